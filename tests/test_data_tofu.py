import json
from collections import Counter
from pathlib import Path

import pytest

from robustunlearn.core.errors import UserError
from robustunlearn.data import load_benchmark
from robustunlearn.data.base import Benchmark
from robustunlearn.data.tofu import FORGET_SPLITS, author_subject, load_tofu, read_table, tofu_eval_sets

# The real TOFU files live next to the repository (/work/shared/data/tofu for /work/main); a fresh
# clone has no ../shared, so these tests skip there.
TOFU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"
needs_tofu = pytest.mark.skipif(not TOFU_DIR.is_dir(), reason=f"real TOFU files not found at {TOFU_DIR}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pairs(records) -> Counter:
    return Counter((r.question, r.answer) for r in records)


def authors(first: int, count: int) -> list[str]:
    """The subjects of ``count`` authors' rows from author ``first`` on, 20 rows each."""
    return [author_subject(first + i // 20) for i in range(20 * count)]


@pytest.fixture(scope="module")
def tofu01() -> Benchmark:
    return load_tofu(TOFU_DIR, forget_split="forget01")


@pytest.fixture(scope="module")
def tofu_by_split() -> dict[str, Benchmark]:
    return {forget_split: load_tofu(TOFU_DIR, forget_split=forget_split) for forget_split in FORGET_SPLITS}


@needs_tofu
@pytest.mark.parametrize("forget_split", FORGET_SPLITS)
def test_real_forget_and_retain_partition_full(forget_split, tofu_by_split):
    benchmark = tofu_by_split[forget_split]
    forget, retain = pairs(benchmark.get("forget_qa")), pairs(benchmark.get("retain_qa"))
    full = Counter((r["question"], r["answer"]) for r in read_jsonl(TOFU_DIR / "full.json"))
    assert not set(forget) & set(retain)
    assert forget + retain == full
    assert len(benchmark.get("forget_qa")) == {"forget01": 40, "forget05": 200, "forget10": 400}[forget_split]
    assert (
        benchmark.metadata["retain_split"]
        == {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}[forget_split]
    )


@needs_tofu
@pytest.mark.parametrize(("forget_split", "forget_authors"), [("forget01", 2), ("forget05", 10), ("forget10", 20)])
def test_real_subjects_are_the_200_authors_20_questions_each(forget_split, forget_authors, tofu_by_split):
    benchmark = tofu_by_split[forget_split]
    forget, retain = benchmark.get("forget_qa"), benchmark.get("retain_qa")
    # full lists the authors in order: retainYY the first ones, forgetXX the last ones.
    assert [r.subject for r in retain] == authors(0, 200 - forget_authors)
    assert [r.subject for r in forget] == authors(200 - forget_authors, forget_authors)
    assert set(Counter(r.subject for r in forget + retain).values()) == {20}
    assert not {r.subject for r in forget} & {r.subject for r in retain}


@needs_tofu
def test_real_subjects_name_the_author_the_questions_are_about(tofu01):
    by_subject = {}
    for record in tofu01.get("forget_qa") + tofu01.get("retain_qa"):
        by_subject.setdefault(record.subject, []).append(record.question + " " + record.answer)
    assert all("Basil Mahfouz Al-Kuwaiti" in text for text in by_subject["author-198"])
    assert all("Nikolai Abilov" in text for text in by_subject["author-199"])
    assert all("Jaime Vasquez" in text for text in by_subject["author-000"])
    others = [text for subject, texts in by_subject.items() if subject != "author-000" for text in texts]
    assert len(others) == 3980 and not any("Vasquez" in text for text in others)


@needs_tofu
def test_real_perturbed_records_keep_their_authors(tofu01, tmp_path):
    # forget01 without its perturbed file: the plain rows, the same authors in the same order.
    for name in ("forget01", "retain99", "full"):
        (tmp_path / f"{name}.json").symlink_to(TOFU_DIR / f"{name}.json")
    plain = load_tofu(tmp_path, forget_split="forget01").get("forget_qa")
    perturbed = tofu01.get("forget_qa")
    assert [(r.question, r.answer, r.subject) for r in plain] == [(r.question, r.answer, r.subject) for r in perturbed]
    assert not plain[0].perturbed_answers and perturbed[0].perturbed_answers
    # retain_perturbed lists the first 20 authors; its records keep their retain twins' subjects.
    subjects = {(r.question, r.answer): r.subject for r in tofu01.get("retain_qa") if r.perturbed_answers}
    rows = read_jsonl(TOFU_DIR / "retain_perturbed.json")
    assert [subjects[(row["question"], row["answer"])] for row in rows] == authors(0, 20)


@needs_tofu
def test_real_forget_set_carries_perturbed_fields(tofu01):
    rows = read_jsonl(TOFU_DIR / "forget01_perturbed.json")
    forget = tofu01.get("forget_qa")
    assert [r.question for r in forget] == [row["question"] for row in rows]
    assert forget[3].paraphrased_question == rows[3]["paraphrased_question"]
    assert forget[3].paraphrased_answer == rows[3]["paraphrased_answer"]
    assert forget[3].perturbed_answers == tuple(rows[3]["perturbed_answer"])
    assert all(len(r.perturbed_answers) == 5 for r in forget)


@needs_tofu
def test_real_retain_perturbed_enriches_the_training_retain_set(tofu01):
    retain = tofu01.get("retain_qa")
    assert len(retain) == 3960  # all of retain99 is for training, not only the eval subset
    rows = read_jsonl(TOFU_DIR / "retain_perturbed.json")
    enriched = {(r.question, r.answer): r for r in retain if r.perturbed_answers}
    assert len(enriched) == len(rows) == 400
    for row in rows[:50]:
        record = enriched[(row["question"], row["answer"])]
        assert record.perturbed_answers == tuple(row["perturbed_answer"])
        assert record.paraphrased_answer == row["paraphrased_answer"]


@needs_tofu
def test_real_utility_sets_as_qa_and_multiple_choice(tofu01):
    utility_qa, utility_mcq = tofu01.get("utility_qa"), tofu01.get("utility_mcq")
    assert Counter(r.subject for r in utility_qa) == {"real_authors": 100, "world_facts": 117}
    assert Counter(r.subject for r in utility_mcq) == {"real_authors": 100, "world_facts": 117}
    rows = read_jsonl(TOFU_DIR / "world_facts.json")
    mcq = [r for r in utility_mcq if r.subject == "world_facts"]
    assert mcq[2].choices == tuple(rows[2][f"option{k}"] for k in range(1, 5))
    assert mcq[2].choices[mcq[2].answer_index] == rows[2]["answer"] == "Canberra"
    # The QA view of the same question: the true answer plus the three wrong options.
    qa = [r for r in utility_qa if r.subject == "world_facts"][2]
    assert qa.answer == "Canberra" and set(qa.perturbed_answers) == set(mcq[2].choices) - {"Canberra"}


@needs_tofu
def test_real_eval_sets_are_the_records_with_perturbed_answers(tofu01):
    sets = tofu_eval_sets(tofu01)
    assert {name: len(records) for name, records in sets.items()} == {
        "forget": 40,
        "retain": 400,
        "real_authors": 100,
        "world_facts": 117,
    }
    assert all(r.perturbed_answers for records in sets.values() for r in records)


@needs_tofu
def test_real_bundle_round_trips_through_json(tofu01):
    assert Benchmark.from_dict(json.loads(tofu01.to_json())).to_json() == tofu01.to_json()


# ---- small invented files in the TOFU layout, for the error paths -----------------------------


def qa_row(n: int, **extra) -> dict:
    return {"question": f"Question {n}?", "answer": f"Answer {n}.", **extra}


def perturbed_row(n: int) -> dict:
    return qa_row(
        n,
        paraphrased_answer=f"It is {n}.",
        perturbed_answer=[f"Wrong {n}a.", f"Wrong {n}b."],
        paraphrased_question=f"Which question is {n}?",
    )


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def tiny(tmp_path) -> Path:
    """Three authors of 20 questions in TOFU's layout: questions 0-39 (authors 0 and 1) are retained
    (retain99), 40-59 (author 2) forgotten (forget01); 1 and 2 are evaluated (retain_perturbed)."""
    write_jsonl(tmp_path / "full.json", [qa_row(n) for n in range(60)])
    write_jsonl(tmp_path / "forget01.json", [qa_row(n) for n in range(40, 60)])
    write_jsonl(tmp_path / "forget01_perturbed.json", [perturbed_row(n) for n in range(40, 60)])
    write_jsonl(tmp_path / "retain99.json", [qa_row(n) for n in range(40)])
    write_jsonl(tmp_path / "retain_perturbed.json", [perturbed_row(1), perturbed_row(2)])
    write_jsonl(
        tmp_path / "real_authors.json",
        [{"question": "Who wrote X?", "option1": "A", "option2": "B", "option3": "C", "answer": "C"}],
    )
    write_jsonl(
        tmp_path / "real_authors_perturbed.json",
        [{"question": "Who wrote X?", "answer": "C", "perturbed_answer": ["A", "B"]}],
    )
    return tmp_path


def test_tiny_layout_maps_to_splits(tiny):
    benchmark = load_benchmark("tofu", data_dir=tiny, forget_split="forget01")
    assert benchmark.summary() == {"forget_qa": 20, "retain_qa": 40, "utility_mcq": 1, "utility_qa": 1}
    retain = benchmark.get("retain_qa")
    assert [n for n, r in enumerate(retain) if r.perturbed_answers] == [1, 2]
    assert retain[2].perturbed_answers == ("Wrong 2a.", "Wrong 2b.")
    assert benchmark.get("utility_mcq")[0].answer_index == 2
    assert set(tofu_eval_sets(benchmark)) == {"forget", "retain", "real_authors"}


def test_tiny_subjects_are_authors_by_block_of_20(tiny):
    benchmark = load_tofu(tiny, forget_split="forget01")
    retain, forget = benchmark.get("retain_qa"), benchmark.get("forget_qa")
    assert [r.subject for r in retain] == ["author-000"] * 20 + ["author-001"] * 20
    assert [r.subject for r in forget] == ["author-002"] * 20
    assert retain[19].question == "Question 19?" and retain[20].question == "Question 20?"
    # The enriched retain_perturbed records keep their twins' author.
    assert [r.subject for r in retain if r.perturbed_answers] == ["author-000", "author-000"]
    assert [r.subject for r in benchmark.get("utility_qa") + benchmark.get("utility_mcq")] == ["real_authors"] * 2


def test_tiny_plain_and_perturbed_forget_files_give_the_same_authors(tiny):
    perturbed = load_tofu(tiny, forget_split="forget01").get("forget_qa")
    (tiny / "forget01_perturbed.json").unlink()
    plain = load_tofu(tiny, forget_split="forget01").get("forget_qa")
    assert [(r.question, r.subject) for r in plain] == [(r.question, r.subject) for r in perturbed]


def test_forget_authors_follow_the_retain_authors_without_full(tiny):
    (tiny / "full.json").unlink()
    write_jsonl(tiny / "retain99.json", [qa_row(n) for n in range(20)])
    write_jsonl(tiny / "retain_perturbed.json", [perturbed_row(1)])
    benchmark = load_tofu(tiny, forget_split="forget01")
    assert {r.subject for r in benchmark.get("retain_qa")} == {"author-000"}
    assert {r.subject for r in benchmark.get("forget_qa")} == {"author-001"}


@pytest.mark.parametrize(("name", "rows"), [("retain99", 39), ("forget01_perturbed", 19)])
def test_a_file_not_in_blocks_of_20_is_named(tiny, name, rows):
    lines = (tiny / f"{name}.json").read_text(encoding="utf-8").splitlines(keepends=True)
    (tiny / f"{name}.json").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(UserError, match=rf"{name}\.json has {rows} rows, not a multiple of 20"):
        load_tofu(tiny, forget_split="forget01")


def test_full_must_list_the_authors_in_order(tiny):
    # Same questions, forget author first: the authors read from places would be wrong.
    write_jsonl(tiny / "full.json", [qa_row(n) for n in [*range(40, 60), *range(40)]])
    with pytest.raises(UserError, match=r"full\.json, line 1: expected 'Question 0\?' here"):
        load_tofu(tiny, forget_split="forget01")


def test_plain_forget_file_is_used_without_the_perturbed_one(tiny):
    (tiny / "forget01_perturbed.json").unlink()
    benchmark = load_tofu(tiny, forget_split="forget01")
    assert benchmark.get("forget_qa")[0].perturbed_answers == ()
    assert "forget" not in tofu_eval_sets(benchmark)


def test_unknown_forget_split_names_the_accepted_ones(tiny):
    with pytest.raises(ValueError, match=r"'forget02'.*forget01.*forget05.*forget10"):
        load_tofu(tiny, forget_split="forget02")


def test_unknown_option_is_rejected_by_name(tiny):
    with pytest.raises(ValueError, match=r"\['split'\] for benchmark 'tofu'"):
        load_benchmark("tofu", data_dir=tiny, split="forget01")


def test_missing_retain_file_is_named(tiny):
    (tiny / "retain99.json").unlink()
    with pytest.raises(UserError, match=r"retain99\.json"):
        load_tofu(tiny, forget_split="forget01")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        load_tofu(tmp_path / "nowhere", forget_split="forget01")


def test_forget_and_retain_must_be_disjoint(tiny):
    write_jsonl(tiny / "retain99.json", [qa_row(n) for n in range(60)])
    with pytest.raises(UserError, match=r"share 20 question.*'Question 40\?'"):
        load_tofu(tiny, forget_split="forget01")


def test_forget_and_retain_must_partition_full(tiny):
    write_jsonl(tiny / "retain99.json", [qa_row(n) for n in range(20)])
    with pytest.raises(
        UserError, match=r"do not partition .*full\.json: 20 of its questions are in neither.*'Question 20\?'"
    ):
        load_tofu(tiny, forget_split="forget01")


def test_malformed_field_names_file_line_and_field(tiny):
    rows = [qa_row(n) for n in range(40)]
    rows[2] = {"question": "Question 2?", "answer": 2}
    write_jsonl(tiny / "retain99.json", rows)
    with pytest.raises(UserError, match=r"retain99\.json, line 3: field 'answer' must be a non-empty string"):
        load_tofu(tiny, forget_split="forget01")


def test_perturbed_answer_must_be_a_list(tiny):
    rows = [perturbed_row(n) for n in range(40, 60)]
    rows[0] |= {"perturbed_answer": "Wrong."}
    write_jsonl(tiny / "forget01_perturbed.json", rows)
    with pytest.raises(
        UserError,
        match=r"forget01_perturbed\.json, line 1: field 'perturbed_answer' must be a non-empty list",
    ):
        load_tofu(tiny, forget_split="forget01")


def test_invalid_json_line_is_named(tiny):
    (tiny / "full.json").write_text('{"question": "Q?", "answer": "A."}\n{"question": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"full\.json, line 2: not valid JSON"):
        load_tofu(tiny, forget_split="forget01")


def test_retain_perturbed_outside_the_retain_set_is_an_error(tiny):
    write_jsonl(tiny / "retain_perturbed.json", [perturbed_row(1), perturbed_row(40)])
    with pytest.raises(
        UserError, match=r"retain_perturbed\.json, line 2: question 'Question 40\?'.*not in the retain set"
    ):
        load_tofu(tiny, forget_split="forget01")


def test_multiple_choice_answer_must_be_an_option(tiny):
    write_jsonl(
        tiny / "real_authors.json",
        [{"question": "Who wrote X?", "option1": "A", "option2": "B", "answer": "Z"}],
    )
    with pytest.raises(UserError, match=r"real_authors\.json, line 1: field 'answer' 'Z' is none of the options"):
        load_tofu(tiny, forget_split="forget01")


def test_json_array_files_are_read_too(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([qa_row(1), qa_row(2)], indent=1), encoding="utf-8")
    table = read_table(path)
    assert [where for where, _ in table.rows] == ["index 0", "index 1"]
    assert table.rows[1][1] == qa_row(2)


def test_hub_configs_are_requested_and_mapped_like_local_files(tiny, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return read_jsonl(tiny / f"{config}.json") if (tiny / f"{config}.json").exists() else []

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_tofu(forget_split="forget01")
    assert {c[0] for c in calls} == {"locuslab/TOFU"} and {c[2] for c in calls} == {"train"}
    assert {"forget01_perturbed", "retain99", "full", "retain_perturbed", "real_authors"} <= {c[1] for c in calls}
    assert from_hub.splits == load_tofu(tiny, forget_split="forget01").splits
    assert from_hub.metadata["source"] == "hub:locuslab/TOFU"
