"""`robustunlearn eval` as a user runs it: our metrics and an lm-eval task on local WMDP-layout
questions agree, a GGUF copy of the model scores what the directory scores, and mistakes are
one-line errors."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from helpers import WMDP_TASK
from robustunlearn.cli import main
from robustunlearn.core.models import save_model
from test_cli import assert_one_line_error, run_cli

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'robustunlearn[lm-eval]')",
)
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed")


def run_ok(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *args])
    main()  # returns normally on success (exit code 0)
    captured = capsys.readouterr()
    return captured.out + captured.err


@pytest.fixture(scope="module")
def model_dir(mcq_model, tmp_path_factory):
    return save_model(*mcq_model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def recipe(wmdp_task_dir, tmp_path_factory):
    """benchmark: wmdp on the local questions only (no corpora), multiple choice scored as cloze
    (the wmdp preset's letters overridden) as the lm-eval task helpers.WMDP_TASK scores it."""
    path = tmp_path_factory.mktemp("recipe") / "wmdp-bio.yaml"
    options = {"data_dir": str(wmdp_task_dir), "subsets": ["bio"], "corpora": False}
    recipe = {"benchmark": "wmdp", "benchmark_options": options, "eval": {"mcq_format": "cloze"}}
    path.write_text(json.dumps(recipe), encoding="utf-8")
    return path


@needs_lm_eval
def test_eval_reports_our_metrics_and_lm_eval_alike(monkeypatch, capsys, model_dir, recipe, wmdp_task_dir, tmp_path):
    output = tmp_path / "eval.json"
    printed = run_ok(
        monkeypatch,
        capsys,
        "eval",
        "--config",
        str(recipe),
        "--model",
        str(model_dir),
        "--lm-eval",
        WMDP_TASK,
        "--lm-eval-include",
        str(wmdp_task_dir / "tasks"),
        "--output",
        str(output),
    )
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["benchmark"] == "wmdp" and report["model"] == str(model_dir)
    ours = report["metrics"]["forget_mcq_accuracy"]
    assert report["lm_eval"]["scores"][WMDP_TASK]["acc"] == pytest.approx(ours)
    assert report["lm_eval"]["n_samples"][WMDP_TASK]["effective"] == 8
    assert "forget MCQ acc" in printed and f"lm-eval {WMDP_TASK} acc" in printed
    assert "evaluation: eval preset wmdp" in printed and "mcq_format='cloze'" in printed  # preset and override


@needs_gguf
def test_eval_loads_a_gguf_model(monkeypatch, capsys, mcq_model, model_dir, recipe, tmp_path):
    from test_gguf import write_llama_gguf

    gguf_file = tmp_path / "tiny.gguf"
    write_llama_gguf(*mcq_model, gguf_file)
    scores = {}
    for name, model in (("dir", model_dir), ("gguf", gguf_file)):
        output = tmp_path / f"{name}.json"
        run_ok(monkeypatch, capsys, "eval", "--config", str(recipe), "--model", str(model), "--output", str(output))
        scores[name] = json.loads(output.read_text(encoding="utf-8"))["metrics"]
    assert scores["gguf"] == pytest.approx(scores["dir"])


def test_eval_usage_errors(monkeypatch, capsys, tmp_path):
    code, output = run_cli(monkeypatch, capsys, "eval", "--no-metrics")
    assert code == 2
    assert_one_line_error(output, "--no-metrics", "--lm-eval")
    code, output = run_cli(monkeypatch, capsys, "eval", "--lm-eval-include", str(tmp_path))
    assert code == 2
    assert_one_line_error(output, "--lm-eval-include needs --lm-eval")
    code, output = run_cli(monkeypatch, capsys, "eval", "--model", str(tmp_path / "absent.gguf"))
    assert code == 2
    assert_one_line_error(output, "absent.gguf", "does not exist")
    code, output = run_cli(monkeypatch, capsys, "eval", "--lm-eval", "wmdp_bio", "--output", str(tmp_path))
    assert code == 2
    assert_one_line_error(output, "is a directory")


def test_eval_without_lm_eval_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    cache = tmp_path / "cache"  # preparing the default target would fill it: the check comes first
    code, output = run_cli(
        monkeypatch, capsys, "eval", "--lm-eval", "wmdp_bio", "--no-metrics", "--cache-dir", str(cache)
    )
    assert code == 2
    assert_one_line_error(output, "pip install 'robustunlearn[lm-eval]'")
    assert not cache.exists()
