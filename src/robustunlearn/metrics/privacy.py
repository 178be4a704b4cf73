"""Membership inference on a benchmark and MUSE's PrivLeak, with the reference it is measured against.

:func:`membership_sets` picks a benchmark's members and non-members: texts the model was trained
on (the forget set) and texts of the same distribution it never saw (holdout):

* MUSE: its PrivLeak texts, ``privleak/forget`` vs ``privleak/holdout``
  (:func:`robustunlearn.data.muse.privleak_sets`);
* any benchmark with ``forget_text`` and ``holdout_text`` (the synthetic benchmark: the forget
  people's passages vs those of the holdout people, who were never trained on; MUSE without its
  PrivLeak tables: ``raw/forget`` vs ``raw/holdout``);
* none on TOFU (see :data:`TOFU_REASON`) or any other benchmark without a holdout: the reason is
  returned instead of an AUC that would measure a distribution shift rather than membership.

:func:`mia_privacy` scores them with :func:`robustunlearn.metrics.mia.mia_suite` (membership AUCs:
> 0.5 when members are detected); :func:`privleak_against` turns the Min-K% AUC into PrivLeak
(:func:`robustunlearn.metrics.muse.privleak`) against, in this order, the retrain model's AUC, MUSE's
published retrain AUC (only when asked for a MUSE corpus), or nothing (PrivLeak ``None``), and
names which one in ``privleak_reference``.

MUSE's published retrain AUCs (:data:`MUSE_PUBLISHED_RETRAIN_AUC`, the ``AUC_RETRAIN`` constants of
its ``constants.py``: News 0.4772, Books 0.5393) are in MUSE's own orientation, which scores holdout
texts as the positives; our membership AUCs are ``1 -`` that, so the retrain AUC passed to ``privleak``
is ``1 - published`` and PrivLeak's denominator is the published number, as in MUSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from robustunlearn.data.base import Benchmark, Passage
from robustunlearn.data.muse import privleak_sets
from robustunlearn.metrics.mia import mia_suite
from robustunlearn.metrics.muse import privleak
from robustunlearn.metrics.suite import EvalSettings

PRIVLEAK_AUC = "auc_min_k"  # MUSE's PrivLeak reads the Min-K% (k = 40%) AUC
MUSE_PUBLISHED_RETRAIN_AUC = {"news": 0.4772, "books": 0.5393}  # MUSE's orientation: 1 - our membership AUC
RETRAIN_REFERENCE = "retrain"
NO_REFERENCE = "no reference"
TOFU_REASON = (
    "TOFU has no holdout of the forget set's distribution: every fictitious author outside the forget "
    "set is in the retain set (trained on), and its perturbed, real-author and world-facts sets are other "
    "distributions, so an AUC against them would measure the distribution shift, not membership"
)


@dataclass(frozen=True)
class MembershipSets:
    """A benchmark's membership-inference texts: ``members`` (trained on) and ``nonmembers``."""

    members: list[Passage]
    nonmembers: list[Passage]
    source: str  # which splits they come from


def membership_sets(benchmark: Benchmark) -> tuple[MembershipSets | None, str | None]:
    """``(sets, None)``, or ``(None, why the benchmark has none)`` (see the module docstring)."""
    muse = privleak_sets(benchmark)
    if muse.get("forget") and muse.get("holdout"):
        return MembershipSets(muse["forget"], muse["holdout"], "privleak/forget vs privleak/holdout"), None
    if benchmark.get("forget_text") and benchmark.get("holdout_text"):
        sets = MembershipSets(
            benchmark.get("forget_text"), benchmark.get("holdout_text"), "forget_text vs holdout_text"
        )
        return sets, None
    if benchmark.name == "tofu":
        return None, TOFU_REASON
    return None, f"benchmark {benchmark.name!r} has no holdout texts of the forget set's distribution (non-members)"


def mia_privacy(model, tokenizer, benchmark: Benchmark, settings: EvalSettings) -> dict[str, Any]:
    """The MIA-suite AUCs of ``model`` on the benchmark's members vs non-members, each capped at
    ``settings.max_examples``: ``{"source", "members", "nonmembers", "aucs"}`` (counts scored), or
    ``{"aucs": None, "reason"}`` where the benchmark has none."""
    sets, reason = membership_sets(benchmark)
    if sets is None:
        return {"aucs": None, "reason": reason}
    limit = settings.max_examples
    members, nonmembers = (records if limit is None else records[:limit] for records in (sets.members, sets.nonmembers))
    aucs = mia_suite(model, tokenizer, members, nonmembers, batch_size=settings.batch_size)
    return {"source": sets.source, "members": len(members), "nonmembers": len(nonmembers), "aucs": aucs}


def muse_corpus(benchmark: Benchmark) -> str | None:
    """The MUSE corpus (``news`` or ``books``) of a MUSE benchmark, else None."""
    return benchmark.metadata.get("corpus") if benchmark.name.startswith("muse-") else None


def privleak_against(auc_model: float, retrain_auc: float | None = None, *, muse: str | None = None) -> dict[str, Any]:
    """``{"privleak", "privleak_reference"}`` for the membership AUC ``auc_model`` (Min-K%): against
    ``retrain_auc`` (``"retrain"``) when given; else, with ``muse`` a corpus, against MUSE's published
    retrain AUC for it (``"muse-published-<corpus>"``; see the module docstring for its orientation);
    else ``{"privleak": None, "privleak_reference": "no reference"}``. A retrain AUC of 1 (the retrain
    model separates the sets perfectly, as happens by chance on a handful of texts) leaves PrivLeak
    undefined: None, with ``privleak_note`` saying so."""
    if retrain_auc == 1.0:
        note = "the retrain model's AUC is 1 (it separates members perfectly): PrivLeak is undefined"
        return {"privleak": None, "privleak_reference": RETRAIN_REFERENCE, "privleak_note": note}
    if retrain_auc is not None:
        return {"privleak": privleak(auc_model, retrain_auc), "privleak_reference": RETRAIN_REFERENCE}
    if muse is not None:
        published = MUSE_PUBLISHED_RETRAIN_AUC[muse]
        return {"privleak": privleak(auc_model, 1.0 - published), "privleak_reference": f"muse-published-{muse}"}
    return {"privleak": None, "privleak_reference": NO_REFERENCE}


def with_privleak(mia: dict[str, Any], retrain_mia: dict[str, Any] | None = None, *, muse: str | None = None) -> dict:
    """``mia`` (of :func:`mia_privacy`) with :func:`privleak_against`'s keys, the reference being the
    retrain model's ``retrain_mia`` when it has AUCs."""
    if mia["aucs"] is None:
        return {**mia, "privleak": None, "privleak_reference": NO_REFERENCE}
    retrain_auc = None if retrain_mia is None or retrain_mia["aucs"] is None else retrain_mia["aucs"][PRIVLEAK_AUC]
    return {**mia, **privleak_against(mia["aucs"][PRIVLEAK_AUC], retrain_auc, muse=muse)}
