"""``tfidf``: the handcrafted text baseline (did transfer help?) — word 1-2 gram TF-IDF
(sublinear term frequency, L2-normalised rows, the 4,096 most frequent n-grams) fitted on the
job's *training split only* when the job is planned (:func:`fit`), so no validation or test
text shapes its vocabulary. The fitted vocabulary and IDF weights are a JSON file (never a
pickle) named by its sha256, which is the backbone's identity: the train ids, their texts and
the settings all enter the content key through it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import TextPreprocessing, WeightsInfo, file_sha256, register
from pipeline.errors import BackboneError, DataError

NAME = "tfidf"
MAX_FEATURES = 4096
SETTINGS = {"ngram_range": [1, 2], "sublinear_tf": True, "norm": "l2", "lowercase": True,
            "max_features": MAX_FEATURES, "version": 1}
TOKEN = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token pattern


def fit(texts: Sequence[str], out_dir: Path) -> Path:
    """Fit on ``texts`` (the training split) and write ``<sha256>.json`` under ``out_dir``.

    Raises:
        DataError: no training text holds a word of two or more letters.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=MAX_FEATURES,
                          dtype=np.float32)
    try:
        vec.fit(list(texts))
    except ValueError:
        raise DataError("backbone tfidf: the training texts hold no words (empty "
                        "vocabulary); fix: check the text column, or use a pretrained text "
                        "encoder") from None
    vocabulary = {term: int(i) for term, i in sorted(vec.vocabulary_.items())}
    body = json.dumps({"settings": SETTINGS, "fitted_on": len(texts),
                       "vocabulary": vocabulary, "idf": [float(v) for v in vec.idf_]},
                      sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{digest}.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(body)
        tmp.replace(path)
    return path


def _load(path: str) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text())
        assert isinstance(raw["vocabulary"], dict) and len(raw["idf"]) == len(raw["vocabulary"])
        return dict(raw)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise BackboneError(f"tfidf vocabulary {path!r} is missing or damaged; fix: submit the "
                            "job again (tfidf is fitted on the training split when planned)"
                            ) from None


@register(NAME)
def _tfidf(weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    if not weights or Path(weights).suffix != ".json":
        # what compare's early check sees before planning fits the vocabulary
        pre = TextPreprocessing(max_length=512, tokenizer_sha256="unfitted",
                                model_max_length=512, pooling="none", normalize=True)
        info = WeightsInfo("tfidf (fitted on the training split when planned; handcrafted "
                           "baseline)", "unfitted", pre)

        def unfitted() -> Any:
            raise BackboneError("backbone tfidf is fitted on a job's training split when the "
                                "job is planned; fix: submit the job (or use the job's head)")

        return info, unfitted
    digest = file_sha256(weights)
    raw = _load(weights)
    pre = TextPreprocessing(max_length=512, tokenizer_sha256=digest, model_max_length=512,
                            pooling="none", normalize=True)
    info = WeightsInfo(f"tfidf {len(raw['vocabulary'])} n-grams, fitted on "
                       f"{raw['fitted_on']} training texts (handcrafted baseline)", digest, pre)

    def build() -> Any:
        import torch

        vocabulary: dict[str, int] = raw["vocabulary"]
        idf = np.asarray(raw["idf"], np.float32)

        class Tfidf(torch.nn.Module):
            baseline = True
            max_length = 512

            def truncated(self, texts: Sequence[str]) -> int:
                return 0

            def forward(self, texts: Sequence[str]) -> torch.Tensor:
                out = np.zeros((len(texts), len(vocabulary)), np.float32)
                for row, text in enumerate(texts):
                    words = TOKEN.findall(text.lower())
                    counts: dict[int, int] = {}
                    for gram in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
                        j = vocabulary.get(gram)
                        if j is not None:
                            counts[j] = counts.get(j, 0) + 1
                    for j, c in counts.items():
                        out[row, j] = (1 + math.log(c)) * idf[j]
                norms = np.linalg.norm(out, axis=1, keepdims=True)
                return torch.from_numpy(out / np.maximum(norms, 1e-12))

        return Tfidf()

    return info, build
