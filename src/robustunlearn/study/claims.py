"""The paper's claims, measured on a study's rows, each with an interval and a verdict.

A claim (:class:`Claim`) is data: its text and the comparisons (:class:`Comparison`) that must all
hold. A comparison names the optimizers it is about (by grade, ``row.cell.grade``, or by name),
the measure (:data:`MEASURES`), the attacks it pools (a family or one attack), what it is measured
against (the reference optimizer, every other optimizer, a group, or 0) and the expected sign of
the difference. To add a claim, add one entry to :data:`CLAIMS`.

The robustness claims read the attack ladders (:func:`robustunlearn.study.scores.cell_ladders`):
a cell's value is a ladder's AUC, the mean over its rungs of the excess F_attacked - F_control of
the cell's model over the control model under the same attack. Of each family they read one kind
of ladder (:data:`LADDER_PREFERENCE`): quantization the ``rtn`` ladder (else the family's first),
relearning the ladder scored on the held-out subjects (else on the whole forget set), perturbation
its first; a comparison may name other kinds (the in-set relearning ladders are shown beside
claim 2, not counted). Where an optimizer has no such AUC (rows without controls, written before
them), a comparison that names no ladder falls back to the recovery ratio over the same attacks
(:attr:`Measure.fallback`) and says so.

How a comparison is measured, for each optimizer S its subject selection matches:

* per unit u = (benchmark, objective, seed) that S and the other side both have, the difference
  d_u = mean over the attacks (ladders) both have of (value_S - value_other) (cell measures have
  one value);
* against a group (``"others"`` or an :class:`Optimizers`), d_u is the difference least favourable
  to the claim: the largest for an expected ``"lower"``, the smallest for ``"higher"``;
* per seed, the mean of d_u over its units; then the mean over seeds and its 95% percentile
  bootstrap interval (:func:`robustunlearn.study.stats.bootstrap_interval`), and the verdict
  (:func:`robustunlearn.study.stats.verdict`).

A claim is contradicted when any comparison is, not measured when any is not (an optimizer, an
attack or a landscape missing from the study), supported when all are, else inconclusive
("inconclusive (1 seed)" when one seed is all that keeps a comparison from a verdict). "At least"
claims are tested one-sided: a tie reads inconclusive, a significant shortfall contradicted.
Comparisons marked ``shown`` are reported beside the claim but do not count towards its verdict
(and are left out where not measured).

Beside a robustness comparison (lower = less recovered) stands a utility caveat when the more
robust side's unlearned model has lower utility than the other's beyond the interval of their
paired utility difference: damaged models relearn slowly, so such robustness may be damage. The
utility is the reported one: the unlearned model's utility metric in the rows (on the retain
split's evaluation part), not the unlearning curve's subset.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from robustunlearn.study.landscape import lmc_barrier
from robustunlearn.study.rows import NO_ATTACK, SCORINGS, ResultRow, RowCell
from robustunlearn.study.scores import WHOLE_FORGET_SET, Ladder, attack_scores, cell_ladders, lower_is_better
from robustunlearn.study.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_MEASURED,
    ONE_SEED,
    SUPPORTED,
    Direction,
    Interval,
    bootstrap_interval,
    verdict,
)

DEFAULT_REFERENCE_OPTIMIZER = "adam"
ROBUSTNESS_MEASURE = "recovery_ratio"  # what the paired differences against the reference compare
LADDER_MEASURE = "excess_auc"  # what the robustness claims compare
FIRST_LADDER = "*"  # in a ladder preference: the family's first ladder
# The kinds of ladder (_ladder_kind) a robustness comparison reads in each attack family, in order
# of preference: the first kind the cell has is read, every ladder of that kind pooled.
LADDER_PREFERENCE: dict[str, tuple[str, ...]] = {
    "quantization": ("rtn", FIRST_LADDER),
    "relearning": ("held_out_subjects", WHOLE_FORGET_SET),
    "perturbation": (FIRST_LADDER,),
}

Unit = tuple[str, str, int]  # (benchmark, objective, seed): what a comparison pairs on
Scored = tuple[ResultRow, dict[str, Any]]  # a row and its attack_scores
UnitValues = dict[Unit, dict[str, float]]  # per unit, a measure's values by attack or ladder ("" for a cell's own)


@dataclass(frozen=True)
class Optimizers:
    """A selection of optimizers: those of any of ``grades`` or named in ``names``."""

    grades: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    def matches(self, optimizer: str, grade: str) -> bool:
        return grade in self.grades or optimizer in self.names

    def describe(self) -> str:
        return " or ".join([*self.grades, *self.names])


Versus = Literal["reference", "others", "zero"] | Optimizers


@dataclass(frozen=True)
class Comparison:
    """``subject - versus`` of ``measure``, expected ``"lower"``, ``"higher"`` or ``"better"`` (the
    measure's better direction: :attr:`Measure.better`). Per-attack measures pool the attacks of
    ``attack_family`` (every attack when ``None``) or the one ``attack``; the ladder measure reads
    the ``ladders`` kinds given (in order of preference), else :data:`LADDER_PREFERENCE`'s. A
    ``shown`` comparison is reported beside its claim without counting towards its verdict."""

    subject: Optimizers
    measure: str
    expected: Literal["lower", "higher", "better"]
    attack_family: str | None = None
    attack: str | None = None
    versus: Versus = "reference"
    ladders: tuple[str, ...] = ()
    shown: bool = False


@dataclass(frozen=True)
class Claim:
    text: str
    comparisons: tuple[Comparison, ...]


@dataclass(frozen=True)
class CellScores:
    """One cell's rows, each with its :func:`attack_scores`, and its ladders."""

    scored: list[Scored]
    ladders: list[Ladder]


@dataclass(frozen=True)
class Measure:
    """A number per cell (per attack or ladder for ``robustness`` measures) that comparisons take
    differences of; ``fallback``: the measure an optimizer without values of this one is compared
    on, where the comparison names no ladders."""

    title: str
    values: Callable[[CellScores, Comparison, str], dict[str, float]]  # (cell, comparison, reference) -> by key
    better: Callable[[Scored], Direction | None]  # which values are better (None: neither)
    robustness: bool = False
    fallback: str | None = None


def _selects(row: ResultRow, comparison: Comparison) -> bool:
    return comparison.attack_family in (None, row.attack_family) and comparison.attack in (None, row.attack)


def _attack_score(key: str) -> Callable[[CellScores, Comparison, str], dict[str, float]]:
    def values(cell: CellScores, comparison: Comparison, reference: str) -> dict[str, float]:
        return {
            row.attack: scores[key]
            for row, scores in cell.scored
            if row.attack != NO_ATTACK and scores[key] is not None and _selects(row, comparison)
        }

    return values


def _unlearned_score(key: str) -> Callable[[CellScores, Comparison, str], dict[str, float]]:
    return lambda cell, comparison, reference: {"": cell.scored[0][1][key]}


def _ladder_kind(ladder: Ladder) -> str:
    """What kind of ladder ``ladder`` is: a relearning ladder's scoring (``in_set``,
    ``held_out_subjects``, ... or :data:`WHOLE_FORGET_SET`), else the last word of its name (a
    quantization ladder's method, ``noise``)."""
    last = ladder.name.rsplit(" ", 1)[-1]
    if ladder.family == "relearning":
        return last if last in SCORINGS else WHOLE_FORGET_SET
    return last


def _chosen_ladders(ladders: Iterable[Ladder], family: str, preference: tuple[str, ...]) -> list[Ladder]:
    """The ladders of ``family`` with an AUC of the first kind in ``preference`` present
    (:data:`FIRST_LADDER`: the family's first ladder); none when no kind is."""
    found = [ladder for ladder in ladders if ladder.family == family and ladder.auc is not None]
    for kind in preference:
        chosen = found[:1] if kind == FIRST_LADDER else [ladder for ladder in found if _ladder_kind(ladder) == kind]
        if chosen:
            return chosen
    return []


def _ladder_auc(cell: CellScores, comparison: Comparison, reference: str) -> dict[str, float]:
    """The AUC of each ladder the comparison reads, by ladder name: of its family, or of every
    family of :data:`LADDER_PREFERENCE`."""
    families = [comparison.attack_family] if comparison.attack_family else list(LADDER_PREFERENCE)
    return {
        ladder.name: float(ladder.auc)
        for family in families
        for ladder in _chosen_ladders(cell.ladders, family, comparison.ladders or LADDER_PREFERENCE.get(family, ()))
        if ladder.auc is not None
    }


def _lmc_anchor(pair: str) -> str:
    """The optimizer an LMC curve starts from: ``"[<objective>: ]<anchor>-vs-<optimizer>"``."""
    return pair.rsplit(": ", 1)[-1].split("-vs-", 1)[0]


def _lmc_barrier(cell: CellScores, comparison: Comparison, reference: str) -> dict[str, float]:
    """The barrier of the forget metric on the LMC curve from the reference optimizer's model to
    the cell's (:func:`robustunlearn.study.landscape.lmc_barrier`); none without such a curve."""
    for row, _ in cell.scored:
        landscape, metric = row.landscape, row.primary_metric
        if landscape is None or not landscape.lmc or not landscape.pair or _lmc_anchor(landscape.pair) != reference:
            continue
        if all(metric in point for point in landscape.lmc) and len({p["alpha"] for p in landscape.lmc}) >= 2:
            return {"": lmc_barrier(landscape.lmc, metric, higher_is_worse=lower_is_better(metric))}
    return {}


def _direction_of(metric: str) -> Direction:
    return "lower" if lower_is_better(metric) else "higher"


MEASURES: dict[str, Measure] = {
    "recovery_ratio": Measure(
        "recovery ratio", _attack_score("recovery_ratio"), lambda scored: "lower", robustness=True
    ),
    LADDER_MEASURE: Measure(
        "excess AUC over the control",
        _ladder_auc,
        lambda scored: "lower",
        robustness=True,
        fallback="recovery_ratio",
    ),
    "forget_unlearned": Measure(
        "forget metric of the unlearned model",
        _unlearned_score("forget_unlearned"),
        lambda scored: _direction_of(scored[0].primary_metric),
    ),
    "utility_unlearned": Measure(
        "utility of the unlearned model",
        _unlearned_score("utility_before"),
        lambda scored: _direction_of(scored[1]["utility_metric"]),
    ),
    "lmc_barrier": Measure("LMC barrier from the reference's model", _lmc_barrier, lambda scored: None),
}

ZEROTH_ORDER = Optimizers(grades=("zeroth-order",))
SIGN_BASED = Optimizers(grades=("compressed-first-order",))
HYBRID = Optimizers(grades=("hybrid",))
SECOND_ORDER = Optimizers(grades=("second-order",))
IN_SET = ("in_set",)  # the relearning ladders scored on the records relearning trained on
CLAIMS: tuple[Claim, ...] = (
    Claim(
        "Zeroth-order and sign-based unlearning recover less than Adam under quantization",
        (
            Comparison(ZEROTH_ORDER, LADDER_MEASURE, "lower", "quantization"),
            Comparison(SIGN_BASED, LADDER_MEASURE, "lower", "quantization"),
        ),
    ),
    Claim(
        "Zeroth-order and sign-based unlearning recover less than Adam under relearning",
        (
            Comparison(ZEROTH_ORDER, LADDER_MEASURE, "lower", "relearning"),
            Comparison(SIGN_BASED, LADDER_MEASURE, "lower", "relearning"),
            Comparison(ZEROTH_ORDER, LADDER_MEASURE, "lower", "relearning", ladders=IN_SET, shown=True),
            Comparison(SIGN_BASED, LADDER_MEASURE, "lower", "relearning", ladders=IN_SET, shown=True),
        ),
    ),
    Claim(
        "Sophia (second-order) recovers the most",
        (Comparison(SECOND_ORDER, LADDER_MEASURE, "higher", versus="others"),),
    ),
    Claim(
        "The hybrid reaches Adam's forgetting with utility at least Adam's",
        (Comparison(HYBRID, "forget_unlearned", "better"), Comparison(HYBRID, "utility_unlearned", "better")),
    ),
    Claim("The hybrid recovers less than Adam", (Comparison(HYBRID, LADDER_MEASURE, "lower"),)),
    Claim(
        "Zeroth-order unlearning lands in a different basin from Adam's (LMC barrier), sign-based ones in Adam's",
        (
            Comparison(ZEROTH_ORDER, "lmc_barrier", "higher", versus="zero"),
            Comparison(ZEROTH_ORDER, "lmc_barrier", "higher", versus=SIGN_BASED),
        ),
    ),
)


@dataclass(frozen=True)
class UtilityCaveat:
    """The more robust side's unlearned model has lower utility than the other's: ``difference`` is
    utility(``more_robust``) - utility(``other``), per seed, with its interval below 0."""

    more_robust: str
    other: str
    difference: Interval


@dataclass(frozen=True)
class Measured:
    """One comparison for one subject optimizer: ``difference`` = subject - versus per seed, on
    ``measure`` (the comparison's, or its fallback: then ``note`` says why), pooled over the
    attacks or ladders ``pooled``; ``forget_unlearned``: each side's mean F_unlearned over the
    units paired."""

    comparison: Comparison
    subject: str  # the optimizer, or the selection's description when none matched
    versus: str  # the reference optimizer, "0", or "highest/lowest of <names>"
    expected: Direction  # the expected sign of the difference, resolved ("better" read from the measure)
    difference: Interval | None
    verdict: str
    note: str | None = None  # why it is not measured, or why it fell back to another measure
    utility_caveat: UtilityCaveat | None = None
    measure: str = ""  # the measure the difference is of: the comparison's or its fallback
    pooled: tuple[str, ...] = ()  # the attacks or ladders the differences pool ("" keys left out)
    forget_unlearned: dict[str, float] | None = None  # by optimizer


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    measured: list[Measured]
    verdict: str


class _ScoredStudy:
    """A study's rows scored once, by cell, with their ladders and each optimizer's grade."""

    def __init__(self, rows: list[ResultRow], reference: str):
        self.reference = reference
        by_cell: dict[RowCell, list[ResultRow]] = {}
        for row in rows:
            by_cell.setdefault(row.cell, []).append(row)
        self.by_cell = {
            cell: CellScores([(row, attack_scores(row)) for row in cell_rows], cell_ladders(cell_rows))
            for cell, cell_rows in by_cell.items()
        }
        self.grades = {cell.optimizer: cell.grade for cell in self.by_cell}
        self.first = next(iter(self.by_cell.values())).scored[0]

    def values(self, measure: str, comparison: Comparison) -> dict[str, UnitValues]:
        """Per optimizer and unit, ``measure``'s values by attack or ladder as ``comparison``
        selects them (cells differing only in their learning rate averaged); optimizers and units
        without a value are left out."""
        spec = MEASURES[measure]
        collected: dict[str, dict[Unit, dict[str, list[float]]]] = {}
        for cell, scores in self.by_cell.items():
            unit = collected.setdefault(cell.optimizer, {}).setdefault((cell.benchmark, cell.objective, cell.seed), {})
            for key, value in spec.values(scores, comparison, self.reference).items():
                unit.setdefault(key, []).append(float(value))
        return {
            optimizer: {
                unit: {k: statistics.fmean(v) for k, v in values.items()} for unit, values in units.items() if values
            }
            for optimizer, units in collected.items()
            if any(units.values())
        }


def _mean_difference(subject: dict[str, float], other: dict[str, float]) -> float | None:
    shared = subject.keys() & other.keys()
    return statistics.fmean(subject[key] - other[key] for key in shared) if shared else None


def _seed_differences(
    subject: UnitValues, competitors: dict[str, UnitValues], expected: Direction
) -> tuple[dict[int, float], dict[Unit, str]]:
    """Per seed, the mean over its units of the difference least favourable to ``expected`` among
    the competitors; and per unit, the competitor it came from."""
    least_favourable = max if expected == "lower" else min
    by_seed: dict[int, list[float]] = {}
    chosen: dict[Unit, str] = {}
    for unit, values in subject.items():
        candidates = [
            (difference, name)
            for name, other in competitors.items()
            if unit in other and (difference := _mean_difference(values, other[unit])) is not None
        ]
        if candidates:
            difference, chosen[unit] = least_favourable(candidates)
            by_seed.setdefault(unit[2], []).append(difference)
    return {seed: statistics.fmean(differences) for seed, differences in by_seed.items()}, chosen


def _pooled(subject: UnitValues, competitors: dict[str, UnitValues], chosen: dict[Unit, str]) -> tuple[str, ...]:
    """The attacks or ladders the paired differences pooled, in order of first appearance."""
    keys = (key for unit, name in chosen.items() for key in subject[unit] if key in competitors[name][unit])
    return tuple(key for key in dict.fromkeys(keys) if key)


def _forget_unlearned(
    study: _ScoredStudy, comparison: Comparison, subject: str, chosen: dict[Unit, str]
) -> dict[str, float]:
    """Each side's mean F_unlearned over the units it was paired on (the subject first)."""
    forget = study.values("forget_unlearned", comparison)
    sides = {subject: list(chosen)} | {
        name: [unit for unit, other in chosen.items() if other == name] for name in dict.fromkeys(chosen.values())
    }
    return {
        name: statistics.fmean(forget[name][unit][""] for unit in units)
        for name, units in sides.items()
        if name in forget and units
    }


def _versus(
    study: _ScoredStudy, comparison: Comparison, subject: str, values: dict[str, UnitValues], expected: Direction
) -> tuple[str, dict[str, UnitValues]]:
    """What ``subject`` is measured against: its label and the competitors' values by name."""
    versus = comparison.versus
    if versus == "reference":
        return study.reference, {study.reference: values.get(study.reference, {})}
    if versus == "zero":
        return "0", {"0": {unit: dict.fromkeys(keys, 0.0) for unit, keys in values.get(subject, {}).items()}}
    group = {
        name: units
        for name, units in values.items()
        if name != subject and (versus == "others" or versus.matches(name, study.grades[name]))
    }
    extreme = "highest" if expected == "higher" else "lowest"
    return f"{extreme} of {', '.join(sorted(group)) or _group_name(versus)}", group


def _group_name(versus: Versus) -> str:
    return "the other optimizers" if versus == "others" else f"the {versus.describe()} optimizers"


def _utility_caveat(
    study: _ScoredStudy,
    comparison: Comparison,
    subject: str,
    chosen: dict[Unit, str],
    robustness: Interval,
    robust_side: Direction,
) -> UtilityCaveat | None:
    """A :class:`UtilityCaveat` when the more robust side of a comparison (``subject`` when its
    ``robustness`` difference leans to ``robust_side``, else its competitors ``chosen`` per unit) has
    an unlearned model whose utility, paired by unit, is worse than the other side's beyond its interval."""
    if robustness.low is None or robustness.mean == 0:
        return None
    utility = study.values("utility_unlearned", comparison)
    by_seed: dict[int, list[float]] = {}
    for unit, other in chosen.items():
        mine, theirs = utility.get(subject, {}).get(unit), utility.get(other, {}).get(unit)
        if mine and theirs:
            by_seed.setdefault(unit[2], []).append(mine[""] - theirs[""])
    if len(by_seed) < 2:
        return None
    difference = bootstrap_interval([statistics.fmean(by_seed[seed]) for seed in sorted(by_seed)])
    others = ", ".join(sorted(set(chosen.values())))
    if (robustness.mean < 0) == (robust_side == "lower"):
        more_robust, other = subject, others
    else:
        more_robust, other, difference = others, subject, difference.negated()
    utility_better = MEASURES["utility_unlearned"].better(study.first)
    worse = verdict(difference, "lower" if utility_better == "higher" else "higher") == SUPPORTED
    return UtilityCaveat(more_robust, other, difference) if worse else None


def _why_not_measured(
    study: _ScoredStudy, comparison: Comparison, subject: str, versus: str, values: dict[str, UnitValues]
) -> str:
    title = " or ".join(MEASURES[measure].title for measure in _measures_tried(comparison))
    if comparison.ladders:
        title += f" ({', '.join(comparison.ladders)} ladders)"
    if comparison.versus == "reference" and study.reference not in study.grades:
        return f"the reference optimizer {study.reference} is not in the study"
    if subject not in values or comparison.versus == "zero":
        return f"no {title} for {subject}"
    return f"no {title} shared by {subject} and {versus}"


def _measures_tried(comparison: Comparison) -> list[str]:
    """The comparison's measure, then its fallback where the comparison names no ladders."""
    fallback = MEASURES[comparison.measure].fallback
    return [comparison.measure] + ([fallback] if fallback and not comparison.ladders else [])


def _fallback_note(comparison: Comparison, measure: str) -> str | None:
    if measure == comparison.measure:
        return None
    return f"fallback: rows without controls give no {MEASURES[comparison.measure].title}"


def _measure(study: _ScoredStudy, comparison: Comparison) -> list[Measured]:
    """The comparison for each optimizer its subject selects (one "not measured" entry when none)."""
    spec = MEASURES[comparison.measure]
    expected = spec.better(study.first) if comparison.expected == "better" else comparison.expected
    if expected is None:
        raise ValueError(f"measure {comparison.measure!r} has no better direction; expect 'lower' or 'higher'")
    tried = {measure: study.values(measure, comparison) for measure in _measures_tried(comparison)}
    subjects = [
        name
        for name, grade in study.grades.items()
        if comparison.subject.matches(name, grade)
        and not (comparison.versus == "reference" and name == study.reference)
    ]
    if not subjects:
        selection = comparison.subject.describe()
        versus = _versus(study, comparison, selection, {}, expected)[0]
        note = f"no {selection} optimizer in the study"
        return [Measured(comparison, selection, versus, expected, None, NOT_MEASURED, note, measure=comparison.measure)]
    return [_measure_subject(study, comparison, subject, expected, tried) for subject in subjects]


def _measure_subject(
    study: _ScoredStudy,
    comparison: Comparison,
    subject: str,
    expected: Direction,
    tried: dict[str, dict[str, UnitValues]],
) -> Measured:
    """``subject``'s comparison on the first measure of ``tried`` that pairs it with its competitors."""
    for measure, values in tried.items():
        label, competitors = _versus(study, comparison, subject, values, expected)
        by_seed, chosen = _seed_differences(values.get(subject, {}), competitors, expected)
        if by_seed:
            break
    else:
        note = _why_not_measured(study, comparison, subject, label, tried[comparison.measure])
        return Measured(comparison, subject, label, expected, None, NOT_MEASURED, note, measure=comparison.measure)
    spec = MEASURES[measure]
    difference = bootstrap_interval([by_seed[seed] for seed in sorted(by_seed)])
    caveat = (
        _utility_caveat(study, comparison, subject, chosen, difference, spec.better(study.first))
        if spec.robustness
        else None
    )
    return Measured(
        comparison,
        subject,
        label,
        expected,
        difference,
        verdict(difference, expected),
        _fallback_note(comparison, measure),
        caveat,
        measure,
        _pooled(values.get(subject, {}), competitors, chosen),
        _forget_unlearned(study, comparison, subject, chosen),
    )


def claim_verdict(verdicts: Iterable[str]) -> str:
    """A claim's verdict from its comparisons': contradicted if any is, not measured if any is,
    supported if all are, else inconclusive ("inconclusive (1 seed)" when only single seeds stand
    between it and support)."""
    verdicts = list(verdicts)
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if NOT_MEASURED in verdicts:
        return NOT_MEASURED
    if all(found == SUPPORTED for found in verdicts):
        return SUPPORTED
    return ONE_SEED if all(found in (SUPPORTED, ONE_SEED) for found in verdicts) else INCONCLUSIVE


def evaluate_claims(
    rows: list[ResultRow], claims: Iterable[Claim] = CLAIMS, reference_optimizer: str = DEFAULT_REFERENCE_OPTIMIZER
) -> list[ClaimResult]:
    """Each claim measured on ``rows`` (the module docstring gives the method), in order; shown
    comparisons that could not be measured are left out."""
    study = _ScoredStudy(rows, reference_optimizer)
    results = []
    for claim in claims:
        measured = [
            entry
            for comparison in claim.comparisons
            for entry in _measure(study, comparison)
            if not (comparison.shown and entry.verdict == NOT_MEASURED)
        ]
        counted = [entry.verdict for entry in measured if not entry.comparison.shown]
        results.append(ClaimResult(claim, measured, claim_verdict(counted)))
    return results


def paired_differences(
    rows: list[ResultRow], reference_optimizer: str = DEFAULT_REFERENCE_OPTIMIZER, measure: str = ROBUSTNESS_MEASURE
) -> list[Measured]:
    """For each optimizer but the reference and each attack, ``measure`` of the optimizer minus the
    reference's, paired by (benchmark, objective, seed), with its interval; the verdict is on the
    difference being better (for the recovery ratio: lower, the optimizer recovering less)."""
    study = _ScoredStudy(rows, reference_optimizer)
    attacks = list(dict.fromkeys(row.attack for row in rows if row.attack != NO_ATTACK))
    return [
        entry
        for optimizer in study.grades
        if optimizer != reference_optimizer
        for attack in attacks
        for entry in _measure(study, Comparison(Optimizers(names=(optimizer,)), measure, "better", attack=attack))
    ]
