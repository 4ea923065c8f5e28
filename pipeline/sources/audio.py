"""Audio: ``audiofolder`` (``root/<class>/<clip>``, or ``root/{train,val,test}/<class>/<clip>``),
``audio`` (every clip under a folder, unlabeled: batch prediction);
tables of audio paths are read by ``manifest`` (a table whose paths are all audio files is an
audio source).

A clip is decoded with ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis, AIFF...) to mono
float32 at its own sample rate; the backbone's preprocessing resamples it to the encoder's rate
(:func:`pipeline.preprocess.preprocess`). Bounded like images: the duration the header declares
is checked before anything is decoded (a header claiming hours is a recorded skip, not an
allocation), and at most that many frames are ever read. Corrupt, non-audio, empty, non-finite
and silent clips are recorded skips with the reason.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import Loaded, Source, digest_of, failure, register
from pipeline.sources.decode import read_bytes
from pipeline.sources.folder import FileSource, FolderSource, ImagesSource
from pipeline.spec import DataSpec

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au")
MAX_AUDIO_SECONDS = 600.0  # a longer clip is a recorded skip (cut long recordings into files)
MIN_RATE, MAX_RATE = 1_000, 384_000  # sample rates outside these are not audio anyone records
SILENT_PEAK = 10 ** (-80 / 20)  # -80 dBFS: below this a clip holds nothing to hear


@dataclass(frozen=True)
class Clip:
    """A decoded clip: mono float32 samples in -1..1 at ``rate`` Hz."""

    samples: np.ndarray
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


class AudioError(ValueError):
    """A clip that is not usable; the message is the recorded skip's reason."""


def soundfile_module() -> object:
    """``soundfile``, or the fix when the audio extra is not installed.

    Raises:
        DataError: soundfile is missing.
    """
    try:
        import soundfile
    except (ImportError, OSError) as exc:
        raise DataError(f"audio needs the soundfile package ({type(exc).__name__}: {exc}); "
                        "fix: pip install 'featurefleet[audio]'") from None
    return soundfile


def decode_audio(raw: bytes, max_seconds: float = MAX_AUDIO_SECONDS) -> Clip:
    """Decode an audio file's bytes to a mono float32 :class:`Clip` at its own rate.

    Raises:
        AudioError: not audio soundfile reads, a header claiming more than ``max_seconds``, an
            odd sample rate, no frames, non-finite samples, or silence (peak below -80 dBFS).
    """
    sf = soundfile_module()
    try:
        info = sf.info(io.BytesIO(raw))  # type: ignore[attr-defined]
    except Exception as exc:  # libsndfile: "Format not recognised", "unknown format"...
        raise AudioError(f"not a readable audio file ({' '.join(str(exc).split())[:120]})"
                         ) from None
    rate, frames, channels = int(info.samplerate), int(info.frames), int(info.channels)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
    if channels < 1 or channels > 64:
        raise AudioError(f"{channels} channels (at most 64 are read)")
    if frames <= 0:
        raise AudioError("empty audio (0 frames)")
    if frames / rate > max_seconds:
        raise AudioError(f"the header declares {frames / rate:.0f} s of audio; at most "
                         f"{max_seconds:.0f} s per clip are decoded (cut it into shorter files)")
    try:
        data, _ = sf.read(io.BytesIO(raw), frames=frames, dtype="float32",  # type: ignore[attr-defined]
                          always_2d=True)
    except Exception as exc:
        raise AudioError(f"corrupt audio data ({' '.join(str(exc).split())[:120]})") from None
    if data.shape[0] == 0:
        raise AudioError("empty audio (no frames could be read)")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError("non-finite samples (NaN or infinity in a float file)")
    peak = float(np.abs(mono).max())
    if peak < SILENT_PEAK:
        raise AudioError(f"silent (peak {20 * np.log10(max(peak, 1e-12)):.0f} dBFS, below -80)")
    return Clip(np.ascontiguousarray(mono, dtype=np.float32), rate)


def decode_clips(paths: Sequence[Path], indices: Sequence[int]) -> Loaded:
    """Decode audio files; a file that is not a usable clip is a recorded failure. Each clip's
    digest is of the very bytes it was decoded from."""
    out = Loaded()
    for path, i in zip(paths, indices, strict=True):
        try:
            raw = read_bytes(path)
            out.images.append(decode_audio(raw))
            out.indices.append(int(i))
            out.digests.append(digest_of(raw))
        except DataError:
            raise  # the audio extra is missing: the whole job's problem, not this sample's
        except Exception as exc:
            out.failures.append(failure(i, exc))
    return out


class ClipFiles(FileSource):
    """Audio files under a root folder, decoded to clips."""

    suffixes = AUDIO_EXTENSIONS
    what = "audio"
    plural = "audio files"
    modality = "audio"

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        return decode_clips([self.root / self.files[i] for i in indices], indices)

    def load_encoded(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        return self.load(indices)


class AudioFolderSource(ClipFiles, FolderSource):
    """One subfolder of clips per class, optionally inside train/ val/ test/ folders."""


class AudioFilesSource(ClipFiles, ImagesSource):
    """Every clip under ``root`` (recursively), one class: unlabeled clips (batch
    prediction, embeddings)."""


def is_audio_path(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


@register("audiofolder")
def _audiofolder(spec: DataSpec) -> Source:
    soundfile_module()
    return AudioFolderSource(Path(str(spec.path)))


@register("audio")
def _audio(spec: DataSpec) -> Source:
    soundfile_module()
    return AudioFilesSource(Path(str(spec.path)))
