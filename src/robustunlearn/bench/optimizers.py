"""Benchmarks of the toolkit's own costs on tiny Llama models.

:func:`bench_optimizers` measures, for every registered optimizer, what one step costs next to
the forward pass it is built from (time and memory) and how much state it keeps.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import resource
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from robustunlearn.core.io import atomic_write_json
from robustunlearn.optim import OPTIMIZERS, build_optimizer
from robustunlearn.optim.base import Closure, make_closure

# Llama shapes of about 1M and 5M parameters (untied embeddings).
BENCH_MODELS: dict[str, dict[str, int]] = {
    "1M": {
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
    },
    "5M": {
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
    },
}
_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 4}
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


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _measure(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: ``{"rows": ...}`` of one optimizer (``None``: inference only) or ``{"error": ...}``."""
    try:
        return {"rows": _measure_rows(task)}
    except Exception as error:  # noqa: BLE001 - one failing optimizer must not end the benchmark
        return {"error": f"{type(error).__name__}: {error}"}


def _set_mmap_threshold(size: int) -> None:
    """glibc: serve allocations of ``size`` bytes or more with their own mmap (returned to the
    system when freed) and fix that threshold (by default glibc raises it as the program frees
    large blocks, after which freed memory stays resident and RSS stops following live memory).
    Elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _measure_rows(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Build the model and optimizer, then two passes over the shapes (smallest first).

    Memory: a step per shape (a forward for the inference baseline), with every large
    allocation mapped and unmapped on its own so that the process's peak RSS, read after each
    shape, is that shape's peak (a larger shape has the larger peak).
    Time: after a warm-up round (so that freed memory is reused, as in any long run, rather than
    mapped afresh), ``repeats`` forwards and steps, interleaved."""

    if task["threads"] is not None:
        torch.set_num_threads(task["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes, name, repeats = task["shapes"], task["optimizer"], task["repeats"]
    if device.type == "cpu":
        _set_mmap_threshold(64 << 10)
    baseline = 0 if device.type == "cuda" else _peak_bytes(device)
    torch.manual_seed(0)
    config = LlamaConfig(**task["config"], **_HEADS, max_position_embeddings=max(s for _, s in shapes))
    model = LlamaForCausalLM(config).to(device)
    closures = [lm_closure(model, torch.randint(0, config.vocab_size, shape, device=device)) for shape in shapes]
    # `hybrid` alternates every step here, and each of its rounds takes a step of each phase
    options, per_round = ({"every": 1}, 2) if name == "hybrid" else ({}, 1)
    total_steps = per_round * (2 + repeats) * len(shapes)
    optimizer = None if name is None else build_optimizer(name, model, total_steps=total_steps, **options)

    def forward(closure) -> None:
        with torch.no_grad():
            closure(backward=False)

    def steps(closure) -> None:
        for _ in range(per_round):
            optimizer.step(closure)

    # CPU: the process's CPU time, which other processes' load on the machine does not inflate
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def timed(fn, *args) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start

    peaks = []
    for closure in closures:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if optimizer is None:
            forward(closure)
        else:
            steps(closure)
        peaks.append(_peak_bytes(device) - baseline)
    if device.type == "cpu":
        _set_mmap_threshold(32 << 20)

    rows = []
    for (batch, seq_len), closure, peak in zip(shapes, closures, peaks):
        forward(closure)
        if optimizer is not None:
            steps(closure)
        forward_times, step_times = [], []
        for _ in range(repeats):
            forward_times.append(timed(forward, closure))
            if optimizer is not None:
                step_times.append(timed(steps, closure) / per_round)
        rows.append(
            {
                "params": sum(p.numel() for p in model.parameters()),
                "batch": batch,
                "seq_len": seq_len,
                "forward_s": statistics.median(forward_times),
                "step_s": statistics.median(step_times) if step_times else None,
                "peak_bytes": peak,
                "state_bytes": 0 if optimizer is None else _tensor_bytes(optimizer.state_dict()),
                "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            }
        )
    return rows


def bench_optimizers(
    sizes: Sequence[str | Mapping[str, int]] = ("1M", "5M"),
    shapes: Sequence[tuple[int, int]] = ((8, 128), (8, 512)),
    optimizers: Sequence[str] | None = None,
    json_path: str | Path | None = None,
    console: Any = None,
    *,
    repeats: int = 3,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Cost of one step of each optimizer on tiny Llama models, relative to a forward pass.

    ``sizes`` are names in :data:`BENCH_MODELS` or ``LlamaConfig`` keyword dicts; ``shapes`` are
    ``(batch, seq_len)`` of random-token batches; ``optimizers`` default to every registered one.
    Each row has ``optimizer``, ``size``, ``params``, ``batch``, ``seq_len`` and:

    * ``step_over_forward``: median step time over median forward time (no-grad forward of the
      same batch, measured in the same process, interleaved with the steps). On CPU the times
      are the process's CPU time (all its threads), which load from other processes does not
      inflate; on GPU, wall time between synchronisations;
    * ``peak_mem_over_inference``: peak memory during steps over peak memory during inference
      alone. Each measurement runs in a fresh worker process forked from a server that has only
      imported the libraries, and counts the peak RSS (``torch.cuda.max_memory_allocated`` on
      GPU) above what the process held before building the model;
    * ``state_over_params``: bytes of tensors in the optimizer's ``state_dict`` over parameter bytes.

    ``repeats`` timed steps and forwards per shape follow a warm-up round; ``threads`` sets torch's CPU
    threads in the workers (``None``: torch's default). Prints
    a table with rich; with ``json_path`` writes the rows as JSON.
    """

    console = Console() if console is None else console
    names = list(OPTIMIZERS) if optimizers is None else list(optimizers)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizers {unknown}; accepted: {', '.join(sorted(OPTIMIZERS))}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    configs = {}
    for size in sizes:
        if isinstance(size, str):
            if size not in BENCH_MODELS:
                raise ValueError(
                    f"unknown size {size!r}; accepted: {', '.join(BENCH_MODELS)} or a dict of LlamaConfig arguments"
                )
            configs[size] = BENCH_MODELS[size]
        else:
            configs[f"custom-{len(configs)}"] = dict(size)
    ordered_shapes = sorted(shapes, key=lambda s: s[0] * s[1])

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    rows: list[dict[str, Any]] = []
    with context.Pool(1, maxtasksperchild=1) as pool:  # one fresh process per measurement
        for label, config in configs.items():
            tasks = [
                {
                    "config": config,
                    "shapes": ordered_shapes,
                    "optimizer": n,
                    "repeats": repeats,
                    "threads": threads,
                }
                for n in [None, *names]
            ]
            results = pool.imap(_measure, tasks)
            inference = next(results)
            if "error" in inference:
                raise RuntimeError(f"the inference baseline failed on {label}: {inference['error']}")
            for name, measured in zip(names, results):
                if "error" in measured:
                    console.print(f"{name} failed on {label}: {measured['error']}", style="red")
                    continue
                for base, row in zip(inference["rows"], measured["rows"]):
                    rows.append(
                        {
                            "optimizer": name,
                            "size": label,
                            "params": row["params"],
                            "batch": row["batch"],
                            "seq_len": row["seq_len"],
                            "step_over_forward": row["step_s"] / row["forward_s"],
                            "peak_mem_over_inference": row["peak_bytes"] / base["peak_bytes"],
                            "state_over_params": row["state_bytes"] / row["param_bytes"],
                            "step_s": row["step_s"],
                            "forward_s": row["forward_s"],
                            "peak_bytes": row["peak_bytes"],
                            "inference_peak_bytes": base["peak_bytes"],
                        }
                    )
                console.print(f"measured {name} on {label}", style="dim")

    table = Table(title="optimizer cost per step, tiny Llama", box=box.SIMPLE)
    table.add_column("optimizer", no_wrap=True)
    table.add_column("params", justify="right")
    table.add_column("shape", justify="right")
    table.add_column("step/fwd", justify="right")
    table.add_column("mem/inference", justify="right")
    table.add_column("state/params", justify="right")
    for row in rows:
        table.add_row(
            row["optimizer"],
            f"{row['params'] / 1e6:.1f}M",
            f"{row['batch']}x{row['seq_len']}",
            f"{row['step_over_forward']:.2f}",
            f"{row['peak_mem_over_inference']:.2f}",
            f"{row['state_over_params']:.2f}",
        )
    console.print(table)
    if json_path is not None:
        atomic_write_json(Path(json_path), rows)
    return rows
