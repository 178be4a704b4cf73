"""Membership inference: per-example scores and the AUC of members (forget) vs non-members (holdout).

Scores, from the per-token log-probabilities ``l_t = log p(x_t | x_<t)`` of the scored text:

* ``loss``: mean NLL, ``-mean_t l_t`` (Yeom et al., 2018); lower for members.
* ``zlib``: ``loss / len(zlib.compress(text))`` (Carlini et al., 2021; MUSE's ``PPL/zlib``);
  lower for members.
* ``min_k``: Min-K% Prob (Shi et al., 2024), the mean of the lowest ``k`` fraction of ``l_t``;
  higher for members.
* ``min_k_plus_plus``: Min-K%++ (Zhang et al., 2024), the same over the standardised
  ``(l_t - mu_t) / sigma_t`` with ``mu_t = E_{z~p}[log p(z)]`` and
  ``sigma_t^2 = Var_{z~p}[log p(z)]`` under the model's own next-token distribution; higher for members.

Min-K% averages ``max(1, int(k * n))`` tokens of ``n`` (the papers' ``int`` rounding, never empty).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
from sklearn.metrics import roc_auc_score

from robustunlearn.data.base import QA, Passage
from robustunlearn.data.prompts import qa_completion, qa_prompt
from robustunlearn.metrics.likelihood import completion_scores

HIGHER_FOR_MEMBERS = {"loss": False, "zlib": False, "min_k": True, "min_k_plus_plus": True}
_TINY_STD = 1e-12  # a next-token distribution uniform on its support has sigma = 0 and l_t = mu_t


def scored_text(record: Passage | QA) -> tuple[str, str]:
    """``(prompt, scored text)`` as the record is trained (:mod:`robustunlearn.data.collate`): a
    passage's whole text; a QA pair's answer ``qa_completion(answer)`` after ``qa_prompt(question)``.
    The ``eos`` that training appends is not scored."""
    if isinstance(record, Passage):
        return "", record.text
    if isinstance(record, QA):
        return qa_prompt(record.question), qa_completion(record.answer)
    raise TypeError(f"membership inference takes Passage or QA records, got {type(record).__name__}")


def _lowest_mean(values: torch.Tensor, k: float) -> float:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1], got {k}")
    count = max(1, int(k * values.numel()))
    return values.sort().values[:count].mean().item()


def min_k(logprobs: torch.Tensor, k: float = 0.4) -> float:
    """Min-K% Prob: mean of the lowest ``k`` fraction of the token log-probabilities."""
    return _lowest_mean(logprobs, k)


def min_k_plus_plus(logprobs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, k: float = 0.4) -> float:
    """Min-K%++: mean of the lowest ``k`` fraction of ``(logprobs - mean) / std``."""
    return _lowest_mean((logprobs - mean) / std.clamp_min(_TINY_STD), k)


def mia_scores(
    model,
    tokenizer,
    records: Sequence[Passage | QA],
    *,
    k: float = 0.4,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Per-record ``loss``, ``zlib``, ``min_k`` and ``min_k_plus_plus`` (see the module docstring)."""
    if not records:
        raise ValueError("cannot score an empty list of records")
    prompts, texts = zip(*(scored_text(r) for r in records))
    token_scores = completion_scores(
        model, tokenizer, prompts, texts, distribution_stats=True, batch_size=batch_size, progress=progress
    )
    out: dict[str, list[float]] = {name: [] for name in HIGHER_FOR_MEMBERS}
    for text, s in zip(texts, token_scores):
        out["loss"].append(s.nll)
        out["zlib"].append(s.nll / len(zlib.compress(text.encode("utf-8"))))
        out["min_k"].append(min_k(s.logprobs, k))
        out["min_k_plus_plus"].append(min_k_plus_plus(s.logprobs, s.mean, s.std, k))
    return out


def mia_aucs(members: Mapping[str, Sequence[float]], nonmembers: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``{"auc_<score>": ROC AUC}`` for every score in both mappings, oriented so that 1 means
    members are perfectly detected and 0.5 means chance (``loss`` and ``zlib`` are negated)."""
    aucs = {}
    for name, higher_for_members in HIGHER_FOR_MEMBERS.items():
        if name not in members or name not in nonmembers:
            continue
        if not members[name] or not nonmembers[name]:
            counts = f"{len(members[name])} members and {len(nonmembers[name])} non-members"
            raise ValueError(f"the AUC of {name!r} needs both members and non-members; got {counts}")
        sign = 1.0 if higher_for_members else -1.0
        values = [sign * v for v in [*members[name], *nonmembers[name]]]
        labels = [1] * len(members[name]) + [0] * len(nonmembers[name])
        aucs[f"auc_{name}"] = float(roc_auc_score(labels, values))
    return aucs


def mia_suite(
    model,
    tokenizer,
    members: Sequence[Passage | QA],
    nonmembers: Sequence[Passage | QA],
    *,
    k: float = 0.4,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, float]:
    """AUCs of the four scores for ``members`` (the forget set) vs ``nonmembers`` (holdout):
    ``auc_loss``, ``auc_zlib``, ``auc_min_k``, ``auc_min_k_plus_plus`` (> 0.5: members detected).
    ``auc_min_k`` with ``k = 0.4`` is the input of :func:`robustunlearn.metrics.muse.privleak`."""
    options = {"k": k, "batch_size": batch_size, "progress": progress}
    return mia_aucs(
        mia_scores(model, tokenizer, members, **options), mia_scores(model, tokenizer, nonmembers, **options)
    )
