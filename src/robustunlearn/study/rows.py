"""The grade study's result rows: one per (cell, attack), the schema of ``results.jsonl`` (one row a
line) and of each finished cell's ``rows.json`` (a list of its rows).

A row, field by field (:class:`ResultRow`)::

    {
      "cell": {"benchmark": "synthetic", "objective": "npo", "optimizer": "adam",
               "grade": "first-order", "seed": 0, "lr": 0.001},
      "attack": "none" | "rtn-int4" | "nf4" | "gptq-int4" | "relearn" | "relearn-lora"
                | "benign-relearn" | "noise-0.01" | "prune-0.3" | ...,
      "attack_family": "none" | "quantization" | "relearning" | "perturbation",
      "forget": {"forget_qa_rouge": 0.12, "forget_qa_accuracy": 0.05,
                 "forget_verbmem_rouge": 0.2, "forget_mcq_accuracy": 0.3},
      "utility": {"retain_qa_rouge": 0.9, "retain_qa_accuracy": 0.88, "utility_perplexity": 12.3},
      "reference": {"target": {<forget and utility keys>}, "unlearned": {...}, "retrain": {...} | null},
      "primary_metric": "forget_qa_rouge",
      "cost": {"steps": 120, "forward_passes": 240, "backward_passes": 120, "seconds": 31.2,
               "reached_level": true, "target_level": 0.2, "forward_equivalents": 480.0,
               "compute_budget": 1000.0, "budget_spent": false, "level_gap": 0.01,
               "level_tolerance": 0.05},
      "unlearning_curve": [{"step": 10, "forward_equivalents": 40.0, "forget_qa_rouge": 0.8,
                            "retain_qa_rouge": 0.95}, ...]  (absent on older rows),
      "curve": [{"step": 0, "forget_qa_rouge": 0.1, "forget_qa_rouge@in_set": 0.1, ...},
                {"step": 10, "train_loss": 2.1, "forget_qa_rouge": 0.5, ...}, ...] | null,
      "scorings": {"in_set": {"forget_qa_rouge": 0.9}, "held_out_subjects": {"forget_qa_rouge": 0.2},
                   "held_out_attributes": {...}}  (relearning rows only),
      "control": {"source": "retrain" | "target", "forget": {...}, "utility": {...},
                  "scorings": {...}, "curve": [...]}  (absent on older rows),
      "landscape": {"pair": "adam-vs-zo-adazo",
                    "lmc": [{"alpha": 0.0, "forget_qa_rouge": ..., "forget_qa_loss": ...}, ...],
                    "sharpness_loss": "forget_qa_loss",
                    "sharpness": [{"scale": ..., "mean_loss_increase": ..., "std": ...}]} | null,
      "scores": {...},
      "tofu": {...}  (only on rows whose benchmark has TOFU's evaluation sets),
      "privacy": {"source": "forget_text vs holdout_text", "members": 20, "nonmembers": 20,
                  "aucs": {"auc_loss": 0.9, "auc_zlib": 0.88, "auc_min_k": 0.91, "auc_min_k_plus_plus": 0.7},
                  "privleak": -85.2, "privleak_reference": "retrain"}  (absent on older rows)
    }

* ``cell`` (:class:`RowCell`): the grid cell: benchmark, objective, optimizer, its grade, seed and
  learning rate. ``attack``: the attack applied to the cell's unlearned model, :data:`NO_ATTACK`
  for the unlearned model itself; ``attack_family``: the attack's kind.
* ``forget`` / ``utility``: metrics of the attacked model (for ``"none"``: of the unlearned one),
  named as in :data:`robustunlearn.metrics.suite.METRICS`; ``reference`` (:class:`References`):
  the same metrics of the original (target), unlearned and retrained models.
* ``primary_metric``: the forget metric the scores use; the utility metric is
  :func:`robustunlearn.study.scores.utility_metric` (``retain_qa_rouge`` when present).
* ``cost`` (:class:`UnlearningCost`): of the cell's unlearning run (every row of a cell carries
  the same); ``forward_equivalents``, ``compute_budget``, ``budget_spent``, ``level_gap`` and
  ``level_tolerance`` are absent on older rows.
* ``unlearning_curve``: the cell's checks during unlearning: step, forward-pass equivalents spent,
  the level metric and, where measured, the utility metric on a small retain-evaluation subset.
* ``curve``: forget metrics by relearning step (relearning attacks only): ``"step"``,
  ``"train_loss"`` (absent at step 0), ``"<metric>"`` on the whole forget set and
  ``"<metric>@<scoring>"`` (:func:`scored_metric`) on each part of it in :data:`SCORINGS`.
* ``scorings``: relearning rows only: the level metric of the attacked model on the parts of the
  forget set (:data:`SCORINGS`: the records relearning trained on, and those it held out by whole
  subject or by attribute); a part is absent where it is empty (no attributes, or WMDP).
* ``control`` (:class:`Control`): the same attack (same name, strength, records and seed) applied
  to the control model: the retrain model, else the target standing in as an upper bound
  (``source``); on the unattacked row, the unattacked control model's metrics.
* ``landscape`` (:class:`Landscape`): optional, any key of it may be absent: ``lmc`` runs from the
  model of ``pair``'s first optimizer, the study's reference (θ_a, α = 0), to this cell's (θ_b, α = 1);
  ``sharpness`` (of the loss ``sharpness_loss``) is of this cell's model.
* ``scores``: :func:`robustunlearn.study.scores.attack_scores` of the row when it was written. The
  report recomputes them from the other fields rather than trusting stored ones.
* ``tofu``: :func:`robustunlearn.metrics.suite.tofu_scores` of the attacked model; the key is
  absent where there are none.
* ``attack_config``: the attack's exact configuration (``AttackOutcome.config``): a quantizer's
  method, backend, bits, group size, scheme (symmetric or not, grouped over what) and which modules
  stay in full precision; relearning's data, steps, lr and optimizer; noise's scale; and
  ``"strength"``, the number that orders the rungs of a ladder, weakest first (quantization:
  16 - bits; noise: the scale; relearning: the lr). Absent on the unattacked row.
* ``privacy``: membership inference on the attacked model
  (:func:`robustunlearn.metrics.privacy.mia_privacy` with
  :func:`~robustunlearn.metrics.privacy.with_privleak`): the MIA-suite AUCs of the benchmark's
  members vs non-members and PrivLeak against ``privleak_reference`` (``"retrain"``,
  ``"muse-published-news"``, ... or ``"no reference"`` with PrivLeak null; null too, with
  ``privleak_note``, where the retrain model's AUC is 1); on a benchmark without
  non-members (TOFU) ``aucs`` is null and ``reason`` says why. Absent on rows written before it existed.

Every part writes its keys sorted, as the files store them (``sort_keys``), so a row read back
lists its cell's and its cost's fields in the same order as one about to be written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from robustunlearn.core.io import atomic_write_json, atomic_write_text

NO_ATTACK = "none"  # the attack of the row that holds the unlearned model itself
OPTIONAL_FIELDS = (  # row keys absent when None
    "tofu",
    "attack_config",
    "privacy",
    "unlearning_curve",
    "scorings",
    "control",
)
# The parts of the forget set a relearning row is scored on: the records relearning trained on, and
# those it held out, by whole subject (author, ...) or by attribute of a trained-on subject.
SCORINGS = ("in_set", "held_out_subjects", "held_out_attributes")
CONTROL_SOURCES = ("retrain", "target")  # the control model: the retrain model, else the target
# The cost fields absent when None (rows written before them lack them).
COST_OPTIONAL_FIELDS = ("forward_equivalents", "compute_budget", "budget_spent", "level_gap", "level_tolerance")

Metrics = dict[str, float]
Points = list[dict[str, float]]  # a curve: one dict of numbers per point
Parser = Callable[[Any, str], Any]  # (JSON value, its name in the row) -> the field's value; ValueError if invalid


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(description: str, accepts: Callable[[Any], bool]) -> Parser:
    """A parser that takes a JSON value as it is when ``accepts`` it."""

    def parse(value: Any, name: str) -> Any:
        if not accepts(value):
            raise ValueError(f"'{name}' must be {description}, got {json.dumps(value)[:80]}")
        return value

    return parse


def _or_null(parse: Parser) -> Parser:
    return lambda value, name: None if value is None else parse(value, name)


_STRING = _kind("a string", lambda value: isinstance(value, str))
_INTEGER = _kind("an integer", lambda value: isinstance(value, int) and not isinstance(value, bool))
_NUMBER = _kind("a number", _is_number)
_BOOLEAN = _kind("true or false", lambda value: isinstance(value, bool))
_OBJECT = _kind("an object", lambda value: isinstance(value, dict))
_METRIC_VALUES = _kind(
    "an object of numbers", lambda value: isinstance(value, dict) and all(map(_is_number, value.values()))
)
_POINTS = _kind(
    "a list of objects of numbers",
    lambda value: (
        isinstance(value, list)
        and all(isinstance(point, dict) and all(map(_is_number, point.values())) for point in value)
    ),
)


def _parse_scorings(value: Any, name: str) -> dict[str, Metrics]:
    """``{scoring: metrics}`` with each scoring one of :data:`SCORINGS`."""
    _OBJECT(value, name)
    unknown = [key for key in value if key not in SCORINGS]
    if unknown:
        raise ValueError(f"'{name}' has unknown scoring(s) {', '.join(unknown)}; known: {', '.join(SCORINGS)}")
    return {key: _METRIC_VALUES(metrics, f"{name}.{key}") for key, metrics in value.items()}


def scored_metric(metric: str, scoring: str) -> str:
    """The key of ``metric`` on the forget-set part ``scoring`` in a relearning curve's points:
    ``"forget_qa_rouge@in_set"``."""
    return f"{metric}@{scoring}"


def _parse_fields(
    cls: type, data: Any, parsers: dict[str, Parser], where: str = "", optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The values of ``cls``'s fields in the JSON object ``data`` (``where`` names it in the row, ``""``
    for the row itself), each through its parser; ``ValueError`` when a field is missing (but
    ``optional`` ones: ``None``), unknown or invalid."""
    if not isinstance(data, dict):
        if not where:
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        raise ValueError(f"'{where}' must be an object, got {json.dumps(data)[:80]}")
    prefix = f"{where}." if where else ""
    names = [spec.name for spec in fields(cls)]
    missing = [prefix + name for name in names if name not in data and name not in optional]
    if missing:
        raise ValueError(f"result row lacks {', '.join(missing)}")
    unknown = [prefix + key for key in data if key not in names]
    if unknown:
        raise ValueError(f"result row has unknown field(s) {', '.join(unknown)}")
    return {name: None if name not in data else parsers[name](data[name], prefix + name) for name in names}


def _sorted_fields(instance: Any, *, skip_none: bool = False) -> dict[str, Any]:
    values = {spec.name: getattr(instance, spec.name) for spec in fields(instance)}
    return {key: values[key] for key in sorted(values) if not (skip_none and values[key] is None)}


@dataclass(frozen=True)
class RowCell:
    """The grid cell a row belongs to."""

    benchmark: str
    objective: str
    optimizer: str
    grade: str  # the optimizer's grade (robustunlearn.optim.GRADES)
    seed: int
    lr: float
    options: dict[str, Any] | None = None  # optimizer options the cell overrides (the lr sweep's choices)

    def to_json(self) -> dict[str, Any]:
        data = _sorted_fields(self)
        return data if self.options else {key: value for key, value in data.items() if key != "options"}

    def grid_point(self) -> dict[str, Any]:
        """The cell without its seed: the grid point whose seeds the report averages."""
        return {key: value for key, value in self.to_json().items() if key != "seed"}

    @classmethod
    def from_json(cls, data: Any) -> RowCell:
        text = {name: _STRING for name in ("benchmark", "objective", "optimizer", "grade")}
        parsers = {**text, "seed": _INTEGER, "lr": _NUMBER, "options": _OBJECT}
        return cls(**_parse_fields(cls, data, parsers, "cell", optional=("options",)))


@dataclass(frozen=True)
class References:
    """The metrics of the models a row's are compared with."""

    target: Metrics  # the original model, before unlearning
    unlearned: Metrics  # the cell's unlearned model, before any attack
    retrain: Metrics | None  # a model never trained on the forget set (None where the benchmark has none)

    def to_json(self) -> dict[str, Any]:
        return _sorted_fields(self)

    @classmethod
    def from_json(cls, data: Any) -> References:
        parsers = {"target": _METRIC_VALUES, "unlearned": _METRIC_VALUES, "retrain": _or_null(_METRIC_VALUES)}
        return cls(**_parse_fields(cls, data, parsers, "reference"))


@dataclass(frozen=True)
class UnlearningCost:
    """What a cell's unlearning run took (it stops once the forget metric reaches ``target_level``)."""

    steps: int
    forward_passes: int
    backward_passes: int
    seconds: float  # wall time
    reached_level: bool
    target_level: float | None  # the level floor (retrain, or chance) plus the tolerance (None: no floor)
    # Absent on older rows:
    forward_equivalents: float | None = None  # forward passes + 2 x backward passes spent
    compute_budget: float | None = None  # the budget it had, in forward-pass equivalents
    budget_spent: bool | None = None  # it stopped because the budget ran out
    level_gap: float | None = None  # target_level - F_unlearned: > 0 when it over-shot the level by that
    level_tolerance: float | None = None  # the evaluation preset's tolerance

    def to_json(self) -> dict[str, Any]:
        data = _sorted_fields(self)
        return {key: value for key, value in data.items() if value is not None or key not in COST_OPTIONAL_FIELDS}

    @classmethod
    def from_json(cls, data: Any) -> UnlearningCost:
        counts = {name: _INTEGER for name in ("steps", "forward_passes", "backward_passes")}
        numbers = {name: _or_null(_NUMBER) for name in COST_OPTIONAL_FIELDS if name != "budget_spent"}
        parsers = {
            **counts,
            **numbers,
            "seconds": _NUMBER,
            "reached_level": _BOOLEAN,
            "target_level": _or_null(_NUMBER),
            "budget_spent": _or_null(_BOOLEAN),
        }
        return cls(**_parse_fields(cls, data, parsers, "cost", optional=COST_OPTIONAL_FIELDS))


@dataclass(frozen=True)
class Landscape:
    """The loss landscape around a cell's unlearned model; each part may be absent (``None``)."""

    pair: str | None = None  # "<first optimizer>-vs-<this cell's>", prefixed "<objective>: " with several
    lmc: Points | None = None  # {"alpha": α, <metric>: value, ...} along θ = (1-α)·θ_a + α·θ_b
    sharpness_loss: str | None = None  # the loss the sharpness is measured on
    sharpness: Points | None = None  # {"scale", "mean_loss_increase", "std"} per noise scale

    def to_json(self) -> dict[str, Any]:
        return _sorted_fields(self, skip_none=True)

    @classmethod
    def from_json(cls, data: Any) -> Landscape:
        parsers = {"pair": _STRING, "lmc": _POINTS, "sharpness_loss": _STRING, "sharpness": _POINTS}
        return cls(**_parse_fields(cls, data, parsers, "landscape", optional=tuple(parsers)))


@dataclass(frozen=True)
class Control:
    """The same attack on the control model (same name, strength, records and seed): what a model
    that never learned the forget set, or (``source="target"``, an upper bound where there is no
    retrain model) the original model, scores under it."""

    source: str  # one of CONTROL_SOURCES
    forget: Metrics
    utility: Metrics
    scorings: dict[str, Metrics] | None = None  # as the row's: relearning only
    curve: Points | None = None  # as the row's: relearning only

    def to_json(self) -> dict[str, Any]:
        return _sorted_fields(self, skip_none=True)

    @classmethod
    def from_json(cls, data: Any) -> Control:
        parsers = {
            "source": _kind(f"one of {', '.join(CONTROL_SOURCES)}", lambda value: value in CONTROL_SOURCES),
            "forget": _METRIC_VALUES,
            "utility": _METRIC_VALUES,
            "scorings": _or_null(_parse_scorings),
            "curve": _or_null(_POINTS),
        }
        return cls(**_parse_fields(cls, data, parsers, "control", optional=("scorings", "curve")))


@dataclass
class ResultRow:
    """One (cell, attack) row of the study (the module docstring shows one in JSON)."""

    cell: RowCell
    attack: str
    attack_family: str
    forget: Metrics
    utility: Metrics
    reference: References
    primary_metric: str
    cost: UnlearningCost
    curve: Points | None = None
    landscape: Landscape | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    tofu: dict[str, Any] | None = None
    attack_config: dict[str, Any] | None = None  # the attack's exact configuration (AttackOutcome.config)
    privacy: dict[str, Any] | None = None  # membership-inference AUCs and PrivLeak (metrics.privacy)
    unlearning_curve: Points | None = None  # the cell's checks during unlearning
    scorings: dict[str, Metrics] | None = None  # the level metric on each part of the forget set
    control: Control | None = None  # the same attack on the control model

    def to_json(self) -> dict[str, Any]:
        data = _sorted_fields(self)
        data.update(
            cell=self.cell.to_json(),
            reference=self.reference.to_json(),
            cost=self.cost.to_json(),
            landscape=None if self.landscape is None else self.landscape.to_json(),
            control=None if self.control is None else self.control.to_json(),
        )
        for optional in OPTIONAL_FIELDS:
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_json(cls, data: Any) -> ResultRow:
        """The row a JSON object holds; ``ValueError`` naming the first field that is missing,
        unknown or of the wrong kind."""
        parsers = {
            "cell": lambda value, _: RowCell.from_json(value),
            "attack": _STRING,
            "attack_family": _STRING,
            "forget": _METRIC_VALUES,
            "utility": _METRIC_VALUES,
            "reference": lambda value, _: References.from_json(value),
            "primary_metric": _STRING,
            "cost": lambda value, _: UnlearningCost.from_json(value),
            "curve": _or_null(_POINTS),
            "landscape": _or_null(lambda value, _: Landscape.from_json(value)),
            "scores": _OBJECT,
            "tofu": _or_null(_OBJECT),
            "attack_config": _or_null(_OBJECT),
            "privacy": _or_null(_OBJECT),
            "unlearning_curve": _or_null(_POINTS),
            "scorings": _or_null(_parse_scorings),
            "control": _or_null(lambda value, _: Control.from_json(value)),
        }
        return cls(**_parse_fields(cls, data, parsers, optional=OPTIONAL_FIELDS))


def write_results_jsonl(path: Path, rows: Iterable[ResultRow]) -> None:
    """Write ``results.jsonl`` atomically: one row a line, keys sorted."""
    atomic_write_text(path, "".join(json.dumps(row.to_json(), sort_keys=True) + "\n" for row in rows))


def read_results_jsonl(path: Path, check: Callable[[ResultRow, ResultRow], None] | None = None) -> list[ResultRow]:
    """The rows of a ``results.jsonl`` (blank lines skipped), each passed with the file's first row to
    ``check`` (which raises ``ValueError`` on a row it rejects). A line that is not a valid row, or
    that ``check`` rejects, raises ``ValueError`` naming ``path:line``; so does a file without rows."""
    path = Path(path)
    rows: list[ResultRow] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from error
        try:
            row = ResultRow.from_json(data)
            if check is not None:
                check(row, rows[0] if rows else row)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from error
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no result rows")
    return rows


def write_cell_rows(path: Path, rows: Iterable[ResultRow]) -> None:
    """Write a finished cell's ``rows.json`` atomically: a JSON list of its rows."""
    atomic_write_json(path, [row.to_json() for row in rows])


def read_cell_rows(path: Path) -> list[ResultRow]:
    """The rows of a finished cell's ``rows.json``; ``ValueError`` naming the file and the row when
    one is not a valid row."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of result rows, got {type(data).__name__}")
    rows = []
    for index, item in enumerate(data):
        try:
            rows.append(ResultRow.from_json(item))
        except ValueError as error:
            raise ValueError(f"{path}: row {index}: {error}") from error
    return rows
