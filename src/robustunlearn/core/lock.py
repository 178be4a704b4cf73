"""One process at a time per directory: an exclusive ``fcntl.flock`` on a lock file that holds the
holder's PID. The kernel releases the lock when its holder dies (even by SIGKILL), so a killed run
never leaves a stale lock behind; a lock file left by one is simply locked again.

An output directory is refused to a second process (two runs would interleave their checkpoints
and logs); a prepare cache entry is waited for (the second process then reuses what the first
built)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from robustunlearn.core.errors import UserError

LOCK_NAME = ".robustunlearn.lock"  # inside an output directory
WAIT_POLL_SECONDS = 0.5


class DirectoryInUse(UserError):
    """Another live process holds the lock of the directory."""


def _holder(lock_file: Path) -> int | None:
    """The PID the holder wrote, None while it has not written it yet (or the file is gone)."""
    try:
        return int(lock_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _in_use(directory: Path, lock_file: Path) -> DirectoryInUse:
    pid = _holder(lock_file)
    return DirectoryInUse(f"{directory} is in use by {f'process {pid}' if pid else 'another process'}")


def _try_lock(lock_file: Path) -> int | None:
    """An open descriptor holding the lock on ``lock_file``, or None if another process holds it.

    A holder unlinks the file before releasing it, so a lock won on a file that is no longer at
    ``lock_file`` (its holder released it in between) is worthless: try again on the new file."""
    while True:
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        try:
            current = os.stat(lock_file)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(descriptor).st_ino:
            return descriptor
        os.close(descriptor)


@contextlib.contextmanager
def directory_lock(
    directory: str | Path,
    *,
    lock_file: str | Path | None = None,
    wait: bool = False,
    on_wait: Callable[[int | None], None] | None = None,
) -> Iterator[None]:
    """Hold the exclusive lock of ``directory`` (its file: ``lock_file``, default
    ``directory/.robustunlearn.lock``) for the ``with`` block.

    When another process holds it: ``DirectoryInUse`` ("D is in use by process N"), or with
    ``wait`` wait until it is released, calling ``on_wait(pid)`` once first."""
    directory = Path(directory)
    lock_file = Path(lock_file) if lock_file is not None else directory / LOCK_NAME
    descriptor = _try_lock(lock_file)
    if descriptor is None and not wait:
        raise _in_use(directory, lock_file)
    if descriptor is None and on_wait is not None:
        on_wait(_holder(lock_file))
    while descriptor is None:
        time.sleep(WAIT_POLL_SECONDS)
        descriptor = _try_lock(lock_file)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        # Unlink while still holding the lock: a process waiting on this file then sees it is gone.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_file)
        os.close(descriptor)
