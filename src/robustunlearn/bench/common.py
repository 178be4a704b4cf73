"""What the benchmarks share: the tiny Llama sizes, the device, threads and clock every row of a run
is measured with, the progress bar, and the JSON file of a run."""

from __future__ import annotations

import ctypes
import dataclasses
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import LlamaConfig, LlamaForCausalLM

from robustunlearn.bench.timing import TimingSettings
from robustunlearn.core.io import atomic_write_json

# Llama shapes of about 0.1M (for tests and smoke runs), 1M and 5M parameters (untied embeddings).
BENCH_MODELS: dict[str, dict[str, int]] = {
    "0.1M": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
    },
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


def model_configs(sizes: Sequence[str | Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Label -> ``LlamaConfig`` keywords, for names in :data:`BENCH_MODELS` or keyword dicts
    (labelled ``custom-<i>``)."""
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
    return configs


def bench_config(config: Mapping[str, int], max_positions: int) -> LlamaConfig:
    """The ``LlamaConfig`` of a benchmark model (4 attention heads)."""
    return LlamaConfig(**config, **_HEADS, max_position_embeddings=max_positions)


def bench_model(config: Mapping[str, int], max_positions: int, device: torch.device) -> LlamaForCausalLM:
    """A Llama with ``config`` and random weights (seed 0) on ``device``."""
    torch.manual_seed(0)
    return LlamaForCausalLM(bench_config(config, max_positions)).to(device)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cost_clock(device: torch.device, threads: int) -> tuple[Callable[[], float], str]:
    """The clock calls are timed with, and its name. On CPU with one thread: the process's CPU
    time, which is that thread's work and which load from other processes does not inflate. With
    several threads, CPU time would also count threads spinning while they wait for each other,
    and on a GPU the work is not the CPU's: wall time."""
    if device.type == "cpu" and threads == 1:
        return time.process_time, "process CPU time"
    return time.perf_counter, "wall time"


def synchronised(call: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``call``, returning only once the device has finished its work (GPU kernels run
    asynchronously)."""
    if device.type != "cuda":
        return call

    def finished() -> None:
        torch.cuda.synchronize(device)
        call()
        torch.cuda.synchronize(device)

    return finished


def peak_bytes(device: torch.device) -> int:
    """The process's peak memory so far: ``torch.cuda.max_memory_allocated`` on a GPU, else its
    peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt's parameter numbers (malloc.h)
_KEEP_FREED = 1 << 30  # a trim threshold no run's freed heap top reaches: freed memory stays resident


def _mallopt(parameter: int, value: int) -> None:
    """glibc's ``mallopt``; elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(parameter, value)
    except (OSError, AttributeError):
        pass


def set_mmap_threshold(size: int) -> None:
    """glibc: serve allocations of ``size`` bytes or more with their own mmap (returned to the
    system when freed) and fix that threshold (by default glibc raises it as the program frees
    large blocks, after which freed memory stays resident and RSS stops following live memory).
    Elsewhere a no-op."""
    _mallopt(_M_MMAP_THRESHOLD, size)


def settle_malloc() -> None:
    """glibc, before timing in a process whose thresholds a memory measurement fixed: every
    allocation from the heap (none mapped on its own) and no freed memory returned to the system,
    so that memory one call frees is reused by the next rather than faulted back in: what a
    caching allocator (a GPU's, or jemalloc's) gives. Elsewhere a no-op.

    Measured (1M model, 8x128, one thread): with the trim threshold left at its 128 KiB default, a
    forward pass in a zo-sgd worker took 8,800 page faults and 16 of its 60 ms in the kernel, and
    the per-round step/forward ratio spread by 18% of its median (interquartile range); with the
    thresholds a long-running process settles on (mmap at 32 MiB, trim at 64 MiB), no faults,
    43 ms, and 8%. Those leave blocks over 32 MiB, the logits of the 8x512 rows (67 MB at 5M),
    mapped afresh every call: at 5M 8x512 (zo-adam, AMD EPYC, commit 2684036) a forward still took
    63-83k faults and a fifth of its time in the kernel; from the heap, none after the first call,
    the forward's median 0.84 s against 1.10 s, and the ratios' interquartile range 11.5% of their
    median against 15.8%."""
    _mallopt(_M_MMAP_MAX, 0)
    _mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED)


def run_threads(threads: int | None) -> int:
    """The torch CPU thread count every row of a run uses: ``threads``, or this process's."""
    if threads is None:
        return torch.get_num_threads()
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return threads


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers of a run depend on besides the code: torch, device, threads, clock."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "device": name, "threads": threads, "clock": cost_clock(device, threads)[1]}


UNSETTLED_CAPTION = (
    "95% CI: of the median over the rounds; pairs: timed rounds "
    "(*: the time budget or the round cap ended them before the interval was narrow enough)"
)


def pairs_cell(row: dict[str, Any]) -> str:
    """A row's rounds, starred unless its medians' intervals got narrow enough."""
    return f"{row['pairs']}{'' if row['stop'] == 'precise' else '*'}"


def interval_cell(row: dict[str, Any], name: str) -> str:
    """The 95% interval of the median ``name`` of ``row``, or a dash with too few rounds for one."""
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    return "-" if low is None or high is None else f"{low:.2f}-{high:.2f}"


def progress_bar(console: Any) -> Progress:
    """The progress bar of a long benchmark (drawn only on a terminal, gone when done)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def write_run(
    path: str | Path,
    env: dict[str, Any],
    timing: TimingSettings,
    rows: list[dict[str, Any]],
    targets: list[dict[str, Any]],
) -> None:
    """The run as JSON: ``environment``, the ``timing`` settings, ``rows`` and ``targets``."""
    atomic_write_json(
        Path(path), {"environment": env, "timing": dataclasses.asdict(timing), "rows": rows, "targets": targets}
    )
