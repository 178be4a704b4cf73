"""Where a study's time went: wall seconds per phase, per cell and per attack.

:class:`PhaseClock` times phases (``with clock.phase("unlearn", cell=name): ...``). A phase inside
another counts only in the inner one: each record holds its phase's own seconds, less those of the
phases nested in it, so the records add up to the wall time of the outermost phases.

:class:`StudyTimes` keeps a study directory's ledger. Each run of the study appends one entry to
``timing.json`` at the study's root: its wall seconds, the seconds its phases account for, its
study-level phases (loading or preparing the models, references, the lr sweep, the report) and
the grid's cells, those finished by an earlier run marked ``resumed``. A cell's own phases go to
``cells/<id>/timing.json`` once it finishes, so a resumed study still counts the time of cells
finished earlier; a cell killed midway is run again from scratch and its lost time is not counted.

:func:`study_time` reads the ledger back into the table ``results.json`` and the report carry;
:func:`time_summary` is the one line a run prints at its end.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from robustunlearn.core.io import atomic_write_json
from robustunlearn.train.prepare import CHECKSUMS, Prepared

TIMING_FILE = "timing.json"
OTHER = "other"  # a run's wall seconds that no phase accounts for
# The phases, in the order of a study, with their titles.
PHASES = {
    "prepare": "preparing the target and retrain models",
    "load": "loading the models",
    "references": "reference models' evaluation",
    "sweep": "lr sweep",
    "unlearn": "unlearning",
    "evaluate": "evaluation",
    "attack": "attacks (with their evaluation)",
    "control": "control attacks (with their evaluation)",
    "scoring": "privacy/TOFU scoring",
    "landscape": "landscape (sharpness, LMC)",
    "report": "report",
    OTHER: "other (untimed)",
}
PER_ATTACK = {"attack": "attacks", "control": "controls"}  # phases broken down by attack (their detail)
# The groups of the one-line summary: its label and the phases it adds up.
SUMMARY_GROUPS = {
    "unlearning": ("unlearn",),
    "attacks": ("attack", "control"),
    "evaluation": ("evaluate",),
    "scoring": ("scoring",),
    "landscape": ("landscape",),
    "references": ("references",),
    "lr sweep": ("sweep",),
    "prepare": ("prepare",),
    "loading": ("load",),
    "report": ("report",),
    OTHER: (OTHER,),
}


@dataclass
class PhaseRecord:
    """One timed phase: its own seconds (less its nested phases'), the cell it belongs to (None:
    the study's) and a detail (the attack, the sweep trial, ``sharpness`` or ``lmc``)."""

    phase: str
    seconds: float = 0.0
    cell: str | None = None
    detail: str | None = None


class PhaseClock:
    """Times phases with ``timer`` (wall seconds); ``records`` holds those not yet taken."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter):
        self.timer = timer
        self.started = timer()
        self.records: list[PhaseRecord] = []
        self._nested: list[float] = []  # per open phase: the seconds of the phases closed inside it

    @contextmanager
    def phase(self, name: str, cell: str | None = None, detail: str | None = None) -> Iterator[PhaseRecord]:
        """Time the block as phase ``name``; the record it yields may be renamed inside the block
        (``load`` that turned out to train becomes ``prepare``). Recorded even when the block raises."""
        record = PhaseRecord(name, cell=cell, detail=detail)
        start = self.timer()
        self._nested.append(0.0)
        try:
            yield record
        finally:
            elapsed = self.timer() - start
            record.seconds = elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed
            self.records.append(record)

    def elapsed(self) -> float:
        return self.timer() - self.started

    def take(self) -> list[PhaseRecord]:
        """The records so far, removed from the clock."""
        records, self.records = self.records, []
        return records


def load_phase(prepared: Prepared | None, since: float) -> str:
    """``prepare`` when the prepared cache entry was completed at or after ``since`` (``time.time()``
    before loading: this run trained, or waited for another process that did), else ``load``."""
    if prepared is None:
        return "load"
    return "prepare" if (prepared.directory / CHECKSUMS).stat().st_mtime >= since else "load"


class StudyTimes:
    """The time ledger of the study in ``directory`` (see the module's docstring), kept with ``clock``.
    Without ``writes`` (a rank other than 0 of a launch) it keeps the clock but writes no file."""

    def __init__(self, directory: Path, clock: PhaseClock | None = None, writes: bool = True):
        self.directory = Path(directory)
        self.clock = clock or PhaseClock()
        self.writes = writes
        self.runs: list[dict[str, Any]] = _read(self.directory / TIMING_FILE).get("runs", [])
        self.run: dict[str, Any] = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": 0.0,
            "timed": 0.0,
            "phases": [],
            "cells": [],
            "resumed": [],
        }
        self.runs.append(self.run)
        self.cell_seconds: list[float] = []  # the wall seconds of each cell this run finished

    def resumed(self, name: str) -> None:
        """Enter cell ``name``, finished by an earlier run, in this run's grid."""
        self.run["cells"].append(name)
        self.run["resumed"].append(name)

    def processes(self, workers: int, threads: int, ranks: int = 1) -> None:
        """Record how this run's cells ran: ``workers`` processes (1: in the study's own) of
        ``threads`` torch threads each, in each of the ``ranks`` processes of a launch (torchrun)."""
        self.run["workers"], self.run["threads"] = workers, threads
        if ranks > 1:
            self.run["ranks"] = ranks

    def starting(self, name: str) -> None:
        """Enter cell ``name`` in this run's grid, about to run. Times an earlier run left for it
        are dropped: its rows were removed, so it is redone."""
        self.run["cells"].append(name)
        if self.writes:
            _cell_path(self.directory, name).unlink(missing_ok=True)

    def took(self, records: Sequence[PhaseRecord]) -> None:
        """Take the phase ``records`` of work done in another process (saved with the next cell)."""
        self.clock.records.extend(records)

    def finished(self, name: str, records: Sequence[PhaseRecord], seconds: float) -> None:
        """Cell ``name`` finished in another process in ``seconds``: take its phase ``records`` and save."""
        self.took(records)
        self.cell_seconds.append(seconds)
        self.save()

    @contextmanager
    def running(self, name: str) -> Iterator[None]:
        """Run cell ``name`` here (see :meth:`starting`); its times are saved once it finishes."""
        self.starting(name)
        started = self.clock.timer()
        yield
        self.cell_seconds.append(self.clock.timer() - started)
        self.save()

    def cell_line(self, name: str, to_run: int) -> str:
        """``cell 3/12: <name> (about 1h05m left)``: the place of the cell about to run among the
        ``to_run`` cells this run runs, and the mean time of those done so far times those left."""
        done = len(self.cell_seconds)
        line = f"cell {done + 1}/{to_run}: {name}"
        if not done:
            return line
        return f"{line} (about {format_seconds(self._left(to_run, 1))} left)"

    def finished_line(self, name: str, to_run: int, workers: int) -> str:
        """``cell 3/12 done: <name> (about 20m left)``, for cells run by ``workers`` processes: the
        mean time of the cells done so far times those left, over the workers."""
        done = len(self.cell_seconds)
        line = f"cell {done}/{to_run} done: {name}"
        if done == to_run:
            return line
        return f"{line} (about {format_seconds(self._left(to_run, workers))} left)"

    def _left(self, to_run: int, workers: int) -> float:
        done = len(self.cell_seconds)
        return sum(self.cell_seconds) / done * (to_run - done) / min(workers, to_run - done)

    def save(self) -> None:
        """Write the clock's records: each cell's to its ``timing.json`` (after those it has), the
        study's to this run's entry. Call it between phases, not inside one."""
        records = self.clock.take()
        if not self.writes:
            return
        by_cell: dict[str, list[PhaseRecord]] = defaultdict(list)
        for record in records:
            if record.cell is None:
                self.run["phases"].append(_record_json(record))
            else:
                by_cell[record.cell].append(record)
        for name, found in by_cell.items():
            path = _cell_path(self.directory, name)
            earlier = _read(path).get("phases", [])
            atomic_write_json(path, {"phases": earlier + [_record_json(record) for record in found]})
        self.run["timed"] += sum(record.seconds for record in records)
        self.run["seconds"] = self.clock.elapsed()
        atomic_write_json(self.directory / TIMING_FILE, {"runs": self.runs})


def study_time(directory: Path) -> dict[str, Any] | None:
    """The time table of the study in ``directory`` (None before any run wrote a ledger):

    * ``phases``: seconds per phase (:data:`PHASES` order; ``other``: the runs' wall seconds no
      phase accounts for), over every run, for the study and the cells of the last run's grid;
    * ``seconds``: their sum; ``runs``: how many runs the study took; ``wall_seconds``: the runs'
      wall time, less than ``seconds`` when cells ran in parallel; ``workers``: the most worker
      processes a run used (1: none) and ``threads``: the torch threads of each;
    * ``attacks``/``controls``: seconds per attack (on the cells; on the control);
    * ``cells``: per cell of the grid, ``seconds``, ``phases``, ``attacks``, ``controls`` and
      ``resumed`` (finished by an earlier run); ``seconds`` is None for a cell that left no times."""
    runs = _read(Path(directory) / TIMING_FILE).get("runs")
    if not runs:
        return None
    records = [record for run in runs for record in run["phases"]]
    last = runs[-1]
    cells = {}
    for name in last["cells"]:
        path = _cell_path(directory, name)
        found = _read(path).get("phases", []) if path.exists() else None
        records += found or []
        cells[name] = {**_breakdown(found or []), "resumed": name in last["resumed"]}
        if found is None:
            cells[name]["seconds"] = None
    other = sum(max(0.0, run["seconds"] - run["timed"]) for run in runs)
    table = _breakdown(records, other)
    busiest = max(runs, key=lambda run: run.get("workers", 1))
    return {
        **table,
        "runs": len(runs),
        "wall_seconds": round(sum(run["seconds"] for run in runs), 2),
        "workers": busiest.get("workers", 1),
        "threads": busiest.get("threads"),
        "cells": cells,
    }


def _breakdown(records: Sequence[dict[str, Any]], other: float = 0.0) -> dict[str, Any]:
    """Seconds per phase (known phases in :data:`PHASES` order, then others) and per attack."""
    totals: dict[str, float] = defaultdict(float)
    per_attack: dict[str, dict[str, float]] = {key: defaultdict(float) for key in PER_ATTACK.values()}
    for record in records:
        totals[record["phase"]] += record["seconds"]
        if record["phase"] in PER_ATTACK:
            per_attack[PER_ATTACK[record["phase"]]][record["detail"]] += record["seconds"]
    if other > 0:
        totals[OTHER] += other
    order = {phase: index for index, phase in enumerate(PHASES)}
    phases = {phase: round(totals[phase], 2) for phase in sorted(totals, key=lambda p: order.get(p, len(order)))}
    return {
        "seconds": round(sum(totals.values()), 2),
        "phases": phases,
        **{key: {name: round(seconds, 2) for name, seconds in found.items()} for key, found in per_attack.items()},
    }


def percentages(values: dict[str, float]) -> dict[str, int]:
    """Whole percentages of ``values``' total that add up to exactly 100 (largest remainders get
    the points rounding down lost); all zero when the total is."""
    total = sum(values.values())
    if total <= 0:
        return {name: 0 for name in values}
    exact = {name: 100 * value / total for name, value in values.items()}
    shares = {name: int(share) for name, share in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - shares[name], reverse=True)
    for name in by_remainder[: 100 - sum(shares.values())]:
        shares[name] += 1
    return shares


def format_seconds(seconds: float) -> str:
    """``42.0s`` under a minute, ``7m12s`` under an hour, else ``2h05m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def time_summary(table: dict[str, Any]) -> str:
    """``time: 7m12s — unlearning 41%, attacks 33% (controls 9%), evaluation 18%, ...``: the
    groups of :data:`SUMMARY_GROUPS` by share, those under half a percent left out; the shares
    shown add up to 100%."""
    phases = table["phases"]
    groups = {label: sum(phases.get(phase, 0.0) for phase in members) for label, members in SUMMARY_GROUPS.items()}
    shares = percentages(groups)
    parts = []
    for label in sorted(groups, key=groups.get, reverse=True):
        if shares[label] == 0:
            continue
        part = f"{label} {shares[label]}%"
        if label == "attacks" and phases.get("control"):
            part += f" (controls {round(100 * phases['control'] / table['seconds'])}%)"
        parts.append(part)
    total = format_seconds(table["seconds"])
    if table.get("workers", 1) > 1:
        total = (
            f"{format_seconds(table['wall_seconds'])} wall, cells in {table['workers']} worker processes "
            f"(phases add up to {total})"
        )
    return f"time: {total} — " + (", ".join(parts) or "nothing timed")


def _record_json(record: PhaseRecord) -> dict[str, Any]:
    entry = asdict(record)
    del entry["cell"]  # a cell's records live in its own file; the study's have none
    return {**entry, "seconds": round(record.seconds, 3)}


def _cell_path(directory: Path, name: str) -> Path:
    return Path(directory) / "cells" / name / TIMING_FILE


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
