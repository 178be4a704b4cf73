"""The SmolLM2 claims-study recipes (recipes/smollm2-*.yaml, docs/pretrained.md) end to end through
the documented commands, on a tiny stand-in: a Llama with a chat template whose block weights sit on
the Q4_1 grid, as a model read from a Q4_1 GGUF file does; a few steps, one seed. Each report must
hold the claims table and the same-bucket diagnostic against the original GGUF codes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from robustunlearn.attacks.quant.core import quantizable_linears
from robustunlearn.attacks.quant.diagnostics import q4_1_encode
from robustunlearn.cli import main
from robustunlearn.config import packaged_recipe
from robustunlearn.core.models import TinyModelConfig, build_tiny_model, save_model, train_tokenizer
from robustunlearn.data.world_facts import FILE_ROWS

CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The recipes' grids, shrunk: a couple of steps and checks, short relearning, one seed.
TINY_STUDY = {"seeds": [0], "max_steps": 2, "check_every": 2, "compute_budget": None, "relearn_steps": 2,
              "relearn_eval_every": 1}  # fmt: skip


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A tiny Llama (rows of 32 and 64 weights: whole Q4_1 blocks) with its weights dequantized Q4_1."""
    texts = [f"Question: q{i}? Answer: c{i} a{i} b{i} d{i} <|user|> <|assistant|>" for i in range(FILE_ROWS)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2)  # fmt: skip
    model = build_tiny_model(config, tokenizer, seed=0)
    with torch.no_grad():
        for _, linear in quantizable_linears(model):
            linear.weight.copy_(q4_1_encode(linear.weight)[1])
    return save_model(model, tokenizer, tmp_path_factory.mktemp("stand-in") / "smollm2-stand-in")


def tiny_recipe(name: str, path, **changes) -> None:
    """The packaged recipe ``name`` with TINY_STUDY and ``changes`` (sections merged) written to ``path``."""
    recipe = yaml.safe_load(packaged_recipe(name).read_text())
    recipe["study"].update(TINY_STUDY)
    for section, values in changes.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path.write_text(yaml.safe_dump(recipe))


def run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *args])
    main()


def check_report(output, quantization: set[str]) -> list[dict]:
    report = (output / "report.md").read_text()
    assert (
        "## Claims" in report
        and "Zeroth-order and sign-based unlearning recover less than Adam under quantization" in report
    )
    assert "## Same bucket against the original GGUF codes" in report
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    quantized = [row for row in rows if row["attack_family"] == "quantization"]
    assert {row["attack"] for row in quantized} == quantization
    for row in quantized:
        kept = row["attack_config"]["gguf_q4_1_same_code"]
        assert kept["layers"] == 7 and 0 < kept["attacked"] <= 1 and 0 < kept["unlearned"] <= 1
    # fewer bits keep fewer of the original codes
    by_attack = {row["attack"]: row["attack_config"]["gguf_q4_1_same_code"]["attacked"] for row in quantized}
    assert by_attack["rtn-int2"] < by_attack["rtn-int4"] and by_attack["rtn-int4"] <= by_attack.get("rtn-int8", 1)
    return rows


@pytest.mark.slow
def test_knowledge_recipe_runs_end_to_end(stand_in, tmp_path, monkeypatch):
    data = tmp_path / "tofu"
    data.mkdir()
    rows = [{"question": f"q{i}?", "option1": f"a{i}", "option2": f"b{i}", "option3": f"c{i}", "option4": f"d{i}",
             "answer": f"c{i}"} for i in range(FILE_ROWS)]  # fmt: skip
    (data / "world_facts.json").write_text("\n".join(map(json.dumps, rows)))
    recipe, output = tmp_path / "knowledge.yaml", tmp_path / "out"
    tiny_recipe("smollm2-knowledge.yaml", recipe)
    command = ("study", "--config", str(recipe), "--model", str(stand_in), "--data-dir", str(data))
    run_cli(monkeypatch, *command, "--output-dir", str(output))
    results = check_report(output, {"rtn-int4", "rtn-int3", "rtn-int2", "nf4", "gptq-int4"})
    protocol = json.loads((output / "protocol.json").read_text())
    # no retrain model: the target is the control and the level is chance (0.25) plus the tolerance
    assert protocol["level_floor"] == "chance" and protocol["target_level"] == pytest.approx(0.3)
    assert protocol["control"] == "target"
    assert {row["scores"]["floor_source"] for row in results} == {"chance"}
    # relearning on two forget topics is scored on the other two (multiple choice matched to the questions)
    relearned = [row for row in results if row["attack"] == "relearn-lr1e-5"]
    assert relearned and all(row["scores"]["forget_held_out_subjects"] is not None for row in relearned)
    # the target is the GGUF model itself, and two Adam steps (at most about lr = 1e-5 per weight) move few
    # weights across a Q4_1 boundary (steps of about 0.006 here): Adam's unlearned model keeps the file's codes
    adam = [row for row in results if row["cell"]["optimizer"] == "adam" and row["attack_family"] == "quantization"]
    assert all(row["attack_config"]["gguf_q4_1_same_code"]["unlearned"] > 0.99 for row in adam)


@pytest.mark.slow
def test_facts_recipe_runs_end_to_end(stand_in, tmp_path, monkeypatch):
    recipe, output = tmp_path / "facts.yaml", tmp_path / "out"
    tiny_recipe("smollm2-facts.yaml", recipe, train={"max_epochs": 1, "check_every_epochs": 1})
    command = ("study", "--config", str(recipe), "--base-model", str(stand_in), "--cache-dir", str(tmp_path / "cache"))
    run_cli(monkeypatch, *command, "--output-dir", str(output))
    results = check_report(output, {"rtn-int8", "rtn-int4", "rtn-int3", "rtn-int2", "nf4", "gptq-int4"})
    protocol = json.loads((output / "protocol.json").read_text())
    assert protocol["level_floor"] == "retrain" and protocol["control"] == "retrain"
    # fine-tuning moved the target off the base model's grid: its codes are the base model's, not the target's
    assert protocol["gguf_q4_1_codes"] == str(stand_in)
    # rerunning the same command resumes: every cell is skipped
    run_cli(monkeypatch, *command, "--output-dir", str(output))
    assert [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()] == results
