"""The speech demo's data: the Free Spoken Digit Dataset (FSDD: 3,000 recordings of the digits
0-9, 6 speakers x 50 takes, 8 kHz; Zohar Jackson et al., CC BY-SA 4.0) as a manifest labelled
by digit or by speaker, split as the data set's authors do (takes 0-4: test).

Where it comes from: ``--path`` (a copy of the data set: a folder holding ``recordings/``), else
a developer checkout's ``../shared/data/fsdd``, else a download of the public repository."""

from __future__ import annotations

import csv
import io
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

from pipeline.errors import FeaturefleetError

FSDD_ZIP = ("https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/heads/"
            "master.zip")
NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
CREDIT = "Free Spoken Digit Dataset (FSDD), Zohar Jackson et al., CC BY-SA 4.0"


def find_fsdd(path: str | None) -> Path | None:
    """The folder holding ``recordings/`` (``path``, or a developer checkout's shared copy)."""
    candidates = [Path(path).expanduser()] if path else [
        Path.cwd().parent / "shared" / "data" / "fsdd",
        Path(__file__).resolve().parents[3] / "shared" / "data" / "fsdd"]
    for c in candidates:
        for folder in (c, c / "free-spoken-digit-dataset-master"):
            if (folder / "recordings").is_dir():
                return folder
    if path:
        raise FeaturefleetError(f"{path!r} holds no FSDD recordings/ folder; fix: pass the "
                                "folder of a copy of free-spoken-digit-dataset")
    return None


def download_fsdd(dest: Path) -> Path:
    """Download the data set's repository (about 24 MB) and unpack its recordings.

    Raises:
        FeaturefleetError: no internet (with the fix: ``--path``).
    """
    print(f"featurefleet demo: downloading the {CREDIT} (~24 MB)", flush=True)
    try:
        with urllib.request.urlopen(FSDD_ZIP, timeout=60) as resp:
            blob = resp.read(200 << 20)
    except OSError as exc:
        raise FeaturefleetError(f"cannot download FSDD ({type(exc).__name__}: {exc}); fix: "
                                "pass --path to a copy of free-spoken-digit-dataset") from None
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for member in z.namelist():
            name = Path(member).name
            if "/recordings/" in member and NAME.match(name):
                (dest / "recordings").mkdir(parents=True, exist_ok=True)
                (dest / "recordings" / name).write_bytes(z.read(member))
    return dest


def fsdd_manifest(path: str | None, out: Path, task: str) -> Path:
    """``out/fsdd.csv``: every recording (copied under ``out/recordings``), labelled by
    ``task`` (``digits`` or ``speakers``), takes 0-4 in the test split."""
    out.mkdir(parents=True, exist_ok=True)
    source = find_fsdd(path)
    if source is None:
        source = download_fsdd(out)
    rows = []
    (out / "recordings").mkdir(exist_ok=True)
    for wav in sorted((source / "recordings").glob("*.wav")):
        m = NAME.match(wav.name)
        if not m:
            continue
        copy = out / "recordings" / wav.name
        if not copy.exists():
            shutil.copyfile(wav, copy)
        label = m.group(1) if task == "digits" else m.group(2)
        rows.append((f"recordings/{wav.name}", label, "test" if int(m.group(3)) < 5 else "train"))
    if not rows:
        raise FeaturefleetError(f"no FSDD recordings (<digit>_<speaker>_<take>.wav) in "
                                f"{str(source / 'recordings')!r}; fix: pass --path to a copy of "
                                "free-spoken-digit-dataset")
    manifest = out / "fsdd.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return manifest
