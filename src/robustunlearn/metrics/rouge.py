"""ROUGE-L via Google's ``rouge-score`` (the package MUSE and TOFU score with).

ROUGE-L compares the longest common subsequence (LCS) of the lower-cased alphanumeric word
tokens: ``precision = LCS / |prediction|``, ``recall = LCS / |reference|``,
``f1 = 2 P R / (P + R)``. MUSE scores without a stemmer, TOFU with the Porter stemmer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from rouge_score.rouge_scorer import RougeScorer

RougeKind = Literal["recall", "f1", "precision"]


@dataclass(frozen=True)
class RougeL:
    precision: float
    recall: float
    f1: float


@lru_cache(maxsize=2)
def _scorer(use_stemmer: bool) -> RougeScorer:
    return RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(reference: str, prediction: str, *, use_stemmer: bool = False) -> RougeL:
    score = _scorer(use_stemmer).score(reference, prediction)["rougeL"]
    return RougeL(score.precision, score.recall, score.fmeasure)


def rouge_l_scores(
    references: Sequence[str], predictions: Sequence[str], kind: RougeKind, *, use_stemmer: bool = False
) -> list[float]:
    """One ROUGE-L value (``kind``: recall, f1 or precision) per reference/prediction pair."""
    if kind not in ("recall", "f1", "precision"):
        raise ValueError(f"unknown ROUGE-L kind {kind!r}; expected 'recall', 'f1' or 'precision'")
    if len(references) != len(predictions):
        raise ValueError(f"got {len(references)} references but {len(predictions)} predictions")
    return [getattr(rouge_l(r, p, use_stemmer=use_stemmer), kind) for r, p in zip(references, predictions)]
