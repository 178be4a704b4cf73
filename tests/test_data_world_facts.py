"""The world-facts benchmark (TOFU's world facts by topic, pretrained knowledge to forget): topics
split into forget and retain, the kept rows, the multiple choice, and its errors."""

from __future__ import annotations

import json

import pytest

from robustunlearn.core.errors import UserError
from robustunlearn.data import check_benchmark_options, load_benchmark
from robustunlearn.data.splits import relearn_split, retain_views
from robustunlearn.data.world_facts import FILE_ROWS, TOPICS


def _write_facts(directory, rows=FILE_ROWS):
    lines = [
        {
            "question": f"q{i}?",
            "option1": f"a{i}",
            "option2": f"b{i}",
            "option3": f"c{i}",
            "option4": f"d{i}",
            "answer": f"c{i}",
        }  # fmt: skip
        for i in range(rows)
    ]
    (directory / "world_facts.json").write_text("\n".join(json.dumps(line) for line in lines))
    return directory


def test_every_row_has_one_topic():
    rows = sorted(row for topic_rows in TOPICS.values() for row in topic_rows)
    assert rows == list(range(FILE_ROWS))


def test_forget_topics_and_kept_rows(tmp_path):
    kept = [0, 2, 3, 5, 66, 69]  # landmarks 0, 5; capitals-cities 2; natural-world 3; twentieth-century 66, 69
    benchmark = load_benchmark(
        "world-facts", data_dir=_write_facts(tmp_path), forget_topics=["landmarks", "twentieth-century"], questions=kept
    )
    forget = benchmark.splits["forget_qa"]
    assert [(r.question, r.subject) for r in forget] == [
        ("q0?", "landmarks"),
        ("q5?", "landmarks"),
        ("q66?", "twentieth-century"),
        ("q69?", "twentieth-century"),
    ]
    assert forget[0].answer == "c0" and forget[0].perturbed_answers == ("a0", "b0", "d0")
    mcq = benchmark.splits["forget_mcq"]
    assert [m.question for m in mcq] == [r.question for r in forget]
    assert mcq[0].choices == ("a0", "b0", "c0", "d0") and mcq[0].answer_index == 2
    retain = benchmark.splits["retain_qa"]
    assert [(r.question, r.subject) for r in retain] == [("q2?", "capitals-cities#2"), ("q3?", "natural-world#3")]
    # relearning holds whole topics out; the retain split divides question by question
    split = relearn_split(benchmark, 1, 0.5, seed=0)
    assert {r.subject for r in split.train} | {r.subject for r in split.held_out_subjects} == {
        "landmarks",
        "twentieth-century",
    }
    assert not {r.subject for r in split.train} & {r.subject for r in split.held_out_subjects}
    assert (
        len(
            retain_views(
                load_benchmark("world-facts", data_dir=tmp_path, forget_topics=["landmarks"]), 0
            ).evaluation.splits["retain_qa"]
        )
        > 20
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "forget_topics is required"),
        ({"forget_topics": ["moon"]}, "forget_topics must be distinct names"),
        ({"forget_topics": list(TOPICS)}, "at least one topic to retain"),
        ({"forget_topics": ["landmarks"], "questions": [0, 0]}, "questions must be distinct row numbers"),
        ({"forget_topics": ["landmarks"], "questions": [FILE_ROWS]}, "questions must be distinct row numbers"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        check_benchmark_options("world-facts", {"data_dir": "x", **options})


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="has no world_facts.json"):
        load_benchmark("world-facts", data_dir=tmp_path, forget_topics=["landmarks"])
    _write_facts(tmp_path, rows=3)
    with pytest.raises(UserError, match="has 3 rows"):
        load_benchmark("world-facts", data_dir=tmp_path, forget_topics=["landmarks"])
    with pytest.raises(UserError, match="leave forget_qa, forget_mcq empty"):
        load_benchmark("world-facts", data_dir=_write_facts(tmp_path), forget_topics=["landmarks"], questions=[2])


def test_real_file_loads():
    from pathlib import Path

    directory = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
    if not (directory / "world_facts.json").is_file():
        pytest.skip(f"TOFU's world facts are not in {directory}")
    benchmark = load_benchmark("world-facts", data_dir=directory, forget_topics=["landmarks"])
    assert len(benchmark.splits["forget_qa"]) == len(TOPICS["landmarks"])
    assert benchmark.splits["forget_qa"][0].answer == "Paris"
