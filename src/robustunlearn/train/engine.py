"""The unlearning loop: one objective x one optimizer grade, read top to bottom.

Each step draws a forget batch and a retain batch, computes the frozen reference model's outputs
once (under ``no_grad``), builds the closure of :mod:`robustunlearn.optim.base` and lets the
optimizer call it as its grade needs: backward for first-order, function values at perturbed
weights for zeroth-order, sampled labels for Sophia-G. Steps are logged as JSON lines; checkpoints
(trainable weights, optimizer state, RNG states, data position) are written atomically so a
killed run resumes to the same final weights.

Options (:class:`UnlearnSettings`): a budget in ``steps`` or ``epochs``; LoRA adapters instead of
full fine-tuning (``lora``), whose reference model is the same model with its adapter disabled;
keeping the weights with the best value of an evaluation metric (``keep_best``). Launched in
several processes (``torchrun``, ``accelerate launch``), the run is data parallel
(:mod:`robustunlearn.core.distributed`): ``batch_size`` is the global batch, each rank takes its
shard, and rank 0 alone logs, evaluates and writes files. docs/engine.md has the details.
"""

from __future__ import annotations

import contextlib
import copy
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

from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch, UnlearnBatch
from robustunlearn.core.distributed import DataParallel, data_parallel
from robustunlearn.core.io import atomic_write_json
from robustunlearn.core.models import WEIGHTS
from robustunlearn.core.modules import add_lora, lora_options, save_trainable_weights
from robustunlearn.data.base import QA, Benchmark, Record
from robustunlearn.data.collate import collate_records
from robustunlearn.data.prompts import REFUSAL_ANSWERS
from robustunlearn.objectives import build_objective
from robustunlearn.optim import build_optimizer
from robustunlearn.train.checkpoint import Checkpointer, best_snapshots, read_log
from robustunlearn.train.settings import UnlearnSettings

_RANK_SEED_STRIDE = 1_000_003  # rank r samples Sophia-G's labels from seed + r·stride


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
    return [QA(question=r.question, answer=rng.choice(REFUSAL_ANSWERS), subject=r.subject) for r in questions]


def sampled_label_loss(model, batch: TokenBatch, generator: torch.Generator) -> torch.Tensor:
    """NLL of labels drawn from the model's own softmax at the scored positions (Sophia-G's GNB)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    scored = batch.labels[:, 1:] != IGNORE_INDEX
    picked = logits[scored]
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(picked.float(), -1), 1, generator=generator).squeeze(-1)
    return torch.nn.functional.cross_entropy(picked, sampled)


def make_closure(
    model,
    objective,
    batch: UnlearnBatch,
    reference: dict,
    generator: torch.Generator,
    record: dict,
    passes: dict[str, int],
    after_backward: Callable[[], None] | None = None,
):
    """The step's closure (protocol in :mod:`robustunlearn.optim.base`); ``record`` receives the
    loss terms of its latest call, for logging; ``passes`` counts forward and backward passes;
    ``after_backward`` runs after each backward (data parallel: the gradient all-reduce)."""

    def closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None) -> torch.Tensor:
        passes["forward"] += 1
        passes["backward"] += int(backward)
        if backward:
            model.zero_grad(set_to_none=True)
        # backward=False keeps the caller's grad mode: ZO calls under no_grad, sophia-h with a graph.
        with torch.enable_grad() if backward else contextlib.nullcontext():
            if sample_labels:
                loss = sampled_label_loss(model, batch.forget, generator)
            else:
                terms = objective.loss(model, batch, reference)
                if term is not None and term not in terms:
                    raise KeyError(f"the objective has no loss term {term!r}; it has {sorted(terms)}")
                loss = terms["loss" if term is None else term]
                record.update({k: float(v.detach()) for k, v in terms.items() if v.numel() == 1})
            if backward:
                loss.backward()
                if after_backward is not None:
                    after_backward()
        # Without backward the graph (if the caller enabled grad) is kept: sophia-h differentiates twice.
        return loss.detach() if backward else loss

    return closure


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
    stopped_early: str | None = None  # why the evaluation callback stopped the run
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})  # model passes, this process
    total_steps: int = 0  # the step budget (from steps or epochs)
    best: dict[str, Any] | None = None  # with keep_best: step, metric, value, mode of the kept weights


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
    forget: list[Record], retain: list[Record], refusal_seed: int, parallel: DataParallel, tokenizer, max_length: int
) -> UnlearnBatch:
    """This rank's shard of the global forget and retain batches, with the refusals (for ``idk``)
    of its forget questions, drawn over the global batch as a single process draws them."""
    refusals = refusal_records(forget, refusal_seed)
    mine = parallel.shard(forget)
    before = sum(isinstance(r, QA) for r in forget[: parallel.shard_start(len(forget))])
    questions = [r for r in mine if isinstance(r, QA)]
    refusals = refusals[before : before + len(questions)]
    return UnlearnBatch(
        forget=collate_records(tokenizer, mine, max_length),
        retain=collate_records(tokenizer, parallel.shard(retain), max_length),
        forget_refusal=collate_records(tokenizer, refusals, max_length) if refusals else None,
        forget_answered=collate_records(tokenizer, questions, max_length) if questions else None,
    )


def _optimizer_parts(optimizer) -> list:
    """The optimizer and, for a hybrid, its first-order and zeroth-order parts."""
    return [optimizer, *(getattr(optimizer, name) for name in ("fo", "zo") if hasattr(optimizer, name))]


def _inexact_zeroth_order_dtypes(optimizer) -> list[str]:
    """The dtypes below float32 among the weights zeroth-order parts of ``optimizer`` perturb:
    their perturb-and-restore round trip is exact in float32 and float64 only (optim/zo.py)."""
    from robustunlearn.optim.zo import ZerothOrderOptimizer

    low = {
        str(p.dtype).removeprefix("torch.")
        for part in _optimizer_parts(optimizer)
        if isinstance(part, ZerothOrderOptimizer)
        for group in part.param_groups
        for p in group["params"]
        if p.dtype.is_floating_point and torch.finfo(p.dtype).bits < 32
    }
    return sorted(low)


def _make_data_parallel(optimizer, parallel: DataParallel) -> None:
    """Let zeroth-order parts average their projected gradients over ranks; refuse what would
    let ranks drift apart."""
    from robustunlearn.optim.sophia import SophiaH
    from robustunlearn.optim.zo import ZerothOrderOptimizer

    for part in _optimizer_parts(optimizer):
        if isinstance(part, SophiaH) and part.hvp == "autograd":
            # its Hessian-vector products never pass through the closure's gradient all-reduce
            raise ValueError(
                "sophia-h with hvp='autograd' cannot run in several processes; use hvp='finite-difference'"
            )
        if isinstance(part, ZerothOrderOptimizer) and part.reduce_projected_grad is None:
            part.reduce_projected_grad = parallel.mean_


@contextlib.contextmanager
def _reference_view(model, reference_model, lora: bool) -> Iterator[Any]:
    """The frozen reference: the deep copy taken at the start, or under LoRA the model itself
    with its adapter disabled (in eval mode, like the copy)."""
    if not lora:
        yield reference_model
        return
    training = model.training
    # re-enabling the adapter makes all of its weights trainable again (peft's set_adapter)
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        model.train(training)


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
    optimizer whose ``may_stop`` is false (a ``hybrid`` before the end of a ZO block) defers that
    stop to the next step where it is true."""

    console = console or Console(stderr=True)
    output_dir = Path(output_dir) if output_dir is not None else None
    if config.keep_best is not None and (evaluate is None or output_dir is None):
        raise ValueError(f"keep_best={config.keep_best!r} needs an evaluate callback and an output directory")
    parallel = data_parallel()
    if config.batch_size % parallel.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} (the global batch) must be a multiple of the "
            f"{parallel.world_size} processes"
        )
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    lora = lora_options(config.lora)
    if lora is not None:
        model = add_lora(model, lora)  # the base weights freeze, the adapters train
    objective = build_objective(config.objective, model=model, **config.objective_options)
    trainable = objective.trainable_parameters(model)
    if trainable is not None:
        chosen = {id(p) for p in trainable}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in chosen)
    reference_model = None
    if objective.needs_reference and lora is None:
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    device = next(model.parameters()).device
    forget_records = _records(benchmark, config.forget_splits)
    total_steps = config.total_steps(len(forget_records))
    optimizer = build_optimizer(config.optimizer, model, config.lr, total_steps=total_steps, **config.optimizer_options)
    trained = [p for p in model.parameters() if p.requires_grad]
    inexact = _inexact_zeroth_order_dtypes(optimizer)
    if inexact and parallel.is_main:
        console.print(
            f"[yellow]warning:[/yellow] {config.optimizer} perturbs and restores {', '.join(inexact)} weights "
            "inexactly (they drift a few ulps per step); load the model in float32 (dtype: float32) for exact steps",
            highlight=False,
            soft_wrap=True,
        )
    average_gradients = None
    if parallel.enabled:
        _make_data_parallel(optimizer, parallel)
        average_gradients = functools.partial(parallel.average_gradients, trained)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_schedule, config.warmup_steps, total_steps)
    )
    streams = {
        "forget": RecordStream(forget_records, config.batch_size, config.seed),
        "retain": RecordStream(_records(benchmark, config.retain_splits), config.batch_size, config.seed + 1),
    }
    generator = torch.Generator(device=device).manual_seed(config.seed + _RANK_SEED_STRIDE * parallel.rank)
    checkpointer = Checkpointer(output_dir, parallel) if output_dir is not None else None
    keeper = best_snapshots(output_dir) if config.keep_best is not None else None

    start_step, resumed_from, history, best = 0, None, [], None
    # A reason to stop that waits for a point where the optimizer may stop (a hybrid ends on ZO).
    pending_stop = None
    log_path = output_dir / "log.jsonl" if output_dir is not None else None
    if resume:
        if checkpointer is None:
            raise ValueError("resume needs an output directory")
        latest = checkpointer.latest()
        if latest is not None:
            progress_state = checkpointer.load(latest, model, optimizer, scheduler, streams, generator)
            start_step = resumed_from = progress_state["step"]
            pending_stop = progress_state.get("pending_stop")
            if parallel.is_main:
                console.print(f"resuming from step {start_step} ({latest})", highlight=False, soft_wrap=True)
            if log_path is not None and log_path.exists():  # drop log lines of steps the checkpoint does not hold
                history = [h for h in read_log(log_path) if h.get("step", 0) <= start_step]
        kept = keeper.current() if keeper is not None else None
        best = None if kept is None else kept[1]
    parallel.broadcast_([p.detach() for p in trained])  # every rank starts from rank 0's weights
    parallel.barrier()  # every rank has read the log before rank 0 rewrites it
    if output_dir is not None and parallel.is_main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        if keeper is not None and best is None:
            shutil.rmtree(keeper.root, ignore_errors=True)  # a fresh run's best is its own

    started = time.perf_counter()
    stopped_early = None
    passes = {"forward": 0, "backward": 0}
    columns = (
        TextColumn(f"unlearn {config.objective}/{config.optimizer}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not progress or not parallel.is_main) as bar:
        task = bar.add_task("unlearn", total=total_steps, completed=start_step, loss="-")
        step = start_step
        for step in range(start_step + 1, total_steps + 1):
            # every rank draws the global batch from its copy of the streams, then takes its shard
            batch = _shard_batch(
                streams["forget"].next(),
                streams["retain"].next(),
                config.seed + step,
                parallel,
                tokenizer,
                config.max_length,
            ).to(device)
            reference = {}
            if objective.needs_reference:
                with torch.no_grad(), _reference_view(model, reference_model, lora is not None) as frozen:
                    reference = objective.reference_outputs(frozen, batch)
                passes["forward"] += 1
            if any("batch_size" in group for group in optimizer.param_groups):
                # Sophia-G's B: its sampled-label loss averages the scored forget tokens (of every rank)
                scored = int(parallel.sum_((batch.forget.labels[:, 1:] != IGNORE_INDEX).sum()))
                for group in optimizer.param_groups:
                    if "batch_size" in group:
                        group["batch_size"] = scored
            # the phase this step runs in: a hybrid's current_phase names the phase of its next step
            phase = optimizer.current_phase if hasattr(type(optimizer), "current_phase") else None
            terms: dict[str, float] = {}
            closure = make_closure(model, objective, batch, reference, generator, terms, passes, average_gradients)
            returned = optimizer.step(closure)
            scheduler.step()
            terms = parallel.mean_values(terms, device)
            entry = {"step": step, "lr": optimizer.param_groups[0]["lr"], **terms}
            if returned is not None:  # the loss the optimizer reports (at θ; the last closure call may be perturbed)
                entry["loss"] = parallel.mean_values({"loss": float(returned)}, device)["loss"]
            if phase is not None:
                entry["current_phase"] = phase
            if hasattr(optimizer, "last_unclipped_fraction"):
                entry["last_unclipped_fraction"] = optimizer.last_unclipped_fraction
            bad = [k for k, v in terms.items() if isinstance(v, float) and not math.isfinite(v)]
            if not terms or bad:
                cause = f"{', '.join(bad)} = {[terms[k] for k in bad]}" if bad else "the closure was never called"
                if output_dir is not None and parallel.is_main:
                    atomic_write_json(output_dir / "status.json", {"state": "failed", "step": step, "cause": cause})
                raise NonFiniteLossError(step, cause)
            if evaluate is not None and config.eval_every and step % config.eval_every == 0:
                entry["eval"] = parallel.broadcast_object(evaluate(model, step) if parallel.is_main else None)
                model.train()
                value = _best_value(entry["eval"], config.keep_best) if keeper is not None else None
                if value is not None and (best is None or _better(value, best["value"], config.keep_best_mode)):
                    best = {"step": step, "metric": config.keep_best, "value": value, "mode": config.keep_best_mode}
                    if parallel.is_main:
                        keeper.commit(
                            f"step-{step}", lambda staging: save_trainable_weights(model, staging / WEIGHTS), best
                        )
            history.append(entry)
            if log_path is not None and parallel.is_main:
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")
            bar.update(task, completed=step, loss=f"{terms.get('loss', float('nan')):.4f}")
            if should_stop is not None and "eval" in entry and pending_stop is None:
                pending_stop = should_stop(entry["eval"])
            if pending_stop is not None and getattr(optimizer, "may_stop", True):
                stopped_early = pending_stop
            is_last = step == total_steps or stopped_early is not None
            if checkpointer is not None and (
                is_last or (config.checkpoint_every and step % config.checkpoint_every == 0)
            ):
                checkpointer.save(
                    step,
                    model,
                    optimizer,
                    scheduler,
                    streams,
                    generator,
                    {"config": config.model_dump(mode="json"), "pending_stop": pending_stop},
                )
            if stopped_early is not None:
                break
    model.eval()
    if output_dir is not None and parallel.is_main:
        atomic_write_json(
            output_dir / "status.json", {"state": "finished", "step": step, "stopped_early": stopped_early}
        )
    parallel.barrier()  # no rank returns before rank 0 has written the run's files
    if best is not None:
        best = {k: best[k] for k in ("step", "metric", "value", "mode")}
    return UnlearnResult(
        model, step, history, time.perf_counter() - started, resumed_from, stopped_early, passes, total_steps, best
    )
