"""Audio as a modality: decoding bounded by the header, recorded skips, folder and manifest
sources, the resemblyzer and mfcc backbones, windows pooled per clip, audio signatures, bad
specs refused at planning, a whole job (quality stage, report, predict) through real worker
processes, and the handcrafted baselines (``mfcc``, ``pixels``). The clips are synthesized
here (tests must pass without ``../shared``); FSDD, where present, is used by
``benchmarks/speech.py``."""

from __future__ import annotations

import io
import itertools
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.errors import DataError, SpecError
from pipeline.sources import open_source
from pipeline.spec import DataSpec, JobSpec

PITCH = {"low": 180.0, "mid": 300.0, "high": 480.0}


def tone(label: str, rng: np.random.Generator, rate: int, seconds: float) -> np.ndarray:
    """A voiced-sounding clip: a few harmonics of the class's pitch (jittered), a syllable
    rate envelope, a little noise."""
    t = np.arange(int(rate * seconds)) / rate
    f0 = PITCH[label] * (1 + 0.04 * rng.standard_normal())
    x = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6)) / h for h in (1, 2, 3))
    env = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)
    return (0.25 * x * env + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_clips(root: Path, per_class: int, seed: int = 0) -> Path:
    """root/<label>/<k>.wav|flac at 8, 16 and 22.05 kHz, some stereo, 0.4 to 3 s long."""
    rng = np.random.default_rng(seed)
    for label in PITCH:
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rate = (8000, 16000, 22050)[k % 3]
            x = tone(label, rng, rate, float(rng.uniform(0.4, 3.0)))
            if k % 4 == 0:
                x = np.stack([x, 0.7 * x], axis=1)
            sf.write(root / label / f"{k}.{'flac' if k % 5 == 0 else 'wav'}", x, rate)
    return root


def wav_bytes(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def flac_claiming(seconds_claimed: float) -> bytes:
    """A valid short FLAC whose STREAMINFO declares ``seconds_claimed`` of audio."""
    raw = bytearray(wav_bytes(np.full(1600, 0.1, np.float32), 16000, "FLAC"))
    total = int(seconds_claimed * 16000)
    bits = int.from_bytes(raw[18:26], "big")
    raw[18:26] = ((bits & ~((1 << 36) - 1)) | min(total, (1 << 36) - 1)).to_bytes(8, "big")
    return bytes(raw)


# --- decoding --------------------------------------------------------------------------------


def test_decode_is_mono_float_at_the_files_rate_and_bounded_by_the_header() -> None:
    from pipeline.sources.audio import AudioError, decode_audio

    stereo = np.stack([np.full(800, 0.2), np.full(800, 0.4)], axis=1).astype(np.float32)
    clip = decode_audio(wav_bytes(stereo, 8000, subtype="FLOAT"))
    assert clip.rate == 8000 and clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert np.allclose(clip.samples, 0.3, atol=1e-6) and clip.seconds == pytest.approx(0.1)
    assert decode_audio(flac_claiming(0.1)).rate == 16000  # the patch itself is sound
    bad = {
        "the header declares 4294967 s": flac_claiming(4.3e6),
        "not a readable audio file": b"RIFF\x00\x00\x00\x00WAVEnonsense" + bytes(64),
        "silent": wav_bytes(np.zeros(1600, np.float32), 16000),
        "non-finite": wav_bytes(np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT"),
        "empty audio": wav_bytes(np.zeros(0, np.float32), 16000),
    }
    for expect, raw in bad.items():
        with pytest.raises(AudioError, match=expect):
            decode_audio(raw)
    rate_patched = bytearray(wav_bytes(np.full(1600, 0.1, np.float32), 16000))
    rate_patched[24:28] = struct.pack("<I", 10)  # 10 Hz
    with pytest.raises(AudioError, match="sample rate 10 Hz"):
        decode_audio(bytes(rate_patched))


def test_audiofolder_records_skips_and_keeps_splits(tmp_path: Path) -> None:
    root = write_clips(tmp_path / "clips", per_class=4)
    (root / "low" / "broken.wav").write_bytes(b"RIFF" + bytes(40))
    (root / "mid" / "days.flac").write_bytes(flac_claiming(3 * 86400))
    (root / "high" / "quiet.wav").write_bytes(wav_bytes(np.zeros(800, np.float32), 8000))
    (root / "high" / "notes.txt").write_text("not audio")
    src = open_source(DataSpec(source="audiofolder", path=str(root)))
    assert src.modality == "audio" and src.class_names == ["high", "low", "mid"]
    assert len(src) == 15 and src.predefined_splits() is None
    loaded = src.load(range(len(src)))
    reasons = {src.sample_id(i): why for i, why in loaded.failures}
    assert set(reasons) == {"low/broken.wav", "mid/days.flac", "high/quiet.wav"}, reasons
    assert "not a readable audio file" in reasons["low/broken.wav"]
    assert "the header declares 259200 s" in reasons["mid/days.flac"]
    assert "silent" in reasons["high/quiet.wav"]
    assert len(loaded.images) == 12 and {c.rate for c in loaded.images} == {8000, 16000, 22050}
    split = write_clips(tmp_path / "split" / "train", per_class=3)
    write_clips(tmp_path / "split" / "test", per_class=2, seed=1)
    src = open_source(DataSpec(source="audiofolder", path=str(split.parent)))
    assert {k: len(v) for k, v in src.predefined_splits().items()} == {"train": 9, "test": 6}
    with pytest.raises(DataError, match=r"holds no audio files.*\.wav"):
        (tmp_path / "empty").mkdir()
        open_source(DataSpec(source="audio", path=str(tmp_path / "empty")))


def test_a_manifest_of_clips_is_audio_and_mixed_manifests_are_refused(tmp_path: Path) -> None:
    root = write_clips(tmp_path, per_class=2)
    rows = ["path,label,split", "low/0.flac,a,train", "mid/1.wav,b,train", "high/0.flac,a,test"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.csv")))
    assert src.modality == "audio" and len(src.load([0, 1, 2]).images) == 3
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["low/0.flac", "mid/1.wav"], "label": ["a", "b"],
                             "extra": [1, 2]}), tmp_path / "m.parquet")
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.parquet")))
    assert src.modality == "audio" and src.class_names == ["a", "b"]
    (root / "x.png").write_bytes(b"png")
    (tmp_path / "mixed.csv").write_text("path,label\nlow/0.flac,a\nx.png,b\n")
    with pytest.raises(DataError, match="mixes audio"):
        open_source(DataSpec(source="manifest", path=str(tmp_path / "mixed.csv")))


def test_webdataset_tars_of_clips_are_audio(tmp_path: Path) -> None:
    import tarfile

    rng = np.random.default_rng(2)
    with tarfile.open(tmp_path / "clips-train.tar", "w") as tf:
        for k, label in enumerate(["low", "high", "low", "high"]):
            for name, data in ((f"{k:04d}.flac", wav_bytes(tone(label, rng, 16000, 0.5),
                                                           16000, "FLAC")),
                               (f"{k:04d}.cls", label.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    src = open_source(DataSpec(source="webdataset", path=str(tmp_path / "clips-train.tar")))
    assert src.modality == "audio" and src.class_names == ["high", "low"] and len(src) == 4
    loaded = src.load([0, 1, 2, 3])
    assert not loaded.failures and {c.rate for c in loaded.images} == {16000}


# --- backbones -------------------------------------------------------------------------------


def test_windows_cover_the_clip_and_pad_short_ones() -> None:
    from pipeline.backbones.audio import GE2E_PRE, MFCC_PRE

    rate = GE2E_PRE.sample_rate
    assert GE2E_PRE.windows(rate // 2) == [(0, 25600)]  # 0.5 s: one padded 1.6 s window
    spans = GE2E_PRE.windows(4 * rate)
    assert spans[0] == (0, 25600) and all(b - a == 25600 for a, b in spans)
    assert spans[-1][1] >= 4 * rate - 0.25 * 25600  # the end is covered (75% rule)
    assert {b[0] - a[0] for a, b in itertools.pairwise(spans)} == {12800}
    assert MFCC_PRE.windows(12345) == [(0, 12345)]


def test_resemblyzer_and_mfcc_features(tmp_path: Path) -> None:
    import torch

    from pipeline.backbones import file_sha256, load_backbone, preprocessing_from_dict
    from pipeline.backbones.audio import _package_file
    from pipeline.preprocess import preprocess
    from pipeline.sources.audio import Clip

    rng = np.random.default_rng(0)
    clips = [Clip(tone(lbl, rng, rate, s), rate) for lbl, rate, s in
             (("low", 8000, 0.7), ("low", 22050, 5.0), ("high", 16000, 1.9))]
    speaker = load_backbone("resemblyzer", None)
    assert speaker.weights.sha256 == file_sha256(str(_package_file("resemblyzer",
                                                                    "pretrained.pt")))
    pre = speaker.weights.preprocessing
    assert preprocessing_from_dict(pre.to_dict()) == pre and pre.sample_rate == 16000
    x = preprocess(clips, pre, "cpu")
    assert [len(c) for c in x] == [11200, 80000, 30400]  # resampled to 16 kHz
    with torch.inference_mode():
        e = speaker.model(x).numpy()
        again = speaker.model(x[:1]).numpy()
    assert e.shape == (3, 256) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(e[0], again[0], atol=1e-5)  # a clip's embedding ignores its batch
    assert e[0] @ e[1] > e[0] @ e[2]  # same pitch closer than another
    base = load_backbone("mfcc", None)
    f = base.model(preprocess(clips, base.weights.preprocessing, "cpu")).numpy()
    assert f.shape == (3, 40) and base.parameters == 0 and np.isfinite(f).all()
    assert "baseline" in base.weights.id


def test_audio_signatures_find_copies_and_the_picture_is_a_spectrogram() -> None:
    from pipeline.preprocess import audio_signatures, resample
    from pipeline.quality.probing import near_copy
    from pipeline.reports.quality import spectrogram_picture
    from pipeline.sources.audio import Clip

    rng = np.random.default_rng(3)
    clips = [Clip(tone(lbl, rng, 16000, 1.5), 16000) for lbl in list(PITCH) * 4]
    copies = [near_copy(c, rng) for c in clips]
    a = audio_signatures([c.samples for c in clips]).astype(np.float32)
    b = audio_signatures([resample(c.samples, c.rate, 16000) for c in copies]).astype(
        np.float32)
    same, other = (a * b).sum(1), (a * np.roll(b, 1, axis=0)).sum(1)
    assert np.median(same) > 0.9 and np.median(same) > np.median(other) + 0.05, (same, other)
    pic = spectrogram_picture(clips[0].samples, 16000, side=32)
    assert pic.shape == (32, 64, 3) and pic.dtype == np.uint8 and pic.std() > 10


def _audio_spec(tmp_path: Path, root: Path, **kw: object) -> JobSpec:
    return JobSpec.from_dict({"name": "test-audio", "data": {
        "source": "audiofolder", "path": str(root), "shard_size": 20},
        "backbone": {"name": "mfcc"}, "quality": {"enabled": False},
        "output": str(tmp_path / "out"), "store": str(tmp_path / "out" / "store"), **kw})


def test_bad_audio_specs_are_refused_at_planning(tmp_path: Path) -> None:
    from pipeline.planner import make_plan

    root = write_clips(tmp_path / "clips", per_class=8)
    base = _audio_spec(tmp_path, root)
    cases = [(base.replace(backbone={"name": "efficientnet_lite0"}),
              "the data is audio but backbone 'efficientnet_lite0' reads image.*resemblyzer"),
             (base.replace(backbone={"image_size": 64}), "image_size is not for audio"),
             (base.replace(strategy="finetune"), "'mfcc' is a handcrafted baseline"),
             (base.replace(kind="pretrain"), "pretraining runs on images"),
             (_audio_spec(tmp_path, tmp_path / "digits-like").replace(
                 backbone={"name": "resemblyzer"}), "does not exist")]
    for spec, expect in cases:
        with pytest.raises((SpecError, DataError), match=expect):
            make_plan(spec, "0" * 12)
    images = JobSpec.from_dict({"data": {"source": "digits"}, "backbone": {"name": "mfcc"}})
    with pytest.raises(SpecError, match="the data is image but backbone 'mfcc' reads audio"):
        make_plan(images, "1" * 12)
    a = make_plan(base, "a" * 12)
    b = make_plan(base.replace(backbone={"name": "resemblyzer"}), "b" * 12)
    assert a.strategy == "probe" and a.key != b.key
    assert b.backbone.preprocessing["window_s"] == 1.6  # the window policy is in the plan


# --- a whole job through real workers --------------------------------------------------------


@pytest.mark.integration
def test_audio_job_quality_report_and_predict(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipeline import submit

    root = write_clips(tmp_path / "clips", per_class=14)
    (root / "low" / "broken.wav").write_bytes(b"RIFF" + bytes(40))
    (root / "mid" / "days.flac").write_bytes(flac_claiming(3 * 86400))
    spec = _audio_spec(tmp_path, root, quality={"enabled": True, "folds": 3})
    job = submit(spec, broker=cluster.broker)
    st = job.wait(timeout=300)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = job.result()
    assert rep["metrics"]["top1"] >= 0.9  # three pitches: chance is 0.33
    assert sorted(s["id"] for s in rep["data"]["skipped"]) == ["low/broken.wav",
                                                               "mid/days.flac"]
    assert rep["backbone"]["preprocessing"]["modality"] == "audio"
    assert "label_issues" in rep["quality"] and "duplicates" in rep["quality"]
    html = Path(st["report"]).with_suffix(".html").read_text()
    assert "16 kHz, whole clips" in html
    rng = np.random.default_rng(9)
    sf.write(tmp_path / "new_high.wav", tone("high", rng, 16000, 1.2), 16000)
    sf.write(tmp_path / "new_low.ogg", tone("low", rng, 16000, 1.2), 16000)
    cmd = [sys.executable, "-m", "pipeline", "predict", st["job_dir"],
           str(tmp_path / "new_high.wav"), str(tmp_path / "new_low.ogg"), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert [g["label"] for g in json.loads(out.stdout)] == ["high", "low"]
    flag = subprocess.run([*cmd[:5], "--audio", str(tmp_path / "new_low.ogg"), "--json"],
                          capture_output=True, text=True, timeout=180)
    assert flag.returncode == 0 and json.loads(flag.stdout)[0]["label"] == "low", flag.stderr
    bad = subprocess.run([*cmd[:5], str(root / "low" / "broken.wav")], capture_output=True,
                         text=True, timeout=180)
    assert bad.returncode != 0 and "cannot read audio" in bad.stderr and "fix:" in bad.stderr
    bad = subprocess.run([*cmd[:5], "--text", "hello"], capture_output=True, text=True,
                         timeout=180)
    assert bad.returncode != 0 and "reads audio clips; fix: pass audio files" in bad.stderr
    # the speaker encoder fine-tuned end to end on the engine, then used like any classifier
    ft = spec.replace(name="test-audio-ft", backbone={"name": "resemblyzer"},
                      strategy="finetune", quality={"enabled": False}, finetune={
                          "epochs": 6, "batch_size": 8, "checkpoint_every_steps": 4,
                          "lr": 3e-2, "backbone_lr_mult": 0.03})
    job = submit(ft, broker=cluster.broker)
    st = job.wait(timeout=400)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = job.result()
    assert rep["strategy"] == "finetune" and rep["metrics"]["top1"] >= 0.8, rep["metrics"]
    assert [h["epoch"] for h in rep["train"]["finetune"]["history"]] == list(range(1, 7))
    from pipeline import load_classifier

    clf = load_classifier(st["job_dir"], device="cpu")
    got = clf.predict([str(tmp_path / "new_high.wav"), (tone("low", rng, 8000, 1.0), 8000)])
    assert [g["label"] for g in got] == ["high", "low"], got


def test_the_speech_demo_reads_a_copy_of_fsdd_by_digit_or_speaker(tmp_path: Path) -> None:
    from pipeline.client.speech import find_fsdd, fsdd_manifest
    from pipeline.errors import FeaturefleetError

    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("3_jackson_0.wav", "3_jackson_7.wav", "5_lucas_12.wav", "README.wav"):
        sf.write(rec / name, tone("mid", rng, 8000, 0.5), 8000)
    manifest = fsdd_manifest(str(tmp_path / "fsdd"), tmp_path / "out", "speakers")
    lines = manifest.read_text().splitlines()
    assert lines == ["path,label,split", "recordings/3_jackson_0.wav,jackson,test",
                     "recordings/3_jackson_7.wav,jackson,train",
                     "recordings/5_lucas_12.wav,lucas,train"]
    src = open_source(DataSpec(source="manifest", path=str(manifest)))
    assert src.modality == "audio" and src.class_names == ["jackson", "lucas"]
    digits = fsdd_manifest(str(tmp_path / "fsdd"), tmp_path / "out2", "digits")
    assert digits.read_text().splitlines()[1] == "recordings/3_jackson_0.wav,3,test"
    with pytest.raises(FeaturefleetError, match="holds no FSDD recordings/ folder; fix:"):
        find_fsdd(str(tmp_path / "out" / "nothing"))


def test_handcrafted_baselines_of_images_and_audio(tmp_path: Path) -> None:
    """``pixels`` and ``mfcc`` run through the same plan and shards as any backbone, are
    marked as baselines, and are refused where there is nothing to train."""
    from pipeline.backbones import is_baseline, resolve_weights
    from pipeline.extract import Target, extract_shard
    from pipeline.planner import make_plan
    from pipeline.store.shards import read_shard

    assert is_baseline(resolve_weights("pixels", None).id)
    assert is_baseline(resolve_weights("mfcc", None).id)
    assert not is_baseline(resolve_weights("resemblyzer", None).id)
    spec = JobSpec.from_dict({"data": {"source": "digits", "limit": 120, "shard_size": 200},
                              "backbone": {"name": "pixels"}, "output": str(tmp_path)})
    plan = make_plan(spec, "p" * 12)
    assert plan.strategy == "probe"
    src = open_source(plan.spec.data)
    got = extract_shard(src, list(range(40)), plan.backbone, plan.spec.backbone,
                        Target(str(tmp_path / "s.h5"), plan.key, 0.0))
    shard = read_shard(str(tmp_path / "s.h5"))
    assert got.rows == 40 and shard.features.shape == (40, 256)
    assert np.isfinite(shard.features).all() and shard.features.std() > 0.1
    for bad in (spec.replace(strategy="finetune"), spec.replace(kind="pretrain")):
        with pytest.raises(SpecError, match="handcrafted baseline with nothing to train"):
            make_plan(bad, "q" * 12)


def _tiny_hf_audio(folder: Path, kind: str) -> Path:
    """A randomly initialised, tiny wav2vec2 or Whisper saved with ``save_pretrained`` (the
    real loading code runs on it; pretrained ones download, which this machine cannot)."""
    import transformers as tf

    if kind == "wav2vec2":
        cfg = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                                conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                                num_conv_pos_embedding_groups=2)
        tf.Wav2Vec2Model(cfg).save_pretrained(folder)
        tf.Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(folder)
    else:
        cfg = tf.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                               vocab_size=100, pad_token_id=1, bos_token_id=2, eos_token_id=3,
                               decoder_start_token_id=2, max_target_positions=64)
        tf.WhisperModel(cfg).save_pretrained(folder)
        tf.WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["wav2vec2", "whisper"])
def test_hf_audio_encoders_pool_windows_and_key_their_extractor(tmp_path: Path,
                                                                 kind: str) -> None:
    import torch

    from pipeline.backbones import load_backbone, resolve_weights
    from pipeline.preprocess import preprocess
    from pipeline.sources.audio import Clip

    folder = _tiny_hf_audio(tmp_path / kind, kind)
    name = f"hf:{folder}"
    bb = load_backbone(name, "DEFAULT")
    pre = bb.weights.preprocessing
    assert pre.modality == "audio" and pre.sample_rate == 16000 and pre.extractor_sha256
    assert bb.weights.sha256 not in ("random", "")
    rng = np.random.default_rng(0)
    clips = [Clip(tone("low", rng, 8000, 0.6), 8000), Clip(tone("high", rng, 16000, 23.0), 16000)]
    x = preprocess(clips, pre, "cpu")
    with torch.inference_mode():
        both, alone = bb.model(x).numpy(), bb.model(x[:1]).numpy()
    assert both.shape == (2, 32) and np.isfinite(both).all()
    assert np.allclose(both[0], alone[0], atol=1e-5)  # no padding leaks across a batch
    if kind == "wav2vec2":
        assert len(pre.windows(len(x[1]))) == 3  # 23 s: 10 s + 10 s + the last 3 s
    assert resolve_weights(name, "random").sha256 == "random"
    before = pre.extractor_sha256
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings["do_normalize"] = not settings.get("do_normalize", False)
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    assert resolve_weights(name, "DEFAULT").preprocessing.extractor_sha256 != before
