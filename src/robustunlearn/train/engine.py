"""The unlearning loop: one objective x one optimizer grade, read top to bottom.

Each step draws a forget batch and a retain batch (with only the parts the objective reads,
``Objective.batch_parts``), takes the frozen reference model's outputs (looked up in the reference
cache built before the first step, or computed once under ``no_grad``), builds the closure of
:mod:`robustunlearn.optim.base` and lets the optimizer call it as its grade needs: backward for
first-order, function values at perturbed weights for zeroth-order, sampled labels for Sophia-G.
What else the loop asks of the optimizer (Sophia-G's batch size, values to log, whether it may
stop, data parallelism) goes through its hooks (:class:`~robustunlearn.optim.base.OptimizerHooks`).
Steps are logged as JSON lines; checkpoints (trainable weights, optimizer state, RNG states, data
position) are written atomically so a killed run resumes to the same final weights.

:func:`unlearn` reads top to bottom: set-up, resume, then per step :func:`_draw_batch`,
:func:`_reference_outputs`, :func:`_optimizer_step` and what follows it (log entry, finiteness
check, evaluation, stop, checkpoint).

Options (:class:`UnlearnSettings`): a budget in ``steps`` or ``epochs``, and within it optionally a
``compute_budget`` in forward-pass equivalents (the run stops after the step that spends it); LoRA
adapters instead of full fine-tuning (``lora``), whose reference model is the same model with its
adapter disabled; the reference of npo and idk-dpo cached or live (``reference``,
:mod:`robustunlearn.train.reference`); keeping the weights with the best value of an evaluation metric
(``keep_best``). Launched in several processes (``torchrun``, ``accelerate launch``), the run is
data parallel (:mod:`robustunlearn.core.distributed`): ``batch_size`` is the global batch, each
rank takes its shard, and rank 0 alone logs, evaluates and writes files. docs/engine.md has the details.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.distributed.tensor import DTensor

from robustunlearn.core.batching import IGNORE_INDEX, UnlearnBatch
from robustunlearn.core.distributed import DataParallel, data_parallel, full_state_dict, reshard, shard_model
from robustunlearn.core.errors import SettingsError, first_line
from robustunlearn.core.io import atomic_write_json
from robustunlearn.core.models import WEIGHTS
from robustunlearn.core.modules import add_lora, lora_options, save_weights
from robustunlearn.data.base import QA, Benchmark, Record
from robustunlearn.data.collate import collate_records
from robustunlearn.data.prompts import PLAIN_TEMPLATE, REFUSAL_ANSWERS, PromptTemplate
from robustunlearn.objectives import LOSS_TERMS, Objective, build_objective
from robustunlearn.optim import build_optimizer
from robustunlearn.optim.base import hooks, local_shard, make_closure, sampled_label_loss
from robustunlearn.optim.hybrid import AlternatingHybrid
from robustunlearn.train.checkpoint import Checkpointer, Snapshots, best_snapshots, read_log
from robustunlearn.train.reference import REFERENCE_CACHE, ReferenceCache, build_reference_cache
from robustunlearn.train.settings import UnlearnSettings

_RANK_SEED_STRIDE = 1_000_003  # rank r samples Sophia-G's labels from seed + r·stride
FrozenWeights = list[tuple[torch.nn.Parameter, torch.Tensor]]  # a trained parameter, its value at the start


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""

    def __init__(self, step: int, cause: str):
        super().__init__(f"non-finite loss at step {step}: {cause}")
        self.step, self.cause = step, cause


class RecordStream:
    """Endless, seeded, resumable stream of record batches: a fresh permutation every epoch."""

    def __init__(self, records: Sequence[Record], batch_size: int, seed: int):
        if not records:
            raise ValueError("no records to stream")
        self.records, self.batch_size, self.seed = list(records), batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> list[Record]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            batch.append(self.records[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


def refusal_records(records: Sequence[Record], seed: int) -> list[QA]:
    """The QA records among ``records`` with their answers replaced by refusals (for ``idk``)."""
    questions = [r for r in records if isinstance(r, QA)]
    rng = random.Random(seed)
    return [_refusal(r, rng.choice(REFUSAL_ANSWERS)) for r in questions]


def _refusal(question: QA, answer: str) -> QA:
    return QA(question=question.question, answer=answer, subject=question.subject)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


@dataclass
class UnlearnResult:
    model: Any  # under LoRA the peft model: its merge_and_unload() makes the input model plain again
    steps_done: int
    history: list[dict[str, Any]]
    seconds: float
    resumed_from: int | None = None
    stopped_early: str | None = None  # why the run stopped before its step budget: should_stop's reason, or the budget
    # model passes of this process over the whole run (those before a resume included)
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    total_steps: int = 0  # the step budget (from steps or epochs)
    best: dict[str, Any] | None = None  # with keep_best: step, metric, value, mode of the kept weights
    forward_equivalents: float = 0.0  # passes["forward"] + backward_cost · passes["backward"]
    budget_spent: bool = False  # the compute budget stopped the run (not should_stop, not the step budget)


def _best_value(metrics: dict[str, Any], name: str) -> float:
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        available = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ValueError(f"keep_best metric {name!r} is not a number the evaluation returns; it returns {available}")
    return float(value)


def _better(value: float, best: float, mode: str) -> bool:
    return value < best if mode == "min" else value > best


def _records(benchmark: Benchmark, splits: Sequence[str]) -> list[Record]:
    records: list[Record] = []
    for split in splits:
        records += benchmark.get(split)
    if not records:
        raise ValueError(
            f"benchmark {benchmark.name!r} has no records in {list(splits)}; it has {sorted(benchmark.splits)}"
        )
    return records


def _shard_batch(
    forget: list[Record],
    retain: list[Record],
    refusal_seed: int,
    parallel: DataParallel,
    tokenizer,
    max_length: int,
    *,
    parts: frozenset[str],
    template: PromptTemplate = PLAIN_TEMPLATE,
) -> UnlearnBatch:
    """This rank's shard of the global forget and retain batches, with the ``parts`` an objective
    reads (``Objective.batch_parts``): for ``"refusal"`` the refusals of its forget questions, drawn
    over the global batch as a single process draws them, and those questions with their answers."""
    mine = parallel.shard(forget)
    batch = UnlearnBatch(forget=collate_records(tokenizer, mine, max_length, template))
    if "retain" in parts:
        batch.retain = collate_records(tokenizer, parallel.shard(retain), max_length, template)
    if "refusal" in parts:
        before = sum(isinstance(r, QA) for r in forget[: parallel.shard_start(len(forget))])
        questions = [r for r in mine if isinstance(r, QA)]
        refusals = refusal_records(forget, refusal_seed)[before : before + len(questions)]
        batch.forget_refusal = collate_records(tokenizer, refusals, max_length, template) if refusals else None
        batch.forget_answered = collate_records(tokenizer, questions, max_length, template) if questions else None
    return batch


@contextlib.contextmanager
def _reference_view(model, frozen_weights: FrozenWeights | None, lora: bool) -> Iterator[Any]:
    """The frozen reference: the model itself in eval mode, with its trained weights swapped for
    their values at the start (``frozen_weights``: a live reference without LoRA), or with its LoRA
    adapter disabled (the reference under LoRA); with neither, before the first step, the model as
    it is (what the reference cache is built from). Everything is put back on leaving.

    Under FSDP the values are copied into each rank's shards and back (FSDP gathers its own
    buffers, not a swapped ``.data``), and the model is resharded after the reference's forward."""
    training = model.training
    # re-enabling the adapter makes all of its weights trainable again (peft's set_adapter)
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    swapped = _swap_weights(frozen_weights or ())
    model.eval()
    try:
        with model.disable_adapter() if lora else contextlib.nullcontext():
            yield model
    finally:
        _swap_weights(swapped)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        model.train(training)
        reshard(model)


@torch.no_grad()
def _swap_weights(weights: FrozenWeights) -> FrozenWeights:
    """Give each parameter of ``weights`` its paired value; return the values they had."""
    previous = []
    for p, value in weights:
        if isinstance(p, DTensor):
            previous.append((p, p.to_local().clone()))
            p.to_local().copy_(local_shard(value))
        else:
            previous.append((p, p.data))
            p.data = value
    return previous


@dataclass
class _Run:
    """One run: what set-up builds, then the state its steps advance."""

    config: UnlearnSettings
    model: Any
    tokenizer: Any
    objective: Objective
    # the trained weights' values at the start, if the objective needs a live reference and there is
    # no LoRA adapter to disable
    frozen_weights: FrozenWeights | None
    lora: bool
    trained: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    streams: dict[str, RecordStream]
    generator: torch.Generator  # Sophia-G's label sampler
    total_steps: int
    parallel: DataParallel
    after_backward: Callable[[], None] | None  # data parallel: the gradient all-reduce
    output_dir: Path | None
    checkpointer: Checkpointer | None
    keeper: Snapshots | None  # with keep_best: the best weights so far
    console: Any
    start_step: int = 0
    resumed_from: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    pending_stop: str | None = None  # should_stop's reason, waiting until the optimizer may stop
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    reference_cache: ReferenceCache | None = None  # the reference's log-probabilities, once built or loaded

    @property
    def caches_reference(self) -> bool:
        return _caches_reference(self.objective, self.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def forward_equivalents(self) -> float:
        """The cost so far: forward + backward_cost · backward passes (this process's; under data
        parallelism every rank runs as many)."""
        return self.passes["forward"] + self.config.backward_cost * self.passes["backward"]

    @property
    def budget_spent(self) -> bool:
        budget = self.config.compute_budget
        return budget is not None and self.forward_equivalents >= budget

    @property
    def log_path(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / "log.jsonl"


def unlearn(
    model,
    tokenizer,
    benchmark: Benchmark,
    config: UnlearnSettings,
    output_dir: str | Path | None = None,
    *,
    resume: bool = False,
    evaluate: Callable[[Any, int], dict[str, Any]] | None = None,
    should_stop: Callable[[dict[str, Any]], str | None] | None = None,
    progress: bool = True,
    console=None,
) -> UnlearnResult:
    """Unlearn ``benchmark``'s forget splits from ``model`` in place and return it (under LoRA,
    wrapped in a peft model whose adapters hold the change).

    ``evaluate(model, step)`` runs every ``config.eval_every`` steps (on rank 0); its metrics are
    logged and passed to ``should_stop``, which returns a reason to stop early (or None). An
    optimizer whose ``may_stop`` hook is false (a ``hybrid`` before the end of a ZO block) defers
    that stop to the next step where it is true. The run also stops after the step at which its cost
    in forward-pass equivalents reaches ``config.compute_budget``, deferred the same way."""
    output_dir = Path(output_dir) if output_dir is not None else None
    if config.keep_best is not None and (evaluate is None or output_dir is None):
        raise ValueError(f"keep_best={config.keep_best!r} needs an evaluate callback and an output directory")
    run = _set_up(model, tokenizer, benchmark, config, output_dir, console or Console(stderr=True))
    if resume:
        _resume(run)
    _cache_reference(run)  # after a checkpoint loaded, a no-op: _resume gave the run its cache before the weights
    _start(run)

    started = time.perf_counter()
    step, stopped_early = run.start_step, None
    with _progress_bar(run, progress) as show:
        for step in range(run.start_step + 1, run.total_steps + 1):
            batch = _draw_batch(run, step)
            reference = _reference_outputs(run, batch)
            terms, reported_loss = _optimizer_step(run, batch, reference)
            entry = _log_entry(run, step, terms, reported_loss)
            _stop_if_not_finite(run, step, terms)
            _evaluate(run, step, entry, evaluate)
            _append_to_log(run, entry)
            show(step, entry.get("loss", float("nan")))
            stopped_early = _stop_reason(run, entry, should_stop)
            _checkpoint_if_due(run, step, last=step == run.total_steps or stopped_early is not None)
            if stopped_early is not None:
                break
    return _finish(run, step, stopped_early, started)


# -- set-up ---------------------------------------------------------------------------------------


def _set_up(model, tokenizer, benchmark: Benchmark, config: UnlearnSettings, output_dir: Path | None, console) -> _Run:
    """Seed, prepare the model, and build the optimizer, its schedule, the data streams and the
    checkpointer."""
    parallel = data_parallel()
    if config.parallel.mode == "fsdp":
        parallel = parallel.with_sharding()
    if config.batch_size % parallel.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} (the global batch) must be a multiple of the "
            f"{parallel.world_size} processes"
        )
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, objective, frozen_weights, lora = _prepare_model(model, config, parallel)
    device = next(model.parameters()).device
    forget_records = _records(benchmark, config.forget_splits)
    total_steps = config.total_steps(len(forget_records))
    try:
        optimizer = build_optimizer(
            config.optimizer, model, config.lr, total_steps=total_steps, **config.optimizer_options
        )
    except (TypeError, ValueError) as error:  # an option value the optimizer refuses (names are checked up front)
        raise SettingsError(f"optimizer {config.optimizer}: {first_line(error)}") from error
    _check_layout_under_budget(optimizer, config)
    trained = [p for p in model.parameters() if p.requires_grad]
    if parallel.is_main:
        for warning in [*hooks(optimizer).precision_warnings(), *_curvature_warnings(optimizer, objective)]:
            console.print(f"[yellow]warning:[/yellow] {config.optimizer} {warning}", highlight=False, soft_wrap=True)
    after_backward = None
    if parallel.enabled:
        hooks(optimizer).enable_data_parallel(parallel.mean_)
    if parallel.sharded:  # FSDP reduce-scatters the gradients itself
        try:
            hooks(optimizer).enable_fsdp(model, parallel.mesh)
        except ValueError as error:
            raise SettingsError(f"optimizer {config.optimizer}: {first_line(error)}") from error
    elif parallel.enabled:
        after_backward = functools.partial(parallel.average_gradients, trained)
    schedule = lr_lambda(config.lr_schedule, config.warmup_steps, total_steps)
    return _Run(
        config=config,
        model=model,
        tokenizer=tokenizer,
        objective=objective,
        frozen_weights=frozen_weights,
        lora=lora,
        trained=trained,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        streams={
            "forget": RecordStream(forget_records, config.batch_size, config.seed),
            "retain": RecordStream(_records(benchmark, config.retain_splits), config.batch_size, config.seed + 1),
        },
        generator=torch.Generator(device=device).manual_seed(config.seed + _RANK_SEED_STRIDE * parallel.rank),
        total_steps=total_steps,
        parallel=parallel,
        after_backward=after_backward,
        output_dir=output_dir,
        checkpointer=Checkpointer(output_dir, parallel) if output_dir is not None else None,
        keeper=best_snapshots(output_dir) if config.keep_best is not None else None,
        console=console,
    )


def _shard(model, lora: bool, config: UnlearnSettings, mesh) -> None:
    """Shard the model with FSDP2 (each rank keeps its shards; under FSDP every rank's shards
    together make the one model, so no broadcast is needed)."""
    if lora:
        raise SettingsError(
            "LoRA with parallel mode fsdp: a LoRA run holds one copy of the base weights, which fits a GPU; "
            "use parallel mode ddp"
        )
    shard_model(model, mesh, config.parallel.mixed_precision == "bf16")


def _check_layout_under_budget(optimizer: torch.optim.Optimizer, config: UnlearnSettings) -> None:
    """``SettingsError`` for a ``hybrid`` whose blocks are laid out back from the last step
    (``align="end"``) in a run whose last step the compute budget decides."""
    if config.compute_budget is None or not isinstance(optimizer, AlternatingHybrid) or optimizer.align != "end":
        return
    raise SettingsError(
        f"optimizer {config.optimizer}: align='end' lays the blocks out back from the last step, which a "
        "compute_budget leaves unknown; use align='start' (blocks from the first step, stops at the end of a ZO block)"
    )


def _curvature_warnings(optimizer: torch.optim.Optimizer, objective: Objective) -> list[str]:
    """Sophia-G's curvature (an optimizer that wants the batch's token count takes
    ``closure(sample_labels=True)``: labels sampled from the model's outputs) is that of the output
    distribution, which says nothing about a loss on hidden activations (docs/engine.md, "Sophia-G
    on unlearning losses")."""
    if not hooks(optimizer).wants_batch_tokens or objective.loss_on != "activations":
        return []
    return [
        f"estimates curvature from labels sampled from the model's outputs, unrelated to {objective.name}'s "
        "activation loss (on the embedded model 10^7 times smaller than its own, so every coordinate clips "
        f"to a sign step); use sophia-h (Hutchinson on {objective.name}'s own loss) for a second-order run"
    ]


def _caches_reference(objective: Objective, config: UnlearnSettings) -> bool:
    """Whether the run looks the reference's outputs up in a :class:`ReferenceCache`: asked for,
    and exact (the objective reads nothing else of the reference)."""
    return config.reference == "cached" and objective.needs_reference and objective.sequence_reference


def _prepare_model(
    model, config: UnlearnSettings, parallel: DataParallel
) -> tuple[Any, Objective, FrozenWeights | None, bool]:
    """The model to train (with LoRA adapters, if asked; sharded under FSDP), the objective, which
    weights train, and
    for a live reference a copy of the trained weights (None under LoRA, whose reference is the
    disabled adapter, and with a reference cache, built from the model itself before the first step).

    The reference is the model with its trained weights at their start values: the others never
    change, so only the trained ones are copied. For RMU, whose reference is read on every retain
    batch, that is a copy of three ``down_proj`` matrices (2.4% of a 7B model's weights) instead of
    the whole model; a cache of its retain activations instead would hold every retain example the
    stream can draw (the ``RMU`` docstring has the numbers)."""
    lora = lora_options(config.lora)
    if lora is not None:
        model = add_lora(model, lora)  # the base weights freeze, the adapters train
    try:
        objective = build_objective(config.objective, model=model, **config.objective_options)
    except (TypeError, ValueError) as error:
        raise SettingsError(f"objective {config.objective}: {first_line(error)}") from error
    trainable = objective.trainable_parameters(model)
    if trainable is not None:
        chosen = {id(p) for p in trainable}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in chosen)
    if parallel.sharded:
        _shard(model, lora is not None, config, parallel.mesh)  # the copy below is then of each rank's shards
    frozen_weights = None
    if objective.needs_reference and lora is None and not _caches_reference(objective, config):
        frozen_weights = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
    model.train()
    return model, objective, frozen_weights, lora is not None


def _resume(run: _Run) -> None:
    """Load the latest checkpoint (if any), keep the log lines of the steps it holds, and the best
    weights kept so far."""
    if run.checkpointer is None:
        raise ValueError("resume needs an output directory")
    latest = run.checkpointer.latest()
    if latest is not None:
        stored_cache = latest / REFERENCE_CACHE
        if not stored_cache.is_file():  # written by a version without the cache: built before the weights load
            _cache_reference(run)
        # the stored settings are compared before anything loads: a run resumes only as itself
        state = run.checkpointer.load(
            latest, run.model, run.optimizer, run.scheduler, run.streams, run.generator, settings=run.config
        )
        if run.caches_reference and run.reference_cache is None:  # load() has verified its checksum
            run.reference_cache = ReferenceCache.load(stored_cache)
        run.start_step = run.resumed_from = state["step"]
        run.pending_stop = state.get("pending_stop")
        run.passes.update(state.get("passes", {}))  # a checkpoint written before passes were saved: counted from here
        if run.parallel.is_main:
            run.console.print(f"resuming from step {run.start_step} ({latest})", highlight=False, soft_wrap=True)
            for note in state["resume_notes"]:
                run.console.print(f"note: {note}", highlight=False, soft_wrap=True)
        if run.log_path.exists():  # drop log lines of steps the checkpoint does not hold
            run.history = [h for h in read_log(run.log_path) if h.get("step", 0) <= run.start_step]
    kept = run.keeper.current() if run.keeper is not None else None
    run.best = None if kept is None else kept[1]


def _cache_reference(run: _Run) -> None:
    """Build the reference cache from the model as it is (the reference: before the first step
    and before a checkpoint's weights load), if the run caches its reference and has no cache yet.
    Every forget record is an example, and for an objective that reads refusals every forget
    question with every refusal answer; the passes are counted like a step's."""
    if not run.caches_reference or run.reference_cache is not None:
        return
    records = list(run.streams["forget"].records)
    if "refusal" in run.objective.batch_parts:
        questions = [r for r in records if isinstance(r, QA)]
        records += [_refusal(q, answer) for q in questions for answer in REFUSAL_ANSWERS]
    with _reference_view(run.model, None, run.lora) as frozen:
        run.reference_cache, forwards = build_reference_cache(
            frozen,
            run.tokenizer,
            records,
            max_length=run.config.max_length,
            batch_size=run.config.batch_size,
            parallel=run.parallel,
            template=run.config.template,
        )
    run.passes["forward"] += forwards


def _start(run: _Run) -> None:
    """Every rank starts from rank 0's weights (sharded: each holds its own part of the one
    model); rank 0 writes the log of the steps kept so far."""
    if not run.parallel.sharded:
        run.parallel.broadcast_([p.detach() for p in run.trained])
    run.parallel.barrier()  # every rank has read the log before rank 0 rewrites it
    if run.output_dir is None or not run.parallel.is_main:
        return
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    run.log_path.write_text("".join(json.dumps(h) + "\n" for h in run.history))
    if run.keeper is not None and run.best is None:
        shutil.rmtree(run.keeper.root, ignore_errors=True)  # a fresh run's best is its own


@contextlib.contextmanager
def _progress_bar(run: _Run, enabled: bool) -> Iterator[Callable[[int, float], None]]:
    """A progress bar (rank 0 only); yields ``show(step, loss)``."""
    columns = (
        TextColumn(f"unlearn {run.config.objective}/{run.config.optimizer}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=run.console, disable=not enabled or not run.parallel.is_main) as bar:
        task = bar.add_task("unlearn", total=run.total_steps, completed=run.start_step, loss="-")
        yield lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.4f}")


# -- one step -------------------------------------------------------------------------------------


def _draw_batch(run: _Run, step: int) -> UnlearnBatch:
    """Every rank draws the global batch from its copy of the streams, then takes its shard."""
    forget, retain = run.streams["forget"].next(), run.streams["retain"].next()
    config = run.config
    shard = _shard_batch(
        forget,
        retain,
        config.seed + step,
        run.parallel,
        run.tokenizer,
        config.max_length,
        parts=run.objective.batch_parts,
        template=config.template,
    )
    return shard.to(run.device)


def _reference_outputs(run: _Run, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
    """What the objective needs from the frozen reference model on ``batch``: looked up in the
    reference cache, or computed once per step."""
    if not run.objective.needs_reference:
        return {}
    if run.reference_cache is not None:
        sequences = run.objective.reference_sequences(batch)
        return {name: run.reference_cache.lookup(tokens) for name, tokens in sequences.items()}
    with torch.no_grad(), _reference_view(run.model, run.frozen_weights, run.lora) as frozen:
        reference = run.objective.reference_outputs(frozen, batch)
    run.passes["forward"] += 1
    return reference


def _optimizer_step(run: _Run, batch: UnlearnBatch, reference: dict) -> tuple[dict[str, float], float | None]:
    """One optimizer step and one scheduler step. Returns the loss terms of the closure's latest
    call and the loss the optimizer reports (None if it reports none), averaged over ranks."""
    optimizer_hooks = hooks(run.optimizer)
    if optimizer_hooks.wants_batch_tokens:
        # Sophia-G's B: its sampled-label loss averages the scored forget tokens (of every rank)
        optimizer_hooks.set_batch_tokens(int(run.parallel.sum_((batch.forget.labels[:, 1:] != IGNORE_INDEX).sum())))
    terms: dict[str, float] = {}

    def objective_loss(term: str | None) -> torch.Tensor:
        out = run.objective.loss(run.model, batch, reference)
        terms.update({k: float(v.detach()) for k, v in out.items() if v.numel() == 1})
        return out["loss" if term is None else term]

    closure = make_closure(
        run.model,
        objective_loss,
        terms=LOSS_TERMS,
        sampled_label_loss=lambda term: sampled_label_loss(run.model, batch.forget, run.generator),
        after_backward=run.after_backward,
        passes=run.passes,
    )
    reported = run.optimizer.step(closure)
    run.scheduler.step()
    terms = run.parallel.mean_values(terms, run.device)
    if reported is None:
        return terms, None
    return terms, run.parallel.mean_values({"loss": float(reported)}, run.device)["loss"]


def _log_entry(run: _Run, step: int, terms: dict[str, float], reported_loss: float | None) -> dict[str, Any]:
    """The step's log entry: its learning rate; ``loss``, the loss the optimizer's step reports
    (at the weights θ before the step for most grades); the loss terms of the closure's latest
    call and where that call was, ``terms_at`` (``"θ"``, or e.g. ``"θ − eps·z"`` for a
    zeroth-order step); the run's cost so far, ``forward_equivalents``; and what the optimizer adds."""
    optimizer_hooks = hooks(run.optimizer)
    entry = {
        "step": step,
        "lr": run.optimizer.param_groups[0]["lr"],
        **terms,
        "terms_at": optimizer_hooks.last_closure_at,
    }
    if reported_loss is not None:
        entry["loss"] = reported_loss
    return {**entry, "forward_equivalents": run.forward_equivalents, **optimizer_hooks.log_fields()}


def _stop_if_not_finite(run: _Run, step: int, terms: dict[str, float]) -> None:
    """Raise :class:`NonFiniteLossError` (and mark the run failed) if a loss term is NaN or infinite."""
    bad = [k for k, v in terms.items() if isinstance(v, float) and not math.isfinite(v)]
    if terms and not bad:
        return
    cause = f"{', '.join(bad)} = {[terms[k] for k in bad]}" if bad else "the closure was never called"
    if run.output_dir is not None and run.parallel.is_main:
        atomic_write_json(run.output_dir / "status.json", {"state": "failed", "step": step, "cause": cause})
    raise NonFiniteLossError(step, cause)


def _evaluate(run: _Run, step: int, entry: dict[str, Any], evaluate: Callable | None) -> None:
    """Every ``eval_every`` steps: ``entry["eval"]`` = rank 0's metrics, and with ``keep_best`` a
    snapshot of the weights when they are the best so far."""
    every = run.config.eval_every
    if evaluate is None or not every or step % every:
        return
    # a sharded model's forward passes need every rank (each gathers the weights with the others)
    evaluates = run.parallel.is_main or run.parallel.sharded
    entry["eval"] = run.parallel.broadcast_object(evaluate(run.model, step) if evaluates else None)
    run.model.train()
    reshard(run.model)
    if run.keeper is None:
        return
    config = run.config
    value = _best_value(entry["eval"], config.keep_best)
    if run.best is not None and not _better(value, run.best["value"], config.keep_best_mode):
        return
    run.best = {"step": step, "metric": config.keep_best, "value": value, "mode": config.keep_best_mode}
    weights = full_state_dict(run.model, sharded=run.parallel.sharded, trainable_only=True)  # on rank 0
    if run.parallel.is_main:
        run.keeper.commit(f"step-{step}", lambda staging: save_weights(weights, staging / WEIGHTS), run.best)


def _append_to_log(run: _Run, entry: dict[str, Any]) -> None:
    run.history.append(entry)
    if run.log_path is not None and run.parallel.is_main:
        with open(run.log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")


def _stop_reason(run: _Run, entry: dict[str, Any], should_stop: Callable | None) -> str | None:
    """Why the run stops after this step, if it does: ``should_stop``'s answer to an evaluation,
    held pending until the optimizer may stop; else the compute budget, once spent (it stays spent,
    so it too waits until the optimizer may stop)."""
    if should_stop is not None and "eval" in entry and run.pending_stop is None:
        run.pending_stop = should_stop(entry["eval"])
    if not hooks(run.optimizer).may_stop:
        return None
    if run.pending_stop is not None:
        return run.pending_stop
    if run.budget_spent:
        return f"compute budget of {run.config.compute_budget:g} forward-pass equivalents spent"
    return None


def _checkpoint_if_due(run: _Run, step: int, last: bool) -> None:
    every = run.config.checkpoint_every
    if run.checkpointer is None or not (last or (every and step % every == 0)):
        return
    extra = {"config": run.config.model_dump(mode="json"), "pending_stop": run.pending_stop, "passes": run.passes}
    files = {} if run.reference_cache is None else {REFERENCE_CACHE: run.reference_cache.save}
    run.checkpointer.save(step, run.model, run.optimizer, run.scheduler, run.streams, run.generator, extra, files)


def _finish(run: _Run, step: int, stopped_early: str | None, started: float) -> UnlearnResult:
    run.model.eval()
    if run.output_dir is not None and run.parallel.is_main:
        status = {"state": "finished", "step": step, "stopped_early": stopped_early}
        atomic_write_json(run.output_dir / "status.json", status)
    run.parallel.barrier()  # no rank returns before rank 0 has written the run's files
    best = None if run.best is None else {k: run.best[k] for k in ("step", "metric", "value", "mode")}
    seconds = time.perf_counter() - started
    return UnlearnResult(
        run.model,
        step,
        run.history,
        seconds,
        run.resumed_from,
        stopped_early,
        run.passes,
        run.total_steps,
        best,
        forward_equivalents=run.forward_equivalents,
        budget_spent=stopped_early is not None and run.pending_stop is None,  # a stop should_stop did not ask for
    )
