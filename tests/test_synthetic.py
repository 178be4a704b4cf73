import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from robustunlearn.data import BENCHMARKS, load_benchmark
from robustunlearn.data.base import QA, Benchmark, Continuation, MultipleChoice, Passage
from robustunlearn.data.prompts import qa_completion, qa_prompt
from robustunlearn.data.synthetic import (
    ATTRIBUTES,
    FATHER_NAMES,
    FIRST_NAMES,
    GENERATOR_VERSION,
    LAST_NAMES,
    MOTHER_NAMES,
    PET_NAMES,
    SCHEMA_VERSION,
    SyntheticConfig,
    generate_synthetic,
)

PEOPLE_ROLES = ("forget", "retain", "holdout")
KIND_TYPES = {"text": Passage, "qa": QA, "verbmem": Continuation, "mcq": MultipleChoice}
EXPECTED_SPLITS = {f"{r}_{k}" for r in PEOPLE_ROLES for k in KIND_TYPES} | {"utility_text", "utility_qa"}


@pytest.fixture(scope="module")
def default() -> Benchmark:
    return generate_synthetic()


def _sha(benchmark: Benchmark) -> str:
    return hashlib.sha256(benchmark.to_json().encode("utf-8")).hexdigest()


def _mentions(value: str, text: str) -> bool:
    """Whole-word, case-insensitive occurrence (what a lenient containment metric would accept)."""
    return re.search(rf"\b{re.escape(value)}\b", text, re.IGNORECASE) is not None


def check_invariants(bench: Benchmark, config: SyntheticConfig) -> None:
    assert bench.name == "synthetic" and bench.schema_version == SCHEMA_VERSION
    assert set(bench.splits) == EXPECTED_SPLITS
    for split, records in bench.splits.items():
        assert all(type(r) is KIND_TYPES[split.split("_", 1)[1]] for r in records), split

    # Roles partition the people, with the configured sizes.
    people = {role: [p.subject for p in bench.get(f"{role}_text")] for role in PEOPLE_ROLES}
    assert {role: len(names) for role, names in people.items()} == config.role_sizes()
    everyone = [name for names in people.values() for name in names]
    assert len(set(everyone)) == len(everyone) == config.num_people
    assert people == bench.metadata["people"]

    for role in PEOPLE_ROLES:
        passages = {p.subject: p.text for p in bench.get(f"{role}_text")}
        qas = bench.get(f"{role}_qa")
        # One QA per attribute per person, each answer in the person's own passage and no
        # perturbed (wrong) answer there, so the passage determines the answer.
        assert Counter(q.subject for q in qas) == {name: len(config.attributes) for name in passages}
        assert all(q.answer in passages[q.subject] for q in qas)
        for q in qas:
            assert q.attribute in config.attributes
            assert q.subject in q.question and q.subject in q.paraphrased_question
            assert q.paraphrased_question != q.question
            assert len(set(q.perturbed_answers)) == 3 and q.answer not in q.perturbed_answers
            assert set(q.perturbed_answers) <= set(ATTRIBUTES[q.attribute].values)
            assert not any(_mentions(w, passages[q.subject]) for w in q.perturbed_answers), q
            assert 1 <= len(q.answer.split()) <= 3

        truth = {(q.subject, q.question): q.answer for q in qas}
        mcqs = bench.get(f"{role}_mcq")
        assert len(mcqs) == config.mcq_per_person * len(passages)
        for m in mcqs:
            assert len(m.choices) == 4 and len(set(m.choices)) == 4
            assert m.choices[m.answer_index] == truth[(m.subject, m.question)]

        verbmem = bench.get(f"{role}_verbmem")
        assert sorted(c.subject for c in verbmem) == sorted(passages)
        for c in verbmem:
            assert c.prefix and c.continuation.startswith(" ")
            assert passages[c.subject].startswith(c.prefix + c.continuation)


def test_default_benchmark_invariants(default):
    check_invariants(default, SyntheticConfig())
    assert default.metadata["generator_version"] == GENERATOR_VERSION
    assert default.metadata["seed"] == 0
    assert default.metadata["config"]["num_people"] == 150


def test_default_sizes_and_training_budget(default):
    sizes = default.summary()
    assert sizes == {
        "forget_text": 15, "retain_text": 113, "holdout_text": 22,
        "forget_qa": 120, "retain_qa": 904, "holdout_qa": 176,
        "forget_verbmem": 15, "retain_verbmem": 113, "holdout_verbmem": 22,
        "forget_mcq": 45, "retain_mcq": 339, "holdout_mcq": 66,
        "utility_text": 60, "utility_qa": 20,
    }  # fmt: skip
    words = [len(p.text.split()) for r in PEOPLE_ROLES for p in default.get(f"{r}_text")]
    assert 40 <= min(words) and max(words) <= 60
    continuation_words = [len(c.continuation.split()) for r in PEOPLE_ROLES for c in default.get(f"{r}_verbmem")]
    assert 20 <= min(continuation_words) and max(continuation_words) <= 30
    # What the target model trains on, in its training format, fits the CPU budget.
    trained_text = sum(len(p.text) for s in ("forget_text", "retain_text", "utility_text") for p in default.get(s))
    trained_qa = sum(
        len(qa_prompt(q.question)) + len(qa_completion(q.answer))
        for s in ("forget_qa", "retain_qa")
        for q in default.get(s)
    )
    assert trained_text + trained_qa <= 150_000


def test_mcq_answer_positions_are_spread(default):
    positions = Counter(m.answer_index for r in PEOPLE_ROLES for m in default.get(f"{r}_mcq"))
    assert set(positions) == {0, 1, 2, 3} and min(positions.values()) > 90  # 450 questions


def test_utility_is_general_text_that_answers_its_qa(default):
    texts = [p.text for p in default.get("utility_text")]
    names = [n for names in default.metadata["people"].values() for n in names]
    assert not any(n.split()[0] in t or n.split()[1] in t for n in names for t in texts)
    for q in default.get("utility_qa"):
        assert any(q.answer in t and (q.subject in t or q.subject == "sums") for t in texts), q
        assert len(q.answer.split()) <= 2
    assert len({q.question for q in default.get("utility_qa")}) == 20


def test_same_config_gives_identical_bytes():
    config = SyntheticConfig(num_people=30, seed=7)
    assert generate_synthetic(config).to_json() == generate_synthetic(config).to_json()


def test_identical_bytes_across_processes(default):
    code = (
        "import hashlib, sys; from robustunlearn.data.synthetic import generate_synthetic; "
        "sys.stdout.write(hashlib.sha256(generate_synthetic().to_json().encode('utf-8')).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash salt than this process
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout == _sha(default)


def test_different_seeds_give_different_people(default):
    other = generate_synthetic(SyntheticConfig(seed=1))
    names = lambda b: {n for names in b.metadata["people"].values() for n in names}  # noqa: E731
    assert len(names(default) & names(other)) < 50  # of 200, from 4096 possible names
    assert default.get("utility_text") != other.get("utility_text")


def test_role_fractions_move_people_without_changing_them(default):
    other = generate_synthetic(SyntheticConfig(forget_fraction=0.2))
    check_invariants(other, SyntheticConfig(forget_fraction=0.2))
    assert len(other.get("forget_text")) == 30
    passages = lambda b: {p.text for r in PEOPLE_ROLES for p in b.get(f"{r}_text")}  # noqa: E731
    assert passages(other) == passages(default)


def test_five_people_and_attribute_subset():
    config = SyntheticConfig(num_people=5, attributes=["hobby", "birth_city"], mcq_per_person=2, seed=3)
    bench = generate_synthetic(config)
    check_invariants(bench, config)
    assert config.role_sizes() == {"forget": 1, "retain": 3, "holdout": 1}
    assert {q.attribute for q in bench.get("retain_qa")} == {"hobby", "birth_city"}
    assert bench.metadata["config"]["attributes"] == ["hobby", "birth_city"]


def test_round_trip_through_json(default, tmp_path):
    again = Benchmark.from_dict(json.loads(default.to_json()))
    assert again.to_json() == default.to_json()
    assert again.splits == default.splits
    default.save(tmp_path / "synthetic.json")
    assert Benchmark.load(tmp_path / "synthetic.json").to_json() == default.to_json()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_people": 2}, "num_people"),
        ({"num_people": 5000}, "num_people"),
        ({"num_people": "200"}, "num_people must be an integer"),
        ({"num_people": True}, "num_people must be an integer"),
        ({"forget_fraction": 0.0}, "forget_fraction"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"num_people": 4, "forget_fraction": 0.5, "holdout_fraction": 0.4}, "leave no retain"),
        ({"attributes": ["hobby", "shoe_size"]}, "attributes"),
        ({"attributes": ["hobby", "hobby"], "mcq_per_person": 1}, "attributes"),
        ({"attributes": []}, "attributes"),
        ({"attributes": "hobby"}, "not the string"),
        ({"mcq_per_person": 0}, "mcq_per_person"),
        ({"attributes": ["hobby"]}, "mcq_per_person"),
        ({"num_utility_passages": 0}, "num_utility_passages"),
        ({"num_utility_qa": 229}, "num_utility_qa"),
    ],
)
def test_config_validation(options, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**options)


def test_load_benchmark_registry():
    assert "synthetic" in BENCHMARKS
    assert (
        load_benchmark("synthetic", num_people=5).to_json()
        == generate_synthetic(SyntheticConfig(num_people=5)).to_json()
    )
    with pytest.raises(ValueError, match="unknown benchmark 'tofuu'.*synthetic"):
        load_benchmark("tofuu")
    with pytest.raises(ValueError, match="num_peple"):
        load_benchmark("synthetic", num_peple=5)


def test_vocabularies_are_usable():
    for attribute in ATTRIBUTES.values():
        assert len(set(attribute.values)) == len(attribute.values) >= 20, attribute.key
        assert len(set(attribute.questions)) >= 2 and len(attribute.sentences) >= 2
    name_lists = (FIRST_NAMES, LAST_NAMES, MOTHER_NAMES, FATHER_NAMES, PET_NAMES)
    all_names = [n for names in name_lists for n in names]
    assert len(set(all_names)) == len(all_names)  # no name means two things
