"""Robustness scores of an unlearned model under attack: pure functions over numbers and result rows.

Notation, for the forget metric F (higher = more of the forget set is still known, e.g. forget
QA ROUGE-L): F_target of the original model, F_unlearned after unlearning, F_attacked after an
attack (quantization, relearning, weight noise, ...) on the unlearned model, F_floor what a model
that never learned the forget set scores (the retrain reference, else the metric's chance level).

F_control is what the control model (the retrain model, else the target as an upper bound)
scores under the same attack: the excess F_attacked - F_control is what the attack brings back
beyond what it teaches a model that never learned the forget set.

A *row* is one (cell, attack) record of ``results.jsonl``: a :class:`robustunlearn.study.rows.ResultRow`.
:func:`attack_scores` fills its ``scores``, :func:`cell_ladders` orders a cell's rows into ladders of
one attack at growing strength, :func:`summarise` condenses many rows into one summary per cell and
one mean over seeds per grid point.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from robustunlearn.attacks.quant.core import parse_method
from robustunlearn.attacks.registry import parse_attack
from robustunlearn.attacks.spec import PERTURBATION, QUANTIZATION, RELEARNING
from robustunlearn.metrics.suite import METRICS, UTILITY_METRIC
from robustunlearn.study.rows import NO_ATTACK, SCORINGS, ResultRow, RowCell, scored_metric
from robustunlearn.study.stats import bootstrap_interval

# Which values are better for the metrics the study measures beyond the registry: the landscape's
# teacher-forced QA losses (a higher forget loss means more forgotten).
STUDY_METRIC_DIRECTIONS = {"forget_qa_loss": "higher", "retain_qa_loss": "lower"}
# The numeric fields of a cell summary whose spread over seeds a mean summary reports.
MEAN_FIELDS = (
    "forget_target",
    "forget_unlearned",
    "utility_unlearned",
    "worst",
    "attacks",
    "cost",
    "ladders",
    "level_gap",
    "forward_equivalents",
)
# The recovery ratio needs unlearning to have removed at least this share of what separates the
# original model from the floor (the retrain reference, else chance): F_target - F_floor.
MIN_REMOVED_SHARE = 0.2
# The per-attack scores a cell summary keeps.
ATTACK_FIELDS = (
    "forget",
    "forget_change",
    "retained_fraction",
    "recovery_ratio",
    "recovery_ratio_note",
    "relearn_auc",
    "utility_after",
    "utility_drop",
    "control_forget",
    "excess_over_control",
)
WHOLE_FORGET_SET = "all"  # the relearning ladder scored on the whole forget set, next to SCORINGS
# A quantization attack's strength is 16 - bits: the distance from 16-bit weights (as the study writes it).
FULL_PRECISION_BITS = 16


def retained_fraction(
    f_attacked: float, f_target: float, f_chance: float = 0.0, *, tolerance: float = 1e-9
) -> float | None:
    """Knowledge kept relative to the original model, above the metric's chance level c::

        (F_attacked - c) / (F_target - c)

    0 = nothing left (at chance: a 4-option multiple-choice model at 0.25 knows nothing), 1 = as
    much as the original model. ``None`` when ``|F_target - c| <= tolerance`` (the original model
    was at chance, so there is nothing to keep)."""
    if abs(f_target - f_chance) <= tolerance:
        return None
    return (f_attacked - f_chance) / (f_target - f_chance)


class Recovery(NamedTuple):
    """A recovery ratio, or ``None`` with the reason (``note``) why there is none."""

    ratio: float | None
    note: str | None = None


def recovery_ratio(
    f_attacked: float,
    f_unlearned: float,
    f_target: float,
    f_floor: float | None,
    *,
    min_removed_share: float = MIN_REMOVED_SHARE,
    tolerance: float = 1e-9,
) -> Recovery:
    """How much the attack brought back, in units of what the matched forgetting level removes::

        R = (F_attacked - F_unlearned) / (F_target - F_floor)

    F_floor is the retrain reference's value (the level every cell unlearns towards), else the
    metric's chance level (:func:`forget_floor`). The denominator is a property of the benchmark,
    the same for every cell, so R cannot blow up in a cell that stopped short of the level, and
    ratios compare like the absolute changes F_attacked - F_unlearned they scale. 0 = the attack
    recovered nothing, 1 = it recovered as much as separates the original model from the floor;
    negative when the attack removed even more.

    ``None`` with a ``note`` when there is no floor, when ``|F_target - F_floor| <= tolerance``
    (the original model is at the floor: nothing to forget), or when unlearning removed less than
    ``min_removed_share`` of it, ``(F_target - F_unlearned) / (F_target - F_floor) <
    min_removed_share`` (what an attack brings back from a model that forgot little is no
    measure of robustness)."""
    if f_floor is None:
        return Recovery(None, "no floor: no retrain reference and no chance level for the metric")
    span = f_target - f_floor
    if abs(span) <= tolerance:
        return Recovery(None, f"the original model is at the floor ({f_floor:.3g}): nothing to forget")
    removed_share = (f_target - f_unlearned) / span
    if removed_share < min_removed_share:
        return Recovery(
            None,
            f"unlearning removed {removed_share:.0%} of the original model's distance to the floor, "
            f"less than {min_removed_share:.0%}",
        )
    return Recovery((f_attacked - f_unlearned) / span)


def relearn_auc(curve: list[dict[str, float]], metric: str) -> float:
    """Mean level of ``metric`` over a relearning curve: the trapezoid area under
    ``metric(step)`` divided by the step span::

        AUC = 1/(s_n - s_0) · Σ_i (s_{i+1} - s_i) · (m_i + m_{i+1}) / 2

    so a curve that jumps back to the original level early scores near that level, one that
    recovers late scores near the unlearned level. A one-point curve scores its only value."""
    if not curve:
        raise ValueError("the relearning curve is empty")
    missing = [point for point in curve if metric not in point or "step" not in point]
    if missing:
        raise ValueError(f"relearning curve point {missing[0]} lacks 'step' or {metric!r}")
    points = sorted((float(point["step"]), float(point[metric])) for point in curve)
    span = points[-1][0] - points[0][0]
    if span == 0:
        return statistics.fmean(value for _, value in points)
    area = sum((s1 - s0) * (m0 + m1) / 2 for (s0, m0), (s1, m1) in itertools.pairwise(points))
    return area / span


def utility_metric(utility: dict[str, float]) -> str:
    """The utility metric the scores use: :data:`~robustunlearn.metrics.suite.UTILITY_METRIC` when
    measured, else the first key."""
    if not utility:
        raise ValueError("no utility metric in the row")
    return UTILITY_METRIC if UTILITY_METRIC in utility else next(iter(utility))


def lower_is_better(metric: str) -> bool:
    """Whether lower values of ``metric`` are the better ones: its registry direction
    (:data:`~robustunlearn.metrics.suite.METRICS`), or :data:`STUDY_METRIC_DIRECTIONS`'."""
    if metric in METRICS:
        return METRICS[metric].direction == "lower"
    if metric in STUDY_METRIC_DIRECTIONS:
        return STUDY_METRIC_DIRECTIONS[metric] == "lower"
    raise ValueError(f"metric {metric!r} has no known direction (not in the metric registry)")


def _metric(metrics: dict[str, float], key: str, where: str) -> float:
    if key not in metrics:
        raise ValueError(f"{where} has no {key!r} metric")
    return float(metrics[key])


def chance_level(metric: str) -> float | None:
    """What a model that knows nothing scores on ``metric``: its registry ``chance``
    (:data:`~robustunlearn.metrics.suite.METRICS`; 0.25 for 4-option multiple choice); ``None``
    for a metric without one or outside the registry."""
    return METRICS[metric].chance if metric in METRICS else None


def forget_floor(row: ResultRow) -> tuple[float | None, str]:
    """F_floor of the row's ``primary_metric`` and where it comes from: the retrain reference's
    value (``"retrain"``), else the metric's :func:`chance_level` (``"chance"``; ``None`` without one)."""
    retrain = row.reference.retrain
    if retrain and row.primary_metric in retrain:
        return float(retrain[row.primary_metric]), "retrain"
    return chance_level(row.primary_metric), "chance"


def attack_scores(row: ResultRow) -> dict[str, Any]:
    """All scores of one (cell, attack) row, on the row's ``primary_metric`` F and utility metric U
    (:func:`utility_metric`):

    * ``forget`` = F_attacked, ``forget_unlearned``, ``forget_target``, ``forget_floor`` (and
      ``floor_source``: :func:`forget_floor`);
    * ``forget_change`` = F_attacked - F_unlearned, the absolute change the attack made;
    * ``retained_fraction`` (:func:`retained_fraction`, above the metric's chance level; ``None``
      for a metric without one);
    * ``recovery_ratio`` (:func:`recovery_ratio`) and ``recovery_ratio_note``: why it is ``None``
      (``None`` when there is a ratio);
    * ``relearn_auc`` (:func:`relearn_auc` of the row's ``curve``; ``None`` without a curve);
    * ``utility_before`` = U of the unlearned model, ``utility_after`` = U of the attacked model,
      ``utility_drop`` = how much worse the attack made it: before - after, or after - before
      for lower-is-better metrics (perplexity);
    * ``control_forget`` = F_control, F of the control model under the same attack, and
      ``control_source`` (``"retrain"`` or ``"target"``), ``excess_over_control`` = F_attacked -
      F_control; all ``None`` on a row without a control;
    * ``forget_in_set``, ``forget_held_out_subjects``, ``forget_held_out_attributes``: F of the
      attacked model on each part of the forget set (the row's ``scorings``: the records
      relearning trained on, those of subjects it never saw, and held-out attributes of the
      subjects it saw); ``None`` where the row has no such part (every non-relearning row);
    * ``excess_scorings`` = ``{scoring: F_attacked@scoring - F_control@scoring}`` over the parts
      both the row and its control have; ``None`` when either has no scorings.
    """
    primary = row.primary_metric
    f_attacked = _metric(row.forget, primary, "'forget'")
    f_unlearned = _metric(row.reference.unlearned, primary, "'reference.unlearned'")
    f_target = _metric(row.reference.target, primary, "'reference.target'")
    f_floor, floor_source = forget_floor(row)
    chance = chance_level(primary)
    recovery = recovery_ratio(f_attacked, f_unlearned, f_target, f_floor)
    utility = utility_metric(row.utility)
    before = _metric(row.reference.unlearned, utility, "'reference.unlearned'")
    after = _metric(row.utility, utility, "'utility'")
    return {
        "utility_metric": utility,
        "forget": f_attacked,
        "forget_unlearned": f_unlearned,
        "forget_target": f_target,
        "forget_floor": f_floor,
        "floor_source": floor_source,
        "forget_change": f_attacked - f_unlearned,
        "retained_fraction": None if chance is None else retained_fraction(f_attacked, f_target, chance),
        "recovery_ratio": recovery.ratio,
        "recovery_ratio_note": recovery.note,
        "relearn_auc": relearn_auc(row.curve, primary) if row.curve else None,
        "utility_before": before,
        "utility_after": after,
        "utility_drop": after - before if lower_is_better(utility) else before - after,
        **_control_scores(row, f_attacked),
        **{f"forget_{name}": value for name, value in _scoring_values(row.scorings, primary, "scorings").items()},
    }


def _scoring_values(scorings: dict[str, dict[str, float]] | None, metric: str, where: str) -> dict[str, float | None]:
    """``metric`` on each of :data:`SCORINGS` (``None`` for a part absent from ``scorings``)."""
    scorings = scorings or {}
    return {
        name: _metric(scorings[name], metric, f"'{where}.{name}'") if name in scorings else None for name in SCORINGS
    }


def _control_scores(row: ResultRow, f_attacked: float) -> dict[str, Any]:
    """The control's F, its source, and the excesses of :func:`attack_scores`."""
    control = row.control
    if control is None:
        return {"control_forget": None, "control_source": None, "excess_over_control": None, "excess_scorings": None}
    primary = row.primary_metric
    f_control = _metric(control.forget, primary, "'control.forget'")
    excess_scorings = None
    if row.scorings is not None and control.scorings is not None:
        attacked = _scoring_values(row.scorings, primary, "scorings")
        controlled = _scoring_values(control.scorings, primary, "control.scorings")
        excess_scorings = {
            name: attacked[name] - controlled[name]
            for name in SCORINGS
            if attacked[name] is not None and controlled[name] is not None
        }
    return {
        "control_forget": f_control,
        "control_source": control.source,
        "excess_over_control": f_attacked - f_control,
        "excess_scorings": excess_scorings,
    }


@dataclass(frozen=True)
class LadderPoint:
    """One rung of a :class:`Ladder`: the attack at one strength, and the control under it."""

    attack: str  # the row's attack name
    rung: str  # its label: "int4", "0.03", "step 20"
    strength: float  # orders the rungs, weakest first (a relearning rung: its step)
    forget: float  # F_attacked (relearning: the scoring's value at that step)
    control: float | None  # F_control under the same rung; None without a control
    excess: float | None  # forget - control; None without a control


@dataclass(frozen=True)
class Ladder:
    """One attack at growing strength on one cell, each rung against the control under it.

    With the excesses e_0..e_{n-1} of the n rungs, weakest first, and ``removed`` = F_target -
    F_unlearned (what unlearning removed, on the whole forget set, for every ladder of the cell):

    * ``auc`` = the mean excess over the rungs, the trapezoid over the rung index::

          AUC = 1/(n-1) · Σ_{i<n-1} (e_i + e_{i+1}) / 2        (n = 1: AUC = e_0)

      ``None`` unless every rung has a control;
    * ``breakdown`` = the weakest rung with e_i >= removed / 2 (the attack brings back at least half
      of what unlearning removed, beyond what it teaches the control); ``None``: no rung within
      the ladder does, or no rung has a control (then ``auc`` is ``None`` too). Where unlearning
      removed nothing (removed <= 0) the threshold is <= 0: an excess of 0 already breaks down."""

    name: str  # "quantization rtn", "noise", "relearn lr=0.0001 in_set", ...
    family: str  # quantization | relearning | perturbation
    points: tuple[LadderPoint, ...]  # weakest first; a relearning ladder starts at step 0
    removed: float  # F_target - F_unlearned
    auc: float | None
    breakdown: str | None


def _ladder(name: str, family: str, points: Sequence[LadderPoint], removed: float) -> Ladder:
    """The ladder of ``points`` sorted weakest first, with its :class:`Ladder` ``auc`` and ``breakdown``."""
    ordered = tuple(sorted(points, key=lambda point: point.strength))
    excesses = [point.excess for point in ordered]
    auc = None
    if all(excess is not None for excess in excesses):
        pairs = list(itertools.pairwise(excesses))
        auc = excesses[0] if not pairs else sum((a + b) / 2 for a, b in pairs) / len(pairs)
    broken = (point.rung for point in ordered if point.excess is not None and point.excess >= removed / 2)
    return Ladder(name, family, ordered, removed, auc, next(broken, None))


def _strength(row: ResultRow) -> float:
    """The row's ``attack_config["strength"]``; for rows written before it, from the attack name:
    FULL_PRECISION_BITS - bits of a quantizer, the scale of noise."""
    config = row.attack_config or {}
    if "strength" in config:
        return float(config["strength"])
    if row.attack_family == QUANTIZATION:
        return float(FULL_PRECISION_BITS - parse_method(row.attack).bits)
    return float(parse_attack(row.attack).strength)


def _rung(row: ResultRow, ladder_method: str) -> LadderPoint:
    """A quantization or noise row as a rung, labelled by its attack name less the ladder's
    ``<method>-`` or ``noise-`` (``rtn-int4`` -> ``int4``; ``nf4`` stays ``nf4``)."""
    scores = attack_scores(row)
    label = row.attack.removeprefix(f"{ladder_method}-") or row.attack
    return LadderPoint(
        row.attack, label, _strength(row), scores["forget"], scores["control_forget"], scores["excess_over_control"]
    )


def _quantization_method(row: ResultRow) -> str:
    """The quantizer a quantization row's ladder is of: its method without the bits (``rtn-int4``,
    or ``rtn``, -> ``rtn``; ``nf4`` -> ``nf4``)."""
    method = (row.attack_config or {}).get("method", row.attack)
    return re.sub(r"-int\d+$", "", str(method))


def _relearning_ladders(row: ResultRow, removed: float) -> list[Ladder]:
    """One ladder per scoring present in a relearning row's curve: its points at each step, against
    the control curve's point at the same step."""
    config = row.attack_config or {}
    base = re.sub(r"-lr[0-9.eE+-]+$", "", row.attack)  # relearn-lr1e-4 -> relearn: the lr is named apart
    prefix = f"{base} lr={config['lr']:g}" if "lr" in config else base
    controls = {point["step"]: point for point in (row.control.curve or [])} if row.control else {}
    ladders = []
    for scoring in (WHOLE_FORGET_SET, *SCORINGS):
        key = row.primary_metric if scoring == WHOLE_FORGET_SET else scored_metric(row.primary_metric, scoring)
        points = []
        for point in row.curve or []:
            if key not in point:
                continue
            control = controls.get(point["step"], {}).get(key)
            excess = None if control is None else point[key] - control
            rung = f"step {point['step']:g}"
            points.append(LadderPoint(row.attack, rung, float(point["step"]), point[key], control, excess))
        if points:
            ladders.append(_ladder(f"{prefix} {scoring}", RELEARNING, points, removed))
    return ladders


def cell_ladders(rows: Sequence[ResultRow]) -> list[Ladder]:
    """The ladders of one cell's rows: one per quantizer (rows grouped by ``attack_config["method"]``
    without its bits, named ``"quantization <method>"``) and one of the noise rows (``"noise"``),
    in order of their first row; then, per relearning row, one per forget-set part its curve
    scores (``"<attack> lr=<lr> <scoring>"``: scoring ``all`` for the whole forget set, else one
    of :data:`~robustunlearn.study.rows.SCORINGS`). Other rows (the unattacked one, pruning) are
    on no ladder. ``ValueError`` for rows of several cells or two ladders of one name."""
    if not rows:
        return []
    cells = {row.cell for row in rows}
    if len(cells) > 1:
        raise ValueError(f"cell_ladders takes the rows of one cell, got {len(cells)} cells")
    metric = rows[0].primary_metric
    target = _metric(rows[0].reference.target, metric, "'reference.target'")
    removed = target - _metric(rows[0].reference.unlearned, metric, "'reference.unlearned'")
    rungs: dict[tuple[str, str], list[LadderPoint]] = {}  # (name, family) -> its rungs
    relearning: list[Ladder] = []
    for row in rows:
        if row.attack == NO_ATTACK:
            continue  # the unattacked model is every ladder's reference, not a rung
        if row.attack_family == QUANTIZATION:
            method = _quantization_method(row)
            rungs.setdefault((f"quantization {method}", QUANTIZATION), []).append(_rung(row, method))
        elif row.attack_family == PERTURBATION and row.attack.startswith("noise-"):
            rungs.setdefault(("noise", PERTURBATION), []).append(_rung(row, "noise"))
        elif row.attack_family == RELEARNING:
            relearning.extend(_relearning_ladders(row, removed))
    ladders = [_ladder(name, family, points, removed) for (name, family), points in rungs.items()] + relearning
    names = [ladder.name for ladder in ladders]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two ladders of one cell are named {', '.join(duplicates)}")
    return ladders


def _argmax(scored: list[tuple[str, float | None]]) -> tuple[float | None, str | None]:
    present = [(value, attack) for attack, value in scored if value is not None]
    if not present:
        return None, None
    value, attack = max(present, key=lambda pair: pair[0])
    return value, attack


def worst_case(rows: list[ResultRow]) -> dict[str, Any]:
    """The worst case over the attack suite of one cell (the ``"none"`` row is not an attack):
    the highest F_attacked (``forget``, by ``forget_attack``) and the highest recovery ratio
    (``recovery_ratio``, by ``recovery_attack``). Values and attacks are ``None`` when no attack
    gave one."""
    cells = {row.cell for row in rows}
    if len(cells) > 1:
        raise ValueError(f"worst_case takes the rows of one cell, got {len(cells)} cells")
    attacked = [(row.attack, attack_scores(row)) for row in rows if row.attack != NO_ATTACK]
    forget, forget_attack = _argmax([(attack, scores["forget"]) for attack, scores in attacked])
    recovery, recovery_attack = _argmax([(attack, scores["recovery_ratio"]) for attack, scores in attacked])
    return {
        "forget": forget,
        "forget_attack": forget_attack,
        "recovery_ratio": recovery,
        "recovery_attack": recovery_attack,
    }


def _summarise_cell(rows: list[ResultRow]) -> dict[str, Any]:
    cell = rows[0].cell.to_json()
    scored = [(row, attack_scores(row)) for row in rows]
    first = scored[0][1]
    # Every row of a cell carries the cost of the same unlearning run; prefer the "none" row's.
    cost = next((row.cost for row in rows if row.attack == NO_ATTACK), rows[0].cost)
    return {
        "kind": "cell",
        "cell": cell,
        **{key: cell[key] for key in ("benchmark", "objective", "optimizer", "grade", "seed")},
        "seeds": [cell["seed"]],
        "primary_metric": rows[0].primary_metric,
        "utility_metric": first["utility_metric"],
        "forget_target": first["forget_target"],
        "forget_unlearned": first["forget_unlearned"],
        "utility_unlearned": first["utility_before"],
        "worst": worst_case(rows),
        "attacks": {row.attack: {key: scores[key] for key in ATTACK_FIELDS} for row, scores in scored},
        "cost": cost.to_json(),
        "ladders": {
            ladder.name: {"family": ladder.family, "auc": ladder.auc, "breakdown": ladder.breakdown}
            for ladder in cell_ladders(rows)
        },
        "level_gap": cost.level_gap,
        "forward_equivalents": cost.forward_equivalents,
    }


def _reduce(values: list[Any], numbers: Callable[[list[float]], float | None], join_text: bool) -> Any:
    """Reduce same-shaped trees leaf by leaf: numbers (and bools) with ``numbers`` over the
    non-``None`` ones; strings to themselves when they agree, else their sorted ", "-join
    (or to ``None`` without ``join_text``)."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    if all(isinstance(value, dict) for value in present):
        keys = list(dict.fromkeys(key for value in present for key in value))
        return {key: _reduce([value[key] for value in present if key in value], numbers, join_text) for key in keys}
    if all(isinstance(value, (int, float)) for value in present):
        return numbers([float(value) for value in present])
    return ", ".join(sorted({str(value) for value in present})) if join_text else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _interval(values: list[float]) -> list[float] | None:
    return bootstrap_interval(values).as_list()


def _mean_over_seeds(group: list[dict[str, Any]]) -> dict[str, Any]:
    fields = [
        {key: value for key, value in summary.items() if key not in ("kind", "cell", "seed", "seeds")}
        for summary in group
    ]
    numeric = [{key: summary[key] for key in MEAN_FIELDS} for summary in group]
    return {
        "kind": "mean",
        "cell": {key: value for key, value in group[0]["cell"].items() if key != "seed"},
        **_reduce(fields, statistics.fmean, join_text=True),
        "seed": None,
        "seeds": [summary["seed"] for summary in group],
        "std": _reduce(numeric, _std, join_text=False),
        "ci": _reduce(numeric, _interval, join_text=False),
    }


def summarise(rows: list[ResultRow]) -> list[dict[str, Any]]:
    """One summary per cell, then one mean over seeds per grid point (the cell without its seed),
    both in order of first appearance.

    A cell summary (``"kind": "cell"``) holds ``benchmark, objective, optimizer, grade, seed``,
    the full ``cell``, ``primary_metric``, ``utility_metric``, ``forget_target``,
    ``forget_unlearned``, ``utility_unlearned``, ``worst`` (:func:`worst_case`), ``attacks`` (per
    attack: the :data:`ATTACK_FIELDS` of :func:`attack_scores`), the unlearning ``cost``, its
    ``level_gap`` and ``forward_equivalents`` (``None`` on older rows), and ``ladders``: per
    ladder name (:func:`cell_ladders`) its ``family``, ``auc`` and ``breakdown`` (:class:`Ladder`).

    A mean summary (``"kind": "mean"``) has the same fields with every number replaced by its
    mean over the seeds that have it (``None`` where none has), ``seed=None``, ``seeds`` listing
    the seeds, and ``std``: the :data:`MEAN_FIELDS` again as sample standard deviations (``None``
    with one seed), and ``ci``: the same fields as ``[low, high]`` 95% percentile bootstrap intervals
    over the seeds (:func:`robustunlearn.study.stats.bootstrap_interval`; ``None`` with one seed).
    A bool becomes the fraction of seeds where it holds (``cost.reached_level``); texts that differ
    across seeds (worst-case attack names, recovery-ratio notes, breakdown rungs) are joined with ", "."""
    if not rows:
        raise ValueError("no result rows to summarise")
    by_cell: dict[RowCell, list[ResultRow]] = {}
    for row in rows:
        by_cell.setdefault(row.cell, []).append(row)
    cells: list[dict[str, Any]] = []
    by_point: dict[str, list[dict[str, Any]]] = {}  # the cell summaries of each grid point
    for cell, cell_rows in by_cell.items():
        summary = _summarise_cell(cell_rows)
        cells.append(summary)
        by_point.setdefault(json.dumps(cell.grid_point(), sort_keys=True), []).append(summary)
    return cells + [_mean_over_seeds(group) for group in by_point.values()]
