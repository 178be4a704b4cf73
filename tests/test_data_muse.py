import json
import shutil
from pathlib import Path

import pytest

from robustunlearn.core.errors import UserError
from robustunlearn.data import load_benchmark
from robustunlearn.data.base import QA, Benchmark, Continuation, Passage
from robustunlearn.data.muse import (
    chunk_text,
    few_shot_examples,
    load_muse,
    privleak_sets,
)

FIXTURE = Path(__file__).parent / "fixtures" / "muse" / "news"


@pytest.fixture
def news(tmp_path) -> Path:
    """A writable copy of the fixture, for the error cases."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "news"))


def test_fixture_maps_to_splits():
    benchmark = load_benchmark("muse", data_dir=FIXTURE)
    assert benchmark.name == "muse-news"
    assert benchmark.summary() == {
        "forget_qa": 3,
        "forget_text": 1,
        "forget_verbmem": 3,
        "holdout_text": 1,
        "retain_qa": 2,
        "retain_text": 1,
    }
    forget_txt = (FIXTURE / "raw" / "forget.txt").read_text(encoding="utf-8")
    assert benchmark.get("forget_text") == [Passage(forget_txt.strip(), "forget")]
    verbmem = json.loads((FIXTURE / "verbmem" / "forget.json").read_text(encoding="utf-8"))
    assert benchmark.get("forget_verbmem")[1] == Continuation(verbmem[1]["prompt"], verbmem[1]["gt"])
    assert benchmark.get("retain_qa")[1] == QA(
        "Who scored two goals for Velmora Rovers in the semi-final?", "Mirela Hast"
    )
    assert Benchmark.from_dict(json.loads(benchmark.to_json())).to_json() == benchmark.to_json()


def test_few_shot_examples_and_privleak_texts_read_back_as_records():
    benchmark = load_muse(FIXTURE)
    assert few_shot_examples(benchmark, "forget_qa") == [
        QA("Which river runs through Velmora?", "The Ilse"),
        QA("What is the emblem of Velmora?", "The heron"),
    ]
    assert len(few_shot_examples(benchmark, "retain_qa")) == 1
    sets = privleak_sets(benchmark)
    assert {name: len(texts) for name, texts in sets.items()} == {"forget": 2, "retain": 1, "holdout": 2}
    assert sets["holdout"][0].text.startswith("Engineers in the mountain town of Brask")
    with pytest.raises(ValueError, match="forget_qa"):
        few_shot_examples(benchmark, "holdout_qa")


def test_retain2_joins_retain_text_on_request():
    benchmark = load_muse(FIXTURE, retain_sets=("retain1", "retain2"))
    assert [p.subject for p in benchmark.get("retain_text")] == ["retain1", "retain2"]
    assert "Mirela Hast" in benchmark.get("retain_text")[1].text


def test_repository_data_directory_is_accepted_with_the_corpus_name():
    assert load_muse(FIXTURE.parent, corpus="news").splits == load_muse(FIXTURE).splits


def test_documents_are_chunked_to_chunk_chars_without_losing_words():
    benchmark = load_muse(FIXTURE, chunk_chars=200)
    passages = benchmark.get("forget_text")
    assert len(passages) > 1 and all(len(p.text) <= 200 for p in passages)
    original = (FIXTURE / "raw" / "forget.txt").read_text(encoding="utf-8")
    assert " ".join(p.text for p in passages).split() == original.split()


def test_chunk_text_packs_paragraphs_and_cuts_long_ones():
    text = "One two.\n\nThree four.\n\n" + "word " * 30
    chunks = chunk_text(text, 30)
    assert chunks[0] == "One two.\n\nThree four."  # two short paragraphs share a passage
    assert all(len(c) <= 30 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    assert chunk_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # one long word: cut anywhere
    assert chunk_text("  a\n\nb  ", None) == ["a\n\nb"]
    assert chunk_text(" \n ", 10) == []


def test_jsonl_rows_from_a_hub_export_are_documents(news):
    (news / "raw" / "forget.txt").unlink()
    rows = [{"text": "First article.\n\nIt has two paragraphs."}, {"text": "Second article."}]
    (news / "raw" / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    benchmark = load_muse(news, chunk_chars=None)
    assert [p.text for p in benchmark.get("forget_text")] == [rows[0]["text"], rows[1]["text"]]


def test_optional_tables_may_be_absent(news):
    shutil.rmtree(news / "knowmem")
    shutil.rmtree(news / "privleak")
    benchmark = load_muse(news)
    assert "forget_qa" not in benchmark.splits
    assert few_shot_examples(benchmark, "forget_qa") == [] and privleak_sets(benchmark) == {}


def test_missing_forget_file_is_named(news):
    (news / "raw" / "forget.txt").unlink()
    with pytest.raises(UserError, match=r"missing .*raw/forget\.txt"):
        load_muse(news)


def test_missing_requested_retain2_is_named(news):
    (news / "raw" / "retain2.txt").unlink()
    load_muse(news)  # retain2 is not needed by default
    with pytest.raises(UserError, match=r"raw/retain2\.txt"):
        load_muse(news, retain_sets=("retain1", "retain2"))


def test_verbmem_record_missing_gt_names_file_index_and_field(news):
    path = news / "verbmem" / "forget.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    del rows[1]["gt"]
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(UserError, match=r"verbmem/forget\.json, index 1: missing field 'gt'"):
        load_muse(news)


def test_privleak_item_of_the_wrong_type_is_named(news):
    (news / "privleak" / "holdout.json").write_text('["fine text", 42]', encoding="utf-8")
    with pytest.raises(UserError, match=r"privleak/holdout\.json, index 1: expected a JSON object, got int"):
        load_muse(news)


def muse_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "robustunlearn.data.muse"]


def test_empty_texts_are_skipped_with_one_warning_counting_them(news, caplog):
    # Real MUSE files hold empty articles; one of them used to refuse the whole benchmark.
    (news / "raw" / "forget.txt").unlink()
    rows = ["First article.", "", "Second article.", "  \n", {"text": None}]
    (news / "raw" / "forget.json").write_text(json.dumps(rows), encoding="utf-8")
    (news / "privleak" / "holdout.json").write_text(json.dumps(["A holdout text.", ""]), encoding="utf-8")
    benchmark = load_muse(news, chunk_chars=None)
    assert [p.text for p in benchmark.get("forget_text")] == ["First article.", "Second article."]
    assert [p.text for p in privleak_sets(benchmark)["holdout"]] == ["A holdout text."]
    [message] = muse_warnings(caplog)
    assert "skipped 4 empty text(s)" in message and "\n" not in message
    assert message.endswith(f"3 in {news / 'raw' / 'forget.json'}, 1 in {news / 'privleak' / 'holdout.json'}")


def test_clean_data_loads_without_warnings(caplog):
    load_muse(FIXTURE)
    assert muse_warnings(caplog) == []


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"title": "no text"}], r"raw/forget\.json, index 0: missing field 'text'"),
        ([{"text": 42}], r"raw/forget\.json, index 0: field 'text' must be a non-empty string"),
        (["fine", 42], r"raw/forget\.json, index 1: expected a JSON object, got int"),
        (["", " "], r"raw/forget\.json has no non-empty text"),
    ],
)
def test_malformed_or_all_empty_text_rows_are_refused(news, rows, message):
    (news / "raw" / "forget.txt").unlink()
    (news / "raw" / "forget.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_muse(news)


def older_layout(tmp_path: Path) -> Path:
    """The fixture as some mirrors ship it: the repository's older table names, raw documents as
    JSON arrays of strings."""
    older = Path(shutil.copytree(FIXTURE, tmp_path / "older"))
    for path in (older / "raw").glob("*.txt"):
        path.with_suffix(".json").write_text(json.dumps([path.read_text(encoding="utf-8")]), encoding="utf-8")
        path.unlink()
    (older / "knowmem" / "retain_qa.json").rename(older / "knowmem" / "retain2_qa.json")
    (older / "knowmem" / "retain_qa_icl.json").rename(older / "knowmem" / "retain2_qa_icl.json")
    (older / "privleak" / "retain.json").rename(older / "privleak" / "retain2.json")
    return older


def test_both_layouts_load_to_the_same_benchmark(tmp_path, caplog):
    retain_sets = ("retain1", "retain2")
    current = load_muse(FIXTURE, retain_sets=retain_sets)
    assert muse_warnings(caplog) == []
    older = load_muse(older_layout(tmp_path), retain_sets=retain_sets)
    assert older.splits == current.splits
    assert "retain_qa" in older.splits
    assert older.metadata["few_shot"] == current.metadata["few_shot"]
    assert older.metadata["privleak"] == current.metadata["privleak"]
    [message] = muse_warnings(caplog)
    assert message.endswith(
        "older layout: reading knowmem/retain2_qa as knowmem/retain_qa, "
        "knowmem/retain2_qa_icl as knowmem/retain_qa_icl, privleak/retain2 as privleak/retain"
    )


def test_a_mix_of_both_layouts_is_refused(tmp_path):
    mixed = older_layout(tmp_path)
    shutil.copy(FIXTURE / "knowmem" / "retain_qa.json", mixed / "knowmem" / "retain_qa.json")
    with pytest.raises(
        UserError, match=r"mixes the current layout \(knowmem/retain_qa\) and the older one \(knowmem/retain2_qa, "
    ):
        load_muse(mixed)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"corpus": "poems"}, r"'poems'.*news.*books"),
        ({"retain_sets": ("retain3",)}, r"retain1.*retain2.*retain3"),
        ({"retain_sets": ()}, r"retain_sets"),
        ({"chunk_chars": 0}, r"chunk_chars.*0"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        load_muse(FIXTURE, **options)


def test_hub_configs_and_splits_are_requested(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        path = next((FIXTURE / config).glob(f"{split}.*"))
        if path.suffix == ".txt":
            return [{"text": path.read_text(encoding="utf-8")}]
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [{"text": r} if isinstance(r, str) else r for r in rows]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_muse(corpus="news")
    assert {c[0] for c in calls} == {"muse-bench/MUSE-News"}
    assert {(c[1], c[2]) for c in calls} == {
        ("raw", "forget"),
        ("raw", "retain1"),
        ("raw", "holdout"),
        ("verbmem", "forget"),
        ("knowmem", "forget_qa"),
        ("knowmem", "retain_qa"),
        ("knowmem", "forget_qa_icl"),
        ("knowmem", "retain_qa_icl"),
        ("privleak", "forget"),
        ("privleak", "retain"),
        ("privleak", "holdout"),
    }
    local = load_muse(FIXTURE)
    assert from_hub.splits == local.splits
    assert from_hub.metadata["privleak"] == local.metadata["privleak"]
