"""Benchmark of the unlearning objectives' costs on tiny Llama models (``robustunlearn bench objectives``).

For each objective, optimizer, model size and shape, on random-token batches (every token
scored), these calls are timed in turn by :func:`~robustunlearn.bench.timing.time_interleaved`:

* the baseline, ``forward_backward``: forward and backward of the plain next-token NLL of the
  token batches the objective reads (forget; retain and refusal where it reads them);
* ``plain_step``: one step of the optimizer on that plain loss;
* ``step``: one unlearning step with a live reference: the frozen reference model's outputs
  (under ``no_grad``, if the objective needs them) and one optimizer step on the objective's loss;
* ``reference``: those reference outputs alone (only for objectives that need them);
* ``cached_step``: one unlearning step as the engine takes it with ``reference: cached`` (only for
  objectives whose reference a cache can hold, ``sequence_reference``: npo, idk-dpo): the reference
  outputs looked up in a :class:`~robustunlearn.train.reference.ReferenceCache` built beforehand.

For those objectives the peak memory of a step is also measured with the reference live (a frozen
copy of the model) and cached (no copy), each in a fresh process.

The model trains the objective's parameters (``rmu``: its ``down_proj`` weights) in every call.
"""

from __future__ import annotations

import copy
import multiprocessing
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
    interval_cell,
    model_configs,
    pairs_cell,
    peak_bytes,
    progress_bar,
    run_threads,
    set_mmap_threshold,
    synchronised,
    write_run,
)
from robustunlearn.bench.targets import check_targets, target_lines
from robustunlearn.bench.timing import BASELINE, RatioStats, TimingSettings, time_interleaved
from robustunlearn.core.batching import TokenBatch, UnlearnBatch
from robustunlearn.objectives import LOSS_TERMS, OBJECTIVES, Objective, build_objective
from robustunlearn.objectives.common import mean_nll, sequence_logprobs
from robustunlearn.optim import OPTIMIZERS, build_optimizer
from robustunlearn.optim.base import hooks, make_closure, sampled_label_loss
from robustunlearn.train.reference import ReferenceCache, example_keys

BENCH_OBJECTIVES = ("ga", "graddiff", "npo", "simnpo", "rmu", "idk-dpo")
DEFAULT_OPTIMIZERS = ("adamw", "zo-sgd")
DEFAULT_SIZES = ("1M", "5M")
DEFAULT_SHAPES = ((8, 128), (8, 512))
# --quick: every objective and both default optimizers, on the smaller model and shape
QUICK_SIZES = ("1M",)
QUICK_SHAPES = ((8, 128),)
QUICK_TIMING = TimingSettings(budget_s=10.0)
# Modules the memory workers start from, so that none pays for importing them.
_PRELOAD = ["torch", "transformers.models.llama.modeling_llama", "robustunlearn.bench.objectives"]


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


def caches_reference(objective: Objective) -> bool:
    return objective.needs_reference and objective.sequence_reference


def reference_cache(model: nn.Module, objective: Objective, batch: UnlearnBatch) -> ReferenceCache:
    """What the engine caches before the first step, for ``batch``: ``model``'s (the reference's)
    summed log-probabilities of the sequences the objective's reference reads."""
    sequences = objective.reference_sequences(batch).values()
    training = model.training
    with torch.no_grad():
        values = torch.cat([sequence_logprobs(model.eval(), tokens)[0] for tokens in sequences])
    model.train(training)
    return ReferenceCache([key for tokens in sequences for key in example_keys(tokens)], values)


def step_calls(
    model: nn.Module,
    objective: Objective,
    reference_model: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batch: UnlearnBatch,
    cache: ReferenceCache | None = None,
) -> dict[str, Callable[[], object]]:
    """The calls the module docstring names, under those names (the baseline under
    :data:`~robustunlearn.bench.timing.BASELINE`; ``cached_step`` with a ``cache``)."""
    optimizer_hooks = hooks(optimizer)
    generator = torch.Generator(device=batch.forget.input_ids.device).manual_seed(0)
    scored = batch.forget.scored_tokens

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

    def cached() -> dict[str, torch.Tensor]:
        return {name: cache.lookup(tokens) for name, tokens in objective.reference_sequences(batch).items()}

    def unlearning_step(outputs_of: Callable[[], dict[str, torch.Tensor]]) -> None:
        outputs = outputs_of()

        def objective_loss(term: str | None) -> torch.Tensor:
            return objective.loss(model, batch, outputs)["loss" if term is None else term]

        take_step(make_closure(model, objective_loss, terms=LOSS_TERMS, sampled_label_loss=sampled))

    calls = {BASELINE: plain, "plain_step": lambda: take_step(plain), "step": lambda: unlearning_step(reference)}
    if objective.needs_reference:
        calls["reference"] = reference
    if cache is not None:
        calls["cached_step"] = lambda: unlearning_step(cached)
    return calls


def _unlearning_setup(
    objective_name: str, optimizer_name: str, config: Mapping[str, int], max_positions: int, *, live: bool
) -> tuple[nn.Module, Objective, nn.Module | None, torch.optim.Optimizer]:
    """The model (training the objective's parameters), the objective, with ``live`` the frozen
    reference copy (if the objective needs one), and the optimizer."""
    model = bench_model(config, max_positions, bench_device())
    objective = build_objective(objective_name, model=model)
    train_objective_parameters(model, objective)
    needs_copy = live and objective.needs_reference
    reference_model = copy.deepcopy(model).eval().requires_grad_(False) if needs_copy else None
    model.train()
    return model, objective, reference_model, build_optimizer(optimizer_name, model)


def _objective_rows(
    objective_name: str,
    optimizer_name: str,
    config: Mapping[str, int],
    shapes: Sequence[tuple[int, int]],
    timing: TimingSettings,
) -> list[dict[str, Any]]:
    """The timed rows of one objective and optimizer on one model size, one per shape."""
    device = bench_device()
    max_positions = max(s for _, s in shapes)
    model, objective, reference_model, optimizer = _unlearning_setup(
        objective_name, optimizer_name, config, max_positions, live=True
    )
    rows = []
    for batch_size, seq_len in shapes:
        batch = random_unlearn_batch(objective.batch_parts, (batch_size, seq_len), model.config.vocab_size, device)
        cache = reference_cache(model, objective, batch) if caches_reference(objective) else None
        calls = step_calls(model, objective, reference_model, optimizer, batch, cache)
        baseline = synchronised(calls.pop(BASELINE), device)
        candidates = {name: synchronised(call, device) for name, call in calls.items()}
        timings = time_interleaved(baseline, candidates, timing, cost_clock(device, torch.get_num_threads())[0])
        no_reference = RatioStats(0.0, 0.0, 0.0, timings.pairs)
        reference = timings.ratio("reference", over="step") if "reference" in calls else no_reference
        cached = {}
        if cache is not None:
            cached = {
                **timings.ratio("cached_step", over="plain_step").fields("cached_step_over_plain_step"),
                "cached_step_s": timings.median_s("cached_step"),
            }
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
                **cached,
            }
        )
    return rows


def _step_peaks(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: ``{"peaks": [...]}``, the peak memory of one unlearning step of ``task``'s objective
    and optimizer per shape (smallest first; the peak RSS, or ``max_memory_allocated`` on a GPU,
    above what the process held before building the model), with the reference ``task["reference"]``
    (``"live"``: a frozen copy; ``"cached"``: looked up); or ``{"error": ...}``."""
    try:
        torch.set_num_threads(task["threads"])
        device = bench_device()
        if device.type == "cpu":
            set_mmap_threshold(64 << 10)  # RSS follows live memory (bench optimizers does the same)
        baseline = 0 if device.type == "cuda" else peak_bytes(device)
        live, shapes = task["reference"] == "live", task["shapes"]
        model, objective, reference_model, optimizer = _unlearning_setup(
            task["objective"], task["optimizer"], task["config"], max(s for _, s in shapes), live=live
        )
        peaks = []
        for shape in shapes:
            batch = random_unlearn_batch(objective.batch_parts, shape, model.config.vocab_size, device)
            cache = None if live else reference_cache(model, objective, batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step_calls(model, objective, reference_model, optimizer, batch, cache)["step" if live else "cached_step"]()
            peaks.append(peak_bytes(device) - baseline)
        return {"peaks": peaks}
    except Exception as error:  # noqa: BLE001 - one failing measurement must not end the benchmark
        return {"error": f"{type(error).__name__}: {error}"}


def _add_peak_memory(
    rows: list[dict[str, Any]],
    configs: Mapping[str, Mapping[str, int]],
    shapes: Sequence[tuple[int, int]],
    threads: int,
    console: Any,
) -> None:
    """Add ``live_peak_bytes``, ``cached_peak_bytes`` and ``cached_peak_over_live_peak`` to the rows
    of objectives whose reference can be cached, each peak measured in a fresh process."""
    pairs = sorted({(r["objective"], r["optimizer"], r["size"]) for r in rows if "cached_step_s" in r})
    if not pairs:
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    with context.Pool(1, maxtasksperchild=1) as pool:  # a fresh process per task
        for objective, optimizer, size in pairs:
            tasks = [
                {
                    "objective": objective,
                    "optimizer": optimizer,
                    "config": configs[size],
                    "shapes": list(shapes),
                    "threads": threads,
                    "reference": reference,
                }
                for reference in ("live", "cached")
            ]
            live, cached = pool.map(_step_peaks, tasks)
            failed = [result["error"] for result in (live, cached) if "error" in result]
            if failed:
                console.print(f"peak memory of {objective} with {optimizer} on {size} failed: {failed[0]}", style="red")
                continue
            selected = [r for r in rows if (r["objective"], r["optimizer"], r["size"]) == (objective, optimizer, size)]
            for row, live_peak, cached_peak in zip(selected, live["peaks"], cached["peaks"]):
                row["live_peak_bytes"], row["cached_peak_bytes"] = live_peak, cached_peak
                row["cached_peak_over_live_peak"] = cached_peak / live_peak


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
    (module docstring) and these per-round ratios, each with its quartiles (``_q1``, ``_q3``) and
    its median's 95% interval (``_ci_low``, ``_ci_high``):

    * ``step_over_forward_backward``: unlearning step / plain forward and backward;
    * ``plain_step_over_forward_backward``: plain step / plain forward and backward;
    * ``step_over_plain_step``: unlearning step / plain step of the same optimizer;
    * ``reference_share``: reference outputs / unlearning step (0 without a reference model);
    * for npo and idk-dpo (a reference cache can hold their reference), ``cached_step_over_plain_step``:
      unlearning step with the cached reference / plain step, and ``cached_step_s``.

    Those rows also have ``live_peak_bytes`` and ``cached_peak_bytes``, the peak memory of a step with
    the reference live (a frozen copy) and cached (none), each measured in a fresh process (peak RSS
    on CPU, ``torch.cuda.max_memory_allocated`` on GPU, above what the process held before building
    the model), and their ratio ``cached_peak_over_live_peak``.

    The timed rows run in this process, and every memory worker, with ``threads`` torch CPU threads
    [default: the current count, restored afterwards]. Prints a table, the objective targets as
    pass/fail lines and, with ``json_path``, writes the run as JSON.
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
    _add_peak_memory(rows, configs, shapes, threads, console)

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
    columns = (
        "objective",
        "optimizer",
        "params",
        "shape",
        "step/(fwd+bwd)",
        "step/plain step",
        "95% CI",
        "ref share",
        "cached/plain step",
        "cached 95% CI",
        "mem cached/live",
    )
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
            interval_cell(row, "step_over_plain_step"),
            f"{row['reference_share']:.2f}",
            *_cached_cells(row),
            pairs_cell(row),
        )
    return table


def _cached_cells(row: dict[str, Any]) -> tuple[str, str, str]:
    """The cached step's ratio, its 95% interval and the peak memory ratio; dashes where there is no
    cache."""
    if "cached_step_s" not in row:
        return "-", "-", "-"
    memory = row.get("cached_peak_over_live_peak")
    return (
        f"{row['cached_step_over_plain_step']:.2f}",
        interval_cell(row, "cached_step_over_plain_step"),
        "-" if memory is None else f"{memory:.2f}",
    )
