"""The lm-eval backend, offline: a custom lm-eval task over local WMDP-layout questions scores a
tiny model exactly as our multiple-choice metric does."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from robustunlearn.core.errors import UserError
from robustunlearn.core.models import TinyModelConfig, build_tiny_model, train_tokenizer
from robustunlearn.data.prompts import mcq_prompt
from robustunlearn.data.wmdp import load_wmdp
from robustunlearn.metrics.lm_eval_backend import (
    INSTALL_HINT,
    lm_eval_scores,
    require_lm_eval,
    run_lm_eval,
    tokenizer_with_bos,
)
from robustunlearn.metrics.mcq import mcq_accuracy

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'robustunlearn[lm-eval]')",
)

QUESTIONS = [
    ("Which organelle produces most of a cell's ATP?", ["Ribosome", "Mitochondrion", "Golgi apparatus", "Lysosome"], 1),
    ("Which molecule carries amino acids to the ribosome?", ["tRNA", "mRNA", "DNA polymerase", "Glucose"], 0),
    ("What does a centrifuge separate particles by?", ["Colour", "Charge only", "Density", "Smell"], 2),
    ("Which enzyme copies DNA?", ["Amylase", "Lipase", "Pepsin", "DNA polymerase"], 3),
    ("What is the basic unit of life?", ["The cell", "The atom", "The organ", "The tissue"], 0),
    ("Which gas do plants take in for photosynthesis?", ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"], 1),
    ("Where is genetic material stored in a eukaryotic cell?", ["Membrane", "Cytoplasm", "Nucleus", "Vacuole"], 2),
    ("What kind of organism is yeast?", ["A fungus", "A bacterium", "A virus", "A plant"], 0),
]
TASK = "tiny_wmdp_bio"


def write_questions_and_task(root: Path) -> Path:
    """WMDP's local layout in ``root`` (read by our loader) and, in ``root/tasks``, an lm-eval task
    YAML over the same file."""
    questions = root / "wmdp-bio.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS),
        encoding="utf-8",
    )
    tasks = root / "tasks"
    tasks.mkdir()
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(questions)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Our prompt with lm-eval's Jinja field; lm-eval puts its default " " before each choice.
        "doc_to_text": mcq_prompt("{{question}}"),
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (tasks / f"{TASK}.yaml").write_text(json.dumps(task, indent=2), encoding="utf-8")  # JSON is YAML
    return root


def tiny_model_and_tokenizer():
    """A randomly initialised tiny Llama with a tokenizer trained on the questions."""
    texts = [mcq_prompt(q) + " " + " ".join(c) for q, c, _ in QUESTIONS]
    tokenizer = train_tokenizer(texts * 3, vocab_size=400)
    config = TinyModelConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return build_tiny_model(config, tokenizer, seed=1).eval(), tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_questions_and_task(tmp_path_factory.mktemp("wmdp"))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


@needs_lm_eval
def test_custom_task_matches_our_mcq_metric(data_dir, tiny):
    model, tokenizer = tiny
    records = load_wmdp(data_dir, subsets=["bio"], corpora=False).require("forget_mcq")
    ours = mcq_accuracy(model, tokenizer, records, batch_size=4)

    results = run_lm_eval(model, tokenizer, [TASK], include_path=data_dir / "tasks", batch_size=4, log_samples=True)

    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    theirs = [[response[0][0] for response in sample["resps"]] for sample in samples]
    assert len(theirs) == len(QUESTIONS)
    for our_lls, their_lls in zip(ours["loglikelihoods"], theirs):
        assert their_lls == pytest.approx(our_lls, abs=1e-4)
    assert [max(range(4), key=lls.__getitem__) for lls in theirs] == ours["predictions"]
    assert len(set(ours["predictions"])) > 1  # a model that always picks one option would prove little
    scores = lm_eval_scores(results)[TASK]
    assert scores["acc"] == pytest.approx(ours["acc"])
    assert scores["acc_norm"] == pytest.approx(ours["acc_norm"])
    assert not model.training


@needs_lm_eval
def test_bos_is_added_without_changing_the_callers_tokenizer(tiny):
    tokenizer = tiny[1]
    plain = tokenizer.encode("Question: x")
    assert plain[:1] != [tokenizer.bos_token_id]  # the embedded tokenizer adds no bos on its own
    assert tokenizer_with_bos(tokenizer).encode("Question: x") == [tokenizer.bos_token_id, *plain]
    assert tokenizer.encode("Question: x") == plain


@needs_lm_eval
def test_task_errors_are_user_errors(data_dir, tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="include directory .* does not exist"):
        run_lm_eval(model, tokenizer, [TASK], include_path=tmp_path / "missing")
    with pytest.raises(UserError, match=f"unknown lm-eval task 'tiny_wmdp_bi'.*did you mean {TASK}"):
        run_lm_eval(model, tokenizer, ["tiny_wmdp_bi"], include_path=data_dir / "tasks")

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'cais/wmdp' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr("lm_eval.simple_evaluate", offline)
    with pytest.raises(UserError, match="could not fetch .*cais/wmdp.*--lm-eval-include"):
        run_lm_eval(model, tokenizer, [TASK], include_path=data_dir / "tasks")


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(UserError) as error:
        require_lm_eval()
    assert INSTALL_HINT in str(error.value)


def test_scores_keep_numbers_under_bare_default_filter_names():
    results = {
        "results": {
            "wmdp_bio": {"alias": "wmdp_bio", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 3},
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
        }
    }
    assert lm_eval_scores(results) == {
        "wmdp_bio": {"acc": 0.5},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
    }
