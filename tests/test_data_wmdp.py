import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from robustunlearn.core.errors import UserError
from robustunlearn.data import load_benchmark
from robustunlearn.data.base import Benchmark, MultipleChoice
from robustunlearn.data.wmdp import load_wmdp

FIXTURE = Path(__file__).parent / "fixtures" / "wmdp"


@pytest.fixture
def wmdp(tmp_path) -> Path:
    """A writable copy of the fixture, for the error cases."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "wmdp"))


def test_fixture_maps_to_splits():
    benchmark = load_benchmark("wmdp", data_dir=FIXTURE, subsets=("bio", "cyber"))
    assert benchmark.summary() == {"forget_mcq": 5, "forget_text": 5, "retain_text": 4}
    assert benchmark.get("forget_mcq")[0] == MultipleChoice(
        "Which organelle produces most of a cell's ATP?",
        ("Ribosome", "Mitochondrion", "Golgi apparatus", "Lysosome"),
        1,
        "bio",
    )
    assert Counter(r.subject for r in benchmark.get("forget_mcq")) == {"bio": 3, "cyber": 2}
    assert Counter(p.subject for p in benchmark.get("retain_text")) == {"bio": 2, "cyber": 2}
    assert Benchmark.from_dict(json.loads(benchmark.to_json())).to_json() == benchmark.to_json()


def test_corpus_lines_may_be_objects_json_strings_or_plain_text():
    texts = [p.text for p in load_wmdp(FIXTURE, subsets=("cyber",)).get("forget_text")]
    assert texts == [
        "Transport Layer Security encrypts web traffic between a browser and a server.",
        "A JSON string line: certificates bind a public key to a domain name.",
        "Port scanners list the services that answer on a host's network ports.",
    ]
    bio = load_wmdp(FIXTURE, subsets=("bio",)).get("forget_text")
    assert bio[0].text.startswith("Cellular respiration") and "title" not in bio[0].text


def test_chem_has_questions_but_no_corpora():
    assert load_wmdp(FIXTURE, subsets="chem").summary() == {"forget_mcq": 2}


def test_corpora_off_loads_questions_only_and_skips_missing_corpora(wmdp):
    (wmdp / "bio-forget-corpus.jsonl").unlink()
    assert load_wmdp(wmdp, subsets=("bio",), corpora=False).summary() == {"forget_mcq": 3}
    with pytest.raises(UserError, match=r"bio-forget-corpus\.jsonl \(it is gated.*corpora=False"):
        load_wmdp(wmdp, subsets=("bio",))


def test_long_documents_are_chunked_and_max_documents_caps_each_corpus():
    chunked = load_wmdp(FIXTURE, subsets=("bio",), chunk_chars=60).get("forget_text")
    assert len(chunked) > 2 and all(len(p.text) <= 60 for p in chunked)
    capped = load_wmdp(FIXTURE, subsets=("bio", "cyber"), max_documents=1)
    assert Counter(p.subject for p in capped.get("forget_text")) == {"bio": 1, "cyber": 1}
    assert len(capped.get("forget_mcq")) == 5  # questions are never capped


def test_answer_index_out_of_range_names_file_line_and_field(wmdp):
    path = wmdp / "wmdp-bio.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[1]) | {"answer": 4}
    path.write_text("\n".join([lines[0], json.dumps(row), lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"wmdp-bio\.jsonl, line 2: field 'answer' is 4, out of range for 4 choices"):
        load_wmdp(wmdp, subsets=("bio",))


def test_answer_must_be_an_integer_index(wmdp):
    rows = json.loads((wmdp / "wmdp-cyber.json").read_text(encoding="utf-8"))
    rows[1]["answer"] = "A"
    (wmdp / "wmdp-cyber.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(UserError, match=r"wmdp-cyber\.json, index 1: field 'answer' must be an integer"):
        load_wmdp(wmdp, subsets=("cyber",))


def test_choices_must_be_a_list_of_strings(wmdp):
    (wmdp / "wmdp-chem.jsonl").write_text(
        json.dumps({"question": "Q?", "choices": "A, B", "answer": 0}) + "\n", encoding="utf-8"
    )
    with pytest.raises(UserError, match=r"wmdp-chem\.jsonl, line 1: field 'choices' must be a non-empty list"):
        load_wmdp(wmdp, subsets=("chem",))


def test_broken_json_object_line_in_a_corpus_is_an_error(wmdp):
    path = wmdp / "wmdp-corpora" / "cyber-retain-corpus.jsonl"
    path.write_text('A plain line is fine.\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"cyber-retain-corpus\.jsonl, line 2: not valid JSON"):
        load_wmdp(wmdp, subsets=("cyber",))


def test_missing_question_file_is_named(wmdp):
    (wmdp / "wmdp-cyber.json").unlink()
    with pytest.raises(UserError, match=r"wmdp-cyber\.json"):
        load_wmdp(wmdp, subsets=("cyber",))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"subsets": ("bio", "physics")}, r"bio.*cyber.*chem.*physics"),
        ({"subsets": ("bio", "bio")}, r"distinct"),
        ({"max_documents": 0}, r"max_documents.*0"),
        ({"chunk_chars": -5}, r"chunk_chars"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        load_wmdp(FIXTURE, **options)


def test_hub_names_configs_and_splits(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "cais/wmdp":
            return [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 3}]
        return [{"text": f"{name} {config} document"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    benchmark = load_wmdp(subsets=("bio", "cyber"), max_documents=100)
    assert set(calls) == {
        ("cais/wmdp", "wmdp-bio", "test"),
        ("cais/wmdp", "wmdp-cyber", "test"),
        ("cais/wmdp-bio-forget-corpus", None, "train[:100]"),
        ("cais/wmdp-corpora", "bio-retain-corpus", "train[:100]"),
        ("cais/wmdp-corpora", "cyber-forget-corpus", "train[:100]"),
        ("cais/wmdp-corpora", "cyber-retain-corpus", "train[:100]"),
    }
    assert benchmark.summary() == {"forget_mcq": 2, "forget_text": 2, "retain_text": 2}


def test_hub_failure_becomes_a_user_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(name, config, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"could not load hub dataset cais/wmdp config wmdp-bio split test: no network"):
        load_wmdp(subsets=("bio",))
