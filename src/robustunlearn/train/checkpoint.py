"""Checkpoints of an unlearning run, each written in full under a temporary name and then renamed,
so a run killed at any point resumes from its last complete checkpoint to the same final weights;
and the snapshots ``keep_best`` keeps."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from robustunlearn.core.distributed import DataParallel
from robustunlearn.core.io import atomic_write_json
from robustunlearn.core.models import WEIGHTS
from robustunlearn.core.modules import load_weights, save_trainable_weights


class Snapshots:
    """Directories ``root/<name>``, each written in full under a temporary name and then renamed,
    and a pointer file (``root/<pointer>``, written atomically) naming the current one; only the
    current one is kept (snapshots of 7B models are large)."""

    def __init__(self, root: Path, pointer: str):
        self.root, self.pointer = root, root / pointer

    def current(self) -> tuple[Path, dict[str, Any]] | None:
        if not self.pointer.is_file():
            return None
        record = json.loads(self.pointer.read_text())
        path = self.root / record["name"]
        return (path, record) if path.is_dir() else None

    def commit(self, name: str, write: Callable[[Path], None], record: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".*-*"):  # staging of a writer killed mid-write (one writer at a time)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        write(staging)
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        previous = self.current()
        atomic_write_json(self.pointer, {"name": name, **record})
        if previous is not None and previous[0] != final:
            shutil.rmtree(previous[0], ignore_errors=True)
        return final


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a step may draw from: torch's (CPU and current CUDA device), Python's, and the
    generator of Sophia-G's sampled labels."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "sampling": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    generator.set_state(state["sampling"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Atomic checkpoints in ``directory/checkpoints/step-N`` and a ``latest.json`` pointer.

    A checkpoint holds the trainable weights (the others never change; under LoRA these are the
    adapter weights), optimizer and scheduler state, every rank's RNG states and the data
    position. All ranks call :meth:`save` (it gathers their RNG states); rank 0 writes."""

    def __init__(self, directory: Path, parallel: DataParallel | None = None):
        self.snapshots = Snapshots(directory / "checkpoints", "latest.json")
        self.parallel = parallel or DataParallel()

    def latest(self) -> Path | None:
        current = self.snapshots.current()
        return None if current is None else current[0]

    def save(self, step: int, model, optimizer, scheduler, streams: dict[str, Any], generator, extra: dict) -> None:
        ranks = self.parallel.gather_objects(_rng_state(generator))
        if not self.parallel.is_main:
            return

        def write(staging: Path) -> None:
            save_trainable_weights(model, staging / WEIGHTS)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "ranks": ranks}
            torch.save(state, staging / "state.pt")
            progress = {"step": step, "streams": {k: s.state_dict() for k, s in streams.items()}, **extra}
            atomic_write_json(staging / "progress.json", progress)

        self.snapshots.commit(f"step-{step}", write, {"step": step})

    def load(self, path: Path, model, optimizer, scheduler, streams: dict[str, Any], generator) -> dict:
        state = torch.load(path / "state.pt", weights_only=False)
        if len(state["ranks"]) != self.parallel.world_size:
            raise ValueError(
                f"checkpoint {path} was written by a run of {len(state['ranks'])} process(es); "
                f"resume it with as many, not {self.parallel.world_size}"
            )
        load_weights(model, path / WEIGHTS)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["ranks"][self.parallel.rank], generator)
        progress = json.loads((path / "progress.json").read_text())
        for name, stream in streams.items():
            stream.load_state_dict(progress["streams"][name])
        return progress


def best_snapshots(output_dir: str | Path) -> Snapshots:
    """Where ``keep_best`` keeps its weights: ``output_dir/best/step-N/model.safetensors``, named
    by ``output_dir/best/best.json`` (with the step, metric, value and mode)."""
    return Snapshots(Path(output_dir) / "best", "best.json")


def restore_best(model, output_dir: str | Path) -> dict[str, Any]:
    """Load the weights ``keep_best`` kept into ``model`` (the model :func:`unlearn` returned:
    under LoRA the peft model, before merging) and return their record."""
    current = best_snapshots(output_dir).current()
    if current is None:
        raise ValueError(f"{output_dir} holds no best weights (best/best.json); run with keep_best and eval_every")
    path, record = current
    load_weights(model, path / WEIGHTS)
    return record


def read_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a ``log.jsonl``; a run killed while appending leaves a partial last line,
    which is skipped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not JSON") from None
    return entries
