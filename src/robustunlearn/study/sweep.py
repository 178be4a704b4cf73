"""The study's learning-rate sweep, tuned without the test data: per objective and optimizer,
candidate learning rates (a base x each ``study.sweep_factors``) crossed with the optimizer's option
values (``study.sweep_options``), each unlearned on every ``study.sweep_seeds`` (never the reported
seeds) and scored on the validation view (retain data that neither the unlearning loss nor the
reported evaluation sees). What a trial runs is the caller's: ``trial(cell) -> Trial``.

``lr_sweep.json`` records the choices and every trial; each trial is also kept in
``lr_sweep.partial.json`` as it finishes, so a killed sweep resumes where it stopped, and a trial
already recorded (same objective, optimizer, lr, options and seed) is never run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from statistics import fmean
from typing import Any

from robustunlearn.config import RunSettings, StudySettings, SweepChoices, sweep_base
from robustunlearn.core.io import atomic_write_json
from robustunlearn.study.cells import Cell, Options, compact

SWEEP_FILE = "lr_sweep.json"
PARTIAL_FILE = "lr_sweep.partial.json"
SPLIT = "validation"  # where trials are scored; files of sweeps scored elsewhere are never reused

Candidate = tuple[float, Options]  # (lr, optimizer option overrides)


@dataclass(frozen=True)
class Trial:
    """One candidate cell unlearned on the training view and scored on the validation view:
    whether it reached the forget level, its level metric (``forget``), its utility metric, and
    what it cost (steps, passes, seconds)."""

    reached_level: bool
    forget: float
    utility: float
    cost: dict[str, Any]


def sweep_candidates(settings: RunSettings, study: StudySettings, objective: str, optimizer: str) -> list[Candidate]:
    """The base lr (:func:`robustunlearn.config.sweep_base`) x each ``study.sweep_factors``, crossed
    with every combination of the values ``study.sweep_options`` gives ``optimizer``'s options."""
    base = sweep_base(settings, optimizer, objective)
    grid = study.sweep_options.get(optimizer, {})
    names = sorted(grid)
    option_sets = [tuple(zip(names, values)) for values in product(*(grid[name] for name in names))]
    return [(base * factor, options) for factor in study.sweep_factors for options in option_sets]


def choose(outcomes: dict[Candidate, list[Trial]]) -> Candidate:
    """Among the candidates that reach the forget level on every sweep seed, the one with the best
    mean validation utility; if none does, the one with the largest mean (utility - forget metric):
    the one that forgets most would be the one that wrecks the model most. Ties: the first tried."""
    reaching = [c for c, trials in outcomes.items() if all(t.reached_level for t in trials)]
    if reaching:
        return max(reaching, key=lambda c: fmean(t.utility for t in outcomes[c]))
    return max(outcomes, key=lambda c: fmean(t.utility - t.forget for t in outcomes[c]))


def sweep_learning_rates(
    settings: RunSettings,
    study: StudySettings,
    trial: Callable[[Cell], Trial],
    output_dir: Path,
    console=None,
) -> SweepChoices:
    """Tune every objective x optimizer of ``study`` on the sweep seeds (see the module) by the rule
    of :func:`choose`; return ``{objective: {optimizer: {"lr", "options"}}}`` and write it with the
    trials, the rule, the seeds and the split to ``output_dir/lr_sweep.json``."""
    partial = output_dir / PARTIAL_FILE
    done = {_cell(settings, record): record for path in (output_dir / SWEEP_FILE, partial) for record in _trials(path)}
    cells = [
        (objective, optimizer, candidate, Cell(settings.benchmark, objective, optimizer, seed, *candidate))
        for objective in study.objectives
        for optimizer in study.optimizers
        for candidate in sweep_candidates(settings, study, objective, optimizer)
        for seed in study.sweep_seeds
    ]
    records, outcomes = [], {}
    for count, (objective, optimizer, candidate, cell) in enumerate(cells, 1):
        if cell not in done:
            outcome = trial(cell)
            done[cell] = _record(cell, outcome)
            atomic_write_json(partial, {"split": SPLIT, "trials": list(done.values())})
            if console is not None:
                console.print(f"lr sweep {count}/{len(cells)}: {_describe(cell, outcome)}", highlight=False)
        records.append(done[cell])
        outcomes.setdefault((objective, optimizer), {}).setdefault(candidate, []).append(_outcome(done[cell]))
    chosen: SweepChoices = {objective: {} for objective in study.objectives}
    for (objective, optimizer), candidates in outcomes.items():
        lr, options = choose(candidates)
        chosen[objective][optimizer] = {"lr": lr, "options": dict(options)}
    rule = " ".join((choose.__doc__ or "").split())
    atomic_write_json(
        output_dir / SWEEP_FILE,
        {"chosen": chosen, "trials": records, "rule": rule, "seeds": list(study.sweep_seeds), "split": SPLIT},
    )
    partial.unlink(missing_ok=True)
    return chosen


def _trials(path: Path) -> list[dict[str, Any]]:
    """The trials recorded in ``path``; none from a missing file or one not scored on SPLIT."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data["trials"] if data.get("split") == SPLIT else []


def _cell(settings: RunSettings, record: dict[str, Any]) -> Cell:
    options = tuple(record["options"].items())
    return Cell(settings.benchmark, record["objective"], record["optimizer"], record["seed"], record["lr"], options)


def _record(cell: Cell, outcome: Trial) -> dict[str, Any]:
    where = {"objective": cell.objective, "optimizer": cell.optimizer, "lr": cell.lr, "seed": cell.seed}
    return {**where, "options": dict(cell.options), **asdict(outcome)}


def _outcome(record: dict[str, Any]) -> Trial:
    return Trial(record["reached_level"], record["forget"], record["utility"], record["cost"])


def _describe(cell: Cell, outcome: Trial) -> str:
    options = "".join(f" {name} {compact(value)}" for name, value in cell.options)
    level = "reached" if outcome.reached_level else "missed"
    return (
        f"{cell.objective}/{cell.optimizer} lr {cell.lr:g}{options} seed {cell.seed}: {level} the level, "
        f"forget {outcome.forget:.3f}, utility {outcome.utility:.3f}"
    )
