"""Tables read by several sources: Parquet files decoded in bounded batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.sources import MAX_TABLE_BYTES


def read_parquet(path: Path, wanted: Sequence[str] | None
                  ) -> tuple[list[str], list[dict[str, Any]], str]:
    """A Parquet table's rows (only the columns read), decoded in batches and refused once
    they pass MAX_TABLE_BYTES (compression and dictionary encoding can hide 10,000x: the
    file's metadata does not bound what a column decodes to); the columns must hold plain
    values (a list column is never turned into the text of a list)."""
    import pyarrow as pa

    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
    except Exception as exc:
        raise DataError(f"{str(path)!r} is not a readable Parquet file "
                        f"({type(exc).__name__}); fix: write it with pyarrow or pandas") from None
    read = [c for c in (wanted or names) if c in names]
    for c in read:
        t = pf.schema_arrow.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_boolean(t) or pa.types.is_dictionary(t) or pa.types.is_null(t)):
            raise DataError(f"{str(path)!r} column {c!r} holds {t} values, not texts or labels; "
                            "fix: store one string per row (e.g. join a list of strings "
                            "into one text)")
    rows: list[dict[str, Any]] = []
    decoded = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=read):
            decoded += batch.nbytes
            if decoded > MAX_TABLE_BYTES:
                raise DataError(f"{str(path)!r} decodes to more than {MAX_TABLE_BYTES} bytes "
                                f"in the columns read (past row {len(rows)}), over the limit "
                                "of one text table; fix: split it into smaller files, or write "
                                ".tar shards")
            rows.extend(batch.to_pylist())
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{str(path)!r} is not a readable Parquet file "
                        f"({type(exc).__name__}); fix: write it with pyarrow or pandas") from None
    return names, rows, "row"
