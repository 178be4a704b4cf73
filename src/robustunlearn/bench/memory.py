"""``robustunlearn plan``'s estimate against the measured peak of real unlearning steps on tiny
Llama models on the CPU (``robustunlearn bench memory``).

Each row runs in a fresh process forked from a server that has only imported the libraries. The
process first takes one step at a tiny shape (1 x 8 tokens) with the same model, objective and
optimizer and frees it all, so that the libraries' lazily loaded kernels, thread pools and
allocator arenas are in place; its resident memory then is the baseline. It resets the peak
(``/proc/self/clear_refs``), builds the model (float32), the frozen reference copy if the objective
needs one, the optimizer and a batch of random tokens of the given shape, and takes
:data:`STEPS` unlearning steps as the engine does (:func:`~robustunlearn.bench.objectives.step_calls`:
the reference's outputs, then the optimizer's step over the objective's closure). The measured
bytes are the peak resident memory (``VmHWM``) minus the baseline: weights, gradients, optimizer
state, reference, activations and temporaries, the quantities ``plan`` adds up, with large
allocations mapped and unmapped on their own so that resident memory follows live memory. The
estimate is ``plan``'s total for the same config, batch (one GPU: no parallelism) and length.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from transformers import LlamaForCausalLM

from robustunlearn.bench.common import (
    bench_config,
    model_configs,
    progress_bar,
    set_mmap_threshold,
)
from robustunlearn.bench.objectives import random_unlearn_batch, step_calls, train_objective_parameters
from robustunlearn.objectives import build_objective
from robustunlearn.optim import OPTIMIZERS, build_optimizer
from robustunlearn.train.plan import PlanSettings, human_bytes, plan_memory

# The grades the issue names (first order, sign, second order, zeroth order) under NPO with its
# live reference copy (what the engine runs), and first order under GradDiff (no reference).
DEFAULT_CASES = (
    ("adam", "npo"),
    ("signadam", "npo"),
    ("sophia-g", "npo"),
    ("zo-sgd", "npo"),
    ("adam", "graddiff"),
)
DEFAULT_SIZES = ("1M", "5M")
DEFAULT_SHAPES = ((8, 128),)
TOLERANCE = 0.15  # |measured / estimate - 1| the check accepts
STEPS = 2  # the second step holds the optimizer state while its closure runs
_WARMUP_SHAPE = (1, 8)
_PRELOAD = ["torch", "transformers.models.llama.modeling_llama", "robustunlearn.optim", "robustunlearn.bench.memory"]


def _status_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak resident memory since the last reset) of this process."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # 5: reset the peak resident set size to the current one


def _unlearning_step(task: dict[str, Any], shape: tuple[int, int]):
    """The model, reference, optimizer and batch of ``task`` at ``shape``, and the step over them."""
    config = bench_config(task["config"], max_positions=shape[1])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    objective = build_objective(task["objective"], model=model)
    train_objective_parameters(model, objective)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if objective.needs_reference else None
    optimizer = build_optimizer(task["optimizer"], model, total_steps=STEPS)
    batch = random_unlearn_batch(objective.batch_parts, shape, config.vocab_size, torch.device("cpu"))
    return step_calls(model, objective, reference, optimizer, batch)["step"]


def _measure(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: ``{"measured_bytes": ...}`` of one row, or ``{"error": ...}``."""
    try:
        torch.set_num_threads(1)
        set_mmap_threshold(64 << 10)
        warmup = _unlearning_step(task, _WARMUP_SHAPE)
        warmup()
        del warmup
        gc.collect()
        baseline = _status_bytes("VmRSS")
        _reset_peak()
        step = _unlearning_step(task, task["shape"])
        for _ in range(STEPS):
            step()
        return {"measured_bytes": _status_bytes("VmHWM") - baseline, "baseline_bytes": baseline}
    except Exception as error:  # noqa: BLE001 - one failing row must not end the check
        return {"error": f"{type(error).__name__}: {error}"}


def estimate(config: Mapping[str, int], optimizer: str, objective: str, shape: tuple[int, int]) -> int:
    """``plan``'s total for one row: float32, one device, the objective's live reference."""
    needs_reference = build_objective(objective).needs_reference
    settings = PlanSettings(
        objective=objective,
        optimizers=(optimizer,),
        batch_size=shape[0],
        max_length=shape[1],
        reference="live" if needs_reference else None,
    )
    return plan_memory(bench_config(config, max_positions=shape[1]), settings).rows[0].total


def bench_memory(
    sizes: Sequence[str | Mapping[str, int]] | None = None,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    cases: Sequence[tuple[str, str]] = DEFAULT_CASES,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Measured peak bytes of :data:`STEPS` unlearning steps against ``plan``'s estimate, per
    (optimizer, objective) of ``cases``, model size and ``(batch, length)`` shape. Each row has
    ``optimizer``, ``objective``, ``size``, ``params``, ``batch``, ``seq_len``,
    ``estimate_bytes``, ``measured_bytes``, ``baseline_bytes`` (the process's resident memory
    before the model was built), ``error`` (measured / estimate − 1) and ``within`` (|error| ≤
    :data:`TOLERANCE`). Prints them as a table and a pass/fail line."""
    console = Console() if console is None else console
    for optimizer, _ in cases:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; accepted: {', '.join(sorted(OPTIMIZERS))}")
    configs = model_configs(sizes or DEFAULT_SIZES)
    tasks = [
        {"config": config, "label": label, "optimizer": optimizer, "objective": objective, "shape": tuple(shape)}
        for label, config in configs.items()
        for shape in shapes
        for optimizer, objective in cases
    ]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    rows = []
    with context.Pool(1, maxtasksperchild=1) as pool, progress_bar(console) as progress:  # a fresh process per row
        bar = progress.add_task("bench memory", total=len(tasks))
        for task, measured in zip(tasks, pool.imap(_measure, tasks)):
            progress.advance(bar)
            if "error" in measured:
                raise RuntimeError(f"{task['optimizer']}/{task['objective']} on {task['label']}: {measured['error']}")
            rows.append(_row(task, measured))
    console.print(_table(rows))
    failed = [row for row in rows if not row["within"]]
    verdict = "PASS" if not failed else "FAIL"
    console.print(
        f"{verdict}: {len(rows) - len(failed)} of {len(rows)} estimates within {TOLERANCE:.0%} of the measured peak",
        highlight=False,
    )
    return rows


def _row(task: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    batch, seq_len = task["shape"]
    predicted = estimate(task["config"], task["optimizer"], task["objective"], task["shape"])
    error = measured["measured_bytes"] / predicted - 1
    return {
        "optimizer": task["optimizer"],
        "objective": task["objective"],
        "size": task["label"],
        "batch": batch,
        "seq_len": seq_len,
        "estimate_bytes": predicted,
        "measured_bytes": measured["measured_bytes"],
        "baseline_bytes": measured["baseline_bytes"],
        "error": error,
        "within": abs(error) <= TOLERANCE,
    }


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title="plan's estimate vs the measured peak of unlearning steps (CPU, float32, one thread)",
        box=box.SIMPLE,
        caption="measured: peak resident memory minus the process's before the model was built",
    )
    for column in ("optimizer", "objective", "size", "shape", "estimate", "measured", "error", "within"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("optimizer", "objective") else "right")
    for row in rows:
        table.add_row(
            row["optimizer"],
            row["objective"],
            row["size"],
            f"{row['batch']}x{row['seq_len']}",
            human_bytes(row["estimate_bytes"]),
            human_bytes(row["measured_bytes"]),
            f"{row['error']:+.1%}",
            "yes" if row["within"] else "NO",
        )
    return table
