"""Audio backbones: a frozen encoder over fixed windows of a clip, mean-pooled per clip.

``resemblyzer`` is the offline pretrained encoder: the GE2E speaker encoder (3-layer LSTM over
40 mel bands, 256-d, 16 kHz) whose weights ship inside the ``resemblyzer`` PyPI package; it is
a *speaker* encoder (who speaks, not what is said). Clips are cut into 1.6 s windows every
0.8 s (resemblyzer's partial utterances), each embedded, the mean L2-normalised.

``mfcc`` is the handcrafted baseline every audio comparison needs (did transfer help?): 20 MFCCs
per 10 ms frame, their mean and standard deviation over the clip (40-d); no weights, its
identity is its settings and librosa's version.

The network takes a list of clips (mono float32 arrays at the preprocessing's rate, resampled by
:func:`pipeline.preprocess.preprocess`), as a text backbone takes a list of strings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import (
    AudioPreprocessing,
    WeightsInfo,
    file_sha256,
    register,
)
from pipeline.errors import BackboneError

SPEAKER = "resemblyzer"
MFCC = "mfcc"
MEL_HOP = 160  # samples at 16 kHz: 10 ms frames
MEL_FFT = 400  # 25 ms
GE2E_FRAMES = 160  # 1.6 s partial utterances
GE2E_PRE = AudioPreprocessing(sample_rate=16_000, window_s=1.6, hop_s=0.8, min_coverage=0.75,
                              gain_dbfs=-30.0)
MFCC_PRE = AudioPreprocessing(sample_rate=16_000, window_s=0.0, hop_s=0.0, gain_dbfs=None)


def librosa_module() -> Any:
    """``librosa``, or the fix when the audio extra is not installed.

    Raises:
        BackboneError: librosa is missing.
    """
    try:
        import librosa
    except ImportError:
        raise BackboneError("audio backbones need librosa; fix: pip install "
                            "'featurefleet[audio]'") from None
    return librosa


def raise_gain(x: np.ndarray, target_dbfs: float | None) -> np.ndarray:
    """``x`` scaled up to an RMS of ``target_dbfs`` when quieter (never down)."""
    if target_dbfs is None:
        return x
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms <= 0:
        return x
    change = target_dbfs - 20 * np.log10(rms)
    return x if change <= 0 else (x * 10 ** (change / 20)).astype(np.float32)


def mel_power(x: np.ndarray, rate: int = 16_000, n_mels: int = 40) -> np.ndarray:
    """(frames, n_mels) mel power spectrogram, 25 ms windows every 10 ms (not log: the GE2E
    encoder was trained on power)."""
    librosa = librosa_module()
    m = librosa.feature.melspectrogram(y=x, sr=rate, n_fft=MEL_FFT, hop_length=MEL_HOP,
                                       n_mels=n_mels)
    return np.ascontiguousarray(m.T, dtype=np.float32)


def _ge2e_net() -> Any:
    import torch

    class GE2E(torch.nn.Module):
        """The GE2E speaker encoder: LSTM(40 -> 256, 3 layers), linear, ReLU, L2 norm."""

        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
            self.linear = torch.nn.Linear(256, 256)

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(mels)
            e = torch.relu(self.linear(hidden[-1]))
            out: torch.Tensor = e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)
            return out

    return GE2E()


def _window_encoder(net: Any, pre: AudioPreprocessing) -> Any:
    import torch

    class WindowEncoder(torch.nn.Module):
        """Clips -> windows (mel frames) -> the net on every window at once -> each clip's
        mean window embedding, L2-normalised."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.pre = pre

        def forward(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
            device = next(self.net.parameters()).device
            rows, owner = [], []
            for k, clip in enumerate(clips):
                x = raise_gain(np.asarray(clip, np.float32), self.pre.gain_dbfs)
                spans = self.pre.windows(len(x))
                end = spans[-1][1]
                if end > len(x):
                    x = np.pad(x, (0, end - len(x)))
                mel = mel_power(x, self.pre.sample_rate)
                for start, _ in spans:
                    f0 = start // MEL_HOP
                    part = mel[f0: f0 + GE2E_FRAMES]
                    if len(part) < GE2E_FRAMES:
                        part = np.pad(part, ((0, GE2E_FRAMES - len(part)), (0, 0)))
                    rows.append(part)
                    owner.append(k)
            emb = self.net(torch.from_numpy(np.stack(rows)).to(device))
            index = torch.as_tensor(owner, device=emb.device)
            pooled = torch.zeros(len(clips), emb.shape[1], device=emb.device, dtype=emb.dtype)
            pooled.index_add_(0, index, emb)
            out: torch.Tensor = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-8)
            return out

    return WindowEncoder()


def _package_file(package: str, name: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # where it is installed: not imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


@register(SPEAKER)
def _resemblyzer(weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    if weights == "random":  # the architecture untrained: a baseline for the weights
        return WeightsInfo("random", "random", GE2E_PRE), lambda: _window_encoder(
            _ge2e_net(), GE2E_PRE)
    found: Path | None
    if weights not in (None, "DEFAULT", "pretrained"):
        found = Path(str(weights))
        if not found.is_file():
            raise BackboneError(f"weights file {weights!r} does not exist; fix: leave "
                                "backbone.weights out (resemblyzer's own), or give a saved "
                                "GE2E checkpoint")
    else:
        found = _package_file("resemblyzer", "pretrained.pt")
        if found is None:
            raise BackboneError("resemblyzer is not installed; fix: pip install "
                                "'featurefleet[audio]'")
    path: Path = found
    librosa_module()
    digest = file_sha256(str(path))
    info = WeightsInfo(id=f"resemblyzer GE2E ({path.name})", sha256=digest,
                       preprocessing=GE2E_PRE)

    def build() -> Any:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneError(f"weights file {str(path)!r} is not a torch checkpoint "
                                f"({type(exc).__name__}); fix: use resemblyzer's "
                                "pretrained.pt or a checkpoint saved like it") from None
        state = state.get("model_state", state) if isinstance(state, dict) else state
        net = _ge2e_net()
        try:
            net.load_state_dict({k: v for k, v in state.items()
                                 if k.startswith(("lstm.", "linear."))}, strict=True)
        except (RuntimeError, AttributeError) as exc:
            raise BackboneError(f"weights file {str(path)!r} does not fit the GE2E encoder "
                                f"({str(exc).splitlines()[0][:160]}); fix: use resemblyzer's "
                                "pretrained.pt") from None
        return _window_encoder(net, GE2E_PRE)

    return info, build


def mfcc_features(x: np.ndarray, rate: int = 16_000, n_mfcc: int = 20) -> np.ndarray:
    """A clip's MFCC mean and standard deviation over its 10 ms frames (``2 * n_mfcc``)."""
    librosa = librosa_module()
    m = librosa.feature.mfcc(y=np.asarray(x, np.float32), sr=rate, n_mfcc=n_mfcc,
                             n_fft=MEL_FFT, hop_length=MEL_HOP, n_mels=40)
    return np.concatenate([m.mean(axis=1), m.std(axis=1)]).astype(np.float32)


@register(MFCC)
def _mfcc(weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    if weights not in (None, "DEFAULT", "none"):
        raise BackboneError(f"backbone mfcc has no weights (got {weights!r}); fix: leave "
                            "backbone.weights out")
    librosa = librosa_module()
    settings = {"n_mfcc": 20, "n_fft": MEL_FFT, "hop": MEL_HOP, "n_mels": 40,
                "pool": "mean+std", "librosa": librosa.__version__}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    info = WeightsInfo(id="mfcc-20 mean+std (handcrafted baseline)", sha256=digest,
                       preprocessing=MFCC_PRE)

    def build() -> Any:
        import torch

        class Mfcc(torch.nn.Module):
            baseline = True

            def forward(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
                return torch.from_numpy(np.stack([mfcc_features(c) for c in clips]))

        return Mfcc()

    return info, build


# --- Hugging Face audio encoders: hf:<folder> of wav2vec2 / HuBERT / WavLM / Whisper ... -----

HF_AUDIO_TYPES = ("wav2vec2", "hubert", "wavlm", "whisper", "data2vec-audio", "unispeech",
                  "unispeech-sat", "audio-spectrogram-transformer", "sew", "sew-d")
HF_AUDIO_WINDOW_S = 10.0  # wav2vec2-style encoders: 10 s windows every 10 s, unpadded
WHISPER_FRAME_S = 0.02  # a Whisper encoder frame is 20 ms


def is_audio_folder(folder: Path, config: dict[str, Any]) -> bool:
    """A Hugging Face folder holding an audio encoder (its feature extractor reads waveforms)."""
    pre = _read_json(folder / "preprocessor_config.json")
    kind = str((pre or {}).get("feature_extractor_type", ""))
    reads_waves = isinstance(pre, dict) and "sampling_rate" in pre and not kind.endswith(
        "ImageProcessor")
    return reads_waves or config.get("model_type") in HF_AUDIO_TYPES


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def hf_audio_factory(folder: Path, model_id: str, weights: str | None,
                     weights_sha256: str) -> tuple[WeightsInfo, Callable[[], Any]]:
    """An audio encoder saved with ``save_pretrained`` (its feature extractor beside it):
    clips resampled to the extractor's rate, cut into 10 s windows (30 s for Whisper, the
    padding it needs ignored), the encoder's last hidden states mean-pooled over time and
    windows. The extractor's settings are part of the preprocessing (the content key).

    Raises:
        BackboneError: no feature extractor settings, or weights other than DEFAULT/random.
    """
    name = f"hf:{folder}"
    settings = _read_json(folder / "preprocessor_config.json")
    if not isinstance(settings, dict) or "sampling_rate" not in settings:
        raise BackboneError(f"backbone {name!r}: no preprocessor_config.json with a "
                            "sampling_rate; fix: save the feature extractor beside the model "
                            "(feature_extractor.save_pretrained(folder))")
    if weights not in (None, "random", "DEFAULT"):
        raise BackboneError(f"unknown weights {weights!r} for audio backbone {model_id}; fix: "
                            "use DEFAULT (the folder's weights) or random")
    config = _read_json(folder / "config.json") or {}
    whisper = config.get("model_type") == "whisper"
    window = 30.0 if whisper else HF_AUDIO_WINDOW_S
    pre = AudioPreprocessing(
        sample_rate=int(settings["sampling_rate"]), window_s=window, hop_s=window,
        min_coverage=0.25, pooling="mean-unpadded",
        extractor_sha256=hashlib.sha256(json.dumps(settings, sort_keys=True).encode()
                                        ).hexdigest())
    random_init = weights in (None, "random")
    info = WeightsInfo("random", "random", pre) if random_init else WeightsInfo(
        model_id, weights_sha256, pre)

    def build() -> Any:
        try:
            from transformers import AutoConfig, AutoFeatureExtractor, AutoModel
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            extractor = AutoFeatureExtractor.from_pretrained(str(folder))
            model = (AutoModel.from_config(AutoConfig.from_pretrained(str(folder)))
                     if random_init else AutoModel.from_pretrained(str(folder)))
        except ImportError:
            raise BackboneError("hf: audio encoders need transformers; fix: pip install "
                                "transformers") from None
        except Exception as exc:
            raise BackboneError(f"backbone {name!r}: cannot load the audio encoder in "
                                f"{str(folder)!r} ({type(exc).__name__}: {str(exc)[:160]}); "
                                "fix: pass a folder saved with save_pretrained") from None
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        return _hf_audio_encoder(model, extractor, pre, whisper)

    return info, build


def _hf_audio_encoder(model: Any, extractor: Any, pre: AudioPreprocessing,
                      whisper: bool) -> Any:
    import torch

    class HfAudioEncoder(torch.nn.Module):
        """Windows of equal length in one batch each; last hidden states mean-pooled over the
        frames that hold audio, then over a clip's windows."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = model
            self.__dict__["extractor"] = extractor  # not a module: not saved, not moved
            self.extractor: Any

        def _embed(self, windows: list[np.ndarray]) -> torch.Tensor:
            device = next(self.encoder.parameters()).device
            enc = self.extractor(windows, sampling_rate=pre.sample_rate, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in enc.items()
                      if k in ("input_values", "input_features")}
            hidden = self.encoder(**inputs).last_hidden_state
            if whisper:  # the extractor pads to 30 s: keep the frames that hold the audio
                keep = max(1, int(np.ceil(len(windows[0]) / pre.sample_rate / WHISPER_FRAME_S)))
                hidden = hidden[:, :keep]
            out: torch.Tensor = hidden.float().mean(dim=1)
            return out

        def forward(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
            owner: list[int] = []
            parts: list[np.ndarray] = []
            for k, clip in enumerate(clips):
                x = np.asarray(clip, np.float32)
                for a, b in pre.windows(len(x)):
                    parts.append(x[a:b])
                    owner.append(k)
            rows: list[torch.Tensor | None] = [None] * len(parts)
            by_length: dict[int, list[int]] = {}
            for i, p in enumerate(parts):
                by_length.setdefault(len(p), []).append(i)
            for ids in by_length.values():  # equal lengths: no padding inside a batch
                emb = self._embed([parts[i] for i in ids])
                for i, e in zip(ids, emb, strict=True):
                    rows[i] = e
            stacked = torch.stack([r for r in rows if r is not None])
            index = torch.as_tensor(owner, device=stacked.device)
            pooled = torch.zeros(len(clips), stacked.shape[1], device=stacked.device)
            pooled.index_add_(0, index, stacked)
            counts = torch.bincount(index, minlength=len(clips)).clamp_min(1).unsqueeze(1)
            out: torch.Tensor = pooled / counts
            return out

    return HfAudioEncoder()
