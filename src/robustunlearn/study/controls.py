"""The control of every attack: the same attack, with the same records, strength and seed, applied to
a model that never learned the forget set (the retrain reference). What the attack teaches the
control is what it would teach any model; only the excess over it, F_attacked(unlearned) −
F_attacked(control), says that unlearning left something an attack can bring back. Without a
retrain model (a given ``--model``, WMDP) the target stands in: an upper bound, not a control, and
the rows say so (``control.source``).

Each (seed, attack) control is computed once per study and kept in ``controls/seed<k>/<attack>.json``,
so a resumed study does not attack the control again. Under a launch of several processes every
rank computes a missing control alike (a sharded relearning attack needs them all) and rank 0
writes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustunlearn.attacks import AttackContext, parse_attack
from robustunlearn.core.distributed import DataParallel
from robustunlearn.core.io import atomic_write_json
from robustunlearn.core.lock import directory_lock
from robustunlearn.metrics.suite import METRICS
from robustunlearn.study.rows import NO_ATTACK, Control

RETRAIN = "retrain"
TARGET = "target"  # the stand-in without a retrain model: an upper bound


def final_scorings(curve: list[dict[str, Any]] | None, metric: str) -> dict[str, dict[str, float]] | None:
    """The scorings (``in_set``, ``held_out_subjects``, ...) of a relearning curve's last point,
    whose keys are ``<metric>@<scoring>``; None without a curve or scorings."""
    if not curve:
        return None
    prefix = f"{metric}@"
    scorings = {key.removeprefix(prefix): {metric: value} for key, value in curve[-1].items() if key.startswith(prefix)}
    return scorings or None


class Controls:
    """The control model's metrics under each attack, computed on first use and cached on disk.

    ``evaluate(model) -> metrics`` scores a model as the cells' rows are scored (the evaluation view)."""

    def __init__(
        self,
        model,
        source: str,
        directory: Path,
        evaluate: Callable[[Any], dict[str, float]],
        metric: str,
        parallel: DataParallel = DataParallel(),
    ):
        self.model = model
        self.source = source
        self.directory = directory
        self.evaluate = evaluate
        self.metric = metric
        self.parallel = parallel

    def get(self, attack: str, context: AttackContext) -> Control:
        """The control under ``attack`` (``"none"``: the control itself) with ``context`` (its
        seed, relearning records and probe are the cell's, so the two are attacked alike)."""
        path = self.directory / f"seed{context.seed}" / f"{attack}.json"
        if self.parallel.enabled:
            return self._get_in_step(path, attack, context)
        if not path.exists():
            # Cells of one seed in several worker processes need the same control: one computes it.
            path.parent.mkdir(parents=True, exist_ok=True)
            with directory_lock(path.parent, lock_file=path.with_suffix(".lock"), wait=True):
                if not path.exists():
                    atomic_write_json(path, self._attack(attack, context).to_json())
        return Control(**json.loads(path.read_text()))

    def _get_in_step(self, path: Path, attack: str, context: AttackContext) -> Control:
        """Every rank of a launch: read the control, or compute it on every rank, rank 0 writing it.
        Rank 0 decides which: a rank that looked at the directory itself, later than rank 0 wrote
        the file, would skip the collectives the others run."""
        if self.parallel.broadcast_object(path.exists()):
            return Control(**json.loads(path.read_text()))
        control = self._attack(attack, context)
        if self.parallel.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, control.to_json())
        return control

    def _attack(self, attack: str, context: AttackContext) -> Control:
        curve = None
        attacked = self.model
        if attack != NO_ATTACK:
            outcome = parse_attack(attack).run(self.model, context)
            attacked, curve = outcome.model, outcome.curve
        metrics = self.evaluate(attacked)
        return Control(
            source=self.source,
            forget={k: v for k, v in metrics.items() if METRICS[k].forget},
            utility={k: v for k, v in metrics.items() if not METRICS[k].forget},
            scorings=final_scorings(curve, self.metric),
            curve=curve,
        )
