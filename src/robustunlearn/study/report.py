"""The study report: markdown, self-contained HTML and PNG plots, built from ``results.jsonl``
(its rows: :mod:`robustunlearn.study.rows`).

:func:`write_report` writes ``report.md`` (plots as relative links to PNGs beside it),
``report.html`` (self-contained: the same PNGs embedded as base64 ``<img>``) and the PNGs.
The report opens with the claims table (:mod:`robustunlearn.study.claims`); its other tables show,
per grid point (a cell without its seed), the mean over seeds and, with two or more seeds, its 95%
percentile bootstrap interval "[low, high]" (:mod:`robustunlearn.study.stats`).
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
from robustunlearn.study.rows import NO_ATTACK, Landscape, ResultRow, RowCell, read_results_jsonl
from robustunlearn.study.scores import MIN_REMOVED_SHARE, attack_scores, lower_is_better, summarise, utility_metric
from robustunlearn.study.stats import (
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    CONTRADICTED,
    SUPPORTED,
    Interval,
    bootstrap_interval,
)

FAMILY_ORDER = ("none", "quantization", "relearning", "perturbation")
RELEARN_ATTACK = "relearn"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
MISSING = "—"

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
    "(paired by benchmark, objective and seed; pooled over the attacks of the family; against a group, "
    f"the difference least favourable to the claim), its mean over seeds and {CONFIDENCE:.0%} percentile "
    "bootstrap interval. Supported: the interval excludes 0 on the claimed side; contradicted: on the "
    "other; inconclusive: it spans 0, or one seed gives no interval; not measured: an optimizer, "
    "attack or landscape the claim needs is missing. 'At least' claims are tested one-sided, so a tie "
    "reads inconclusive. The utility caveat marks a comparison whose more robust side has an unlearned "
    "model of lower utility, beyond the interval: damaged models relearn slowly."
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
    ``lmc`` (when a row carries a landscape with an LMC curve). The report opens with the claims
    table (:func:`robustunlearn.study.claims.evaluate_claims`); claims and paired differences are
    measured against ``reference_optimizer``."""
    output_dir = Path(output_dir)
    rows = read_results(results_jsonl)
    study = _Study(rows, reference_optimizer)
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


class _Study:
    """The rows with their summaries, and the names and orders the report uses."""

    def __init__(self, rows: list[ResultRow], reference_optimizer: str):
        self.rows = rows
        self.reference = reference_optimizer
        self.claims = evaluate_claims(rows, reference_optimizer=reference_optimizer)
        self.paired = paired_differences(rows, reference_optimizer)
        self.grades = {row.cell.optimizer: row.cell.grade for row in rows}
        summaries = summarise(rows)
        self.cells = [s for s in summaries if s["kind"] == "cell"]
        self.means = sorted((s for s in summaries if s["kind"] == "mean"), key=self._grid_order)
        self.primary = rows[0].primary_metric
        self.utility = utility_metric(rows[0].utility)
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
        return " / ".join([str(cell["optimizer"])] + [f"{key} {cell.get(key)}" for key in self.varying])

    def grid_rows(self, mean: dict[str, Any]) -> list[ResultRow]:
        return [row for row in self.rows if row.cell.grid_point() == mean["cell"]]


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
        *(str(cell.get(k)) for k in study.varying),
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
    """What a comparison measures, e.g. "recovery ratio under quantization: zo-sgd - adam < 0"."""
    comparison, spec = entry.comparison, MEASURES[entry.comparison.measure]
    attacks = comparison.attack or comparison.attack_family
    where = f" under {attacks}" if attacks else (" over every attack" if spec.per_attack else "")
    sign = {"lower": " < 0", "higher": " > 0"}.get(str(entry.expected), "")
    difference = entry.subject if comparison.versus == "zero" else f"{entry.subject} − {entry.versus}"
    text = f"{spec.title}{where}: {difference}{sign}"
    return text if entry.note is None else f"{text} ({entry.note})"


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
                result.verdict,
                "; ".join(caveats) or MISSING,
            ]
        )
    columns = ["#", "claim", "comparison", f"difference [{CONFIDENCE:.0%} CI]", "seeds", "verdict", "utility caveat"]
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
        values = list(dict.fromkeys(str(cell[key]) for cell in cells))
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


def _document(study: _Study, title: str, images: dict[str, Image]) -> list[Block]:
    blocks: list[Block] = [
        Heading(1, title),
        Heading(2, "Claims"),
        Paragraph(CLAIMS_HOW_TO_READ),
        _claims_table(study.claims),
        Heading(2, "Setup"),
        Bullets(_settings(study)),
        Heading(2, "How to read this"),
        Paragraph(HOW_TO_READ),
    ]
    if "forget_vs_utility" in images:
        blocks.append(images["forget_vs_utility"])
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
    return blocks + _landscape_blocks(study, images)


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
