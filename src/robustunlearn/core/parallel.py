"""Independent jobs in worker processes, one torch thread each by default: a study's cells, or
the target and retrain models that ``prepare`` trains.

A tiny model gains little from a second torch thread (its matrices are too small to split well),
while two jobs in two processes run almost twice as fast as one. A job's numbers depend on its
seed and on its torch thread count (floating-point sums change with the number of threads), never
on which process runs it or in what order, so the worker count changes the time, not the
results, whenever the thread count per job stays the same.

Workers are started with ``spawn`` (forking a process whose OpenMP threads already ran can hang
the child), and on Linux each is killed with its parent: a killed run leaves no worker writing
into a directory that a resumed run then uses.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and taskset set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def plan_workers(jobs: int | None, cells: int, cores: int | None = None) -> tuple[int, int]:
    """``(workers, torch threads per worker)`` for ``cells`` independent jobs to run.

    ``jobs`` None (auto): one worker per core, at most one per job, the cores shared out among
    them. An explicit ``jobs``: that many workers (at most one per job), the cores shared out, at
    least one thread each. One worker means the jobs run in this process, at torch's own threads."""
    cores = available_cores() if cores is None else cores
    workers = max(1, min(cores if jobs is None else jobs, cells))
    return workers, max(1, cores // workers)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _start_worker(initializer: Callable[..., None], args: tuple[Any, ...]) -> None:
    _die_with_parent()
    initializer(*args)


def worker_pool(workers: int, initializer: Callable[..., None], args: tuple[Any, ...]) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, each running ``initializer(*args)`` first (both
    must be importable by name: module-level functions and picklable arguments)."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(initializer, args),
    )
