"""The grade study: optimizers x objectives x seeds, each cell unlearned to a matched forgetting
level within a matched compute budget, then attacked along ladders of strength, beside a control.

The protocol (README "The study's protocol"):

* **Splits** (:mod:`robustunlearn.data.splits`, seeded, written to ``splits.json``): retain subjects
  are split into the unlearning loss's regulariser (the *training view* the engine sees), the lr
  sweep's validation set and the reported evaluation set; the relearning attacker gets some forget
  subjects (and, where records have attributes, some of their attributes) and is scored in-set
  and on the forget records it never saw.
* **Matched forgetting**: every cell checks its forget metric every ``check_every`` steps, the same
  for every optimizer (a hybrid's blocks end on those checks), and stops at the retrain reference's
  level plus the evaluation preset's tolerance; ``level_gap`` records how far below it ended.
* **Matched compute**: a budget in forward-pass equivalents (``compute_budget``), so a
  zeroth-order optimizer takes as many of its cheap steps as the budget buys.
* **Controls** (:mod:`robustunlearn.study.controls`): every attack also runs on the retrain model.
* **Learning rates** (:mod:`robustunlearn.study.sweep`) are tuned on the validation set and on
  seeds that are never reported.

A finished cell leaves ``cells/<id>/rows.json``; a rerun skips it, so a killed study resumes.

**Several processes** (``torchrun``, ``accelerate launch``: :func:`~robustunlearn.core.distributed.data_parallel`):
the cells run one after the other, each on every rank. Rank 0 prepares and evaluates the
references first (the others then read them); every rank unlearns (data parallel, or on FSDP-sharded
weights in parallel mode fsdp), gathers the unlearned model whole, and runs the rest of the cell
alike on it (evaluations, attacks; relearning trains on sharded weights in mode fsdp); rank 0
alone writes the files. The ranks must see one filesystem (the output and cache directories).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from robustunlearn.attacks import AttackContext, parse_attack
from robustunlearn.attacks.quant.diagnostics import q4_1_reference_codes
from robustunlearn.attacks.spec import RELEARNING
from robustunlearn.config import RunSettings, StudySettings, unlearn_settings
from robustunlearn.core.distributed import DataParallel, data_parallel, gathered_copy, launched_processes, local_device
from robustunlearn.core.errors import UserError
from robustunlearn.core.io import atomic_write, atomic_write_json
from robustunlearn.core.models import DTYPES, load_model
from robustunlearn.core.modules import load_weights, save_trainable_weights
from robustunlearn.core.parallel import plan_workers, worker_pool
from robustunlearn.data.base import Benchmark
from robustunlearn.data.splits import RelearnSplit, RetainViews, relearn_split, retain_views
from robustunlearn.metrics import qa_answer_nll
from robustunlearn.metrics.privacy import mia_privacy, muse_corpus, with_privleak
from robustunlearn.metrics.suite import METRICS, UTILITY_METRIC, describe_eval, evaluate_model, tofu_scores
from robustunlearn.optim import OPTIMIZERS
from robustunlearn.study.cells import Cell, cell_optimizer_options, grid_cells
from robustunlearn.study.controls import RETRAIN, TARGET, Controls, final_scorings
from robustunlearn.study.landscape import linear_interpolation, sharpness
from robustunlearn.study.loading import load_target
from robustunlearn.study.report import write_report
from robustunlearn.study.rows import (
    NO_ATTACK,
    Landscape,
    References,
    ResultRow,
    RowCell,
    UnlearningCost,
    read_cell_rows,
    write_cell_rows,
    write_results_jsonl,
)
from robustunlearn.study.scores import attack_scores
from robustunlearn.study.sweep import Trial, sweep_learning_rates
from robustunlearn.study.timing import PhaseClock, PhaseRecord, StudyTimes, load_phase
from robustunlearn.train.engine import unlearn
from robustunlearn.train.settings import UnlearnSettings

UNLEARNED_WEIGHTS = "unlearned.safetensors"  # a cell's unlearned weights, kept for the LMC curves
LANDSCAPE_EXAMPLES = 128  # QA pairs per role the landscape losses average over
SHARPNESS_SCALES = (0.01, 0.03, 0.1)  # Gaussian weight noise, as fractions of each matrix's RMS
# Utility along the unlearning curve: on the first retain QA of the view, a cheap estimate of the
# reported utility (the check also scores the whole forget set, which decides the stop).
CURVE_UTILITY_EXAMPLES = 32
RELEARN_SCORINGS = ("in_set", "held_out_subjects", "held_out_attributes")


@dataclass
class StudyRun:
    """What every cell of one study shares: the settings, the models, the splits and the controls."""

    settings: RunSettings
    study: StudySettings
    target: Any
    tokenizer: Any
    views: RetainViews
    references: dict[str, Any]
    output_dir: Path
    controls: Controls | None = None
    console: Any = None
    cache_dir: Path | None = None  # the prepared models' cache, where worker processes load them from
    relearn_splits: dict[int, RelearnSplit] = field(default_factory=dict)
    clock: PhaseClock = field(default_factory=PhaseClock)  # times each cell's phases (study/timing.py)
    q4_1_codes: dict[str, Any] | None = None  # the original GGUF model's, on first use (study.gguf_q4_1_codes)
    parallel: DataParallel = field(default_factory=DataParallel)  # this rank of a launch (module docstring)

    @property
    def writes(self) -> bool:
        """Whether this process writes the study's files: rank 0, or the only process."""
        return self.parallel.is_main

    @property
    def attack_parallel(self) -> DataParallel | None:
        """What the attacks shard over: the launch's ranks in parallel mode fsdp, else nothing."""
        return self.parallel if self.parallel.sharded else None

    @property
    def metric(self) -> str:
        return self.study.level_metric

    @property
    def relearns(self) -> bool:
        """Whether the attacks include relearning (which needs the relearning split)."""
        return any(parse_attack(name).family == RELEARNING for name in self.study.attacks)

    @property
    def level_floor(self) -> float | None:
        """Where the matched level is measured from: the level metric's chance level under
        ``study.level_floor: chance``, else the retrain reference's value (None without one)."""
        if self.study.level_floor == "chance":
            return METRICS[self.metric].chance
        retrain = self.references.get("retrain")
        return None if retrain is None else retrain[self.metric]

    @property
    def target_level(self) -> float | None:
        """The level floor plus the evaluation preset's tolerance (None without a floor)."""
        floor = self.level_floor
        return None if floor is None else floor + self.settings.eval.level_tolerance

    def original_codes(self) -> dict[str, Any] | None:
        """The Q4_1 codes of the original model (``settings.original_model``, read from a Q4_1 GGUF
        file or its converted directory) when ``study.gguf_q4_1_codes`` asks for them, computed once.
        The target is that model when it was not fine-tuned (no ``base_model``)."""
        if not self.study.gguf_q4_1_codes:
            return None
        if self.q4_1_codes is None:
            settings = self.settings
            original = self.target if settings.base_model is None else load_model(settings.base_model)[0]
            self.q4_1_codes = q4_1_reference_codes(original)
            if not self.q4_1_codes:
                raise UserError(
                    f"study.gguf_q4_1_codes: no layer of {settings.original_model} is on the Q4_1 grid "
                    "(it was not read from a Q4_1 GGUF file)"
                )
        return self.q4_1_codes

    def relearn_split(self, seed: int) -> RelearnSplit:
        """The relearning attacker's records and the held-out parts for ``seed``."""
        if seed not in self.relearn_splits:
            study = self.study
            forget = self.views.evaluation.get("forget_qa")
            subjects = study.relearn_subjects or max(1, len({record.subject for record in forget}) // 2)
            self.relearn_splits[seed] = relearn_split(
                self.views.evaluation, subjects, study.relearn_attribute_share, seed
            )
        return self.relearn_splits[seed]

    def evaluate(self, model, metrics: Sequence[str] | None = None) -> dict[str, float]:
        """``model``'s metrics on the evaluation view (the reported numbers), with a progress bar."""
        views, options = self.views, self.settings.eval
        return evaluate_model(model, self.tokenizer, views.evaluation, options, metrics=metrics, console=self.console)


def unlearning_probe(run: StudyRun, view: Benchmark):
    """The check during unlearning: the level metric on the forget set, which decides the stop,
    and the utility on ``view``'s first CURVE_UTILITY_EXAMPLES retain QA (for the compute curve)."""
    retain = view.get("retain_qa")[:CURVE_UTILITY_EXAMPLES]
    utility_view = view.with_splits(retain_qa=retain) if retain else None

    def probe(model, step: int) -> dict[str, float]:
        values = evaluate_model(model, run.tokenizer, view, run.settings.eval, metrics=(run.metric,))
        if utility_view is not None:
            values.update(
                evaluate_model(model, run.tokenizer, utility_view, run.settings.eval, metrics=(UTILITY_METRIC,))
            )
        return values

    return probe


def relearning_parts(run: StudyRun, split: RelearnSplit) -> dict[str, list]:
    """The non-empty parts of the level metric's forget split by scoring (in-set, held-out subjects,
    held-out attributes): ``split``'s QA parts for a forget-QA metric; for a forget multiple-choice
    metric, the multiple-choice records asking the questions of each QA part (a benchmark such as
    world-facts asks each forget question both ways); none for another metric."""
    metric_split = METRICS[run.metric].split
    if metric_split not in ("forget_qa", "forget_mcq"):
        return {}
    parts = {name: list(getattr(split, name if name != "in_set" else "train")) for name in RELEARN_SCORINGS}
    if metric_split == "forget_mcq":
        by_question = {record.question: record for record in run.views.evaluation.get("forget_mcq")}
        parts = {
            name: [by_question[r.question] for r in records if r.question in by_question]
            for name, records in parts.items()
        }
    return {name: records for name, records in parts.items() if records}


def relearning_probe(run: StudyRun, split: RelearnSplit):
    """The check along a relearning curve: the level metric on the whole forget set, and, when it
    is a forget-QA or forget multiple-choice metric, ``<metric>@<scoring>`` on each non-empty part of
    ``split`` (:func:`relearning_parts`)."""
    metric_split = METRICS[run.metric].split
    parts = relearning_parts(run, split)
    views = {name: run.views.evaluation.with_splits(**{metric_split: records}) for name, records in parts.items()}
    # When the parts partition the forget split, and the metric is a mean over records, the whole set's value
    # is their size-weighted mean, with no second pass (unless eval.max_examples caps each part differently).
    forget = run.views.evaluation.get(metric_split)
    sizes = {name: len(records) for name, records in parts.items()}
    from_parts = run.settings.eval.max_examples is None and sum(sizes.values()) == len(forget) > 0

    def probe(model, step: int) -> dict[str, float]:
        values = {} if from_parts else run.evaluate(model, metrics=(run.metric,))
        for name, view in views.items():
            score = evaluate_model(model, run.tokenizer, view, run.settings.eval, metrics=(run.metric,))
            values[f"{run.metric}@{name}"] = score[run.metric]
        if from_parts:
            whole = sum(sizes[name] * values[f"{run.metric}@{name}"] for name in parts) / len(forget)
            values = {run.metric: whole, **values}
        return values

    return probe


def attack_context(run: StudyRun, seed: int) -> AttackContext:
    """What the attacks of a cell with ``seed`` (and its control) get: the training view (GPTQ
    calibrates on regulariser retain text; benign relearning trains on regulariser QA), the
    relearning attacker's records and probe, and the target the quantization diagnostics compare with."""
    study = run.study
    split = run.relearn_split(seed) if run.relearns else None
    return AttackContext(
        run.tokenizer,
        run.views.training,
        seed=seed,
        batch_size=run.settings.unlearn.batch_size,
        relearn_records=() if split is None else split.train,
        relearn_steps=study.relearn_steps,
        relearn_lr=study.relearn_lr,
        relearn_eval_every=study.relearn_eval_every,
        probe=None if split is None else relearning_probe(run, split),
        reference_model=run.target,
        original_codes=run.original_codes(),
        template=run.settings.unlearn.template,
        parallel=run.attack_parallel,
    )


def cell_options(settings: RunSettings, study: StudySettings, cell: Cell) -> dict[str, Any]:
    """The optimizer options ``cell`` trains with. An optimizer that works in blocks (the
    ``hybrid``: its spec has an ``every``) may stop only at the end of a ZO block, so in a study its
    blocks are laid out from the first step (``align: start``) and, unless the recipe or the tuned
    values set ``every``, last half a check interval: every check is a block end, and every
    optimizer stops within the same number of steps of reaching the level."""
    options = cell_optimizer_options(settings, cell)
    if "every" not in OPTIMIZERS[cell.optimizer].default_options:
        return options
    return {"every": max(1, study.check_every // 2), "align": "start", **options}


def check_stop_alignment(settings: RunSettings, study: StudySettings) -> None:
    """One-line UserError unless every block optimizer of the grid ends a ZO block on each check
    (``2·every`` divides ``check_every``, blocks from the first step) and on the step cap."""
    for objective in study.objectives:
        for optimizer in study.optimizers:
            options = cell_options(settings, study, Cell(settings.benchmark, objective, optimizer, 0, 1.0))
            if "every" not in options:
                continue
            every, align = options["every"], options.get("align")
            if align != "start" or study.check_every % (2 * every) or study.max_steps % (2 * every):
                raise UserError(
                    f"{optimizer} ({objective}) stops only at the end of a ZO block, so a study needs its blocks "
                    f"from the first step (align: start) and 2·every dividing study.check_every "
                    f"({study.check_every}) and study.max_steps ({study.max_steps}); it has every {every}, "
                    f"align {align}"
                )


def check_launch(study: StudySettings, lr_sweep: bool) -> None:
    """One-line UserError for what a launch of several processes (torchrun) cannot run: cells in
    worker processes (``study.jobs`` > 1) and the lr sweep."""
    if launched_processes() <= 1:
        return
    if (study.jobs or 1) > 1:
        raise UserError(
            "--jobs (study.jobs) runs cells in worker processes of one machine; under torchrun every process "
            "works on each cell: leave it unset"
        )
    if lr_sweep:
        raise UserError("the lr sweep runs in one process: run it without torchrun, then launch the study")


def cell_settings(run: StudyRun, cell: Cell) -> UnlearnSettings:
    """The engine's settings of ``cell``: its lr, options and seed, the study's budgets and checks."""
    return unlearn_settings(
        run.settings,
        optimizer=cell.optimizer,
        objective=cell.objective,
        lr=cell.lr,
        optimizer_options=cell_options(run.settings, run.study, cell),
        steps=run.study.max_steps,
        compute_budget=run.study.compute_budget,
        eval_every=run.study.check_every,
        epochs=None,
        seed=cell.seed,
    )


def unlearn_cell(run: StudyRun, cell: Cell, view: Benchmark, directory: Path):
    """Unlearn a copy of the target on the training view until the level, the compute budget or
    the step cap; checks score ``view``. Returns the model, its cost and its unlearning curve."""
    metric, level = run.metric, run.target_level

    def reached(metrics: dict[str, float]) -> str | None:
        if level is not None and metrics[metric] <= level:
            return f"{metric} {metrics[metric]:.3f} <= {level:.3f}"
        return None

    model = copy.deepcopy(run.target)
    started = time.perf_counter()
    outcome = unlearn(
        model,
        run.tokenizer,
        run.views.training,
        cell_settings(run, cell),
        directory / "unlearn",
        evaluate=unlearning_probe(run, view),
        should_stop=reached,
        console=run.console,
        progress=run.console is not None,  # cells in worker processes run quietly: the study reports each as it ends
    )
    if run.parallel.sharded:  # the rest of the cell (evaluations, attacks) runs on the whole model
        model = gathered_copy(outcome.model, run.target, local_device())
    start = {"step": 0, "forward_equivalents": 0.0, metric: run.references["target"][metric]}
    curve = [start] + [
        {"step": entry["step"], "forward_equivalents": entry["forward_equivalents"], **entry["eval"]}
        for entry in outcome.history
        if "eval" in entry
    ]
    cost = UnlearningCost(
        steps=outcome.steps_done,
        forward_passes=outcome.passes["forward"],
        backward_passes=outcome.passes["backward"],
        seconds=round(time.perf_counter() - started, 2),
        reached_level=outcome.stopped_early is not None and not outcome.budget_spent,
        target_level=level,
        forward_equivalents=outcome.forward_equivalents,
        compute_budget=run.study.compute_budget,
        budget_spent=outcome.budget_spent,
        level_tolerance=run.settings.eval.level_tolerance,
    )
    return model, cost, curve


def cell_sharpness(model, tokenizer, benchmark: Benchmark, seed: int) -> dict[str, Any]:
    """Sharpness of the forget loss (see :func:`robustunlearn.study.landscape.sharpness`)."""
    losses = qa_losses(tokenizer, benchmark)
    # 10% of a matrix's RMS is about the rounding noise of 4-bit RTN (step/sqrt(12), step ~ range/15).
    curve = sharpness(
        model, lambda noisy: losses(noisy, roles=("forget",))["forget_qa_loss"], scales=SHARPNESS_SCALES, seed=seed
    )
    return {"sharpness_loss": "forget_qa_loss", "sharpness": curve}


def qa_losses(tokenizer, benchmark: Benchmark):
    """``losses(model)``: the teacher-forced answer NLL on (up to LANDSCAPE_EXAMPLES) forget and
    retain QA pairs, as ``forget_qa_loss`` / ``retain_qa_loss``: one forward pass per batch."""
    records = {role: benchmark.require(f"{role}_qa")[:LANDSCAPE_EXAMPLES] for role in ("forget", "retain")}

    def losses(model, roles=("forget", "retain")) -> dict[str, float]:
        return {f"{role}_qa_loss": qa_answer_nll(model, tokenizer, records[role]) for role in roles}

    return losses


@dataclass(frozen=True)
class UnlearnedCell:
    """What every row of a cell carries about its unlearned model: the cost and curve of its
    unlearning, its evaluation beside the references, and its landscape."""

    cost: UnlearningCost
    curve: list[dict[str, float]]
    reference: References
    landscape: Landscape | None


def run_cell(
    run: StudyRun, cell: Cell, directory: Path, attacks: bool = True, landscape: bool = True
) -> list[ResultRow]:
    """Unlearn one cell to the matched level, evaluate it, run the attack ladders on it and on the
    control; return its rows (:func:`unlearn_and_evaluate`, :func:`attacked_row`). Each row
    carries its model's membership-inference AUCs and PrivLeak against the retrain model's AUC
    (MUSE's published one on MUSE without it)."""
    model, unlearned = unlearn_and_evaluate(run, cell, directory, landscape)
    rows = [unattacked_row(run, cell, model, unlearned)]
    return rows + [attacked_row(run, cell, model, unlearned, name) for name in (run.study.attacks if attacks else ())]


def unlearn_and_evaluate(
    run: StudyRun, cell: Cell, directory: Path, landscape: bool = True, keep_weights: bool = False
) -> tuple[Any, UnlearnedCell]:
    """Unlearn ``cell`` to the matched level and evaluate it; return the model and what its rows
    share. With ``landscape`` (and ``study.landscape``, not under LoRA) that includes the model's
    sharpness, and its weights are kept in ``directory``/UNLEARNED_WEIGHTS for
    :func:`add_lmc_curves`; with ``keep_weights`` they are kept in any case."""
    settings, references, clock = run.settings, run.references, run.clock
    with clock.phase("unlearn", cell=cell.name):
        model, cost, curve = unlearn_cell(run, cell, run.views.evaluation, directory)
    with clock.phase("evaluate", cell=cell.name):
        unlearned = run.evaluate(model)
    if cost.target_level is not None:
        cost = replace(cost, level_gap=cost.target_level - unlearned[run.metric])
    cell_landscape = None
    if landscape and run.study.landscape and settings.unlearn.lora is None:
        with clock.phase("landscape", cell=cell.name, detail="sharpness"):
            cell_landscape = Landscape(**cell_sharpness(model, run.tokenizer, run.views.evaluation, cell.seed))
        keep_weights = True
    if keep_weights and run.writes:
        atomic_write(directory / UNLEARNED_WEIGHTS, lambda path: save_trainable_weights(model, path))
    reference = References(target=references["target"], unlearned=unlearned, retrain=references.get("retrain"))
    return model, UnlearnedCell(cost, curve, reference, cell_landscape)


def unattacked_row(run: StudyRun, cell: Cell, model, unlearned: UnlearnedCell) -> ResultRow:
    """The row of ``cell``'s unlearned ``model`` itself (attack :data:`NO_ATTACK`)."""
    return cell_row(run, cell, unlearned, NO_ATTACK, "none", model, unlearned.reference.unlearned)


def attacked_row(run: StudyRun, cell: Cell, model, unlearned: UnlearnedCell, name: str) -> ResultRow:
    """The row of attack ``name`` on ``cell``'s unlearned ``model`` (left as it is)."""
    attack = parse_attack(name)
    with run.clock.phase("attack", cell=cell.name, detail=name):
        outcome = attack.run(model, attack_context(run, cell.seed))
        attacked = run.evaluate(outcome.model)
    return cell_row(run, cell, unlearned, name, attack.family, outcome.model, attacked, outcome)


def cell_row(
    run: StudyRun,
    cell: Cell,
    unlearned: UnlearnedCell,
    attack: str,
    family: str,
    attacked_model,
    metrics: dict[str, float],
    outcome=None,
) -> ResultRow:
    """The row of ``attacked_model`` (``metrics``: its evaluation), beside the control under the
    same attack, with its scores, TOFU's scores and the privacy metrics."""
    clock, references, views = run.clock, run.references, run.views
    attack_curve = None if outcome is None else outcome.curve
    control = None
    if run.controls is not None:
        with clock.phase("control", cell=cell.name, detail=attack):  # ~0 once cached
            control = run.controls.get(attack, attack_context(run, cell.seed))
    entry = ResultRow(
        cell=RowCell(**cell.as_dict()),
        attack=attack,
        attack_family=family,
        forget={k: v for k, v in metrics.items() if METRICS[k].forget},
        utility={k: v for k, v in metrics.items() if not METRICS[k].forget},
        reference=unlearned.reference,
        primary_metric=run.metric,
        cost=unlearned.cost,
        curve=attack_curve,
        landscape=unlearned.landscape,
        attack_config=None if outcome is None else outcome.config,
        unlearning_curve=unlearned.curve,
        scorings=final_scorings(attack_curve, run.metric),
        control=control,
    )
    entry.scores = attack_scores(entry)
    retrain_ratios = (references.get("tofu_retrain") or {}).get("forget_truth_ratios")
    with clock.phase("scoring", cell=cell.name, detail=attack):
        entry.tofu = tofu_scores(attacked_model, run.tokenizer, views.evaluation, run.settings.eval, retrain_ratios)
        mia = mia_privacy(attacked_model, run.tokenizer, views.evaluation, run.settings.eval)
    retrain_mia = (references.get("privacy") or {}).get("retrain")
    entry.privacy = with_privleak(mia, retrain_mia, muse=muse_corpus(views.evaluation))
    return entry


def sweep_trial(run: StudyRun):
    """The lr sweep's trial: unlearn on the training view, score forgetting and utility on the
    *validation* view (retain subjects neither the unlearning loss nor the report sees)."""

    def trial(cell: Cell) -> Trial:
        directory = run.output_dir / "sweep" / cell.name
        with run.clock.phase("sweep", detail=cell.name):
            model, cost, _ = unlearn_cell(run, cell, run.views.validation, directory)
            scores = evaluate_model(
                model, run.tokenizer, run.views.validation, run.settings.eval, metrics=(run.metric, UTILITY_METRIC)
            )
        return Trial(cost.reached_level, scores[run.metric], scores[UTILITY_METRIC], cost.to_json())

    return trial


def add_lmc_curves(run: StudyRun, finished: Sequence[tuple[Cell, list[ResultRow]]]) -> None:
    """Linear mode connectivity from the reference optimizer's unlearned model to each other cell's with
    the same objective and seed: the level metric and the QA losses along the line. Stored in the
    cell's rows (``landscape.pair``, ``landscape.lmc``) and its ``rows.json``; cells that have one skip.
    The curves run in ``study.jobs`` worker processes as the cells do (or here, one after the other);
    each is timed on ``run.clock`` as its cell's ``landscape`` phase."""
    pending = _lmc_pairs(run, finished)
    workers, threads = plan_workers(1 if run.parallel.enabled else run.study.jobs, len(pending))
    if workers > 1:
        args = (run.settings, run.study, run.output_dir, run.cache_dir, threads)
        with worker_pool(workers, _open_worker, args) as pool:
            drawn = [future.result() for future in [pool.submit(_work_lmc, *pair) for pair in pending]]
        curves = [curve for curve, _ in drawn]
        for _, records in drawn:
            run.clock.records.extend(records)
    else:
        loaded: dict[Cell, Any] = {}
        curves = [lmc_curve(run, anchor, cell, loaded) for anchor, cell in pending]
    rows_of = dict(finished)
    for (anchor, cell), curve in zip(pending, curves):
        pair = f"{anchor.optimizer}-vs-{cell.optimizer}"
        pair = pair if len(run.study.objectives) == 1 else f"{cell.objective}: {pair}"
        landscape = replace(rows_of[cell][0].landscape, pair=pair, lmc=curve)
        for row in rows_of[cell]:
            row.landscape = landscape
        write_cell_rows(run.output_dir / "cells" / cell.name / "rows.json", rows_of[cell])


def _lmc_pairs(run: StudyRun, finished: Sequence[tuple[Cell, list[ResultRow]]]) -> list[tuple[Cell, Cell]]:
    """``(anchor, cell)`` of every curve still to draw: a cell with a landscape and no curve yet, the
    reference optimizer's cell of its objective and seed, and both unlearned models' weights kept
    (a cell finished before weights were kept gets no curve rather than failing the study)."""
    anchors = {(cell.objective, cell.seed): cell for cell, _ in finished if cell.optimizer == run.study.reference}
    weights = run.output_dir / "cells"
    pairs = []
    for cell, rows in finished:
        anchor = anchors.get((cell.objective, cell.seed))
        landscape = rows[0].landscape
        if anchor is None or anchor == cell or landscape is None or landscape.lmc is not None:
            continue
        if all((weights / c.name / UNLEARNED_WEIGHTS).is_file() for c in (anchor, cell)):
            pairs.append((anchor, cell))
    return pairs


def lmc_curve(run: StudyRun, anchor: Cell, cell: Cell, loaded: dict[Cell, Any]) -> list[dict[str, float]]:
    """The curve from ``anchor``'s unlearned model to ``cell``'s (``loaded`` keeps the last anchor:
    one end of several curves)."""
    losses = qa_losses(run.tokenizer, run.views.evaluation)

    def evaluate(model) -> dict[str, float]:
        metrics = (run.study.level_metric,)
        return {
            **evaluate_model(model, run.tokenizer, run.views.evaluation, run.settings.eval, metrics),
            **losses(model),
        }

    def unlearned(which: Cell):
        model = copy.deepcopy(run.target)
        load_weights(model, run.output_dir / "cells" / which.name / UNLEARNED_WEIGHTS)
        return model

    with run.clock.phase("landscape", cell=cell.name, detail="lmc"):
        if anchor not in loaded:
            loaded.clear()
            loaded[anchor] = unlearned(anchor)
        return linear_interpolation(loaded[anchor], unlearned(cell), evaluate, points=run.study.lmc_points)


def reference_privacy(target, retrain, tokenizer, benchmark: Benchmark, settings: RunSettings) -> dict[str, Any]:
    """``{"target", "retrain"}``: the membership-inference AUCs and PrivLeak of the target and retrain
    (None without one) models, both against the retrain model's AUC (the retrain's own PrivLeak is 0)."""
    muse = muse_corpus(benchmark)
    retrain_mia = None if retrain is None else mia_privacy(retrain, tokenizer, benchmark, settings.eval)
    target_mia = mia_privacy(target, tokenizer, benchmark, settings.eval)
    return {
        "target": with_privleak(target_mia, retrain_mia, muse=muse),
        "retrain": None if retrain_mia is None else with_privleak(retrain_mia, retrain_mia, muse=muse),
    }


def study_references(
    target, retrain, tokenizer, benchmark: Benchmark, settings: RunSettings, path: Path, console=None
) -> dict:
    """The reference models' evaluations on ``benchmark`` (the evaluation view), computed once into
    ``path`` (``references.json``): the target's and retrain's (None without a retrain model)
    metrics, the retrain's TOFU scores, and ``privacy`` (:func:`reference_privacy`). A file written
    for other evaluation records (another retain split, or before there were splits) is recomputed.
    With a ``console``, the evaluations show progress bars."""
    stamp = sorted({record.subject for record in benchmark.get("retain_qa")})
    references = json.loads(path.read_text()) if path.exists() else {}
    if references.get("evaluation_subjects") == stamp and "privacy" in references:
        return references
    target_metrics = evaluate_model(target, tokenizer, benchmark, settings.eval, console=console)
    references = {"evaluation_subjects": stamp, "target": target_metrics, "retrain": None}
    if retrain is not None:
        references["retrain"] = evaluate_model(retrain, tokenizer, benchmark, settings.eval, console=console)
        references["tofu_retrain"] = tofu_scores(retrain, tokenizer, benchmark, settings.eval)
    references["privacy"] = reference_privacy(target, retrain, tokenizer, benchmark, settings)
    atomic_write_json(path, references)
    return references


def _level_floor_source(run: StudyRun) -> str | None:
    """What the matched level is measured from: ``"chance"``, ``"retrain"``, or None (no level)."""
    if run.study.level_floor == "chance":
        return "chance"
    return "retrain" if run.references.get("retrain") is not None else None


def write_protocol(run: StudyRun) -> None:
    """``splits.json`` (the retain split and each seed's relearning split) and ``protocol.json``
    (budgets, checks, level, seeds, ladders) in the study's directory, for the report and readers."""
    study, unlearn_options = run.study, run.settings.unlearn
    splits = {
        "retain": run.views.description,
        "relearn": {str(seed): run.relearn_split(seed).description for seed in study.seeds} if run.relearns else None,
    }
    atomic_write_json(run.output_dir / "splits.json", splits)
    protocol = {
        "compute_budget": study.compute_budget,
        "backward_cost": unlearn_options.backward_cost,
        "max_steps": study.max_steps,
        "check_every": study.check_every,
        "level_metric": study.level_metric,
        "level_tolerance": run.settings.eval.level_tolerance,
        "level_floor": _level_floor_source(run),
        "target_level": run.target_level,
        "reference_optimizer": study.reference,
        "seeds": list(study.seeds),
        "sweep_seeds": list(study.sweep_seeds),
        "attacks": list(study.attacks),
        "relearn": {"steps": study.relearn_steps, "eval_every": study.relearn_eval_every, "lr": study.relearn_lr},
        "control": None if run.controls is None else run.controls.source,
        "gguf_q4_1_codes": run.settings.original_model if run.study.gguf_q4_1_codes else None,
    }
    atomic_write_json(run.output_dir / "protocol.json", protocol)


def open_study_run(
    settings: RunSettings,
    study: StudySettings,
    output_dir: Path,
    cache_dir=None,
    console=None,
    clock=None,
    parallel: DataParallel = DataParallel(),
) -> StudyRun:
    """Load (or prepare) the models, split the retain subjects, evaluate the references (once:
    ``references.json``) and set up the controls: what every cell of the study shares. Timed on
    ``clock`` (a new one by default) as ``load`` (``prepare`` when it trained) and ``references``.
    Under a launch (``parallel`` enabled) rank 0 does it first, the others once it is done."""
    if parallel.enabled and settings.parallel.mode == "fsdp":
        parallel = parallel.with_sharding()  # a collective: every rank at the same point
    if parallel.enabled:
        if parallel.is_main:
            opened = _open_study_run(settings, study, output_dir, cache_dir, console, clock, parallel)
        parallel.barrier()  # the prepared models and references.json are there for the other ranks
        if not parallel.is_main:
            opened = _open_study_run(settings, study, output_dir, cache_dir, None, clock, parallel)
        return opened
    return _open_study_run(settings, study, output_dir, cache_dir, console, clock, parallel)


def _open_study_run(
    settings: RunSettings, study: StudySettings, output_dir: Path, cache_dir, console, clock, parallel: DataParallel
) -> StudyRun:
    clock = clock or PhaseClock()
    loading_since = time.time()
    # data parallel: each rank's model on its own GPU; fsdp: on the CPU, the engine moves its shards there
    device = local_device() if parallel.enabled and settings.parallel.mode != "fsdp" else "cpu"
    with clock.phase("load") as loading:
        target, tokenizer, benchmark, prepared = load_target(settings, cache_dir, console, device=device)
        retrain = None if prepared is None else load_model(prepared.retrain_dir, dtype=DTYPES[settings.dtype])[0]
        loading.phase = load_phase(prepared, loading_since)
    if console is not None:  # printed once the model loaded: a loading error stays the only line
        console.print(f"evaluation: {describe_eval(settings.eval)}", highlight=False, soft_wrap=True)
    views = retain_views(benchmark, study.split_seed, study.retain_shares)
    with clock.phase("references"):
        references = study_references(
            target, retrain, tokenizer, views.evaluation, settings, output_dir / "references.json", console
        )
    run = StudyRun(
        settings,
        study,
        target,
        tokenizer,
        views,
        references,
        output_dir,
        console=console,
        clock=clock,
        parallel=parallel,
    )
    run.cache_dir = cache_dir
    control, source = (target, TARGET) if retrain is None else (retrain, RETRAIN)
    run.controls = Controls(control, source, output_dir / "controls", run.evaluate, run.metric, parallel)
    return run


def run_study(
    settings: RunSettings, study: StudySettings, output_dir: Path, cache_dir=None, console=None, lr_sweep: bool = False
) -> list[ResultRow]:
    """Run (or resume) the grid; write ``results.jsonl``, ``report.md``/``report.html``, plots and
    ``timing.json`` (:mod:`robustunlearn.study.timing`: where the time went, each cell's beside it).
    Under a launch of several processes (module docstring) every rank returns the rows; rank 0's
    carry the mode-connectivity curves, and rank 0 alone writes."""
    check_stop_alignment(settings, study)
    check_launch(study, lr_sweep)
    parallel = data_parallel()  # joins the launcher's process group, if any
    times = StudyTimes(output_dir, writes=parallel.is_main)
    run = open_study_run(settings, study, output_dir, cache_dir, console, times.clock, parallel)
    if run.writes:
        write_protocol(run)

    chosen = sweep_learning_rates(settings, study, sweep_trial(run), output_dir, console) if lr_sweep else {}
    times.save()
    finished = run_grid(run, grid_cells(settings, study, chosen), times)
    if not run.writes:
        return [row for _, cell_rows in finished for row in cell_rows]
    if study.landscape:
        if console is not None:
            console.print("loss landscape: linear mode connectivity between the unlearned models")
        add_lmc_curves(run, finished)
    rows = [row for _, cell_rows in finished for row in cell_rows]
    write_results_jsonl(output_dir / "results.jsonl", rows)
    times.save()  # the report's time table is read from the files
    with times.clock.phase("report"):
        write_report(
            output_dir / "results.jsonl",
            output_dir,
            title=f"robustunlearn study: {settings.benchmark}",
            reference_optimizer=study.reference,
        )
    times.save()
    return rows


def run_grid(run: StudyRun, cells: Sequence[Cell], times: StudyTimes) -> list[tuple[Cell, list[ResultRow]]]:
    """Each of ``cells`` and its rows, in the order given: a finished cell's read back from its
    ``rows.json``, the others run (:func:`run_cell`), each writing its ``rows.json`` as it finishes,
    and ``results.jsonl`` after each. The cells to run go to ``study.jobs`` worker processes
    (:mod:`robustunlearn.core.parallel`), or run here one after the other when there is one.
    The console shows each cell's place among those to run and the time left."""
    console, output_dir = run.console, run.output_dir
    finished: dict[Cell, list[ResultRow]] = {}
    # rank 0 says which cells are done: every rank of a launch must run the same ones
    done_before = run.parallel.broadcast_object([_rows_path(run, cell).exists() for cell in cells])
    for cell, finished_before in zip(cells, done_before):
        if finished_before:
            if console is not None:
                console.print(f"skipping finished cell {cell.name}")
            times.resumed(cell.name)
            finished[cell] = read_cell_rows(_rows_path(run, cell))
    pending = [cell for cell in cells if cell not in finished]

    def done(cell: Cell, rows: list[ResultRow] | None = None) -> None:
        finished[cell] = read_cell_rows(_rows_path(run, cell)) if rows is None else rows
        if run.writes:
            write_results_jsonl(
                output_dir / "results.jsonl", [row for c in cells if c in finished for row in finished[c]]
            )

    # a launch's ranks work on each cell together: no worker processes
    workers, threads = plan_workers(1 if run.parallel.enabled else run.study.jobs, len(pending))
    times.processes(workers, threads if workers > 1 else torch.get_num_threads(), run.parallel.world_size)
    if workers > 1:
        _run_in_workers(run, pending, times, workers, threads, done)
    else:
        for cell in pending:
            if console is not None:
                console.print(times.cell_line(cell.name, len(pending)), highlight=False)
            with times.running(cell.name):
                rows = _run_and_keep(run, cell)
            done(cell, rows)
    return [(cell, finished[cell]) for cell in cells]


def _rows_path(run: StudyRun, cell: Cell) -> Path:
    return run.output_dir / "cells" / cell.name / "rows.json"


def _run_and_keep(run: StudyRun, cell: Cell) -> list[ResultRow]:
    """Run ``cell``, write its ``rows.json`` (rank 0) and return its rows."""
    rows = run_cell(run, cell, _rows_path(run, cell).parent)
    if run.writes:
        write_cell_rows(_rows_path(run, cell), rows)
    return rows


def _run_in_workers(run: StudyRun, cells: Sequence[Cell], times: StudyTimes, workers: int, threads: int, done) -> None:
    """Run ``cells`` in ``workers`` processes of ``threads`` torch threads each; as each finishes,
    take its phase times into ``times``, write its rows and call ``done(cell, rows)``.

    A cell is several tasks: its unlearning and evaluation, then each attack on its unlearned
    weights (kept in the cell's directory meanwhile), so that the workers share the last cells'
    attacks instead of one worker running a long cell's ladder alone (the TOFU study: 300 s of one
    worker's 1,500). Under LoRA a cell is one task: its model is not a copy of the target's weights."""
    attacks = list(run.study.attacks)
    split = run.settings.unlearn.lora is None and bool(attacks)
    if run.console is not None:
        tasks = f" ({len(cells) * (1 + len(attacks))} tasks)" if split else ""
        run.console.print(
            f"running {len(cells)} cells{tasks} in {workers} worker processes, {threads} torch thread(s) each",
            highlight=False,
        )
    for cell in cells:
        times.starting(cell.name)
    args = (run.settings, run.study, run.output_dir, run.cache_dir, threads)
    seconds: dict[Cell, float] = dict.fromkeys(cells, 0.0)
    rows: dict[Cell, dict[str, ResultRow]] = {cell: {} for cell in cells}
    unlearned: dict[Cell, UnlearnedCell] = {}

    def finish(cell: Cell) -> None:
        times.finished(cell.name, [], seconds[cell])
        done(cell)
        if run.console is not None:
            run.console.print(times.finished_line(cell.name, len(cells), workers), highlight=False)

    with worker_pool(workers, _open_worker, args) as pool:
        work = _work_unlearning if split else _work_cell
        pending = {pool.submit(work, cell): (cell, None) for cell in cells}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                cell, attack = pending.pop(future)
                result, records, took = future.result()
                seconds[cell] += took
                times.took(records)
                if not split:
                    finish(cell)
                    continue
                if attack is None:
                    unlearned[cell], rows[cell][NO_ATTACK] = result
                    attacking = {
                        pool.submit(_work_attack, cell, unlearned[cell], name): (cell, name) for name in attacks
                    }
                    pending.update(attacking)
                else:
                    rows[cell][attack] = result
                if len(rows[cell]) == 1 + len(attacks):
                    _keep_split_rows(run, cell, [rows[cell][name] for name in (NO_ATTACK, *attacks)], unlearned[cell])
                    finish(cell)


def _keep_split_rows(run: StudyRun, cell: Cell, rows: list[ResultRow], unlearned: UnlearnedCell) -> None:
    """Write the rows of a cell run as several tasks, and remove its unlearned weights unless the
    LMC curves need them (a cell with a landscape)."""
    write_cell_rows(_rows_path(run, cell), rows)
    if unlearned.landscape is None:
        (_rows_path(run, cell).parent / UNLEARNED_WEIGHTS).unlink(missing_ok=True)


_WORKER_RUN: StudyRun | None = None  # in a worker process: the study it runs cells of


def _open_worker(settings: RunSettings, study: StudySettings, output_dir: Path, cache_dir, threads: int) -> None:
    global _WORKER_RUN
    torch.set_num_threads(threads)
    _WORKER_RUN = open_study_run(settings, study, output_dir, cache_dir)


_WORKER_ANCHOR: dict[Cell, Any] = {}  # in a worker process: the last LMC anchor it loaded


def _work_lmc(anchor: Cell, cell: Cell) -> tuple[list[dict[str, float]], list[PhaseRecord]]:
    """Draw the LMC curve of ``cell`` in a worker; return it and the worker's phase records."""
    curve = lmc_curve(_WORKER_RUN, anchor, cell, _WORKER_ANCHOR)
    return curve, _WORKER_RUN.clock.take()


def _timed_in_worker(work: Callable[[StudyRun], Any]) -> tuple[Any, list[PhaseRecord], float]:
    """``work(run)`` on the worker's study; return its result, the worker's phase records since the
    last task (its loading, the first time) and the task's wall seconds."""
    started = time.perf_counter()
    result = work(_WORKER_RUN)
    return result, _WORKER_RUN.clock.take(), time.perf_counter() - started


def _work_cell(cell: Cell) -> tuple[None, list[PhaseRecord], float]:
    """Run ``cell`` in a worker, writing its rows (:func:`_timed_in_worker`: nothing returned)."""

    def work(run: StudyRun) -> None:
        _run_and_keep(run, cell)

    return _timed_in_worker(work)


def _work_unlearning(cell: Cell) -> tuple[tuple[UnlearnedCell, ResultRow], list[PhaseRecord], float]:
    """Unlearn and evaluate ``cell`` in a worker, keeping its weights for its attacks; return (as
    :func:`_timed_in_worker`) what its rows share and its row without attack."""

    def work(run: StudyRun) -> tuple[UnlearnedCell, ResultRow]:
        model, unlearned = unlearn_and_evaluate(run, cell, _rows_path(run, cell).parent, keep_weights=True)
        return unlearned, unattacked_row(run, cell, model, unlearned)

    return _timed_in_worker(work)


def _work_attack(cell: Cell, unlearned: UnlearnedCell, name: str) -> tuple[ResultRow, list[PhaseRecord], float]:
    """Attack ``cell``'s unlearned weights with ``name`` in a worker; return (as
    :func:`_timed_in_worker`) the row."""

    def work(run: StudyRun) -> ResultRow:
        model = copy.deepcopy(run.target)
        load_weights(model, _rows_path(run, cell).parent / UNLEARNED_WEIGHTS)
        return attacked_row(run, cell, model, unlearned, name)

    return _timed_in_worker(work)
