"""Benchmark of the unlearning objectives' costs on tiny Llama models (``robustunlearn bench objectives``).

For each objective, optimizer, model size and shape, on random-token batches (every token
scored), four calls are timed in turn by :func:`~robustunlearn.bench.timing.time_interleaved`:

* the baseline, ``forward_backward``: forward and backward of the plain next-token NLL of the
  token batches the objective reads (forget; retain and refusal where it reads them);
* ``plain_step``: one step of the optimizer on that plain loss;
* ``step``: one unlearning step as the engine takes it: the frozen reference model's outputs
  (under ``no_grad``, if the objective needs them) and one optimizer step on the objective's loss;
* ``reference``: those reference outputs alone (only for objectives that need them).

The model trains the objective's parameters (``rmu``: its ``down_proj`` weights) in every call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from robustunlearn.bench.common import (
    UNSETTLED_CAPTION,
    bench_device,
    bench_model,
    cost_clock,
    environment,
    model_configs,
    pairs_cell,
    progress_bar,
    run_threads,
    synchronised,
    write_run,
)
from robustunlearn.bench.targets import check_targets, target_lines
from robustunlearn.bench.timing import BASELINE, RatioStats, TimingSettings, time_interleaved
from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch, UnlearnBatch
from robustunlearn.objectives import LOSS_TERMS, OBJECTIVES, Objective, build_objective
from robustunlearn.objectives.common import mean_nll, sequence_logprobs
from robustunlearn.optim import OPTIMIZERS, build_optimizer
from robustunlearn.optim.base import hooks, make_closure, sampled_label_loss

BENCH_OBJECTIVES = ("ga", "graddiff", "npo", "simnpo", "rmu", "idk-dpo")
DEFAULT_OPTIMIZERS = ("adamw", "zo-sgd")
DEFAULT_SIZES = ("1M", "5M")
DEFAULT_SHAPES = ((8, 128), (8, 512))
# --quick: every objective and both default optimizers, on the smaller model and shape
QUICK_SIZES = ("1M",)
QUICK_SHAPES = ((8, 128),)
QUICK_TIMING = TimingSettings(budget_s=10.0)


def random_unlearn_batch(
    parts: Collection[str], shape: tuple[int, int], vocab_size: int, device: torch.device, seed: int = 0
) -> UnlearnBatch:
    """An :class:`UnlearnBatch` of random tokens of ``shape``, every token scored, with the
    ``parts`` an objective reads (``Objective.batch_parts``). ``forget_answered`` stays None: the
    dispreferred side of ``idk-dpo`` is then the forget batch."""
    generator = torch.Generator().manual_seed(seed)

    def tokens() -> TokenBatch:
        ids = torch.randint(0, vocab_size, shape, generator=generator)
        return TokenBatch(ids, torch.ones_like(ids), ids.clone()).to(device)

    forget = tokens()
    retain = tokens() if "retain" in parts else None
    refusal = tokens() if "refusal" in parts else None
    return UnlearnBatch(forget, retain, refusal)


def check_bench_optimizers(names: Sequence[str]) -> None:
    """``ValueError`` for a hybrid among ``names``: a hybrid's step costs what its phase costs, so
    the step after a plain one is not a fair sample of it."""
    hybrids = [name for name in names if OPTIMIZERS[name].grade == "hybrid"]
    if hybrids:
        raise ValueError(f"bench objectives takes no hybrid optimizer (a step's cost depends on its phase): {hybrids}")


def plain_nll(model: nn.Module, batch: UnlearnBatch) -> torch.Tensor:
    """Σ over the batch's token batches of their mean next-token NLL."""
    parts = (batch.forget, batch.retain, batch.forget_refusal, batch.forget_answered)
    return sum(mean_nll(*sequence_logprobs(model, tokens)) for tokens in parts if tokens is not None)


def train_objective_parameters(model: nn.Module, objective: Objective) -> None:
    """Let only the objective's parameters train, as the engine does."""
    trainable = objective.trainable_parameters(model)
    if trainable is not None:
        chosen = {id(p) for p in trainable}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in chosen)


def step_calls(
    model: nn.Module,
    objective: Objective,
    reference_model: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batch: UnlearnBatch,
) -> dict[str, Callable[[], object]]:
    """The calls the module docstring names, under those names (the baseline under
    :data:`~robustunlearn.bench.timing.BASELINE`)."""
    optimizer_hooks = hooks(optimizer)
    generator = torch.Generator(device=batch.forget.input_ids.device).manual_seed(0)
    scored = int((batch.forget.labels[:, 1:] != IGNORE_INDEX).sum())

    def sampled(term: str | None) -> torch.Tensor:
        return sampled_label_loss(model, batch.forget, generator)

    plain = make_closure(model, lambda term: plain_nll(model, batch), sampled_label_loss=sampled)

    def reference() -> dict[str, torch.Tensor]:
        if not objective.needs_reference:
            return {}
        with torch.no_grad():
            return objective.reference_outputs(reference_model, batch)

    def take_step(closure) -> None:
        if optimizer_hooks.wants_batch_tokens:  # Sophia-G
            optimizer_hooks.set_batch_tokens(scored)
        optimizer.step(closure)

    def unlearning_step() -> None:
        outputs = reference()

        def objective_loss(term: str | None) -> torch.Tensor:
            return objective.loss(model, batch, outputs)["loss" if term is None else term]

        take_step(make_closure(model, objective_loss, terms=LOSS_TERMS, sampled_label_loss=sampled))

    calls = {BASELINE: plain, "plain_step": lambda: take_step(plain), "step": unlearning_step}
    if objective.needs_reference:
        calls["reference"] = reference
    return calls


def _objective_rows(
    objective_name: str,
    optimizer_name: str,
    config: Mapping[str, int],
    shapes: Sequence[tuple[int, int]],
    timing: TimingSettings,
) -> list[dict[str, Any]]:
    """The timed rows of one objective and optimizer on one model size, one per shape."""
    device = bench_device()
    model = bench_model(config, max(s for _, s in shapes), device)
    objective = build_objective(objective_name, model=model)
    train_objective_parameters(model, objective)
    reference_model = copy.deepcopy(model).eval().requires_grad_(False) if objective.needs_reference else None
    model.train()
    optimizer = build_optimizer(optimizer_name, model)
    rows = []
    for batch_size, seq_len in shapes:
        batch = random_unlearn_batch(objective.batch_parts, (batch_size, seq_len), model.config.vocab_size, device)
        calls = step_calls(model, objective, reference_model, optimizer, batch)
        baseline = synchronised(calls.pop(BASELINE), device)
        candidates = {name: synchronised(call, device) for name, call in calls.items()}
        timings = time_interleaved(baseline, candidates, timing, cost_clock(device, torch.get_num_threads())[0])
        no_reference = RatioStats(0.0, 0.0, 0.0, timings.pairs)
        reference = timings.ratio("reference", over="step") if "reference" in calls else no_reference
        rows.append(
            {
                "params": sum(p.numel() for p in model.parameters()),
                "batch": batch_size,
                "seq_len": seq_len,
                **timings.ratio("step").fields("step_over_forward_backward"),
                **timings.ratio("plain_step").fields("plain_step_over_forward_backward"),
                **timings.ratio("step", over="plain_step").fields("step_over_plain_step"),
                **reference.fields("reference_share"),
                "pairs": timings.pairs,
                "stop": timings.stop,
                "forward_backward_s": timings.median_s(BASELINE),
                "plain_step_s": timings.median_s("plain_step"),
                "step_s": timings.median_s("step"),
                "reference_s": timings.median_s("reference") if "reference" in calls else 0.0,
            }
        )
    return rows


def bench_objectives(
    sizes: Sequence[str | Mapping[str, int]] | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    objectives: Sequence[str] = BENCH_OBJECTIVES,
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    json_path: str | Path | None = None,
    console: Any = None,
    *,
    timing: TimingSettings | None = None,
    threads: int | None = None,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """Cost of one unlearning step of each objective, for each optimizer, on tiny Llama models.

    ``sizes`` as in :func:`~robustunlearn.bench.optimizers.bench_optimizers` [default: 1M, 5M];
    ``shapes`` ``(batch, seq_len)`` of each token batch [default: 8x128, 8x512]; ``quick``: the
    unset ones among ``sizes``, ``shapes`` and ``timing`` take the quick preset (1M, 8x128,
    :data:`QUICK_TIMING`). Each row has ``objective``, ``optimizer``, ``size``, ``params``,
    ``batch``, ``seq_len``, ``threads``, ``pairs``, ``stop``, the median seconds of each call
    (module docstring) and these per-round ratios, each with its quartiles (``_q1``, ``_q3``):

    * ``step_over_forward_backward``: unlearning step / plain forward and backward;
    * ``plain_step_over_forward_backward``: plain step / plain forward and backward;
    * ``step_over_plain_step``: unlearning step / plain step of the same optimizer;
    * ``reference_share``: reference outputs / unlearning step (0 without a reference model).

    The rows run in this process with ``threads`` torch CPU threads [default: the current count,
    restored afterwards]. Prints a table, the objective targets as pass/fail lines and, with
    ``json_path``, writes the run as JSON.
    """
    console = Console() if console is None else console
    unknown = [n for n in objectives if n not in OBJECTIVES] + [n for n in optimizers if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown objectives or optimizers {unknown}")
    check_bench_optimizers(optimizers)
    configs = model_configs(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))
    shapes = sorted(shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES), key=lambda s: s[0] * s[1])
    timing = timing or (QUICK_TIMING if quick else TimingSettings())
    threads = run_threads(threads)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    try:
        with progress_bar(console) as progress:
            bar = progress.add_task("bench objectives", total=len(configs) * len(objectives) * len(optimizers))
            for label, config in configs.items():
                for objective in objectives:
                    for optimizer in optimizers:
                        rows += _named_rows(objective, optimizer, label, config, shapes, timing, threads, console)
                        progress.advance(bar)
    finally:
        torch.set_num_threads(previous_threads)

    console.print(_table(rows, threads))
    targets = check_targets("objectives", rows)
    for line in target_lines(targets):
        console.print(line, highlight=False, soft_wrap=True)
    if json_path is not None:
        write_run(json_path, environment(bench_device(), threads), timing, rows, targets)
    return rows


def _named_rows(
    objective: str,
    optimizer: str,
    label: str,
    config: Mapping[str, int],
    shapes: Sequence[tuple[int, int]],
    timing: TimingSettings,
    threads: int,
    console: Any,
) -> list[dict[str, Any]]:
    """:func:`_objective_rows` with their names, or none (and a red line) if they failed."""
    try:
        measured = _objective_rows(objective, optimizer, config, shapes, timing)
    except Exception as error:  # noqa: BLE001 - one failing pair must not end the benchmark
        console.print(f"{objective} with {optimizer} failed on {label}: {type(error).__name__}: {error}", style="red")
        return []
    names = {"objective": objective, "optimizer": optimizer, "size": label, "threads": threads}
    return [{**names, **row} for row in measured]


def _table(rows: list[dict[str, Any]], threads: int) -> Table:
    title = f"unlearning step cost per objective, tiny Llama, {threads} torch thread(s)"
    table = Table(title=title, box=box.SIMPLE, caption=UNSETTLED_CAPTION)
    columns = ("objective", "optimizer", "params", "shape", "step/(fwd+bwd)", "step/plain step", "IQR", "ref share")
    for column in (*columns, "pairs"):
        table.add_column(column, no_wrap=True, justify="left" if column in columns[:2] else "right")
    for row in rows:
        table.add_row(
            row["objective"],
            row["optimizer"],
            f"{row['params'] / 1e6:.1f}M",
            f"{row['batch']}x{row['seq_len']}",
            f"{row['step_over_forward_backward']:.2f}",
            f"{row['step_over_plain_step']:.2f}",
            f"{row['step_over_plain_step_q1']:.2f}-{row['step_over_plain_step_q3']:.2f}",
            f"{row['reference_share']:.2f}",
            pairs_cell(row),
        )
    return table
