"""A cell of the grade study: one benchmark x objective x optimizer x seed, at a learning rate and
optimizer option overrides; and the cells of a study's grid."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from robustunlearn.config import RunSettings, StudySettings, SweepChoices, learning_rate, optimizer_options
from robustunlearn.optim import OPTIMIZERS

Options = tuple[tuple[str, Any], ...]  # (name, value) pairs, sorted by name


@dataclass(frozen=True)
class Cell:
    """``options``: optimizer options this cell overrides (e.g. ``(("zo_lr", 1e-4),)``): they win
    over the tuned and recipe options, as ``lr`` wins over the tuned and recipe lr."""

    benchmark: str
    objective: str
    optimizer: str
    seed: int
    lr: float
    options: Options = ()

    def __post_init__(self) -> None:
        # one order, so the same overrides make one cell and one directory name
        object.__setattr__(self, "options", tuple(sorted(tuple(self.options))))

    @property
    def grade(self) -> str:
        return OPTIMIZERS[self.optimizer].grade

    @property
    def name(self) -> str:
        """A directory name: ``npo-hybrid-seed0-lr0.0015`` and ``-zo_lr0.0001`` per override."""
        overrides = "".join(f"-{name}{compact(value)}" for name, value in self.options)
        name = f"{self.objective}-{self.optimizer}-seed{self.seed}-lr{self.lr:g}{overrides}"
        return re.sub(r"[^A-Za-z0-9._+-]", "_", name)  # an option value may be any string

    def as_dict(self) -> dict[str, Any]:
        """The cell's fields for a row; ``options`` only when the cell overrides any."""
        fields = {
            "benchmark": self.benchmark,
            "objective": self.objective,
            "optimizer": self.optimizer,
            "grade": self.grade,
            "seed": self.seed,
            "lr": self.lr,
        }
        return {**fields, "options": dict(self.options)} if self.options else fields


def compact(value: Any) -> str:
    """An option value, short: numbers as ``format(value, "g")``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, "g")
    return str(value)


def cell_optimizer_options(settings: RunSettings, cell: Cell) -> dict[str, Any]:
    """The optimizer options ``cell`` trains with: the settings' (tuned, then the recipe's), then
    the cell's own overrides."""
    return {**optimizer_options(settings, cell.optimizer, cell.objective), **dict(cell.options)}


def grid_cells(settings: RunSettings, study: StudySettings, chosen: SweepChoices) -> list[Cell]:
    """The study's cells, objectives x optimizers x seeds, at the learning rate and options the
    settings give after the sweep's choices ``chosen`` (:func:`robustunlearn.config.learning_rate`);
    the sweep's options become the cell's overrides, less those the recipe sets (the recipe wins)."""
    cells = []
    for objective in study.objectives:
        for optimizer in study.optimizers:
            swept = chosen.get(objective, {}).get(optimizer, {}).get("options", {})
            overrides = tuple((k, v) for k, v in swept.items() if k not in settings.unlearn.optimizer_options)
            lr = learning_rate(settings, optimizer, objective, chosen)
            cells += [Cell(settings.benchmark, objective, optimizer, seed, lr, overrides) for seed in study.seeds]
    return cells
