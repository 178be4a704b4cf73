"""Pretrained knowledge as a benchmark, as WMDP unlearns it: TOFU's world facts (``world_facts.json``,
117 questions on geography and history, each with its answer and three wrong options), grouped by
topic, some topics to forget and the others kept.

* ``forget_qa`` and ``forget_mcq``: the questions of ``forget_topics``, as QA pairs (the three wrong
  options as ``perturbed_answers``) and as 4-way multiple choice; ``subject`` = the topic, so the
  relearning attacker trains on some topics and is scored on the others (held-out subjects);
* ``retain_qa``: the questions of the other topics. Each is a subject of its own,
  ``<topic>#<row>``: a few dozen questions grouped by topic would leave the study's retain split
  (regulariser, validation, evaluation) one or two topics per part.

``questions`` keeps only those rows (0-based, in file order): the ones the model to unlearn answers,
so that there is knowledge to remove (docs/pretrained.md says how the SmolLM2 recipe chose its own).
No model was trained on these questions for the study, so there is no retrain reference: the
study's level and floor come from the level metric's chance level (``study.level_floor: chance``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustunlearn.core.errors import UserError
from robustunlearn.data.base import QA, Benchmark, MultipleChoice
from robustunlearn.data.tofu import (
    check_directory,
    check_names_option,
    check_path_option,
    checked_options,
    find_file,
    read_table,
)

SCHEMA_VERSION = "1"
FILE_STEM = "world_facts"  # TOFU's file: question, option1..option4, answer
FILE_ROWS = 117
# Each row of world_facts.json in one topic (0-based rows, in file order).
TOPICS: dict[str, tuple[int, ...]] = {
    "landmarks": (0, 5, 8, 11, 14, 16, 19, 20, 23, 26, 28, 34, 43, 45, 46, 49, 52, 56, 59, 74, 98),
    "capitals-cities": (2, 9, 18, 25, 30, 33, 36, 37, 39, 42, 51, 54, 58),
    "natural-world": (3, 4, 7, 10, 12, 13, 15, 17, 22, 29, 31, 32, 38, 47, 48, 50, 57, 63),
    "countries": (1, 6, 21, 27, 35, 40, 41, 55, 61, 62, 82, 84, 108),
    "disasters": (44, 60, 64, 65, 73, 101, 103),
    "twentieth-century": (66, 68, 69, 71, 72, 76, 78, 81, 89, 93, 94, 99, 100, 102, 106, 107, 111, 115),
    "history-1500-1900": (24, 75, 83, 85, 86, 96, 104, 105, 113, 116),
    "ancient-world": (53, 70, 88, 90, 95, 97, 110),
    "science-exploration": (67, 77, 79, 80, 87, 91, 92, 109, 112, 114),
}
TOPIC_OF_ROW = {row: topic for topic, rows in TOPICS.items() for row in rows}


def _check_values(options: dict[str, Any]) -> None:
    check_path_option(options, "data_dir")
    if options.get("data_dir") is None:
        raise ValueError("data_dir is required: the directory of TOFU's world_facts.json (--data-dir)")
    if "forget_topics" not in options:
        raise ValueError(f"forget_topics is required: names from {list(TOPICS)}")
    check_names_option(options, "forget_topics", TOPICS)
    if len(set(options["forget_topics"])) == len(TOPICS):
        raise ValueError("forget_topics must leave at least one topic to retain")
    questions = options.get("questions")
    if questions is not None and (
        not isinstance(questions, (list, tuple))
        or not questions
        or not all(isinstance(row, int) and not isinstance(row, bool) and 0 <= row < FILE_ROWS for row in questions)
        or len(set(questions)) != len(questions)
    ):
        raise ValueError(f"questions must be distinct row numbers from 0 to {FILE_ROWS - 1}, got {questions!r}")


@checked_options("world-facts", _check_values)
def load_world_facts(
    data_dir: str | Path, *, forget_topics: Sequence[str], questions: Sequence[int] | None = None
) -> Benchmark:
    """The questions of ``data_dir``/world_facts.json (``.jsonl`` too) of rows ``questions`` (all
    when None): ``forget_topics``' as ``forget_qa`` and ``forget_mcq``, the others' as ``retain_qa``."""
    directory = check_directory(data_dir, "world-facts")
    path = find_file(directory, FILE_STEM)
    if path is None:
        raise UserError(f"world-facts data directory {directory} has no {FILE_STEM}.json (TOFU's world facts)")
    table = read_table(path)
    if len(table.rows) != FILE_ROWS:
        raise UserError(f"{path} has {len(table.rows)} rows; TOFU's world facts have {FILE_ROWS}")
    forget = {forget_topics} if isinstance(forget_topics, str) else set(forget_topics)
    kept = range(FILE_ROWS) if questions is None else sorted(questions)
    splits: dict[str, list] = {"forget_qa": [], "forget_mcq": [], "retain_qa": []}
    for row in kept:
        where, record = table.rows[row]
        question, answer = table.string(where, record, "question"), table.string(where, record, "answer")
        options = [table.string(where, record, f"option{k}") for k in range(1, 5)]
        if answer not in options:
            raise table.error(where, f"field 'answer' {answer!r} is none of the options {options}")
        wrong = tuple(option for option in options if option != answer)
        topic = TOPIC_OF_ROW[row]
        if topic in forget:
            splits["forget_qa"].append(QA(question, answer, subject=topic, perturbed_answers=wrong))
            splits["forget_mcq"].append(MultipleChoice(question, tuple(options), options.index(answer), topic))
        else:
            splits["retain_qa"].append(QA(question, answer, subject=f"{topic}#{row}", perturbed_answers=wrong))
    empty = [name for name, records in splits.items() if not records]
    if empty:
        raise UserError(f"world-facts: the chosen questions and forget_topics leave {', '.join(empty)} empty")
    metadata = {"source": str(path), "forget_topics": sorted(forget), "questions": list(kept)}
    return Benchmark("world-facts", SCHEMA_VERSION, splits, metadata)
