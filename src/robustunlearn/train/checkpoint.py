"""Checkpoints of an unlearning run, each written in full under a temporary name and then renamed,
so a run killed at any point resumes from its last complete checkpoint to the same final weights;
and the snapshots ``keep_best`` keeps.

A run directory may come from someone else (a shared checkpoint, a downloaded run), so nothing in
it is trusted: a pointer file may only name a ``step-N`` directory inside its root, every file of a
snapshot must match the SHA-256 recorded when it was written, and ``state.pt`` is unpickled with
``weights_only`` (tensors and plain Python values only, nothing that can run code)."""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from robustunlearn.core.distributed import DataParallel
from robustunlearn.core.errors import UserError
from robustunlearn.core.io import atomic_write_json
from robustunlearn.core.models import WEIGHTS, file_sha256
from robustunlearn.core.modules import load_weights, save_trainable_weights
from robustunlearn.train.settings import UnlearnSettings
from robustunlearn.train.sharded import load_shards, save_shards

CHECKSUMS = "sha256.json"  # in each snapshot: the SHA-256 of each of its other files
_SNAPSHOT_NAME = re.compile(r"step-\d+")
_STAGING_NAME = re.compile(r"\.step-\d+-\w+")  # tempfile.mkdtemp(prefix=".step-N-")


class CheckpointError(UserError, ValueError):
    """A run directory's checkpoint files are unsafe, corrupted or unreadable: resuming from them
    is refused with a one-line message naming the file."""


class Snapshots:
    """Directories ``root/step-N``, each written in full under a temporary name and then renamed,
    with the SHA-256 of its files in ``step-N/sha256.json``, and a pointer file (``root/<pointer>``,
    written atomically) naming the current one; only the current one is kept (snapshots of 7B
    models are large)."""

    def __init__(self, root: Path, pointer: str):
        self.root, self.pointer = root, root / pointer

    def read_pointer(self) -> dict[str, Any] | None:
        """The pointer's record, None without a pointer file; ``CheckpointError`` if it is not JSON
        or names anything but a ``step-N`` directory inside the root (it would be deleted when the
        next snapshot replaces it)."""
        if not self.pointer.is_file():
            return None
        try:
            record = json.loads(self.pointer.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{self.pointer} is not valid JSON ({error}); delete it to start afresh") from None
        if not isinstance(record, dict) or "name" not in record:
            raise CheckpointError(f"{self.pointer} is not a snapshot pointer (a JSON object with a 'name')")
        self._path(record["name"])
        return record

    def current(self) -> tuple[Path, dict[str, Any]] | None:
        """The snapshot the pointer names and its record, None without a pointer file;
        ``CheckpointError`` if the pointer is unsafe or names a snapshot that does not exist."""
        record = self.read_pointer()
        if record is None:
            return None
        path = self._path(record["name"])
        if not path.is_dir():
            raise CheckpointError(f"{self.pointer} names {path}, which does not exist")
        return path, record

    def commit(self, name: str, write: Callable[[Path], None], record: dict[str, Any]) -> Path:
        staging = self.stage(name)
        write(staging)
        return self.publish(name, staging, record)

    def stage(self, name: str) -> Path:
        """A fresh staging directory for the snapshot ``name`` (after removing those of a writer
        killed mid-write), to fill and then :meth:`publish`."""
        self._path(name)
        self.read_pointer()  # refused before anything is written if it is unsafe
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.iterdir():  # staging of a writer killed mid-write (one writer at a time)
            if _STAGING_NAME.fullmatch(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))

    def publish(self, name: str, staging: Path, record: dict[str, Any]) -> Path:
        """Record the SHA-256 of the files in ``staging``, rename it to ``name``, point the pointer
        at it and delete the previous snapshot."""
        final = self._path(name)
        previous = self.read_pointer()
        checksums = {file.name: file_sha256(file) for file in sorted(staging.iterdir())}
        atomic_write_json(staging / CHECKSUMS, checksums)
        if final.exists():  # a snapshot of this step from an earlier run: moved aside, then deleted
            aside = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
            final.rename(aside / name)
            shutil.rmtree(aside)
        staging.rename(final)
        atomic_write_json(self.pointer, {"name": name, **record})
        if previous is not None and previous["name"] != name:
            shutil.rmtree(self._path(previous["name"]), ignore_errors=True)
        return final

    def verify(self, path: Path) -> None:
        """Check every file of the snapshot ``path`` against its ``sha256.json``; ``CheckpointError``
        naming the first file that is missing, unrecorded or different."""
        checksums_path = path / CHECKSUMS
        try:
            checksums = json.loads(checksums_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} has no {CHECKSUMS}; its files cannot be verified") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{checksums_path} is not valid JSON ({error})") from None
        if not isinstance(checksums, dict):
            raise CheckpointError(f"{checksums_path} is not a JSON object of file names and SHA-256 digests")
        present = {file.name for file in path.iterdir()} - {CHECKSUMS}
        for name in sorted(present | set(checksums)):
            file = path / name
            if name not in checksums:
                raise CheckpointError(f"checkpoint {file} is not recorded in {checksums_path}")
            if name not in present or file.is_symlink() or not file.is_file():
                raise CheckpointError(
                    f"checkpoint {file} is missing or not a regular file (recorded in {checksums_path})"
                )
            if file_sha256(file) != checksums[name]:
                raise CheckpointError(f"checkpoint {file} does not match its SHA-256 (corrupted)")

    def _path(self, name: Any) -> Path:
        """``root/name`` for a ``step-N`` name that stays inside the root (not a link out of it)."""
        path = self.root / name if isinstance(name, str) and _SNAPSHOT_NAME.fullmatch(name) else None
        if path is None or path.resolve().parent != self.root.resolve():
            raise CheckpointError(
                f"{self.pointer} names snapshot {name!r}, which is not a step-N directory inside {self.root}"
            )
        return path


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
    position. All ranks call :meth:`save` (it gathers their RNG states); rank 0 writes. Under FSDP
    every rank writes its shards of the weights and optimizer state (:mod:`.sharded`) into the
    staging directory rank 0 made, and rank 0 the rest."""

    def __init__(self, directory: Path, parallel: DataParallel | None = None):
        self.snapshots = Snapshots(directory / "checkpoints", "latest.json")
        self.parallel = parallel or DataParallel()
        self.snapshots.read_pointer()  # an unsafe pointer fails the run now, not at its first checkpoint

    def latest(self) -> Path | None:
        """The last complete checkpoint, None when the run has written none yet."""
        current = self.snapshots.current()
        return None if current is None else current[0]

    def save(
        self,
        step: int,
        model,
        optimizer,
        scheduler,
        streams: dict[str, Any],
        generator,
        extra: dict,
        files: dict[str, Callable[[Path], None]] | None = None,
    ) -> None:
        """Write checkpoint ``step``: what the class docstring lists, ``extra`` in
        ``progress.json``, and each of ``files`` (name: a writer given its path)."""
        ranks = self.parallel.gather_objects(_rng_state(generator))
        name = f"step-{step}"
        staging = None
        if self.parallel.is_main:
            staging = self.snapshots.stage(name)
        if self.parallel.sharded:
            staging = Path(self.parallel.broadcast_object(None if staging is None else str(staging)))
            optimizer_state = save_shards(staging, model, optimizer)
        else:
            optimizer_state = optimizer.state_dict()
        if self.parallel.is_main:
            if not self.parallel.sharded:
                save_trainable_weights(model, staging / WEIGHTS)
            state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "ranks": ranks}
            torch.save(state, staging / "state.pt")
            progress = {"step": step, "streams": {k: s.state_dict() for k, s in streams.items()}, **extra}
            atomic_write_json(staging / "progress.json", progress)
            for file_name, write_file in (files or {}).items():
                write_file(staging / file_name)
            self.snapshots.publish(name, staging, {"step": step})
        self.parallel.barrier()  # no rank goes on (or stages the next checkpoint) before this one is published

    def load(
        self,
        path: Path,
        model,
        optimizer,
        scheduler,
        streams: dict[str, Any],
        generator,
        settings: UnlearnSettings | None = None,
    ) -> dict:
        """Restore the checkpoint ``path`` and return its progress record. With ``settings`` (the
        resuming run's), first :func:`check_resume_settings`: a run with other settings is refused
        before anything is loaded into it, and the notes on allowed changes are in the record's
        ``resume_notes``."""
        self._verify(path)
        progress = json.loads((path / "progress.json").read_text())
        if settings is not None:
            progress["resume_notes"] = check_resume_settings(progress.get("config"), settings)
        try:
            state = torch.load(path / "state.pt", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"checkpoint {path / 'state.pt'} holds objects other than tensors and plain Python values; "
                "refusing to unpickle it (it could run code)"
            ) from None
        if len(state["ranks"]) != self.parallel.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by a run of {len(state['ranks'])} process(es); "
                f"resume it with as many, not {self.parallel.world_size}"
            )
        if self.parallel.sharded:
            load_shards(path, model, optimizer, state["optimizer"], self.parallel.mesh)
        else:
            load_weights(model, path / WEIGHTS)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["ranks"][self.parallel.rank], generator)
        for name, stream in streams.items():
            stream.load_state_dict(progress["streams"][name])
        return progress

    def _verify(self, path: Path) -> None:
        """:meth:`Snapshots.verify` on rank 0 (under FSDP each rank reads only its shards, so one
        reader checks every file); its error is raised on every rank."""
        error = None
        if self.parallel.is_main:
            try:
                self.snapshots.verify(path)
            except CheckpointError as raised:
                error = str(raised)
        error = self.parallel.broadcast_object(error)
        if error is not None:
            raise CheckpointError(error)


def best_snapshots(output_dir: str | Path) -> Snapshots:
    """Where ``keep_best`` keeps its weights: ``output_dir/best/step-N/model.safetensors``, named
    by ``output_dir/best/best.json`` (with the step, metric, value and mode)."""
    return Snapshots(Path(output_dir) / "best", "best.json")


def restore_best(model, output_dir: str | Path) -> dict[str, Any]:
    """Load the weights ``keep_best`` kept into ``model`` (the model :func:`unlearn` returned:
    under LoRA the peft model, before merging) and return their record."""
    path, record = _best(output_dir)
    load_weights(model, path / WEIGHTS)
    return record


def best_weights(output_dir: str | Path) -> dict[str, torch.Tensor]:
    """The weights ``keep_best`` kept, by name (verified against their SHA-256)."""
    path, _ = _best(output_dir)
    return load_file(str(path / WEIGHTS))


def _best(output_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    best = best_snapshots(output_dir)
    current = best.current()
    if current is None:
        raise ValueError(f"{output_dir} holds no best weights (best/best.json); run with keep_best and eval_every")
    path, record = current
    best.verify(path)
    return path, record


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
                raise CheckpointError(f"{path} line {number} is not JSON") from None
    return entries


# -- what a run directory holds, and whether a run may resume it ------------------------------------------

# Settings that change what a run writes or reports, not the weights it computes: a resumed run may
# change them. Every other setting (and any added later) must match the checkpoint's.
COSMETIC_SETTINGS = frozenset({"checkpoint_every", "eval_every"})
# What an unlearning run writes in its directory (the engine and unlearn_only); replacing a run
# removes these and nothing else.
RUN_FILES = ("checkpoints", "best", "final", "log.jsonl", "status.json")


def check_resume_settings(stored: Any, current: UnlearnSettings) -> list[str]:
    """Compare the settings a checkpoint was written with (``progress.json``'s ``config``, the
    ``model_dump(mode="json")`` of the run's :class:`UnlearnSettings`) with the resuming run's.

    A change of a setting that alters the computation (objective, optimizer, lr, options, batch
    size, seed, schedule, splits, max_length, LoRA, the step budget...) would silently produce a
    run that is neither the old one nor the new one: ``CheckpointError`` listing each old and new
    value. Changes of :data:`COSMETIC_SETTINGS` are allowed; the returned notes describe them (and
    a checkpoint that recorded no settings, which cannot be checked). A setting added since the
    checkpoint was written counts as its default there; one removed since is ignored."""
    if stored is None:
        return ["the checkpoint records no settings (written by an older version); they are not checked"]
    if not isinstance(stored, dict):
        raise CheckpointError(f"the checkpoint's settings are not a JSON object: {stored!r}")
    before = {**type(current)().model_dump(mode="json"), **stored}
    now = current.model_dump(mode="json")
    changed = {name: (before[name], value) for name, value in now.items() if before[name] != value}
    blocking = [name for name in sorted(changed) if name not in COSMETIC_SETTINGS]
    if blocking:
        raise CheckpointError(
            f"cannot resume: the checkpoint was written with other settings: {_changes(changed, blocking)}; "
            "resume with the same settings, or start afresh (--overwrite)"
        )
    cosmetic = [name for name in sorted(changed) if name in COSMETIC_SETTINGS]
    if not cosmetic:
        return []
    return [f"resuming with settings changed that do not alter the computation: {_changes(changed, cosmetic)}"]


def _changes(changed: dict[str, tuple[Any, Any]], names: list[str]) -> str:
    """``"lr 0.001 -> 0.002; steps 60 -> 80"``."""
    return "; ".join(f"{name} {json.dumps(changed[name][0])} -> {json.dumps(changed[name][1])}" for name in names)


@dataclass(frozen=True)
class RunState:
    """What an unlearning run left in its directory."""

    checkpoint_step: int | None  # the step of its last complete checkpoint; None: no checkpoint
    finished: bool  # it ran to its end (status.json says so, or final/ is there)


def run_state(output_dir: str | Path) -> RunState:
    """The state of the run in ``output_dir`` (an empty or missing directory: no checkpoint, not
    finished); ``CheckpointError`` for an unsafe checkpoint pointer or a status.json that is not
    JSON, naming the file."""
    output_dir = Path(output_dir)
    pointer = Snapshots(output_dir / "checkpoints", "latest.json").read_pointer()
    status_path = output_dir / "status.json"
    status: Any = {}
    if status_path.is_file():
        try:
            status = json.loads(status_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{status_path} is not valid JSON ({error}); delete it to start afresh") from None
    finished = (isinstance(status, dict) and status.get("state") == "finished") or (output_dir / "final").exists()
    step = None if pointer is None else int(pointer["name"].removeprefix("step-"))  # read_pointer checked it
    return RunState(step, finished)


def clear_run(output_dir: str | Path) -> None:
    """Remove what an unlearning run wrote in ``output_dir`` (:data:`RUN_FILES`), nothing else; a
    link among them is removed, not followed."""
    for name in RUN_FILES:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
