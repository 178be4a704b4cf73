"""TOFU forget01 end to end with the tiny model trained from scratch (slow; needs ../shared/data/tofu)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from robustunlearn.cli import main

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"

RECIPE = """
seed: 0
model: {vocab_size: 1024, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4}
train: {lr: 3.0e-3, max_epochs: 1, batch_tokens: 4096, check_every_epochs: 1}
unlearn: {lr: 1.0e-3, batch_size: 4}
eval: {max_examples: 16, max_new_tokens: 16, tofu_max_new_tokens: 16}
study:
  attacks: [rtn-int4]
  max_steps: 4
  check_every: 2
"""


@pytest.mark.slow
@pytest.mark.skipif(not TOFU_DIR.is_dir(), reason=f"TOFU files not found at {TOFU_DIR} (../shared/data/tofu)")
def test_tofu_forget01_study_carries_tofu_metrics(tmp_path, monkeypatch):
    recipe = tmp_path / "tofu.yaml"
    recipe.write_text(RECIPE)
    output = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "robustunlearn",
            "study",
            "--benchmark",
            "tofu",
            "--data-dir",
            str(TOFU_DIR),
            "--forget-split",
            "forget01",
            "--objectives",
            "npo",
            "--optimizers",
            "adam,hybrid",
            "--config",
            str(recipe),
            "--output-dir",
            str(output),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    main()
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert {row["cell"]["optimizer"] for row in rows} == {"adam", "hybrid"}
    assert {row["attack"] for row in rows} == {"none", "rtn-int4"}
    for row in rows:
        tofu = row["tofu"]
        assert 0 <= tofu["forget_quality"] <= 1
        nine = [v for numbers in tofu["utility_sets"].values() for v in numbers.values()]
        assert len(nine) == 9 and tofu["model_utility"] == pytest.approx(statistics.harmonic_mean(nine))
        assert 0 < tofu["forget_truth_ratio"] <= 1
        assert len(tofu["forget_truth_ratios"]) == 16
        assert set(tofu["utility_sets"]) == {"retain", "real_authors", "world_facts"}
    assert (output / "report.md").exists()
