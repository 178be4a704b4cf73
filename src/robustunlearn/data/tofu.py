"""TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs") as a
:class:`~robustunlearn.data.base.Benchmark`, from a local directory of its JSON Lines files or from
the hub dataset ``locuslab/TOFU`` (one config per file, split ``train``).

Mapping (``docs/benchmarks.md`` has the full table):

* ``forget_qa``: ``forgetXX_perturbed`` (QAs with ``paraphrased_question``, ``paraphrased_answer``
  and 5 ``perturbed_answers``), or the plain ``forgetXX`` when the perturbed file is absent;
* ``retain_qa``: the whole ``retainYY`` (YY = 100 - XX), the set the target model was trained on.
  The ``retain_perturbed`` evaluation subset is not a separate split: its 400 records are these
  same retain records, so they are enriched in place with their paraphrased and perturbed
  answers. "Records with ``perturbed_answers``" is TOFU's evaluation set (:func:`tofu_eval_sets`);
* ``utility_qa``: ``real_authors_perturbed`` and ``world_facts_perturbed``; ``utility_mcq``:
  ``real_authors`` and ``world_facts``, whose ``option1``..``option4`` are a four-way multiple
  choice. Their ``subject`` is the set's name: their questions are about real people and world
  facts, none of the 200 authors, and no split divides them (:func:`tofu_eval_sets` groups by it).

Subjects: TOFU has 200 fictitious authors with 20 QA each, and ``full`` lists them author by author:
``retainYY`` is its first rows, ``forgetXX`` the rest (forget01, 05, 10: the last 2, 10, 20 authors),
``forgetXX_perturbed`` the same rows as ``forgetXX`` in the same order, and ``retain_perturbed`` the
first 20 authors. So a forget or retain record's ``subject`` is its author, ``author-<k>`` with
``k`` (3 digits) its author's place in ``full``: ``k = i // 20`` for row ``i`` of ``retainYY``,
``k = len(retainYY) / 20 + i // 20`` for row ``i`` of ``forgetXX`` (forget01 holds author-198 and
author-199, and an author keeps its id in every retain split); a ``retain_perturbed`` record takes
its retain twin's. A forget or retain file whose length is not a multiple of 20 is an error, and
so, when ``full`` is there, is a ``full`` that does not list ``retainYY`` then ``forgetXX`` row by row.

``forgetXX`` and ``retainYY`` must be disjoint and, when ``full`` is there, partition it
(compared as (question, answer) pairs: ``full`` asks "What is the full name of the author?" twice).

This module also holds the small readers the MUSE and WMDP loaders share: :class:`Table`,
:func:`read_table`, :func:`hub_table` and :func:`checked_options`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustunlearn.core.errors import UserError
from robustunlearn.data.base import QA, Benchmark, MultipleChoice

SCHEMA_VERSION = "1"
HUB_NAME = "locuslab/TOFU"
FORGET_SPLITS = ("forget01", "forget05", "forget10")
UTILITY_SETS = ("real_authors", "world_facts")
QA_PER_AUTHOR = 20  # TOFU's files list each author's questions as one block of this many rows


# ---- shared readers (TOFU, MUSE, WMDP) ----------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """The rows of one file or hub split, each with where it came from (``"line 3"``,
    ``"index 2"``, ``"row 0"``) so that errors can point at it."""

    source: str  # a file path, or a description of the hub split
    rows: list[tuple[str, Any]]

    def error(self, where: str, message: str) -> UserError:
        return UserError(f"{self.source}, {where}: {message}")

    def string(self, where: str, row: Any, field: str, *, required: bool = True) -> str:
        """``row[field]`` as a non-empty string; ``""`` when absent and not ``required``."""
        value = self._field(where, row, field, required)
        if value is None:
            return ""
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, f"field {field!r} must be a non-empty string, got {_short(value)}")
        return value

    def strings(self, where: str, row: Any, field: str, *, required: bool = True) -> tuple[str, ...]:
        """``row[field]`` as a non-empty list of non-empty strings; ``()`` when absent and not
        ``required``."""
        value = self._field(where, row, field, required)
        if value is None:
            return ()
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.error(
                where, f"field {field!r} must be a non-empty list of non-empty strings, got {_short(value)}"
            )
        return tuple(value)

    def text(self, where: str, row: Any) -> str:
        """A row that is a non-empty string, or an object with a non-empty string field ``text``."""
        if isinstance(row, str):
            if not row.strip():
                raise self.error(where, "empty text")
            return row
        return self.string(where, row, "text")

    def _field(self, where: str, row: Any, field: str, required: bool) -> Any:
        if not isinstance(row, dict):
            raise self.error(where, f"expected a JSON object, got {type(row).__name__}")
        if field not in row:
            if required:
                raise self.error(where, f"missing field {field!r}")
            return None
        return row[field]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_table(path: Path, *, plain_lines: bool = False, limit: int | None = None) -> Table:
    """Read a file of records.

    ``.txt``: the whole file is one row, a string. ``.jsonl``: one JSON value per line (blank lines
    skipped). ``.json``: a JSON array when the file starts with ``[``, else JSON Lines too (TOFU's
    ``.json`` files are JSON Lines). With ``plain_lines``, a JSON Lines line that is not JSON and
    does not start with ``{`` is kept as its raw text (the format of WMDP's mirrored corpora).
    ``limit`` keeps the first rows only."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text: {error}") from None
    if path.suffix == ".txt":
        return Table(str(path), [("whole file", text)])
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
        return Table(str(path), [(f"index {i}", item) for i, item in enumerate(items[:limit])])
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            if not plain_lines or line.lstrip().startswith("{"):
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            rows.append((f"line {number}", line.strip()))
    return Table(str(path), rows)


def find_file(directory: Path, stem: str, extensions: Sequence[str] = (".json", ".jsonl")) -> Path | None:
    """The first of ``directory/stem + ext`` that exists, or None."""
    for extension in extensions:
        path = directory / f"{stem}{extension}"
        if path.is_file():
            return path
    return None


def hub_table(name: str, config: str | None, split: str, *, limit: int | None = None) -> Table:
    """One split of a Hugging Face hub dataset, via ``datasets.load_dataset`` (needs the network;
    gated datasets need ``HF_TOKEN``)."""
    try:
        import datasets  # optional heavy dependency: only hub loading needs it
    except ImportError:
        raise UserError(f"loading {name!r} from the hub needs the 'datasets' package: pip install datasets") from None
    source = f"hub dataset {name}" + (f" config {config}" if config else "") + f" split {split}"
    try:
        dataset = datasets.load_dataset(name, config, split=split if limit is None else f"{split}[:{limit}]")
    except Exception as error:  # network, authentication, unknown config: all end the load the same way
        raise UserError(f"could not load {source}: {error}") from error
    return Table(source, [(f"row {i}", dict(row)) for i, row in enumerate(dataset)])


def check_directory(path: str | Path, benchmark: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{benchmark} data directory {directory} does not exist or is not a directory")
    return directory


def checked_options(
    benchmark: str, check_values: Callable[[dict[str, Any]], None]
) -> Callable[[Callable[..., Benchmark]], Callable[..., Benchmark]]:
    """Make a loader reject unknown keyword options (as ``load_benchmark("synthetic", ...)`` does)
    and bad values (``check_values(options)``) with a ValueError naming them and what is accepted.
    The loader's ``check_options(**options)`` runs the same checks without loading anything, so a
    run can refuse a recipe's options before it starts."""

    def wrap(loader: Callable[..., Benchmark]) -> Callable[..., Benchmark]:
        accepted = list(inspect.signature(loader).parameters)

        def check_options(**options: Any) -> None:
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise ValueError(f"unknown option(s) {unknown} for benchmark {benchmark!r}; accepted: {accepted}")
            check_values(options)

        @functools.wraps(loader)
        def checked(*args: Any, **options: Any) -> Benchmark:
            check_options(**options)
            return loader(*args, **options)

        checked.check_options = check_options
        return checked

    return wrap


def check_path_option(options: dict[str, Any], name: str) -> None:
    """``options[name]``, when given, is a path (a string in a recipe) or None."""
    value = options.get(name)
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name} must be a path, got {_short(value)}")


def check_names_option(options: dict[str, Any], name: str, accepted: Sequence[str]) -> None:
    """``options[name]``, when given, is one of ``accepted`` or a non-empty list of distinct ones."""
    if name not in options:
        return
    value = options[name]
    names = [value] if isinstance(value, str) else value
    if (
        not isinstance(names, (list, tuple))
        or not names
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
        or not set(names) <= set(accepted)
    ):
        raise ValueError(f"{name} must be distinct names from {list(accepted)}, got {_short(value)}")


def check_string_option(options: dict[str, Any], name: str, *, optional: bool = False) -> None:
    """``options[name]``, when given, is a non-empty string (or None, if ``optional``)."""
    if name not in options or (optional and options[name] is None):
        return
    if not isinstance(options[name], str) or not options[name].strip():
        raise ValueError(f"{name} must be a non-empty string, got {_short(options[name])}")


# ---- TOFU ----------------------------------------------------------------------------------------


def _check_tofu_values(options: dict[str, Any]) -> None:
    check_path_option(options, "data_dir")
    check_string_option(options, "hub_name")
    if "forget_split" in options and options["forget_split"] not in FORGET_SPLITS:
        raise ValueError(
            f"unknown TOFU forget_split {_short(options['forget_split'])}; expected one of {list(FORGET_SPLITS)}"
        )


@checked_options("tofu", _check_tofu_values)
def load_tofu(
    data_dir: str | Path | None = None, *, forget_split: str = "forget10", hub_name: str = HUB_NAME
) -> Benchmark:
    """Load TOFU with ``forget_split`` (``forget01``, ``forget05`` or ``forget10``) from ``data_dir``
    (files ``<config>.json`` or ``.jsonl``), or from the hub dataset ``hub_name`` when ``data_dir``
    is None. See the module docstring for the mapping to splits."""
    retain_split = f"retain{100 - int(forget_split.removeprefix('forget')):02d}"
    get = _local_getter(check_directory(data_dir, "TOFU")) if data_dir is not None else _hub_getter(hub_name)

    forget_table = get(f"{forget_split}_perturbed") or get(forget_split)
    if forget_table is None:
        raise UserError(f"TOFU directory {data_dir} has neither {forget_split}_perturbed.json nor {forget_split}.json")
    retain_table = get(retain_split)
    if retain_table is None:
        raise UserError(f"TOFU directory {data_dir} has no {retain_split}.json, the retain set of {forget_split}")
    retain = _author_qas(retain_table, first_author=0)
    forget = _author_qas(forget_table, first_author=len(retain) // QA_PER_AUTHOR)
    full_table = get("full")
    _check_partition(forget, forget_table, retain, retain_table, full_table)
    if full_table is not None:
        _check_author_order(full_table, retain, retain_table, forget, forget_table)

    retain_eval_table = get("retain_perturbed")
    if retain_eval_table is not None:
        retain = _with_eval_fields(retain, retain_table, retain_eval_table)

    splits: dict[str, list] = {"forget_qa": forget, "retain_qa": retain, "utility_qa": [], "utility_mcq": []}
    tables = [forget_table, retain_table, full_table, retain_eval_table]
    for name in UTILITY_SETS:
        qa_table, mcq_table = get(f"{name}_perturbed"), get(name)
        if qa_table is not None:
            splits["utility_qa"] += [_qa(qa_table, where, row, name, perturbed=True) for where, row in qa_table.rows]
        if mcq_table is not None:
            splits["utility_mcq"] += [_multiple_choice(mcq_table, where, row, name) for where, row in mcq_table.rows]
        tables += [qa_table, mcq_table]
    metadata = {
        "source": str(data_dir) if data_dir is not None else f"hub:{hub_name}",
        "forget_split": forget_split,
        "retain_split": retain_split,
        "tables": [t.source for t in tables if t is not None],
    }
    return Benchmark("tofu", SCHEMA_VERSION, {k: v for k, v in splits.items() if v}, metadata)


def tofu_eval_sets(benchmark: Benchmark) -> dict[str, list[QA]]:
    """TOFU's evaluation sets, the records with ``perturbed_answers``: ``forget`` (forget_qa),
    ``retain`` (the retain_perturbed subset of retain_qa), ``real_authors`` and ``world_facts``
    (utility_qa by subject). Empty sets are left out. The keys are those
    :func:`robustunlearn.metrics.tofu.model_utility` expects."""
    sets = {
        "forget": benchmark.get("forget_qa"),
        "retain": benchmark.get("retain_qa"),
        **{name: [r for r in benchmark.get("utility_qa") if r.subject == name] for name in UTILITY_SETS},
    }
    sets = {name: [r for r in records if r.perturbed_answers] for name, records in sets.items()}
    return {name: records for name, records in sets.items() if records}


def _local_getter(directory: Path) -> Callable[[str], Table | None]:
    def get(config: str) -> Table | None:
        path = find_file(directory, config)
        return read_table(path) if path is not None else None

    return get


def _hub_getter(hub_name: str) -> Callable[[str], Table | None]:
    return lambda config: hub_table(hub_name, config, "train")


def author_subject(index: int) -> str:
    """The ``subject`` of the questions about TOFU's author number ``index`` (0..199) in ``full``."""
    return f"author-{index:03d}"


def _author_qas(table: Table, first_author: int) -> list[QA]:
    """The rows of a file that lists authors 20 rows each from ``first_author`` on, each with its
    author as subject."""
    if len(table.rows) % QA_PER_AUTHOR:
        raise UserError(
            f"TOFU file {table.source} has {len(table.rows)} rows, not a multiple of {QA_PER_AUTHOR} "
            f"(TOFU lists {QA_PER_AUTHOR} questions per author): its rows cannot be assigned to authors"
        )
    return [
        _qa(table, where, row, author_subject(first_author + i // QA_PER_AUTHOR))
        for i, (where, row) in enumerate(table.rows)
    ]


def _check_author_order(
    full_table: Table, retain: list[QA], retain_table: Table, forget: list[QA], forget_table: Table
) -> None:
    """``full`` lists the retain rows then the forget rows, in order: authors are read from
    positions, so a reordered file would give questions the wrong author."""
    for (where, row), record in zip(full_table.rows, [*retain, *forget]):
        if _pair(_qa(full_table, where, row)) != _pair(record):
            raise full_table.error(
                where,
                f"expected {record.question!r} here: records' authors are read from their places, so "
                f"full must list {retain_table.source} then {forget_table.source} in the same order",
            )


def _qa(table: Table, where: str, row: Any, subject: str = "", *, perturbed: bool = False) -> QA:
    return QA(
        question=table.string(where, row, "question"),
        answer=table.string(where, row, "answer"),
        subject=subject,
        paraphrased_question=table.string(where, row, "paraphrased_question", required=False),
        paraphrased_answer=table.string(where, row, "paraphrased_answer", required=False),
        perturbed_answers=table.strings(where, row, "perturbed_answer", required=perturbed),
    )


def _multiple_choice(table: Table, where: str, row: Any, subject: str) -> MultipleChoice:
    question = table.string(where, row, "question")
    choices = []
    while f"option{len(choices) + 1}" in row:
        choices.append(table.string(where, row, f"option{len(choices) + 1}"))
    if len(choices) < 2:
        raise table.error(where, "a multiple-choice row needs fields 'option1', 'option2', ... (at least two)")
    answer = table.string(where, row, "answer")
    if answer not in choices:
        raise table.error(where, f"field 'answer' {_short(answer)} is none of the options {choices}")
    return MultipleChoice(question, tuple(choices), choices.index(answer), subject)


def _pair(record: QA) -> tuple[str, str]:
    return record.question, record.answer


def _check_partition(
    forget: list[QA], forget_table: Table, retain: list[QA], retain_table: Table, full_table: Table | None
) -> None:
    shared = set(map(_pair, forget)) & set(map(_pair, retain))
    if shared:
        question = min(shared)[0]
        raise UserError(
            f"TOFU forget set {forget_table.source} and retain set {retain_table.source} share "
            f"{len(shared)} question(s), e.g. {question!r}; they must be disjoint"
        )
    if full_table is None:
        return
    full = Counter(_pair(_qa(full_table, where, row)) for where, row in full_table.rows)
    both = Counter(map(_pair, forget)) + Counter(map(_pair, retain))
    missing, extra = full - both, both - full
    if missing or extra:
        example = min(missing or extra)[0]
        raise UserError(
            f"TOFU {forget_table.source} and {retain_table.source} do not partition {full_table.source}: "
            f"{sum(missing.values())} of its questions are in neither and {sum(extra.values())} questions "
            f"are not in it, e.g. {example!r}"
        )


def _with_eval_fields(retain: list[QA], retain_table: Table, eval_table: Table) -> list[QA]:
    """``retain`` with each record of ``eval_table`` (retain_perturbed) replacing its plain twin, whose
    subject it takes."""
    index = {_pair(record): i for i, record in enumerate(retain)}
    enriched = list(retain)
    for where, row in eval_table.rows:
        record = _qa(eval_table, where, row, perturbed=True)
        if _pair(record) not in index:
            raise eval_table.error(
                where,
                f"question {record.question!r} with this answer is not in the retain set {retain_table.source}",
            )
        twin = index[_pair(record)]
        enriched[twin] = dataclasses.replace(record, subject=retain[twin].subject)
    return enriched
