"""Atomic file writes: a reader never sees a half-written file, a killed writer leaves the old one;
and undoing the directories a failed command created."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def missing_directories(path: Path) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first: what creating
    ``path`` would create."""
    missing = []
    for directory in (Path(path).absolute(), *Path(path).absolute().parents):
        if directory.exists() or directory.is_symlink():
            break
        missing.append(directory)
    return missing


def remove_empty(directories: list[Path]) -> None:
    """Remove each of ``directories`` (deepest first) that exists and is empty; stop at the first
    that is not, whose ancestors are then not empty either."""
    for directory in directories:
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty (or not ours to remove): keep it and what holds it
            return
