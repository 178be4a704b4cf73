"""The lm-eval backend, offline: a custom lm-eval task over local WMDP-layout questions scores a
tiny model exactly as our multiple-choice metric does."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from helpers import WMDP_QUESTIONS, WMDP_TASK
from robustunlearn.core.errors import UserError
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


@needs_lm_eval
def test_custom_task_matches_our_mcq_metric(wmdp_task_dir, mcq_model):
    model, tokenizer = mcq_model
    records = load_wmdp(wmdp_task_dir, subsets=["bio"], corpora=False).require("forget_mcq")
    ours = mcq_accuracy(model, tokenizer, records, batch_size=4)

    results = run_lm_eval(
        model, tokenizer, [WMDP_TASK], include_path=wmdp_task_dir / "tasks", batch_size=4, log_samples=True
    )

    samples = sorted(results["samples"][WMDP_TASK], key=lambda sample: sample["doc_id"])
    theirs = [[response[0][0] for response in sample["resps"]] for sample in samples]
    assert len(theirs) == len(WMDP_QUESTIONS)
    for our_lls, their_lls in zip(ours["loglikelihoods"], theirs):
        assert their_lls == pytest.approx(our_lls, abs=1e-4)
    assert [max(range(4), key=lls.__getitem__) for lls in theirs] == ours["predictions"]
    assert len(set(ours["predictions"])) > 1  # a model that always picks one option would prove little
    scores = lm_eval_scores(results)[WMDP_TASK]
    assert scores["acc"] == pytest.approx(ours["acc"])
    assert scores["acc_norm"] == pytest.approx(ours["acc_norm"])
    assert not model.training


@needs_lm_eval
def test_bos_is_added_without_changing_the_callers_tokenizer(mcq_model):
    tokenizer = mcq_model[1]
    plain = tokenizer.encode("Question: x")
    assert plain[:1] != [tokenizer.bos_token_id]  # the embedded tokenizer adds no bos on its own
    assert tokenizer_with_bos(tokenizer).encode("Question: x") == [tokenizer.bos_token_id, *plain]
    assert tokenizer.encode("Question: x") == plain


@needs_lm_eval
def test_task_errors_are_user_errors(wmdp_task_dir, mcq_model, tmp_path, monkeypatch):
    model, tokenizer = mcq_model
    with pytest.raises(UserError, match="include directory .* does not exist"):
        run_lm_eval(model, tokenizer, [WMDP_TASK], include_path=tmp_path / "missing")
    with pytest.raises(UserError, match=f"unknown lm-eval task 'tiny_wmdp_bi'.*did you mean {WMDP_TASK}"):
        run_lm_eval(model, tokenizer, ["tiny_wmdp_bi"], include_path=wmdp_task_dir / "tasks")

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'cais/wmdp' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr("lm_eval.simple_evaluate", offline)
    with pytest.raises(UserError, match="could not fetch .*cais/wmdp.*--lm-eval-include"):
        run_lm_eval(model, tokenizer, [WMDP_TASK], include_path=wmdp_task_dir / "tasks")


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
