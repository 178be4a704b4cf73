"""The unlearning loop: one objective x one optimizer grade, read top to bottom.

Each step draws a forget batch and a retain batch, computes the frozen reference model's outputs
once (under ``no_grad``), builds the closure of :mod:`robustunlearn.optim.base` and lets the
optimizer call it as its grade needs: backward for first-order, function values at perturbed
weights for zeroth-order, sampled labels for Sophia-G. Steps are logged as JSON lines; checkpoints
(model, optimizer state, RNG states, data position) are written atomically so a killed run
resumes to the same final weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors_into, save_model as save_safetensors_from

from robustunlearn.batching import IGNORE_INDEX, TokenBatch, UnlearnBatch
from robustunlearn.data.base import QA, Benchmark, Record
from robustunlearn.data.collate import collate_records
from robustunlearn.data.prompts import REFUSAL_ANSWERS
from robustunlearn.io import atomic_write_json
from robustunlearn.objectives import build_objective
from robustunlearn.optim import build_optimizer

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class UnlearnConfig:
    objective: str = "npo"
    objective_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adamw"
    lr: float | None = None  # None: the optimizer's registered default
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 60
    batch_size: int = 8  # forget examples per step; the retain batch has as many
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    eval_every: int = 0  # steps between calls of the evaluation callback; 0 = never
    forget_splits: tuple[str, ...] = ("forget_qa", "forget_text")
    retain_splits: tuple[str, ...] = ("retain_qa", "retain_text")
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; accepted: {', '.join(SCHEDULES)}")
        self.forget_splits, self.retain_splits = tuple(self.forget_splits), tuple(self.retain_splits)


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
    model, objective, batch: UnlearnBatch, reference: dict, generator: torch.Generator, record: dict, passes: dict[str, int]
):
    """The step's closure (protocol in :mod:`robustunlearn.optim.base`); ``record`` receives the
    loss terms of its latest call, for logging; ``passes`` counts forward and backward passes."""

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
    model: Any
    steps_done: int
    history: list[dict[str, Any]]
    seconds: float
    resumed_from: int | None = None
    stopped_early: str | None = None  # why the evaluation callback stopped the run
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})  # model passes, this process


class Checkpointer:
    """Atomic checkpoints in ``directory/checkpoints/step-N`` and a ``latest`` pointer."""

    def __init__(self, directory: Path):
        self.root = directory / "checkpoints"

    def latest(self) -> Path | None:
        pointer = self.root / "latest.json"
        if not pointer.is_file():
            return None
        path = self.root / json.loads(pointer.read_text())["name"]
        return path if (path / "progress.json").is_file() else None

    def save(self, step: int, model, optimizer, scheduler, streams: dict[str, RecordStream], generator, extra: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".step-", dir=self.root))
        save_safetensors_from(model, str(staging / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "sampling_rng": generator.get_state(),
            },
            staging / "state.pt",
        )
        atomic_write_json(
            staging / "progress.json",
            {"step": step, "streams": {k: s.state_dict() for k, s in streams.items()}, **extra},
        )
        final = self.root / f"step-{step}"
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        previous = self.latest()
        atomic_write_json(self.root / "latest.json", {"name": final.name, "step": step})
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)  # keep one: checkpoints of 7B models are large

    def load(self, path: Path, model, optimizer, scheduler, streams: dict[str, RecordStream], generator) -> dict:
        load_safetensors_into(model, str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        generator.set_state(state["sampling_rng"])
        progress = json.loads((path / "progress.json").read_text())
        for name, stream in streams.items():
            stream.load_state_dict(progress["streams"][name])
        return progress


def _records(benchmark: Benchmark, splits: Sequence[str]) -> list[Record]:
    records: list[Record] = []
    for split in splits:
        records += benchmark.get(split)
    if not records:
        raise ValueError(f"benchmark {benchmark.name!r} has no records in {list(splits)}; it has {sorted(benchmark.splits)}")
    return records


def unlearn(
    model,
    tokenizer,
    benchmark: Benchmark,
    config: UnlearnConfig,
    output_dir: str | Path | None = None,
    *,
    resume: bool = False,
    evaluate: Callable[[Any, int], dict[str, Any]] | None = None,
    should_stop: Callable[[dict[str, Any]], str | None] | None = None,
    progress: bool = True,
    console=None,
) -> UnlearnResult:
    """Unlearn ``benchmark``'s forget splits from ``model`` in place and return it.

    ``evaluate(model, step)`` runs every ``config.eval_every`` steps; its metrics are logged and
    passed to ``should_stop``, which returns a reason to stop early (or None)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    output_dir = Path(output_dir) if output_dir is not None else None
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    objective = build_objective(config.objective, model=model, **config.objective_options)
    trainable = objective.trainable_parameters(model)
    if trainable is not None:
        chosen = {id(p) for p in trainable}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in chosen)
    reference_model = None
    if objective.needs_reference:
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizer = build_optimizer(config.optimizer, model, config.lr, total_steps=config.steps, **config.optimizer_options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.lr_schedule, config.warmup_steps, config.steps))
    streams = {
        "forget": RecordStream(_records(benchmark, config.forget_splits), config.batch_size, config.seed),
        "retain": RecordStream(_records(benchmark, config.retain_splits), config.batch_size, config.seed + 1),
    }
    generator = torch.Generator().manual_seed(config.seed)
    checkpointer = Checkpointer(output_dir) if output_dir is not None else None

    start_step, resumed_from, history = 0, None, []
    log_path = output_dir / "log.jsonl" if output_dir is not None else None
    if resume:
        if checkpointer is None:
            raise ValueError("resume needs an output directory")
        latest = checkpointer.latest()
        if latest is not None:
            start_step = resumed_from = checkpointer.load(latest, model, optimizer, scheduler, streams, generator)["step"]
            if log_path is not None and log_path.exists():  # drop log lines of steps the checkpoint does not hold
                history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
                history = [h for h in history if h.get("step", 0) <= start_step]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    started = time.perf_counter()
    stopped_early = None
    passes = {"forward": 0, "backward": 0}
    columns = (TextColumn(f"unlearn {config.objective}/{config.optimizer}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("unlearn", total=config.steps, completed=start_step, loss="-")
        step = start_step
        for step in range(start_step + 1, config.steps + 1):
            forget_records = streams["forget"].next()
            refusals = refusal_records(forget_records, config.seed + step)
            batch = UnlearnBatch(
                forget=collate_records(tokenizer, forget_records, config.max_length),
                retain=collate_records(tokenizer, streams["retain"].next(), config.max_length),
                forget_refusal=collate_records(tokenizer, refusals, config.max_length) if refusals else None,
            ).to(next(model.parameters()).device)
            with torch.no_grad():
                reference = objective.reference_outputs(reference_model, batch) if reference_model is not None else {}
            passes["forward"] += reference_model is not None
            for group in optimizer.param_groups:
                if "batch_size" in group:  # Sophia-G's B: its sampled-label loss averages the scored forget tokens
                    group["batch_size"] = int((batch.forget.labels[:, 1:] != IGNORE_INDEX).sum())
            terms: dict[str, float] = {}
            returned = optimizer.step(make_closure(model, objective, batch, reference, generator, terms, passes))
            scheduler.step()
            entry = {"step": step, "lr": optimizer.param_groups[0]["lr"], **terms}
            if returned is not None:  # the loss the optimizer reports (at θ; the last closure call may be perturbed)
                entry["loss"] = float(returned)
            for name in ("last_unclipped_fraction", "current_phase"):
                if hasattr(optimizer, name):
                    entry[name] = getattr(optimizer, name)
            bad = [k for k, v in terms.items() if isinstance(v, float) and not math.isfinite(v)]
            if not terms or bad:
                cause = f"{', '.join(bad)} = {[terms[k] for k in bad]}" if bad else "the closure was never called"
                if output_dir is not None:
                    atomic_write_json(output_dir / "status.json", {"state": "failed", "step": step, "cause": cause})
                raise NonFiniteLossError(step, cause)
            if evaluate is not None and config.eval_every and step % config.eval_every == 0:
                entry["eval"] = evaluate(model, step)
                model.train()
            history.append(entry)
            if log_path is not None:
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")
            bar.update(task, completed=step, loss=f"{terms.get('loss', float('nan')):.4f}")
            if should_stop is not None and "eval" in entry:
                stopped_early = should_stop(entry["eval"])
            is_last = step == config.steps or stopped_early is not None
            if checkpointer is not None and (is_last or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                checkpointer.save(step, model, optimizer, scheduler, streams, generator, {"config": asdict(config)})
            if stopped_early is not None:
                break
    model.eval()
    if output_dir is not None:
        atomic_write_json(output_dir / "status.json", {"state": "finished", "step": step, "stopped_early": stopped_early})
    return UnlearnResult(model, step, history, time.perf_counter() - started, resumed_from, stopped_early, passes)
