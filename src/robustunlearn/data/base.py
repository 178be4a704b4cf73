"""The benchmark bundle: named splits of typed records.

Every benchmark (the embedded ``synthetic`` one, TOFU, MUSE, WMDP) is loaded into one
:class:`Benchmark`. Split names follow ``{role}_{kind}``:

* role: ``forget`` (to be unlearned), ``retain`` (trained, must survive), ``holdout``
  (never trained: the non-members for membership inference), ``utility`` (general text);
* kind: ``text`` (:class:`Passage`), ``qa`` (:class:`QA`), ``verbmem`` (:class:`Continuation`),
  ``mcq`` (:class:`MultipleChoice`).

A benchmark holds only the splits it has; consumers ask with :meth:`Benchmark.get` or
:meth:`Benchmark.require` and get one clear error naming what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Union

from robustunlearn.core.io import atomic_write_text


@dataclass(frozen=True)
class Passage:
    """Raw text (a biography passage, a book excerpt, a news article)."""

    text: str
    subject: str = ""  # who or what the passage is about; groups records by person/author

    kind: ClassVar[str] = "text"


@dataclass(frozen=True)
class QA:
    """A question with its reference answer (TOFU-compatible optional fields)."""

    question: str
    answer: str
    subject: str = ""
    attribute: str = ""  # which fact is asked (e.g. "birth_city"); empty when unknown
    paraphrased_question: str = ""
    paraphrased_answer: str = ""
    perturbed_answers: tuple[str, ...] = ()  # wrong answers of the same form (TOFU truth ratio)

    kind: ClassVar[str] = "qa"


@dataclass(frozen=True)
class Continuation:
    """A prefix cut from a training passage and its true continuation (MUSE verbmem)."""

    prefix: str
    continuation: str
    subject: str = ""

    kind: ClassVar[str] = "verbmem"


@dataclass(frozen=True)
class MultipleChoice:
    """A question with answer options; ``answer_index`` points at the correct one (WMDP)."""

    question: str
    choices: tuple[str, ...]
    answer_index: int
    subject: str = ""

    kind: ClassVar[str] = "mcq"

    def __post_init__(self) -> None:
        if not 0 <= self.answer_index < len(self.choices):
            raise ValueError(f"answer_index {self.answer_index} out of range for {len(self.choices)} choices")


Record = Union[Passage, QA, Continuation, MultipleChoice]
RECORD_TYPES: dict[str, type] = {cls.kind: cls for cls in (Passage, QA, Continuation, MultipleChoice)}
ROLES = ("forget", "retain", "holdout", "utility")


def record_to_dict(record: Record) -> dict[str, Any]:
    data = asdict(record)
    for key, value in data.items():
        if isinstance(value, tuple):
            data[key] = list(value)
    return data


def record_from_dict(kind: str, data: dict[str, Any]) -> Record:
    """Build a record of ``kind`` from a dict, naming the missing or unknown field on error."""
    if kind not in RECORD_TYPES:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(RECORD_TYPES)}")
    cls = RECORD_TYPES[kind]
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{kind} record has unknown field(s) {sorted(unknown)}; expected {sorted(names)}")
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{kind} record is missing field(s) {sorted(missing)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def split_kind(split_name: str) -> str:
    """``forget_qa`` -> ``qa``; raises on a name that is not ``{role}_{kind}``."""
    role, _, kind = split_name.partition("_")
    if role not in ROLES or kind not in RECORD_TYPES:
        raise ValueError(
            f"bad split name {split_name!r}: expected '<role>_<kind>' with role in {ROLES} "
            f"and kind in {sorted(RECORD_TYPES)}"
        )
    return kind


@dataclass
class Benchmark:
    """Named splits of typed records plus free-form metadata (generator version, seed, ...)."""

    name: str
    schema_version: str
    splits: dict[str, list[Record]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split_name, records in self.splits.items():
            kind = split_kind(split_name)
            cls = RECORD_TYPES[kind]
            for i, record in enumerate(records):
                if not isinstance(record, cls):
                    raise TypeError(
                        f"split {split_name!r} record {i} is {type(record).__name__}, expected {cls.__name__}"
                    )

    def with_splits(self, **splits: Sequence[Record]) -> Benchmark:
        """A new bundle with ``splits`` replaced (or added); the other splits' lists are shared and
        the metadata is copied shallowly. Validated like the constructor."""
        replaced = {name: list(records) for name, records in splits.items()}
        return Benchmark(self.name, self.schema_version, {**self.splits, **replaced}, dict(self.metadata))

    def get(self, split_name: str) -> list[Record]:
        return self.splits.get(split_name, [])

    def require(self, split_name: str) -> list[Record]:
        if not self.splits.get(split_name):
            raise KeyError(
                f"benchmark {self.name!r} has no (or an empty) split {split_name!r}; it has {sorted(self.splits)}"
            )
        return self.splits[split_name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "schema_version": self.schema_version,
            "metadata": self.metadata,
            "splits": {k: [record_to_dict(r) for r in v] for k, v in sorted(self.splits.items())},
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, fixed separators, so equal bundles give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Benchmark":
        for key in ("name", "schema_version", "splits"):
            if key not in data:
                raise ValueError(f"benchmark JSON is missing the field {key!r}")
        splits = {
            name: [record_from_dict(split_kind(name), r) for r in records] for name, records in data["splits"].items()
        }
        return cls(data["name"], data["schema_version"], splits, dict(data.get("metadata", {})))

    def save(self, path: str | Path) -> None:

        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Benchmark":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def summary(self) -> dict[str, int]:
        return {name: len(records) for name, records in sorted(self.splits.items())}
