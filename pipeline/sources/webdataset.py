"""WebDataset-style tar shards: ``<key>.<jpg|png|...>`` + ``<key>.<cls|label|txt>`` members.

``path`` is a tar file, a folder of them, a glob, a brace range (``data-{000..009}.tar``), or an
fsspec URL of any of those (``s3://bucket/data-{000..009}.tar``). Planning streams each tar once
to index its members; an extraction task then reads only its samples' bytes (ranged reads). Tar
names containing ``train``/``val``/``test`` give the splits.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import (
    DIGEST_BYTES,
    MAX_SAMPLE_BYTES,
    SPLIT_NAMES,
    Loaded,
    Source,
    class_index,
    digest_of,
    digest_stream,
    failure,
    register,
)
from pipeline.sources.decode import (
    IMAGE_EXTENSIONS,
    MAX_TEXT_BYTES,
    decode_image,
    decode_text,
    encoded_or_decoded,
)
from pipeline.spec import DataSpec

MAX_TARS = 100_000
COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
              (b"\x28\xb5\x2f\xfd", "zstd"))
LABEL_EXTENSIONS = ("cls", "label", "txt")


class TarSource(Source):
    """``modality: text``: the sample is ``<key>.txt`` and the label ``<key>.cls``/``.label``."""

    def __init__(self, pattern: str, modality: str = "image") -> None:
        self.modality = modality
        text = modality == "text"
        self.limit = MAX_TEXT_BYTES if text else MAX_SAMPLE_BYTES
        from pipeline.sources.audio import AUDIO_EXTENSIONS, is_audio_path

        sample_ext = {".txt"} if text else set(IMAGE_EXTENSIONS) | set(AUDIO_EXTENSIONS)
        label_ext = tuple(e for e in LABEL_EXTENSIONS if not (text and e == "txt"))
        self.urls = expand_tars(pattern)
        self.members: list[tuple[int, str, int, int]] = []  # (tar, name, offset, size)
        self._digests: list[bytes] = []  # of each member's bytes, read while indexing
        raw_labels: list[str] = []
        splits: list[str] = []
        for t, url in enumerate(self.urls):
            groups: dict[str, dict[str, Any]] = {}
            try:
                with open_binary(url) as fh:
                    head = fh.read(6)
                packed = next((kind for magic, kind in COMPRESSED if head.startswith(magic)),
                              None)
                if packed is not None:  # members are read by byte range: never decompressed
                    raise DataError(f"tar shard {url!r} is {packed}-compressed; its samples "
                                    "cannot be read by byte range; fix: store uncompressed "
                                    ".tar shards (WebDataset's convention; compress at the "
                                    "storage level if needed)")
                with open_binary(url) as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        base = m.name.rsplit("/", 1)[-1]
                        key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                        ext = base.split(".", 1)[1].lower() if "." in base else ""
                        g = groups.setdefault(key, {})
                        if "." + ext in sample_ext:
                            g["image"] = (m.name, m.offset_data, m.size)
                            f = tf.extractfile(m)  # digested in chunks: never a whole member
                            g["digest"] = digest_stream(f, self.limit) if f else digest_of(b"")
                        elif ext in label_ext and m.size <= 4096:
                            f = tf.extractfile(m)
                            g["label"] = f.read().decode(errors="replace").strip() if f else ""
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DataError(f"tar shard {url!r} is unreadable ({type(exc).__name__}: {exc})"
                                "; fix: check the file is a complete tar archive") from None
            split = next((s for s in SPLIT_NAMES if s in url.rsplit("/", 1)[-1]), "")
            for _key, g in sorted(groups.items()):
                if "image" in g and g.get("label"):
                    self.members.append((t, *g["image"]))
                    self._digests.append(g["digest"])
                    raw_labels.append(g["label"])
                    splits.append(split)
        audio = [is_audio_path(name) for _t, name, _o, _s in self.members]
        if any(audio) and not all(audio):
            raise DataError(f"{pattern!r} mixes audio ({self.members[audio.index(True)][1]!r})"
                            f" and image samples ({self.members[audio.index(False)][1]!r}); "
                            "fix: one modality per data set")
        if audio and all(audio):
            self.modality = "audio"
        if not self.members:
            member = "<key>.txt" if text else "<key>.jpg (or .png, .wav, .flac)"
            raise DataError(f"no {modality}+label samples in {pattern!r}; fix: store each "
                            f"sample as {member} with <key>.cls holding its label")
        self.class_names, self.labels = class_index(raw_labels)
        self._splits = np.asarray(splits)

    def raw(self, index: int) -> bytes:
        with open_binary(self.urls[self.members[index][0]]) as fh:
            return self.read_member(fh, index)

    def stat(self, index: int) -> bytes:
        t, name, offset, size = self.members[index]
        return f"{self.urls[t]}\0{url_stamp(self.urls[t])}\0{name}\0{offset}\0{size}".encode()

    def digest_table(self, mode: str) -> np.ndarray | None:
        if mode != "content":
            return None
        return np.frombuffer(b"".join(self._digests), np.uint8).reshape(-1, DIGEST_BYTES)

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        found = {s: np.flatnonzero(self._splits == s) for s in SPLIT_NAMES}
        found = {s: v for s, v in found.items() if len(v)}
        return found if "train" in found else None

    def sample_id(self, index: int) -> str:
        t, name, _o, _s = self.members[index]
        return f"{self.urls[t].rsplit('/', 1)[-1]}:{name}"

    def read_member(self, fh: Any, index: int) -> bytes:
        """A member's bytes.

        Raises:
            ValueError: the member is larger than a sample may be (nothing is read).
        """
        _t, _name, offset, size = self.members[index]
        if size > self.limit:
            raise ValueError(f"tar member of {size} bytes, over the {self.limit}-byte limit "
                             "of one sample (not read)")
        fh.seek(offset)
        return bytes(fh.read(size))

    def load_encoded(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        return self.load(indices, min_size, encoded=True)

    def load(self, indices: Sequence[int], min_size: int | None = None,
             encoded: bool = False) -> Loaded:
        from pipeline.sources.audio import decode_audio

        out = Loaded()
        image = encoded_or_decoded if encoded else decode_image
        by_tar: dict[int, list[int]] = {}
        for i in indices:
            by_tar.setdefault(self.members[i][0], []).append(int(i))
        for t, idx in sorted(by_tar.items()):
            with open_binary(self.urls[t]) as fh:
                for i in sorted(idx, key=lambda j: self.members[j][2]):
                    try:
                        raw = self.read_member(fh, i)
                        out.images.append(decode_text(raw) if self.modality == "text"
                                          else decode_audio(raw) if self.modality == "audio"
                                          else image(raw, min_size))
                        out.indices.append(i)
                        out.digests.append(digest_of(raw))
                    except Exception as exc:
                        out.failures.append(failure(i, exc))
        order = {i: n for n, i in enumerate(indices)}  # back to the requested order
        rows = sorted(zip(out.indices, out.images, out.digests, strict=True),
                      key=lambda p: order[p[0]])
        out.indices = [p[0] for p in rows]
        out.images = [p[1] for p in rows]
        out.digests = [p[2] for p in rows]
        return out


def expand_tars(pattern: str) -> list[str]:
    """The tar files a pattern names (brace range, glob, folder, URL)."""
    import glob
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        if hi < lo or hi - lo >= MAX_TARS:
            raise DataError(f"tar range {m.group(0)!r} in {pattern!r} names "
                            f"{max(0, hi - lo + 1)} files; fix: use a range of 1..{MAX_TARS}")
        urls = [pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]
                for i in range(lo, hi + 1)]
    elif "://" in pattern:
        import fsspec

        _fs, _, paths = fsspec.get_fs_token_paths(pattern)
        proto = pattern.split("://", 1)[0]
        urls = sorted(f"{proto}://{p}" for p in paths)
    elif Path(pattern).is_dir():
        urls = sorted(str(p) for p in Path(pattern).glob("*.tar"))
    else:
        urls = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
    if not urls:
        raise DataError(f"no tar shards match {pattern!r}; fix: give a .tar file, a folder of "
                        "them, a glob or a range such as data-{000..009}.tar")
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise DataError(f"tar shard {missing[0]!r} does not exist ({len(missing)} missing); fix: "
                        "check the range in data.path")
    return urls


def open_binary(url: str) -> Any:
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def url_stamp(url: str) -> str:
    if "://" in url:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        return f"{info.get('size')}\0{info.get('ETag') or info.get('mtime') or ''}"
    st = os.stat(url)
    return f"{st.st_size}\0{st.st_mtime_ns}"


@register("webdataset")
def _webdataset(spec: DataSpec) -> Source:
    return TarSource(str(spec.path))
