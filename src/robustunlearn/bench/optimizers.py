"""Benchmark of the optimizers' costs on tiny Llama models (``robustunlearn bench optimizers``).

:func:`bench_optimizers` measures, for every registered optimizer, what one step costs next to
the forward pass it is built from (time and memory) and how much state it keeps.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

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
    settle_malloc,
    synchronised,
    write_run,
)
from robustunlearn.bench.targets import check_targets, target_lines
from robustunlearn.bench.timing import BASELINE, TimingSettings, ratio_stats, time_interleaved
from robustunlearn.optim import OPTIMIZERS, build_optimizer
from robustunlearn.optim.base import Closure, make_closure

DEFAULT_SIZES = ("1M", "5M")
DEFAULT_SHAPES = ((8, 128), (8, 512))
# --quick: the optimizers of the targets and their first-order neighbours, on the smaller model
QUICK_OPTIMIZERS = ("sgd", "adam", "adamw", "zo-sgd")
QUICK_SIZES = ("1M",)
QUICK_TIMING = TimingSettings(budget_s=10.0)
# Modules the benchmark's worker processes start from, so that none pays for importing them.
_PRELOAD = [
    "torch",
    "transformers.models.llama.modeling_llama",
    "robustunlearn.optim",
    "robustunlearn.bench.optimizers",
]


def lm_closure(model: nn.Module, input_ids: Tensor) -> Closure:
    """Closure (:mod:`robustunlearn.optim.base` protocol) of the next-token loss on
    ``input_ids``; its terms ``"forget"`` and ``"retain"`` are the loss on the first and the
    second half of the batch, so the hybrids that split the objective can run too. With
    ``sample_labels`` the labels at every position are drawn from the model's softmax (torch's
    global generator)."""
    half = len(input_ids) // 2
    rows = {None: input_ids, "forget": input_ids[:half], "retain": input_ids[half:]}

    def next_token_loss(term: str | None) -> Tensor:
        ids = rows[term]
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def sampled_label_loss(term: str | None) -> Tensor:
        logits = model(input_ids=rows[term]).logits.flatten(0, 1)
        labels = torch.multinomial(logits.detach().float().softmax(-1), 1).squeeze(-1)
        return F.cross_entropy(logits, labels)

    return make_closure(model, next_token_loss, terms=("forget", "retain"), sampled_label_loss=sampled_label_loss)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _measure(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: ``{"rows": ...}`` of one optimizer (``None``: inference only) or ``{"error": ...}``."""
    try:
        return {"rows": _measure_rows(task)}
    except Exception as error:  # noqa: BLE001 - one failing optimizer must not end the benchmark
        return {"error": f"{type(error).__name__}: {error}"}


def _measure_rows(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Build the model and optimizer, then two passes over the shapes (smallest first).

    Memory: a step per shape (a forward for the inference baseline), with every large
    allocation mapped and unmapped on its own so that the process's peak RSS, read after each
    shape, is that shape's peak (a larger shape has the larger peak).
    Time (optimizers only): under the malloc thresholds a long run settles on
    (:func:`~robustunlearn.bench.common.settle_malloc`), forwards and steps interleaved by
    :func:`time_interleaved`, whose warm-up lets freed memory be reused rather than mapped afresh."""

    torch.set_num_threads(task["threads"])
    device = bench_device()
    shapes, name, timing = task["shapes"], task["optimizer"], task["timing"]
    if device.type == "cpu":
        set_mmap_threshold(64 << 10)
    baseline = 0 if device.type == "cuda" else peak_bytes(device)
    model = bench_model(task["config"], max(s for _, s in shapes), device)
    vocab_size = model.config.vocab_size
    closures = [lm_closure(model, torch.randint(0, vocab_size, shape, device=device)) for shape in shapes]
    # `hybrid` alternates every step here, and each of its rounds takes a step of each phase
    options, per_round = ({"every": 1}, 2) if name == "hybrid" else ({}, 1)
    total_steps = per_round * (1 + timing.warmup + timing.max_pairs) * len(shapes)
    optimizer = None if name is None else build_optimizer(name, model, total_steps=total_steps, **options)

    def forward(closure) -> None:
        with torch.no_grad():
            closure(backward=False)

    def steps(closure) -> None:
        for _ in range(per_round):
            optimizer.step(closure)

    peaks = []
    for closure in closures:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if optimizer is None:
            forward(closure)
        else:
            steps(closure)
        peaks.append(peak_bytes(device) - baseline)
    if optimizer is None:
        return [{"peak_bytes": peak} for peak in peaks]
    if device.type == "cpu":
        settle_malloc()

    clock = cost_clock(device, task["threads"])[0]
    rows = []
    for (batch, seq_len), closure, peak in zip(shapes, closures, peaks):
        timings = time_interleaved(
            synchronised(lambda: forward(closure), device),
            {"step": synchronised(lambda: steps(closure), device)},
            timing,
            clock,
        )
        ratio = ratio_stats(
            [t / per_round for t in timings.seconds["step"]], timings.seconds[BASELINE], timings.confidence
        )
        rows.append(
            {
                "params": sum(p.numel() for p in model.parameters()),
                "batch": batch,
                "seq_len": seq_len,
                **ratio.fields("step_over_forward"),
                "pairs": ratio.pairs,
                "stop": timings.stop,
                "forward_s": timings.median_s(BASELINE),
                "step_s": timings.median_s("step") / per_round,
                "peak_bytes": peak,
                "state_bytes": _tensor_bytes(optimizer.state_dict()),
                "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            }
        )
    return rows


def bench_optimizers(
    sizes: Sequence[str | Mapping[str, int]] | None = None,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    optimizers: Sequence[str] | None = None,
    json_path: str | Path | None = None,
    console: Any = None,
    *,
    timing: TimingSettings | None = None,
    threads: int | None = None,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """Cost of one step of each optimizer on tiny Llama models, relative to a forward pass.

    ``sizes`` are names in :data:`~robustunlearn.bench.common.BENCH_MODELS` or ``LlamaConfig``
    keyword dicts [default: 1M, 5M]; ``shapes`` are ``(batch, seq_len)`` of random-token batches;
    ``optimizers`` default to every registered one. ``quick``: the unset ones among ``sizes``,
    ``optimizers`` and ``timing`` take the quick preset (:data:`QUICK_SIZES`,
    :data:`QUICK_OPTIMIZERS`, :data:`QUICK_TIMING`). Each row has ``optimizer``, ``grade``,
    ``size``, ``params``, ``batch``, ``seq_len``, ``threads`` and:

    * ``step_over_forward`` (``_q1``, ``_q3``; ``_ci_low``, ``_ci_high``): the median (quartiles; its
      95% interval) over ``pairs`` rounds of
      step time / forward time (no-grad forward of the same batch), the two timed in turn by
      :func:`~robustunlearn.bench.timing.time_interleaved` with ``timing`` (``stop``: why the
      rounds ended), on the clock :func:`~robustunlearn.bench.common.cost_clock` picks (CPU time
      with one thread, else wall time);
    * ``peak_mem_over_inference``: peak memory during steps over peak memory during inference
      alone. Each measurement runs in a fresh worker process forked from a server that has only
      imported the libraries, and counts the peak RSS (``torch.cuda.max_memory_allocated`` on
      GPU) above what the process held before building the model;
    * ``state_over_params``: bytes of tensors in the optimizer's ``state_dict`` over parameter bytes.

    Every worker runs with ``threads`` torch CPU threads [default: this process's count]. Prints a
    table with rich and the optimizer targets (:mod:`~robustunlearn.bench.targets`) as pass/fail
    lines; with ``json_path`` writes the run (:func:`~robustunlearn.bench.common.write_run`).
    """

    console = Console() if console is None else console
    names = list(optimizers or (QUICK_OPTIMIZERS if quick else OPTIMIZERS))
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizers {unknown}; accepted: {', '.join(sorted(OPTIMIZERS))}")
    configs = model_configs(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))
    timing = timing or (QUICK_TIMING if quick else TimingSettings())
    threads = run_threads(threads)
    ordered_shapes = sorted(shapes, key=lambda s: s[0] * s[1])

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    rows: list[dict[str, Any]] = []
    with context.Pool(1, maxtasksperchild=1) as pool, progress_bar(console) as progress:  # a fresh process per task
        bar = progress.add_task("bench optimizers", total=len(configs) * (1 + len(names)))
        for label, config in configs.items():
            tasks = [
                {"config": config, "shapes": ordered_shapes, "optimizer": n, "timing": timing, "threads": threads}
                for n in [None, *names]
            ]
            results = pool.imap(_measure, tasks)
            inference = next(results)
            progress.advance(bar)
            if "error" in inference:
                raise RuntimeError(f"the inference baseline failed on {label}: {inference['error']}")
            for name, measured in zip(names, results):
                progress.advance(bar)
                if "error" in measured:
                    console.print(f"{name} failed on {label}: {measured['error']}", style="red")
                    continue
                for base, row in zip(inference["rows"], measured["rows"]):
                    rows.append(_row(name, label, threads, row, base["peak_bytes"]))

    console.print(_table(rows, threads))
    targets = check_targets("optimizers", rows)
    for line in target_lines(targets):
        console.print(line, highlight=False, soft_wrap=True)
    if json_path is not None:
        write_run(json_path, environment(bench_device(), threads), timing, rows, targets)
    return rows


def _row(name: str, label: str, threads: int, measured: dict[str, Any], inference_peak: int) -> dict[str, Any]:
    """A measured row with its names and ratios."""
    ratio = [key for key in measured if key.startswith("step_over_forward")]
    return {
        "optimizer": name,
        "grade": OPTIMIZERS[name].grade,
        "size": label,
        "threads": threads,
        **{key: measured[key] for key in ("params", "batch", "seq_len", *ratio)},
        "pairs": measured["pairs"],
        "stop": measured["stop"],
        "peak_mem_over_inference": measured["peak_bytes"] / inference_peak,
        "state_over_params": measured["state_bytes"] / measured["param_bytes"],
        "step_s": measured["step_s"],
        "forward_s": measured["forward_s"],
        "peak_bytes": measured["peak_bytes"],
        "inference_peak_bytes": inference_peak,
    }


def _table(rows: list[dict[str, Any]], threads: int) -> Table:
    title = f"optimizer cost per step, tiny Llama, {threads} torch thread(s)"
    table = Table(title=title, box=box.SIMPLE, caption=UNSETTLED_CAPTION)
    for column in ("optimizer", "params", "shape", "step/fwd", "95% CI", "pairs", "mem/inference", "state/params"):
        table.add_column(column, no_wrap=True, justify="left" if column == "optimizer" else "right")
    for row in rows:
        table.add_row(
            row["optimizer"],
            f"{row['params'] / 1e6:.1f}M",
            f"{row['batch']}x{row['seq_len']}",
            f"{row['step_over_forward']:.2f}",
            interval_cell(row, "step_over_forward"),
            pairs_cell(row),
            f"{row['peak_mem_over_inference']:.2f}",
            f"{row['state_over_params']:.2f}",
        )
    return table
