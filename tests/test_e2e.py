"""The README's main job on a tiny configuration, through the CLI."""

from __future__ import annotations

import json
import sys

import pytest

from robustunlearn.cli import main
from robustunlearn.pipeline import METRIC_COLUMNS

TINY_RECIPE = """
seed: 0
data: {num_people: 6, num_utility_passages: 4, num_utility_qa: 2}
model: {vocab_size: 400, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4}
train: {lr: 1.0e-2, max_epochs: 60, batch_tokens: 256, check_every_epochs: 10}
unlearn: {objective: npo, optimizer: adamw, lr: 1.0e-3, steps: 4, batch_size: 4}
eval: {max_examples: 12, verbmem_max_new_tokens: 16}
"""


@pytest.mark.slow
def test_run_writes_results_with_every_key(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    output = tmp_path / "out"
    monkeypatch.setattr(
        sys, "argv",
        ["robustunlearn", "run", "--config", str(recipe), "--output-dir", str(output), "--cache-dir", str(tmp_path / "cache")],
    )
    main()
    printed = capsys.readouterr().out
    assert all(title in printed for title in METRIC_COLUMNS.values())

    results = json.loads((output / "results.json").read_text())
    assert set(results) == {"settings", "benchmark", "prepare", "unlearn", "quantization", "scores", "seconds"}
    assert set(results["scores"]) == {"target", "retrain", "unlearned", "unlearned+rtn-int4", "target+rtn-int4"}
    for name, metrics in results["scores"].items():
        assert set(metrics) == set(METRIC_COLUMNS), name
        assert all(0 <= v <= 1 for k, v in metrics.items() if k != "utility_perplexity"), name
    assert results["unlearn"]["steps"] == 4
    assert results["settings"]["unlearn"]["objective"] == "npo"
    assert results["prepare"]["target"]["parameters"] > 0
    assert (output / "unlearn" / "final" / "model.safetensors").exists()
    assert len((output / "unlearn" / "log.jsonl").read_text().splitlines()) == 4
