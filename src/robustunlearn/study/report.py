"""The study report: markdown, self-contained HTML and PNG plots, built from ``results.jsonl``
(its rows: :mod:`robustunlearn.study.rows`) and, where the study wrote them beside it,
``protocol.json`` and ``splits.json``.

:func:`write_report` writes ``report.md`` (plots as relative links to PNGs beside it),
``report.html`` (self-contained: the same PNGs embedded as base64 ``<img>``) and the PNGs.
The report opens with the claims table (:mod:`robustunlearn.study.claims`), then the protocol
(compute budget, level, seeds, splits, attack ladders), each cell's matched level and the attack
ladders (:func:`robustunlearn.study.scores.cell_ladders`); its other tables show, per grid point
(a cell without its seed), the mean over seeds and, with two or more seeds, its 95% percentile
bootstrap interval "[low, high]" (:mod:`robustunlearn.study.stats`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robustunlearn.core.io import atomic_write, atomic_write_text
from robustunlearn.metrics.privacy import PRIVLEAK_AUC
from robustunlearn.optim import GRADES
from robustunlearn.study.claims import (
    DEFAULT_REFERENCE_OPTIMIZER,
    MEASURES,
    ROBUSTNESS_MEASURE,
    ClaimResult,
    Measured,
    evaluate_claims,
    paired_differences,
)
from robustunlearn.study.landscape import lmc_barrier
from robustunlearn.study.rows import (
    NO_ATTACK,
    SCORINGS,
    Landscape,
    ResultRow,
    RowCell,
    read_results_jsonl,
    scored_metric,
)
from robustunlearn.study.scores import (
    MIN_REMOVED_SHARE,
    Ladder,
    attack_scores,
    cell_ladders,
    lower_is_better,
    summarise,
    utility_metric,
)
from robustunlearn.study.stats import (
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    CONTRADICTED,
    SUPPORTED,
    Interval,
    bootstrap_interval,
)
from robustunlearn.study.timing import PER_ATTACK, PHASES, percentages, study_time

FAMILY_ORDER = ("none", "quantization", "relearning", "perturbation")
RELEARN_ATTACK = "relearn"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINE_STYLES = ("-", "--", ":", "-.")
MISSING = "—"
NO_BREAKDOWN = "none within the ladder"
OVER_SHOT = "over-shot"
PROTOCOL_FILE = "protocol.json"  # written by the study beside results.jsonl
SPLITS_FILE = "splits.json"
PLOTTED_LADDER_FAMILIES = ("quantization", "perturbation")  # ladders.png; relearning has its own plot

HOW_TO_READ = (
    "Each cell unlearns the target model with one optimizer and objective from one seed, then "
    "every attack starts again from that unlearned model. Forget metrics measure what the model "
    "still knows of the forget set (lower = more forgotten); utility measures what it kept of "
    "the rest. The retained fraction is (F_attacked - c) / (F_target - c), c the metric's chance "
    "level (0.25 for 4-option multiple choice): the share of the original knowledge above chance "
    "present after the attack. The change is F_attacked - F_unlearned. The recovery ratio is that "
    "change over F_target - F_floor, what the matched forgetting level removes (F_floor: the retrain "
    "model's value, else chance), the same denominator for every cell: 0 = the attack brought nothing "
    "back, 1 = as much as separates the original model from the floor, negative = the attack removed "
    "more. It is empty, with the reason below the table, where unlearning removed less than "
    f"{MIN_REMOVED_SHARE:.0%} of F_target - F_floor. The relearn AUC is the mean forget level over the "
    "relearning curve. The utility drop is how much worse utility got under the attack (after minus "
    "before for perplexity). The worst case is the highest value over the attacks of each seed, then "
    f"averaged. Numbers are means over seeds with, in brackets, a {CONFIDENCE:.0%} percentile bootstrap "
    f"interval over the seeds ({BOOTSTRAP_RESAMPLES} resamples, seeded) when there are two or more; "
    "with few seeds these intervals are narrow (with two, the range of the two values)."
)
CLAIMS_HOW_TO_READ = (
    "Each claim of the paper, measured on this study: per seed, the difference named in 'comparison' "
    "(paired by benchmark, objective and seed; pooled over the attacks or ladders in brackets; against "
    f"a group, the difference least favourable to the claim), its mean over seeds and {CONFIDENCE:.0%} "
    "percentile bootstrap interval. Recovery claims compare excess AUCs over the control (see 'Attack "
    "ladders'): under quantization of the rtn ladder (else the first quantizer's), under relearning of "
    "the ladder scored on the subjects relearning never saw (else on the whole forget set); the in-set "
    "relearning ladders are shown, not counted. Rows without controls (older results) fall back to the "
    "recovery ratio, and the comparison says so. F_unlearned: each side's mean forget metric of the "
    "unlearned model over the seeds paired, since a model that forgot more has more to recover. "
    "Supported: the interval excludes 0 on the claimed side; contradicted: on the other; inconclusive: "
    "it spans 0, or one seed gives no interval; not measured: an optimizer, attack or landscape the "
    "claim needs is missing. 'At least' claims are tested one-sided, so a tie reads inconclusive. The "
    "utility of the claims is the reported one (the retain split's evaluation part). The utility caveat "
    "marks a robustness comparison whose more robust side has an unlearned model of lower utility, "
    "beyond the interval of the paired utility difference: damaged models relearn slowly."
)
LEVEL_HOW_TO_READ = (
    "Each cell unlearns until its level metric is within the tolerance of the retrain model's level "
    "(or, without a retrain model, of the metric's chance level: the protocol says which): the target "
    "level; or until its compute budget is spent. Forward-pass equivalents count forward "
    "passes plus backward passes at the protocol's cost each. Level gap = target level - F_unlearned: "
    "positive when the cell ended below the target level; a cell is over-shot when its gap exceeds the "
    "tolerance: it forgot more than the matched level, and its robustness numbers compare deeper forgetting."
)
LADDERS_HOW_TO_READ = (
    "A ladder is one attack at growing strength on one cell, rungs weakest first (quantization: fewer "
    "bits; noise: a larger scale; relearning: more steps, from step 0). At each rung the excess is "
    "F_attacked - F_control: what the attack brings back beyond what it gives the control model (the "
    "retrain model; the target, an upper bound, where there is none) under the same rung. Excess AUC: the "
    "mean excess over the rungs (trapezoid over the rung index). Breakdown: the weakest rung whose excess "
    "is at least half of what unlearning removed (removed = F_target - F_unlearned); 'none within the "
    "ladder' when no rung's is. Relearning ladders are scored on the whole forget set (all), on the "
    "records relearning trained on (in_set) and on those it never saw: other subjects "
    "(held_out_subjects) and the trained subjects' other attributes (held_out_attributes). Same bucket: "
    "the share of quantization codes equal to the quantized original model's (mean over the rungs); "
    "update/step: the unlearning update in units of the quantization step (the rungs' medians, median "
    f"over the rungs). Means over seeds with {CONFIDENCE:.0%} bootstrap intervals; utility is the "
    "unlearned model's."
)
PRIVACY_HOW_TO_READ = (
    "Membership inference on the forget set (members) against texts of the same distribution the "
    "target never saw (non-members). PrivLeak, in percent with MUSE's sign, compares the Min-K% AUC "
    "with the reference's: 0 = as private as the reference (retraining), negative = the forget set is "
    "still recognisable as training data (the original model scores near -100), positive = it looks "
    "less familiar than unseen text (over-unlearned), itself a signal. Means over seeds; the first "
    "column is the unlearned model, the others after each attack."
)


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    file_name: str
    caption: str


Block = Heading | Paragraph | Bullets | Table | Image


def read_results(path: Path) -> list[ResultRow]:
    """The rows of a ``results.jsonl`` (:func:`robustunlearn.study.rows.read_results_jsonl`). A line
    that is not a valid row, cannot be scored, or is scored on other metrics than the first row
    raises ``ValueError`` naming ``path:line``."""
    return read_results_jsonl(path, check=_scored_like)


def _scored_like(row: ResultRow, first: ResultRow) -> None:
    """Raise ``ValueError`` unless ``row`` can be scored, on the forget and utility metrics of ``first``
    (the tables compare rows on one of each)."""
    metrics = (row.primary_metric, attack_scores(row)["utility_metric"])
    expected = (first.primary_metric, utility_metric(first.utility))
    if metrics != expected:
        raise ValueError(
            f"scored on {metrics[0]!r} and {metrics[1]!r}, the rows above on {expected[0]!r} and {expected[1]!r}"
        )


def write_report(
    results_jsonl: Path,
    output_dir: Path,
    title: str = "Robust unlearning study",
    reference_optimizer: str = DEFAULT_REFERENCE_OPTIMIZER,
) -> dict[str, Path]:
    """Read ``results_jsonl``, write ``report.md``, ``report.html`` and the PNG plots into
    ``output_dir`` (each file atomically), and return their paths by name: ``markdown``,
    ``html``, and each plot drawn: ``forget_vs_utility``, ``relearning_curves`` (when a
    relearning row has a curve), ``recovery_by_grade`` (when an attack has a recovery ratio),
    ``lmc`` (when a row carries a landscape with an LMC curve), ``compute_curve`` (when a cell has
    an unlearning curve), ``relearning_heldout`` (when a relearning curve is scored on parts of
    the forget set), ``ladders`` (when a quantization or noise rung has a control). The report
    opens with the claims table (:func:`robustunlearn.study.claims.evaluate_claims`); claims and
    paired differences are measured against ``reference_optimizer``. ``protocol.json`` and
    ``splits.json`` are read from the folder of ``results_jsonl`` where present (``ValueError``
    naming the file when one is not a JSON object)."""
    output_dir = Path(output_dir)
    rows = read_results(results_jsonl)
    beside = Path(results_jsonl).parent
    study = _Study(rows, reference_optimizer, _read_object(beside / PROTOCOL_FILE), _read_object(beside / SPLITS_FILE))
    study.time = study_time(beside)
    plots: dict[str, tuple[Path, str]] = {}
    for name, caption, draw in (
        (
            "forget_vs_utility",
            "Forget vs utility: hollow = unlearned, filled = after each attack",
            _plot_forget_utility,
        ),
        ("relearning_curves", "Forget metric during relearning (mean over seeds)", _plot_relearning),
        (
            "recovery_by_grade",
            f"Recovery ratio by optimizer grade and attack (mean and {CONFIDENCE:.0%} bootstrap interval over cells)",
            _plot_recovery,
        ),
        ("lmc", "Linear mode connectivity between unlearned models", _plot_lmc),
        (
            "compute_curve",
            "Level metric and utility during unlearning against forward-pass equivalents (one line per seed)",
            _plot_compute,
        ),
        (
            "relearning_heldout",
            "Relearning scored on the records trained on (in-set) and held out, unlearned model vs control "
            "(mean over seeds)",
            _plot_heldout,
        ),
        ("ladders", "Excess over the control per rung (mean over seeds)", _plot_ladders),
    ):
        figure = draw(study)
        if figure is not None:
            path = output_dir / f"{name}.png"
            atomic_write(path, lambda tmp, figure=figure: figure.savefig(tmp, format="png", dpi=120))
            plots[name] = (path, caption)
    blocks = _document(study, title, {name: Image(path.name, caption) for name, (path, caption) in plots.items()})
    written = {"markdown": output_dir / "report.md", "html": output_dir / "report.html"}
    atomic_write_text(written["markdown"], _markdown(blocks))
    atomic_write_text(written["html"], _html(blocks, title, output_dir))
    return {**written, **{name: path for name, (path, _) in plots.items()}}


def _read_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (empty where there is no such file)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class _Study:
    """The rows with their summaries and ladders, the protocol and splits (empty where the study
    wrote none), and the names and orders the report uses."""

    def __init__(
        self, rows: list[ResultRow], reference_optimizer: str, protocol: dict[str, Any], splits: dict[str, Any]
    ):
        self.rows = rows
        self.reference = reference_optimizer
        self.protocol, self.splits = protocol, splits
        self.time: dict[str, Any] | None = None  # the study's time table (study/timing.py), where it wrote one
        self.cell_rows: dict[RowCell, list[ResultRow]] = {}
        for row in rows:
            self.cell_rows.setdefault(row.cell, []).append(row)
        self.ladders = {cell: {lad.name: lad for lad in cell_ladders(found)} for cell, found in self.cell_rows.items()}
        self.claims = evaluate_claims(rows, reference_optimizer=reference_optimizer)
        self.paired = paired_differences(rows, reference_optimizer)
        self.grades = {row.cell.optimizer: row.cell.grade for row in rows}
        summaries = summarise(rows)
        self.cells = [s for s in summaries if s["kind"] == "cell"]
        self.means = sorted((s for s in summaries if s["kind"] == "mean"), key=self._grid_order)
        self.primary = rows[0].primary_metric
        self.utility = utility_metric(rows[0].utility)
        self.level_metric = str(protocol.get("level_metric", self.primary))
        # The mean over rows of the original (target) and retrained models' metrics; None when no row has them.
        self.target = _mean_metrics([row.reference.target for row in rows])
        self.retrain = _mean_metrics([row.reference.retrain for row in rows])
        families = {row.attack: row.attack_family for row in rows}
        rank = {family: index for index, family in enumerate(FAMILY_ORDER)}
        first_seen = {attack: index for index, attack in enumerate(families)}
        self.attacks = sorted(families, key=lambda a: (a != NO_ATTACK, rank.get(families[a], len(rank)), first_seen[a]))
        self.families = families
        # A grid point is named by its optimizer plus whatever else varies across the grid.
        self.varying = [
            key
            for key in dict.fromkeys(k for m in self.means for k in m["cell"])
            if key not in ("optimizer", "grade") and len({json.dumps(m["cell"].get(key)) for m in self.means}) > 1
        ]

    @staticmethod
    def _grid_order(summary: dict[str, Any]) -> tuple:
        grade = summary["grade"]
        return (_grade_rank(grade), grade, str(summary["objective"]), str(summary["optimizer"]))

    def label(self, cell: dict[str, Any]) -> str:
        return " / ".join([str(cell["optimizer"])] + [f"{key} {_setting(cell.get(key))}" for key in self.varying])

    def grid_rows(self, mean: dict[str, Any]) -> list[ResultRow]:
        return [row for row in self.rows if row.cell.grid_point() == mean["cell"]]

    def grid_cells(self, mean: dict[str, Any]) -> list[RowCell]:
        """The cells (one per seed) of a grid point, by seed."""
        return sorted((cell for cell in self.cell_rows if cell.grid_point() == mean["cell"]), key=lambda c: c.seed)

    def unlearned(self, cell: RowCell) -> dict[str, Any]:
        """The :func:`attack_scores` of the cell's first row: its F_unlearned, utility before any attack."""
        return attack_scores(self.cell_rows[cell][0])

    def ladder_names(self, families: tuple[str, ...] = FAMILY_ORDER) -> list[str]:
        """The names of the ladders of ``families`` any cell has, by family, then in order of first appearance."""
        found = {name: lad.family for by_name in self.ladders.values() for name, lad in by_name.items()}
        rank = {family: index for index, family in enumerate(FAMILY_ORDER)}
        names = [name for name in found if found[name] in families]
        return sorted(names, key=lambda name: rank.get(found[name], len(rank)))


def _mean_metrics(models: list[dict[str, float] | None]) -> dict[str, float] | None:
    """The mean of each metric over the models that have metrics (``None`` when none has)."""
    found = [metrics for metrics in models if metrics]
    if not found:
        return None
    keys = dict.fromkeys(key for metrics in found for key in metrics)
    return {key: statistics.fmean(float(m[key]) for m in found if key in m) for key in keys}


def _grade_rank(grade: str) -> int:
    return GRADES.index(grade) if grade in GRADES else len(GRADES)


# ---------------------------------------------------------------------------------------------
# The document


def _number(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if abs(value) < 10:
            return f"{value:.3f}" if abs(value) >= 0.0005 else "0.000"  # no "-0.000" from rounding
        # counts averaged over seeds come back as floats: 40.0 steps reads as 40
        return f"{value:,.0f}" if value.is_integer() or abs(value) >= 1000 else f"{value:.1f}"
    return str(value)


def _setting(value: Any) -> str:
    """A cell's setting as text; a float with at most 6 significant digits, so that a swept lr
    computed as base x factor (3.0000000000000004e-05) reads as the 3e-05 it stands for."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _general(value: float | None) -> str:
    """Three significant digits, for numbers of any size (noise scales, loss increases)."""
    return MISSING if value is None else f"{value:.3g}"


def _with_interval(value: Any, interval: list[float] | None) -> str:
    """``value [low, high]``, or the value alone without an interval."""
    if value is None or interval is None:
        return _number(value)
    low, high = interval
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


def _interval_text(interval: Interval | None) -> str:
    return MISSING if interval is None else _with_interval(interval.mean, interval.as_list())


def _point_columns(study: _Study) -> list[str]:
    return ["optimizer", "grade", *study.varying, "seeds"]


def _point_cells(study: _Study, mean: dict[str, Any]) -> list[str]:
    cell = mean["cell"]
    return [
        str(cell["optimizer"]),
        str(cell["grade"]),
        *(_setting(cell.get(k)) for k in study.varying),
        str(len(mean["seeds"])),
    ]


UNATTACKED_FIELDS = ("forget", "retained_fraction", "utility_after")  # the unlearned model's own row


def _attack_table(study: _Study, attack: str) -> Table:
    fields = [
        ("forget", f"{study.primary} after attack"),
        ("forget_change", "change from unlearned"),
        ("retained_fraction", "retained fraction"),
        ("recovery_ratio", "recovery ratio"),
        ("relearn_auc", "relearn AUC"),
        ("utility_after", f"{study.utility} after attack"),
        ("utility_drop", "utility drop"),
    ]
    means = [mean for mean in study.means if attack in mean["attacks"]]
    if attack == NO_ATTACK:  # the unlearned model itself: nothing to recover or drop
        fields = [field for field in fields if field[0] in UNATTACKED_FIELDS]
    if all(mean["attacks"][attack]["relearn_auc"] is None for mean in means):
        fields = [field for field in fields if field[0] != "relearn_auc"]
    return Table(
        _point_columns(study) + [title for _, title in fields],
        [
            _point_cells(study, mean)
            + [_with_interval(mean["attacks"][attack][key], mean["ci"]["attacks"][attack][key]) for key, _ in fields]
            for mean in means
        ],
    )


def _recovery_notes(study: _Study, attack: str) -> list[Block]:
    """Why a cell has no recovery ratio under ``attack``, one bullet per cell."""
    notes = [
        f"{study.label(cell['cell'])}, seed {cell['seed']}: {cell['attacks'][attack]['recovery_ratio_note']}"
        for cell in study.cells
        if attack in cell["attacks"] and cell["attacks"][attack]["recovery_ratio_note"]
    ]
    return [Paragraph("No recovery ratio for:"), Bullets(notes)] if notes else []


def _worst_table(study: _Study) -> Table:
    columns = [f"worst {study.primary}", "by attack", "worst recovery ratio", "by attack"]
    rows = []
    for mean in study.means:
        worst, interval = mean["worst"], mean["ci"]["worst"]
        rows.append(
            _point_cells(study, mean)
            + [
                _with_interval(worst["forget"], interval["forget"]),
                worst["forget_attack"] or MISSING,
                _with_interval(worst["recovery_ratio"], interval["recovery_ratio"]),
                worst["recovery_attack"] or MISSING,
            ]
        )
    return Table(_point_columns(study) + columns, rows)


def _cost_table(study: _Study) -> Table:
    keys = list(study.means[0]["cost"])
    rows = [
        _point_cells(study, mean) + [_with_interval(mean["cost"][key], mean["ci"]["cost"][key]) for key in keys]
        for mean in study.means
    ]
    titles = [key.replace("_", " ") + (" (share of seeds)" if key == "reached_level" else "") for key in keys]
    return Table(_point_columns(study) + titles, rows)


def _landscapes(
    study: _Study, part: Callable[[Landscape], list[dict[str, float]] | None], by_pair: bool = False
) -> list[tuple[str, Landscape]]:
    """``(label, landscape)`` of each distinct landscape the rows carry with a ``part`` (each cell's
    rows repeat it), labelled by its pair (with ``by_pair``, where it has one), else by its cell."""
    seen: dict[str, tuple[RowCell, Landscape]] = {}
    for row in study.rows:
        if row.landscape is not None and part(row.landscape):
            seen.setdefault(json.dumps(part(row.landscape), sort_keys=True), (row.cell, row.landscape))
    names = [
        str(landscape.pair if by_pair and landscape.pair else study.label(cell.grid_point()))
        for cell, landscape in seen.values()
    ]
    return [
        (name if names.count(name) == 1 else f"{name} (seed {cell.seed})", landscape)
        for name, (cell, landscape) in zip(names, seen.values())
    ]


def _lmc_curves(study: _Study) -> list[tuple[str, Landscape]]:
    return _landscapes(study, lambda landscape: landscape.lmc, by_pair=True)


def _sharpness_curves(study: _Study) -> list[tuple[str, Landscape]]:
    return _landscapes(study, lambda landscape: landscape.sharpness)


def _lmc_metrics(study: _Study, curves: list[tuple[str, Landscape]]) -> list[str]:
    """The study's forget and utility metrics first, then the curves' other keys; at most three."""
    keys = list(dict.fromkeys(k for _, ls in curves for point in ls.lmc for k in point if k != "alpha"))
    preferred = [key for key in (study.primary, study.utility) if key in keys]
    return (preferred + [key for key in keys if key not in preferred])[:3]


def _landscape_blocks(study: _Study, images: dict[str, Image]) -> list[Block]:
    curves, sharp = _lmc_curves(study), _sharpness_curves(study)
    if not curves and not sharp:
        return []
    blocks: list[Block] = [Heading(2, "Loss landscape")]
    metrics = _lmc_metrics(study, curves)
    # A rise is the worse direction where lower values are the better ones: forget ROUGE (knowledge
    # resurfacing), a utility loss or perplexity; a dip for a forget loss and for utility ROUGE.
    barriers = [
        [name, metric, _number(lmc_barrier(ls.lmc, metric, higher_is_worse=lower_is_better(metric)))]
        for name, ls in curves
        if len({point["alpha"] for point in ls.lmc}) >= 2
        for metric in metrics
        if all(metric in point for point in ls.lmc)
    ]
    if barriers:
        blocks += [
            Paragraph(
                "Barrier: the largest excess of the interpolation path over the straight line between its "
                "endpoints (Frankle et al. 2020), in the direction that is worse: for forget ROUGE a rise and "
                "for a forget loss a dip (knowledge resurfacing between the two models); for utility ROUGE a "
                "fall, for a utility loss or perplexity a rise."
            ),
            Table(["pair", "metric", "barrier"], barriers),
        ]
    if "lmc" in images:
        blocks.append(images["lmc"])
    sharpness = [
        [
            name,
            "loss" if ls.sharpness_loss is None else ls.sharpness_loss,
            _general(point.get("scale")),
            f"{_general(point.get('mean_loss_increase'))} ± {_general(point.get('std'))}",
        ]
        for name, ls in sharp
        for point in ls.sharpness
    ]
    if sharpness:
        blocks += [
            Paragraph(
                "Sharpness: mean change of the loss under Gaussian weight noise of the given scale (a fraction "
                "of each weight matrix's RMS; ± std over draws). On a forget loss a negative change means the "
                "noise brings forgotten answers back."
            ),
            Table(["model", "loss", "noise scale", "loss change"], sharpness),
        ]
    return blocks


def _comparison_text(entry: Measured) -> str:
    """What a comparison measures, e.g. "excess AUC over the control under quantization [quantization
    rtn]: zo-sgd − adam < 0"; a shown comparison (not counted) says so."""
    comparison, spec = entry.comparison, MEASURES[entry.measure]
    attacks = comparison.attack or comparison.attack_family
    where = f" under {attacks}" if attacks else (" over every attack" if spec.robustness else "")
    pooled = f" [{', '.join(entry.pooled)}]" if spec.robustness and entry.pooled else ""
    sign = {"lower": " < 0", "higher": " > 0"}.get(str(entry.expected), "")
    difference = entry.subject if comparison.versus == "zero" else f"{entry.subject} − {entry.versus}"
    shown = "shown, not counted: " if comparison.shown else ""
    text = f"{shown}{spec.title}{where}{pooled}: {difference}{sign}"
    return text if entry.note is None else f"{text} ({entry.note})"


def _forget_unlearned_text(entry: Measured) -> str:
    """Each side's F_unlearned beside a robustness comparison, e.g. "zo-sgd 0.100, adam 0.120"."""
    if not (MEASURES[entry.measure].robustness and entry.forget_unlearned):
        return MISSING
    return ", ".join(f"{name} {_number(value)}" for name, value in entry.forget_unlearned.items())


def _caveat_text(entry: Measured) -> str | None:
    caveat = entry.utility_caveat
    if caveat is None:
        return None
    return f"utility of {caveat.more_robust} − {caveat.other}: {_interval_text(caveat.difference)}"


def _claims_table(claims: list[ClaimResult]) -> Table:
    """One row per claim; a claim of several comparisons lists them, "; "-separated, each with its verdict."""
    rows = []
    for number, result in enumerate(claims, start=1):
        parts = result.measured
        differences = [
            _interval_text(entry.difference) + (f": {entry.verdict}" if len(parts) > 1 else "") for entry in parts
        ]
        caveats = [text for text in map(_caveat_text, parts) if text]
        rows.append(
            [
                str(number),
                result.claim.text,
                "; ".join(map(_comparison_text, parts)),
                "; ".join(differences),
                "; ".join(str(entry.difference.seeds) if entry.difference else MISSING for entry in parts),
                "; ".join(map(_forget_unlearned_text, parts)),
                result.verdict,
                "; ".join(caveats) or MISSING,
            ]
        )
    columns = [
        "#",
        "claim",
        "comparison",
        f"difference [{CONFIDENCE:.0%} CI]",
        "seeds",
        "F_unlearned",
        "verdict",
        "utility caveat",
    ]
    return Table(columns, rows)


def _paired_blocks(study: _Study) -> list[Block]:
    """Each optimizer's robustness score minus the reference optimizer's, per attack."""
    heading, reference = Heading(2, f"Paired differences against {study.reference}"), study.reference
    if reference not in study.grades:
        return [heading, Paragraph(f"The reference optimizer {reference} is not in this study.")]
    if not study.paired:
        return []
    title = MEASURES[ROBUSTNESS_MEASURE].title
    readings = {SUPPORTED: f"recovers less than {reference}", CONTRADICTED: f"recovers more than {reference}"}
    entries = sorted(
        study.paired,
        key=lambda e: (_grade_rank(study.grades[e.subject]), e.subject, study.attacks.index(str(e.comparison.attack))),
    )
    rows = [
        [
            entry.subject,
            study.grades[entry.subject],
            str(entry.comparison.attack),
            str(entry.difference.seeds) if entry.difference else MISSING,
            _interval_text(entry.difference),
            readings.get(entry.verdict, entry.verdict) + (f" ({entry.note})" if entry.note else ""),
            _caveat_text(entry) or MISSING,
        ]
        for entry in entries
    ]
    explanation = (
        f"Per seed, each optimizer's {title} minus {reference}'s on the same benchmark, objective, seed and "
        f"attack; mean over seeds and {CONFIDENCE:.0%} percentile bootstrap interval. Negative: the optimizer "
        f"recovers less than {reference}."
    )
    difference = f"{title} − {reference}'s [{CONFIDENCE:.0%} CI]"
    columns = ["optimizer", "grade", "attack", "seeds", difference, "reading", "utility caveat"]
    return [heading, Paragraph(explanation), Table(columns, rows)]


def _privacy_blocks(study: _Study) -> list[Block]:
    """PrivLeak of each grid point before and after each attack (the Min-K% membership AUC where no
    row has a PrivLeak reference); the reason where the benchmark has no members and non-members."""
    scored = [row for row in study.rows if row.privacy and row.privacy.get("aucs")]
    heading = Heading(2, "Privacy: PrivLeak before and after each attack")
    if not scored:
        reasons = list(dict.fromkeys(row.privacy["reason"] for row in study.rows if row.privacy))
        return [heading, Paragraph(f"No membership inference: {'; '.join(reasons)}")] if reasons else []
    references = list(dict.fromkeys(row.privacy["privleak_reference"] for row in scored))
    by_privleak = any(row.privacy["privleak"] is not None for row in scored)
    title = "PrivLeak %" if by_privleak else "Min-K% AUC"

    def value(row: ResultRow) -> float | None:
        if not (row.privacy and row.privacy.get("aucs")):
            return None
        return row.privacy["privleak"] if by_privleak else row.privacy["aucs"][PRIVLEAK_AUC]

    attacks = [attack for attack in study.attacks if any(row.attack == attack for row in scored)]
    rows = []
    for mean in study.means:
        grid_rows = study.grid_rows(mean)
        found = [
            [v for row in grid_rows if row.attack == attack and (v := value(row)) is not None] for attack in attacks
        ]
        means = [f"{statistics.fmean(v):.{1 if by_privleak else 3}f}" if v else MISSING for v in found]
        rows.append(_point_cells(study, mean) + means)
    columns = [f"{title} {'unlearned' if attack == NO_ATTACK else f'after {attack}'}" for attack in attacks]
    sources = ", ".join(dict.fromkeys(row.privacy["source"] for row in scored))
    note = f"Members vs non-members: {sources}; PrivLeak reference: {', '.join(references)}."
    return [heading, Paragraph(PRIVACY_HOW_TO_READ), Paragraph(note), Table(_point_columns(study) + columns, rows)]


def _settings(study: _Study) -> list[str]:
    settings = []
    cells = [row.cell.to_json() for row in study.rows]
    for key in cells[0]:
        values = list(dict.fromkeys(_setting(cell[key]) for cell in cells))
        settings.append(f"{key}: {', '.join(values)}")
    settings += [
        f"attacks: {', '.join(study.attacks)}",
        f"forget metric: {study.primary} (lower = more forgotten); utility metric: {study.utility}",
        f"{len(study.rows)} rows, {len(study.cells)} cells, {len(study.means)} grid points",
        f"reference optimizer of the claims and paired differences: {study.reference}",
    ]
    references = (("target (original model)", study.target), ("retrain (never saw the forget set)", study.retrain))
    for name, reference in references:
        if reference:
            settings.append(
                f"{name}: {study.primary} {_number(reference.get(study.primary))}, "
                f"{study.utility} {_number(reference.get(study.utility))}"
            )
    return settings


def _listed(values: Any) -> str:
    return ", ".join(map(str, values)) if isinstance(values, list) and values else MISSING


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, list) else value


def _protocol_items(protocol: dict[str, Any]) -> list[str]:
    """The protocol.json fields as sentences (those present)."""
    items = []
    if "compute_budget" in protocol:
        budget = protocol["compute_budget"]
        text = "no compute budget" if budget is None else f"{_general(budget)} forward-pass equivalents per cell"
        items.append(f"compute budget: {text}")
    if "backward_cost" in protocol:
        cost = _general(protocol["backward_cost"])
        items.append(f"forward-pass equivalents = forward passes + {cost} x backward passes")
    if "check_every" in protocol:
        items.append(f"the level is checked every {protocol['check_every']} steps")
    if "level_metric" in protocol:
        tolerance = _general(protocol.get("level_tolerance"))
        floor = {
            "retrain": "the retrain model's level",
            "chance": "the metric's chance level (no retrain model: the target is the control)",
            None: "nothing: no retrain model, so no matched level and every cell runs to its budget",
        }[protocol.get("level_floor", "retrain")]
        items.append(f"level metric: {protocol['level_metric']}, tolerance {tolerance} above {floor}")
    if "seeds" in protocol:
        items.append(f"seeds reported: {_listed(protocol['seeds'])}")
    if "sweep_seeds" in protocol:
        items.append(
            f"sweep seeds (learning rates are tuned on these, never reported): {_listed(protocol['sweep_seeds'])}"
        )
    if "reference_optimizer" in protocol:
        items.append(f"reference optimizer of the protocol: {protocol['reference_optimizer']}")
    if "attacks" in protocol:
        items.append(f"attacks: {_listed(protocol['attacks'])}")
    return items


def _retain_item(retain: dict[str, Any]) -> str:
    """The retain split of splits.json: each part's share, subjects and records per split."""
    shares, subjects, records = (retain.get(key) or {} for key in ("shares", "subjects", "records"))
    parts = []
    for part in dict.fromkeys([*shares, *subjects, *records]):
        text = f"{part}: {_count(subjects.get(part, MISSING))} subjects"
        if part in shares:
            text += f", share {shares[part]:.0%}"
        if records.get(part):
            text += ", records " + ", ".join(f"{split} {n}" for split, n in records[part].items())
        parts.append(text)
    text = (
        f"retain split by subject (seed {retain.get('seed', MISSING)}): {'; '.join(parts)}. The unlearning "
        "loss's retain term trains on the regulariser part, the learning-rate sweep reads validation, the "
        "reported utility is on evaluation."
    )
    return text + (f" {retain['protocol']}." if retain.get("protocol") else "")


def _relearn_split_table(relearn: dict[str, Any]) -> Table:
    """The relearning split of each seed (splits.json): what relearning trained on, what it held out."""
    rows = []
    for seed, split in relearn.items():
        counts = split.get("counts") or {}
        rows.append(
            [
                str(seed),
                str(split.get("split", MISSING)),
                _listed(split.get("subjects")),
                _listed(split.get("attributes")),
                *(_number(counts.get(key)) for key in ("train", "held_out_subjects", "held_out_attributes")),
                str(split.get("note", "")),
            ]
        )
    columns = [
        "seed",
        "from split",
        "subjects trained on",
        "attributes trained on",
        "records trained on",
        "held-out subjects' records",
        "held-out attributes' records",
        "note",
    ]
    return Table(columns, rows)


def _ladder_rungs(study: _Study) -> list[str]:
    """Each ladder's rungs, weakest first, as the first cell that has it climbs them."""
    first = {}
    for by_name in study.ladders.values():
        for name, ladder in by_name.items():
            first.setdefault(name, ladder)
    return [f"{name}: {' → '.join(p.rung for p in first[name].points)}" for name in study.ladder_names()]


def _protocol_blocks(study: _Study) -> list[Block]:
    """protocol.json as bullets, splits.json's retain split and relearning splits, the ladders' rungs."""
    blocks: list[Block] = [Heading(2, "Protocol")]
    items = _protocol_items(study.protocol)
    if study.splits.get("retain"):
        items.append(_retain_item(study.splits["retain"]))
    if items:
        blocks.append(Bullets(items))
    if not study.protocol and not study.splits:
        note = f"No {PROTOCOL_FILE} or {SPLITS_FILE} beside the results: written before the study recorded them."
        blocks.append(Paragraph(note))
    if study.splits.get("relearn"):
        explanation = (
            "The relearning split of each seed: relearning trains on the named subjects' records on the named "
            "attributes; it is scored apart on the other subjects' records and on the trained subjects' other "
            "attributes, which it never saw."
        )
        blocks += [Paragraph(explanation), _relearn_split_table(study.splits["relearn"])]
    rungs = _ladder_rungs(study)
    if rungs:
        blocks += [Paragraph("Attack ladders, rungs weakest first:"), Bullets(rungs)]
    return blocks


def _stopped(row: ResultRow) -> str:
    if row.cost.reached_level:
        return "level reached"
    return "budget spent" if row.cost.budget_spent else "step limit"


def _over_shot(study: _Study, row: ResultRow) -> str:
    """:data:`OVER_SHOT` when the cell ended more than the tolerance below its target level."""
    tolerance = row.cost.level_tolerance
    if tolerance is None:
        tolerance = study.protocol.get("level_tolerance")
    if row.cost.level_gap is None or tolerance is None:
        return MISSING
    return OVER_SHOT if row.cost.level_gap > tolerance else "within tolerance"


def _level_blocks(study: _Study) -> list[Block]:
    """Per cell: what its unlearning spent, where it stopped and how far below its level it ended."""
    columns = ["optimizer", "grade", *study.varying, "seed", "steps", "forward-pass equivalents", "budget"]
    columns += ["stopped", "target level", f"F_unlearned ({study.primary})", "level gap", OVER_SHOT]
    rows, over = [], []
    for mean in study.means:
        for cell in study.grid_cells(mean):
            row = next((r for r in study.cell_rows[cell] if r.attack == NO_ATTACK), study.cell_rows[cell][0])
            cost, flag = row.cost, _over_shot(study, row)
            cells = _point_cells(study, mean)[:-1] + [str(cell.seed), _number(cost.steps)]
            cells += [_number(cost.forward_equivalents), _number(cost.compute_budget), _stopped(row)]
            cells += [_number(cost.target_level), _number(study.unlearned(cell)["forget_unlearned"])]
            rows.append(cells + [_number(cost.level_gap), flag])
            if flag == OVER_SHOT:
                over.append(f"{study.label(cell.grid_point())}, seed {cell.seed}")
    blocks: list[Block] = [Heading(2, "Matched level"), Paragraph(LEVEL_HOW_TO_READ), Table(columns, rows)]
    if over:
        blocks.append(Paragraph(f"Over-shot (their robustness compares deeper forgetting): {'; '.join(over)}."))
    return blocks


def _seed_interval(values: list[float]) -> str:
    """Mean [interval] over seeds of ``values`` (one per seed)."""
    return _interval_text(bootstrap_interval(values)) if values else MISSING


def _breakdown_text(found: list[tuple[RowCell, Ladder]]) -> str:
    """The breakdown rung, once when every seed agrees, else per seed; :data:`MISSING` without controls."""
    labels = [
        (cell.seed, MISSING if all(p.excess is None for p in ladder.points) else ladder.breakdown or NO_BREAKDOWN)
        for cell, ladder in found
    ]
    if len({label for _, label in labels}) == 1:
        return labels[0][1]
    return "; ".join(f"seed {seed}: {label}" for seed, label in labels)


def _quantization_diagnostics(study: _Study, found: list[tuple[RowCell, Ladder]]) -> list[str]:
    """Mean same-bucket share and median update/step over each seed's rungs, then over seeds."""
    same_bucket, update_to_step = [], []
    for cell, ladder in found:
        attacks = {point.attack for point in ladder.points}
        configs = [row.attack_config or {} for row in study.cell_rows[cell] if row.attack in attacks]
        shares = [float(c["same_bucket"]) for c in configs if c.get("same_bucket") is not None]
        ratios = [
            float(c["update_to_step"]["median"])
            for c in configs
            if (c.get("update_to_step") or {}).get("median") is not None
        ]
        if shares:
            same_bucket.append(statistics.fmean(shares))
        if ratios:
            update_to_step.append(statistics.median(ratios))
    return [_seed_interval(same_bucket), _seed_interval(update_to_step)]


def _ladder_table(study: _Study, name: str, family: str) -> Table:
    columns = _point_columns(study) + ["excess AUC", "breakdown", "removed", "F_unlearned", "utility"]
    if family == "quantization":
        columns += ["same bucket", "update/step"]
    rows = []
    for mean in study.means:
        found = [(cell, study.ladders[cell][name]) for cell in study.grid_cells(mean) if name in study.ladders[cell]]
        if not found:
            continue
        unlearned = [study.unlearned(cell) for cell, _ in found]
        cells = _point_cells(study, mean)[:-1] + [str(len(found))]
        cells += [
            _seed_interval([ladder.auc for _, ladder in found if ladder.auc is not None]),
            _breakdown_text(found),
            _seed_interval([ladder.removed for _, ladder in found]),
            _seed_interval([scores["forget_unlearned"] for scores in unlearned]),
            _seed_interval([scores["utility_before"] for scores in unlearned]),
        ]
        rows.append(cells + (_quantization_diagnostics(study, found) if family == "quantization" else []))
    return Table(columns, rows)


def _ladder_blocks(study: _Study, images: dict[str, Image]) -> list[Block]:
    """A table per ladder with a control; a note where the rows have ladders but no controls."""
    controlled = {
        name
        for by_name in study.ladders.values()
        for name, ladder in by_name.items()
        if any(point.excess is not None for point in ladder.points)
    }
    names = [name for name in study.ladder_names() if name in controlled]
    if not names:
        note = "The rows have no controls (written before them): no excess over the control, no ladder scores."
        return [Heading(2, "Attack ladders"), Paragraph(note)] if study.ladder_names() else []
    blocks: list[Block] = [Heading(2, "Attack ladders"), Paragraph(LADDERS_HOW_TO_READ)]
    families = {name: lad.family for by_name in study.ladders.values() for name, lad in by_name.items()}
    for name in names:
        blocks += [Heading(3, f"Ladder: {name} ({families[name]})"), _ladder_table(study, name, families[name])]
    return blocks + [images[name] for name in ("ladders", "relearning_heldout") if name in images]


GGUF_HOW_TO_READ = (
    "The original model was read from a GGUF file in llama.cpp's Q4_1 format: 4-bit codes in blocks "
    "of 32 weights of a row, each block with its own step and minimum. Its weights are those codes "
    "dequantized, so a 4-bit attack on the same grid could land back on the original codes for "
    "reasons that have nothing to do with unlearning; the quantization attacks of this study use "
    "other grids (RTN in groups of 128 columns, NF4 in blocks of 64, GPTQ in groups of 128). Same "
    "Q4_1 code: the share of the original file's codes that a model keeps when re-encoded in Q4_1 "
    "(its own blocks' steps and minima), for the unlearned model and for the attacked one; 1 means "
    "re-exporting it to Q4_1 gives back the original file. Means over seeds with "
    f"{CONFIDENCE:.0%} bootstrap intervals."
)


def _gguf_blocks(study: _Study) -> list[Block]:
    """Per grid point and quantization attack, the share of the original GGUF file's Q4_1 codes
    the unlearned and the attacked model keep; nothing when no row has it."""
    rows = []
    for mean in study.means:
        by_attack: dict[str, list[dict[str, Any]]] = {}
        for cell in study.grid_cells(mean):
            for row in study.cell_rows[cell]:
                kept = (row.attack_config or {}).get("gguf_q4_1_same_code")
                if kept is not None:
                    by_attack.setdefault(row.attack, []).append(kept)
        for attack, kept in by_attack.items():
            rows.append(
                _point_cells(study, mean)[:-1]
                + [str(len(kept)), attack]
                + [_seed_interval([float(k[model]) for k in kept]) for model in ("unlearned", "attacked")]
            )
    if not rows:
        return []
    columns = _point_columns(study) + ["attack", "same Q4_1 code: unlearned", "attacked"]
    return [
        Heading(2, "Same bucket against the original GGUF codes"),
        Paragraph(GGUF_HOW_TO_READ),
        Table(columns, rows),
    ]


def _document(study: _Study, title: str, images: dict[str, Image]) -> list[Block]:
    blocks: list[Block] = [
        Heading(1, title),
        Heading(2, "Claims"),
        Paragraph(CLAIMS_HOW_TO_READ),
        _claims_table(study.claims),
        *_protocol_blocks(study),
        Heading(2, "Setup"),
        Bullets(_settings(study)),
        Heading(2, "How to read this"),
        Paragraph(HOW_TO_READ),
    ]
    if "forget_vs_utility" in images:
        blocks.append(images["forget_vs_utility"])
    blocks += _level_blocks(study)
    if "compute_curve" in images:
        blocks.append(images["compute_curve"])
    blocks += _ladder_blocks(study, images)
    blocks += _gguf_blocks(study)
    for attack in study.attacks:
        if attack == NO_ATTACK:
            blocks += [Heading(2, "No attack (the unlearned model)"), _attack_table(study, attack)]
        else:
            heading = Heading(2, f"Attack: {attack} ({study.families[attack] or 'unknown family'})")
            blocks += [heading, _attack_table(study, attack), *_recovery_notes(study, attack)]
    blocks += [Heading(2, "Worst case over the attacks"), _worst_table(study), *_paired_blocks(study)]
    blocks += _privacy_blocks(study)
    blocks += [Heading(2, "Cost of unlearning"), _cost_table(study)]
    plots = [images[name] for name in ("relearning_curves", "recovery_by_grade") if name in images]
    if plots:
        blocks += [Heading(2, "Plots"), *plots]
    return blocks + _landscape_blocks(study, images) + _time_blocks(study.time)


def _time_blocks(time: dict[str, Any] | None) -> list[Block]:
    """'Where the time went': seconds and share per phase (attacks and controls per attack), then
    per cell; nothing without a time table."""
    if not time:
        return []
    parts: dict[str, float] = {}
    for phase, seconds in time["phases"].items():
        by_attack = time[PER_ATTACK[phase]] if phase in PER_ATTACK else {}
        titles = {f"{PHASES[phase]}: {name}": value for name, value in by_attack.items()}
        parts.update(titles or {PHASES.get(phase, phase): seconds})
    shares = percentages(parts)
    rows = [[name, f"{seconds:.1f}", f"{shares[name]}%"] for name, seconds in parts.items()]
    rows.append(["total", f"{time['seconds']:.1f}", "100%"])
    resumed = sum(cell["resumed"] for cell in time["cells"].values())
    note = (
        f"Wall seconds over the study's {time['runs']} run(s). A phase inside another counts once, in the "
        "inner one; an attack's time includes the evaluation of the attacked model, a control's that of the "
        "attacked control (computed once per seed and attack, then read back in about 0 s); other: what no "
        "phase accounts for. A cell killed midway runs again from scratch, its lost time uncounted."
        + (f" {resumed} cell(s) were finished by an earlier run: their times are that run's." if resumed else "")
        + _parallel_note(time)
    )
    phases = Table(["phase", "seconds", "share"], rows)
    return [Heading(2, "Where the time went"), Paragraph(note), phases, _cell_time_table(time["cells"])]


def _parallel_note(time: dict[str, Any]) -> str:
    if time.get("workers", 1) <= 1:
        return ""
    return (
        f" Cells ran in {time['workers']} worker processes of {time['threads']} torch thread(s) each: the "
        f"phases add up each process's seconds, so the total exceeds the {time['wall_seconds']:.1f} s of wall time."
    )


def _cell_time_table(cells: dict[str, dict[str, Any]]) -> Table:
    """Seconds per cell and phase; a cell finished by an earlier run is marked, one that left no
    times (finished before the study kept them) shows dashes."""
    found = {phase for cell in cells.values() for phase in cell["phases"]}
    phases = [phase for phase in PHASES if phase in found]
    rows = []
    for name, cell in cells.items():
        label = name + (" (earlier run)" if cell["resumed"] else "")
        if cell["seconds"] is None:
            rows.append([label, MISSING] + [MISSING for _ in phases])
            continue
        values = [cell["seconds"]] + [cell["phases"].get(phase, 0.0) for phase in phases]
        rows.append([label] + [f"{value:.1f}" for value in values])
    return Table(["cell", "seconds"] + [PHASES[phase] for phase in phases], rows)


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = [
                "| " + " | ".join(map(_markdown_cell, block.columns)) + " |",
                "|" + "|".join("---" for _ in block.columns) + "|",
                *("| " + " | ".join(map(_markdown_cell, row)) + " |" for row in block.rows),
            ]
            parts.append("\n".join(lines))
        else:
            parts.append(f"![{block.caption}]({block.file_name})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


HTML_STYLE = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}img{max-width:100%}figcaption{font-style:italic}"
)


def _html(blocks: list[Block], title: str, image_dir: Path) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(column)}</th>" for column in block.columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in block.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode((image_dir / block.file_name).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{HTML_STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# The plots (Agg canvases: no display and no pyplot global state)


def _figure(panels: int = 1, width: float = 6.5, height: float = 4.5) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, index + 1) for index in range(panels)]


def _style(index: int) -> dict[str, str]:
    return {"color": f"C{index % 10}", "marker": MARKERS[index % len(MARKERS)]}


def _reference_stars(study: _Study, axes: Any) -> None:
    for name, reference, colour in (("target", study.target, "black"), ("retrain", study.retrain, "grey")):
        if reference and study.primary in reference and study.utility in reference:
            axes.scatter(
                reference[study.primary],
                reference[study.utility],
                marker="*",
                s=220,
                color=colour,
                label=name,
                zorder=3,
            )


def _plot_forget_utility(study: _Study) -> Figure:
    figure, (axes,) = _figure()
    for index, mean in enumerate(study.means):
        style = _style(index)
        start = (mean["forget_unlearned"], mean["utility_unlearned"])
        axes.scatter(
            *start,
            marker=style["marker"],
            s=80,
            facecolors="none",
            edgecolors=style["color"],
            label=study.label(mean["cell"]),
        )
        for attack, scores in mean["attacks"].items():
            if attack == NO_ATTACK or scores["forget"] is None or scores["utility_after"] is None:
                continue
            end = (scores["forget"], scores["utility_after"])
            axes.scatter(*end, marker=style["marker"], s=40, color=style["color"])
            axes.annotate(
                "",
                xy=end,
                xytext=start,
                arrowprops={"arrowstyle": "->", "color": style["color"], "alpha": 0.35, "lw": 0.8},
            )
            axes.annotate(attack, end, xytext=(3, 3), textcoords="offset points", fontsize=6, color=style["color"])
    _reference_stars(study, axes)
    axes.set_xlabel(f"{study.primary} (forget; lower = more forgotten)")
    axes.set_ylabel(f"{study.utility} (utility)")
    axes.set_title("hollow: unlearned, filled: after each attack", fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the corners hold the stars
    return figure


def _mean_curve(curves: list[list[dict[str, float]]], metric: str) -> tuple[list[float], list[float]]:
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        for point in curve:
            if metric in point:
                by_step.setdefault(float(point["step"]), []).append(float(point[metric]))
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[step]) for step in steps]


def _plot_relearning(study: _Study) -> Figure | None:
    with_curves = [a for a in study.attacks if any(r.attack == a and r.curve for r in study.rows)]
    attacks = sorted(with_curves, key=lambda attack: attack != RELEARN_ATTACK)
    if not attacks:
        return None
    figure, panels = _figure(len(attacks))
    for attack, axes in zip(attacks, panels):
        for index, mean in enumerate(study.means):
            curves = [row.curve for row in study.grid_rows(mean) if row.attack == attack and row.curve]
            if curves:
                steps, values = _mean_curve(curves, study.primary)
                axes.plot(steps, values, markersize=4, label=study.label(mean["cell"]), **_style(index))
        for name, reference, line in (("target", study.target, ":"), ("retrain", study.retrain, "--")):
            if reference and study.primary in reference:
                axes.axhline(
                    reference[study.primary], color="black" if name == "target" else "grey", linestyle=line, label=name
                )
        axes.set_title(attack)
        axes.set_xlabel("relearning step")
        axes.set_ylabel(study.primary)
        axes.legend(fontsize=7)
    return figure


def _plot_recovery(study: _Study) -> Figure | None:
    attacks = [attack for attack in study.attacks if attack != NO_ATTACK]
    grades = sorted({cell["grade"] for cell in study.cells}, key=lambda grade: (_grade_rank(grade), grade))
    ratios = {
        (grade, attack): [
            cell["attacks"][attack]["recovery_ratio"]
            for cell in study.cells
            if cell["grade"] == grade
            and attack in cell["attacks"]
            and cell["attacks"][attack]["recovery_ratio"] is not None
        ]
        for grade in grades
        for attack in attacks
    }
    if not any(ratios.values()):
        return None
    figure, (axes,) = _figure(width=max(6.5, 1.6 * len(grades)))
    width = 0.8 / len(attacks)
    for index, attack in enumerate(attacks):
        positions = [g + (index - (len(attacks) - 1) / 2) * width for g in range(len(grades))]
        # NaN draws no bar (no cell of that grade met the attack) and no error bar (one cell)
        intervals = [bootstrap_interval(ratios[grade, attack]) if ratios[grade, attack] else None for grade in grades]
        heights = [math.nan if interval is None else interval.mean for interval in intervals]
        below = [math.nan if i is None or i.low is None else i.mean - i.low for i in intervals]
        above = [math.nan if i is None or i.high is None else i.high - i.mean for i in intervals]
        axes.bar(positions, heights, width, yerr=[below, above], capsize=2, label=attack, color=f"C{index % 10}")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.axhline(1, color="grey", linestyle=":", linewidth=0.8)
    axes.set_xticks(range(len(grades)), grades, rotation=15, fontsize=8)
    axes.set_ylabel(f"recovery ratio of {study.primary}")
    axes.set_title("0 = nothing recovered, 1 = as much as separates the original model from the floor", fontsize=9)
    axes.legend(fontsize=7)
    return figure


def _plot_lmc(study: _Study) -> Figure | None:
    curves = _lmc_curves(study)
    if not curves:
        return None
    metrics = _lmc_metrics(study, curves)
    figure, panels = _figure(len(metrics))
    for metric, axes in zip(metrics, panels):
        for index, (name, landscape) in enumerate(curves):
            points = sorted((p["alpha"], p[metric]) for p in landscape.lmc if metric in p)
            axes.plot([a for a, _ in points], [v for _, v in points], markersize=4, label=name, **_style(index))
        axes.set_xlabel("α  (θ = (1-α)·θ_a + α·θ_b)")
        axes.set_ylabel(metric)
        axes.legend(fontsize=7)
    return figure


def _optimizer_colours(study: _Study) -> dict[str, str]:
    """One colour per optimizer, in grade order."""
    optimizers = dict.fromkeys(str(mean["optimizer"]) for mean in study.means)
    return {optimizer: f"C{index % 10}" for index, optimizer in enumerate(optimizers)}


def _unlearning_curve(rows: list[ResultRow]) -> list[dict[str, float]] | None:
    return next((row.unlearning_curve for row in rows if row.unlearning_curve), None)


def _plot_compute(study: _Study) -> Figure | None:
    """Level metric and utility against forward-pass equivalents during unlearning, a line per cell."""
    curves = [(cell, curve) for cell, rows in study.cell_rows.items() if (curve := _unlearning_curve(rows))]
    if not curves:
        return None
    colours = _optimizer_colours(study)
    seeds = sorted({cell.seed for cell, _ in curves})
    figure, panels = _figure(2)
    for metric, axes in zip((study.level_metric, study.utility), panels):
        for cell, curve in curves:
            points = sorted(
                (p["forward_equivalents"], p[metric]) for p in curve if metric in p and "forward_equivalents" in p
            )
            if points:
                axes.plot(
                    [x for x, _ in points],
                    [y for _, y in points],
                    color=colours.get(cell.optimizer, "black"),
                    linestyle=LINE_STYLES[seeds.index(cell.seed) % len(LINE_STYLES)],
                    marker="o",
                    markersize=3,
                    label=f"{study.label(cell.grid_point())}, seed {cell.seed}",
                )
        if study.protocol.get("compute_budget") is not None:
            axes.axvline(study.protocol["compute_budget"], color="grey", linestyle=":", label="compute budget")
        axes.set_xlabel("forward-pass equivalents")
        axes.set_ylabel(metric)
        axes.legend(fontsize=6)
    targets = [rows[0].cost.target_level for rows in study.cell_rows.values() if rows[0].cost.target_level is not None]
    if targets:
        panels[0].axhline(statistics.fmean(targets), color="black", linestyle="--", linewidth=0.8)
    panels[0].set_title("level metric (dashed: mean target level)", fontsize=9)
    panels[1].set_title("utility on the retain-evaluation subset", fontsize=9)
    return figure


def _plot_heldout(study: _Study) -> Figure | None:
    """Per optimizer, the relearning curves on each part of the forget set, unlearned model vs control."""
    keys = {scoring: scored_metric(study.primary, scoring) for scoring in SCORINGS}
    scored = [
        row
        for row in study.rows
        if row.attack_family == "relearning" and row.curve and any(key in p for p in row.curve for key in keys.values())
    ]
    if not scored:
        return None
    attack = RELEARN_ATTACK if any(row.attack == RELEARN_ATTACK for row in scored) else scored[0].attack
    optimizers = [
        o for o in _optimizer_colours(study) if any(r.cell.optimizer == o and r.attack == attack for r in scored)
    ]
    figure, panels = _figure(len(optimizers), width=4.5)
    for optimizer, axes in zip(optimizers, panels):
        rows = [row for row in scored if row.cell.optimizer == optimizer and row.attack == attack]
        sources = (
            ("unlearned", [row.curve for row in rows], "C0"),
            ("control", [row.control.curve for row in rows if row.control and row.control.curve], "grey"),
        )
        for (scoring, key), style in zip(keys.items(), LINE_STYLES):
            for source, curves, colour in sources:
                steps, values = _mean_curve(curves, key)
                if steps:
                    axes.plot(
                        steps,
                        values,
                        color=colour,
                        linestyle=style,
                        marker="o",
                        markersize=3,
                        label=f"{source}, {scoring}",
                    )
        axes.set_title(f"{optimizer} ({attack})", fontsize=9)
        axes.set_xlabel("relearning step")
        axes.set_ylabel(study.primary)
        axes.legend(fontsize=6)
    return figure


def _mean_excess(study: _Study, mean: dict[str, Any], name: str) -> dict[str, tuple[float, float]]:
    """Per rung label of the ladder ``name``: its strength and the mean excess over the grid point's seeds."""
    found: dict[str, tuple[float, list[float]]] = {}
    ladders = [study.ladders[cell][name] for cell in study.grid_cells(mean) if name in study.ladders[cell]]
    for ladder in ladders:
        for point in ladder.points:
            if point.excess is not None:
                found.setdefault(point.rung, (point.strength, []))[1].append(point.excess)
    return {rung: (strength, statistics.fmean(values)) for rung, (strength, values) in found.items()}


def _plot_ladders(study: _Study) -> Figure | None:
    """Excess over the control per rung of each quantization and noise ladder, a line per grid point."""
    excesses = {
        name: [
            (index, mean, by_rung)
            for index, mean in enumerate(study.means)
            if (by_rung := _mean_excess(study, mean, name))
        ]
        for name in study.ladder_names(PLOTTED_LADDER_FAMILIES)
    }
    excesses = {name: lines for name, lines in excesses.items() if lines}
    if not excesses:
        return None
    figure, panels = _figure(len(excesses), width=4.5)
    for (name, lines), axes in zip(excesses.items(), panels):
        strengths = {rung: strength for _, _, by_rung in lines for rung, (strength, _) in by_rung.items()}
        rungs = sorted(strengths, key=strengths.__getitem__)
        for index, mean, by_rung in lines:
            present = [rung for rung in rungs if rung in by_rung]
            positions = [rungs.index(rung) for rung in present]
            values = [by_rung[rung][1] for rung in present]
            axes.plot(positions, values, markersize=4, label=study.label(mean["cell"]), **_style(index))
        axes.axhline(0, color="black", linewidth=0.8)
        axes.set_xticks(range(len(rungs)), rungs, fontsize=8)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("rung (weakest first)")
        axes.set_ylabel(f"{study.primary}: attacked - control")
        axes.legend(fontsize=7)
    return figure
