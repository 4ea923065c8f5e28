"""What the planner does for a recommendation job (``kind: recommend``): names every item of
the items source, reads the interactions table in bounded batches (only the columns named,
every id mapped to an integer as it streams), records what it leaves out, and splits the
interactions for an evaluation that cannot leak: cold items (every interaction held out),
then the last interactions by time (one cut for everybody: nothing after it is trained on)
or a random share of each user's.

The result is ``interactions.npz`` in the job folder: ``user``, ``item`` (the item's sample
index), ``part`` (0 train, 1 warm test, 2 cold test), ``user_names``; and a summary for the
plan and the report."""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import Source
from pipeline.spec import JobSpec, RecommendSpec

TRAIN, WARM, COLD = 0, 1, 2
BATCH = 1 << 16
MAX_JSONL_BYTES = 2 << 30
LISTED = 20


def item_names(source: Source, spec: JobSpec) -> list[str]:
    """Every item's name, by sample index: a table's ``items_id_column`` (the rows the source
    kept, matched by their row number), else the sample's path without its extension.

    Raises:
        DataError: the items table lacks the column, or names one item twice.
    """
    from pipeline.sources.text import TextTable, read_table

    col = spec.recommend.items_id_column or spec.recommend.item_column
    if isinstance(source, TextTable) and source.files is None and spec.data.path:
        path = Path(spec.data.path).expanduser()
        columns, rows, _ = read_table(path, [col, spec.data.text_column])
        if col not in columns:
            raise DataError(f"the items table {str(path)!r} has no column {col!r} (its "
                            f"columns: {', '.join(map(str, columns))[:120]}); fix: set "
                            "recommend.items_id_column to the column that names each item")
        names = []
        for i in range(len(source.labels)):
            row = rows[int(source.sample_id(i).rsplit(" ", 1)[1]) - 1]
            names.append(_id(row.get(col), col, f"items table {source.sample_id(i)}"))
    else:
        names = [str(Path(source.sample_id(i)).with_suffix("")) for i in range(len(source))]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(f"item {name!r} appears twice in the items ({source.sample_id(i)} "
                            f"and {source.sample_id(seen[name])}); fix: one row per item")
        seen[name] = i
    return names


def _id(value: Any, column: str, where: str) -> str:
    """An id cell as text: strings and integers (integral floats, as a CSV reader may give
    them, count as integers); anything else is refused by name."""
    if isinstance(value, (bool, list, dict, bytes)):
        raise DataError(f"{where}: {column!r} is {value!r}, not a string or integer id; fix: "
                        "give every row a string or integer id")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise DataError(f"{where}: {column!r} is {value!r}, not a string or integer id; "
                            "fix: give every row a string or integer id")
        return str(int(value))
    return "" if value is None else str(value).strip()


def _batches(path: Path, columns: list[str]) -> Iterator[dict[str, list[Any]]]:
    """The table's ``columns`` (those present) in batches of rows, bounded in memory."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            have = [c for c in columns if c in pf.schema_arrow.names]
            for b in pf.iter_batches(batch_size=BATCH, columns=have):
                yield b.to_pydict()
        elif suffix in (".jsonl", ".ndjson", ".json"):
            import pyarrow.json as pj

            if path.stat().st_size > MAX_JSONL_BYTES:
                raise DataError(f"{str(path)!r} is over {MAX_JSONL_BYTES >> 30} GiB of JSON "
                                "lines; fix: write large interaction tables as CSV or Parquet")
            table = pj.read_json(path)
            have = [c for c in columns if c in table.column_names]
            for b in table.select(have).to_batches(max_chunksize=BATCH):
                yield b.to_pydict()
        else:
            import pyarrow as pa
            import pyarrow.csv as pc

            probe = pc.open_csv(path, parse_options=pc.ParseOptions(
                delimiter="\t" if suffix == ".tsv" else ","))
            have = [c for c in columns if c in probe.schema.names]
            types = {c: pa.string() for c in have}  # ids stay as written (no 007 -> 7)
            reader = pc.open_csv(path, parse_options=pc.ParseOptions(
                delimiter="\t" if suffix == ".tsv" else ","), convert_options=pc.ConvertOptions(
                include_columns=have, column_types=types))
            for b in reader:
                yield b.to_pydict()
    except DataError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"the interactions table {str(path)!r} is not readable "
                        f"({type(exc).__name__}: {str(exc)[:120]}); fix: a CSV, JSONL or "
                        "Parquet table with a header naming user and item columns") from None
    except Exception as exc:  # pyarrow's own errors (ArrowInvalid...) are ValueErrors mostly
        raise DataError(f"the interactions table {str(path)!r} is not readable "
                        f"({type(exc).__name__}); fix: a CSV, JSONL or Parquet table with a "
                        "header naming user and item columns") from None


def _times(values: list[Any], column: str, path: Path) -> np.ndarray:
    """Seconds (numbers as they are; ISO dates parsed); an unreadable time is refused."""
    out = np.empty(len(values), np.float64)
    for n, v in enumerate(values):
        try:
            out[n] = float(v)
        except (TypeError, ValueError):
            try:
                import datetime as dt

                out[n] = dt.datetime.fromisoformat(str(v)).timestamp()
            except ValueError:
                raise DataError(f"the interactions table {str(path)!r}: {column!r} is {v!r}, "
                                "not a time; fix: use numbers (e.g. Unix seconds) or ISO "
                                "dates, or split: random") from None
    return out


def read(spec: JobSpec, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The interactions as arrays (user code, item index, time or NaN) and what was left out.

    Raises:
        DataError: no table, no user/item column, ids that are not strings or integers, a
            table over ``recommend.max_interactions`` rows, nothing left to train on.
    """
    cfg: RecommendSpec = spec.recommend
    if not cfg.interactions:
        raise DataError("kind: recommend needs an interactions table; fix: set "
                        "recommend.interactions to a CSV/JSONL/Parquet file of user,item rows")
    path = Path(cfg.interactions).expanduser()
    if not path.is_file():
        raise DataError(f"recommend.interactions {str(path)!r} does not exist; fix: name the "
                        "interactions table (user,item[,rating][,timestamp] rows)")
    wanted = [cfg.user_column, cfg.item_column, cfg.time_column,
              *([cfg.rating_column] if cfg.rating_column else [])]
    index = {n: i for i, n in enumerate(names)}
    users: dict[str, int] = {}
    u_out, i_out, t_out = array("i"), array("i"), array("d")  # 16 bytes a row
    rows = 0
    left = {"unknown_item": 0, "missing_id": 0, "below_min_rating": 0}
    unknown: list[str] = []
    has_time = False
    first = True
    for batch in _batches(path, wanted):
        if first:
            for need in (cfg.user_column, cfg.item_column):
                if need not in batch:
                    raise DataError(f"the interactions table {str(path)!r} has no column "
                                    f"{need!r}; fix: set recommend.user_column / item_column "
                                    "to its user and item columns")
            if cfg.rating_column and cfg.rating_column not in batch:
                raise DataError(f"the interactions table {str(path)!r} has no column "
                                f"{cfg.rating_column!r}; fix: set recommend.rating_column to "
                                "its rating column, or leave it out")
            has_time = cfg.time_column in batch
            if cfg.split == "time" and not has_time:
                raise DataError(f"split: time, but the interactions table {str(path)!r} has "
                                f"no column {cfg.time_column!r}; fix: set "
                                "recommend.time_column, or split: random")
            first = False
        n = len(batch[cfg.user_column])
        rows += n
        if rows > cfg.max_interactions:
            raise DataError(f"the interactions table {str(path)!r} has more than "
                            f"{cfg.max_interactions:,} rows (recommend.max_interactions); fix: "
                            "sample it (e.g. the most recent rows), or raise the limit")
        times = _times(batch[cfg.time_column], cfg.time_column, path) if has_time \
            else np.full(n, np.nan)
        ratings = batch.get(cfg.rating_column) if cfg.rating_column else None
        for r in range(n):
            where = f"interactions row {rows - n + r + 1}"
            uid = _id(batch[cfg.user_column][r], cfg.user_column, where)
            iid = _id(batch[cfg.item_column][r], cfg.item_column, where)
            if not uid or not iid:
                left["missing_id"] += 1
                continue
            if ratings is not None and cfg.min_rating is not None:
                try:
                    if float(ratings[r]) < cfg.min_rating:
                        left["below_min_rating"] += 1
                        continue
                except (TypeError, ValueError):
                    raise DataError(f"{where}: {cfg.rating_column!r} is {ratings[r]!r}, not a "
                                    "number; fix: numeric ratings, or leave "
                                    "recommend.rating_column out") from None
            i = index.get(iid)
            if i is None:
                left["unknown_item"] += 1
                if len(unknown) < LISTED:
                    unknown.append(iid)
                continue
            u_out.append(users.setdefault(uid, len(users)))
            i_out.append(i)
            t_out.append(times[r])
    if first:
        raise DataError(f"the interactions table {str(path)!r} has no rows; fix: one row per "
                        "interaction (user,item)")
    user = np.frombuffer(u_out, np.int32).copy()
    item = np.frombuffer(i_out, np.int32).copy()
    time = np.frombuffer(t_out, np.float64).copy()
    # duplicates (the same user and item again): one positive, the earliest time kept
    order = np.lexsort((time, item, user))
    user, item, time = user[order], item[order], time[order]
    keep = np.ones(len(user), bool)
    keep[1:] = (user[1:] != user[:-1]) | (item[1:] != item[:-1])
    left["duplicate"] = int((~keep).sum())
    user, item, time = user[keep], item[keep], time[keep]
    if len(user) == 0:
        raise DataError(f"no interaction of {str(path)!r} names an item of the items source "
                        f"(e.g. {', '.join(unknown[:3]) or 'none'}); fix: the item column must "
                        "hold the items' ids (recommend.item_column)")
    arrays: dict[str, np.ndarray] = {"user": user, "item": item, "time": time,
              "user_names": np.asarray(sorted(users, key=users.__getitem__), dtype=str)}
    return arrays, {"rows": rows, "kept": len(user), "users": len(users),
                    "items_with_interactions": len(np.unique(item)),
                    "has_time": has_time, "left_out": left, "unknown_items": unknown}


def split(arrays: dict[str, np.ndarray], n_items: int, cfg: RecommendSpec,
          seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``part`` of every interaction (0 train, 1 warm test, 2 cold test) and a summary.
    ``time``: one cut at the (1 - test_fraction) quantile of the warm interactions' times —
    nothing at or after it is trained on; ``random``: that share of each user's warm
    interactions. A user with one warm interaction only trains."""
    user, item, time = arrays["user"], arrays["item"], arrays["time"]
    rng = np.random.default_rng(seed)
    mode = cfg.split if cfg.split != "auto" else (
        "time" if np.isfinite(time).all() and len(time) else "random")
    present = np.unique(item)
    cold_items = rng.permutation(present)[:round(cfg.cold_fraction * len(present))]
    cold = np.zeros(n_items, bool)
    cold[cold_items] = True
    part = np.where(cold[item], COLD, TRAIN).astype(np.int8)
    warm = part == TRAIN
    counts = np.bincount(user[warm], minlength=int(user.max()) + 1)
    if mode == "time":
        cut = float(np.quantile(time[warm], 1 - cfg.test_fraction))
        part[warm & (time >= cut)] = WARM
        extra: dict[str, Any] = {"cut_time": cut}
    else:
        draw = rng.random(len(user))
        part[warm & (draw < cfg.test_fraction) & (counts[user] >= 2)] = WARM
        extra = {}
    trained = np.bincount(user[part == TRAIN], minlength=len(counts))
    return part, {
        "split": mode, "cold_items": int(cold.sum()), "warm_items": int(len(present) -
                                                                        cold.sum()),
        "train": int((part == TRAIN).sum()), "warm_test": int((part == WARM).sum()),
        "cold_test": int((part == COLD).sum()),
        "one_interaction_users": int((counts == 1).sum()),
        "users_without_training": int((trained == 0).sum()), **extra}


def prepare(source: Source, spec: JobSpec, job_dir: Path) -> dict[str, Any]:
    """Item names, interactions read and split, written to ``job_dir/interactions.npz``;
    the summary the plan and report carry.

    Raises:
        DataError: see :func:`read`; or nothing left to train on after the split.
    """
    from pipeline.fsio import atomic_path, atomic_write_text

    names = item_names(source, spec)
    arrays, summary = read(spec, names)
    part, parts = split(arrays, len(names), spec.recommend, spec.data.seed)
    if parts["train"] == 0:
        raise DataError("every interaction was held out for evaluation; fix: lower "
                        "recommend.test_fraction / cold_fraction, or add interactions")
    job_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(job_dir / "interactions.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, user=arrays["user"], item=arrays["item"], part=part,
                 user_names=arrays["user_names"], item_names=np.asarray(names, dtype=str))
    out = {**summary, **parts, "simulated": "SIMULATED" in Path(
        str(spec.recommend.interactions)).name.upper()}
    atomic_write_text(job_dir / "interactions.json", json.dumps(out, indent=2))
    return out
