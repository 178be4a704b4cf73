"""The unlearning loop: logging, checkpoints, resume identity, the non-finite guard."""

from __future__ import annotations

import json

import pytest
import torch

import robustunlearn.engine as engine_module
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic
from robustunlearn.engine import NonFiniteLossError, RecordStream, UnlearnConfig, unlearn
from robustunlearn.models import TinyModelConfig, build_tiny_model, train_tokenizer
from robustunlearn.objectives import build_objective

TINY = TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def setup():
    benchmark = generate_synthetic(SyntheticConfig(num_people=5, num_utility_passages=4, num_utility_qa=2))
    tokenizer = train_tokenizer([r.text for r in benchmark.get("forget_text") + benchmark.get("retain_text")] * 2, 400)
    return benchmark, tokenizer


def fresh_model(tokenizer):
    return build_tiny_model(TINY, tokenizer, seed=0)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_logs_every_step_and_finishes(setup, tmp_path):
    benchmark, tokenizer = setup
    model = fresh_model(tokenizer)
    config = UnlearnConfig(objective="graddiff", optimizer="adamw", lr=1e-3, steps=3, batch_size=2)
    result = unlearn(model, tokenizer, benchmark, config, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all({"loss", "forget", "retain", "lr"} <= set(line) for line in lines)
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"
    assert result.steps_done == 3 and (tmp_path / "checkpoints" / "step-3" / "model.safetensors").exists()


def test_ga_raises_forget_nll_through_the_engine(setup):
    benchmark, tokenizer = setup
    model = fresh_model(tokenizer)
    config = UnlearnConfig(objective="ga", optimizer="adamw", lr=1e-2, steps=8, batch_size=4, forget_splits=("forget_qa",))
    result = unlearn(model, tokenizer, benchmark, config, progress=False)
    # ga's loss is the negative forget NLL: it must go down, i.e. the NLL up.
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.5


class Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "signum", "sophia-g"])
def test_resume_after_kill_gives_identical_weights(setup, tmp_path, optimizer):
    benchmark, tokenizer = setup
    config = UnlearnConfig(objective="npo", optimizer=optimizer, lr=1e-3, steps=6, batch_size=2, checkpoint_every=2, eval_every=1)

    reference = fresh_model(tokenizer)
    unlearn(reference, tokenizer, benchmark, config, tmp_path / "whole", progress=False, evaluate=lambda m, s: {})

    def die_at_step_5(model, step):
        if step == 5:
            raise Killed
        return {}

    interrupted = fresh_model(tokenizer)
    with pytest.raises(Killed):
        unlearn(interrupted, tokenizer, benchmark, config, tmp_path / "killed", progress=False, evaluate=die_at_step_5)
    resumed = fresh_model(tokenizer)  # a new process starts from the original weights
    result = unlearn(resumed, tokenizer, benchmark, config, tmp_path / "killed", resume=True, progress=False, evaluate=lambda m, s: {})
    assert result.resumed_from == 4
    for name, tensor in weights(reference).items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path, monkeypatch):
    benchmark, tokenizer = setup
    real_build = engine_module.build_objective
    calls = {"n": 0}

    def poisoned_build(name, model=None, **hparams):
        objective = real_build(name, model=model, **hparams)
        real_loss = objective.loss

        def loss(model, batch, reference):
            calls["n"] += 1
            terms = real_loss(model, batch, reference)
            if calls["n"] >= 3:
                terms["forget"] = terms["forget"] * float("nan")
                terms["loss"] = terms["forget"] + terms["retain"]
            return terms

        objective.loss = loss
        return objective

    monkeypatch.setattr(engine_module, "build_objective", poisoned_build)
    config = UnlearnConfig(objective="graddiff", optimizer="adamw", lr=1e-3, steps=5, batch_size=2, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError) as error:
        unlearn(fresh_model(tokenizer), tokenizer, benchmark, config, tmp_path, progress=False)
    assert error.value.step == 3 and "nan" in error.value.cause
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 3
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2


def test_record_stream_resumes_mid_epoch():
    stream = RecordStream(list(range(7)), batch_size=3, seed=1)
    first = [stream.next() for _ in range(4)]
    state = stream.state_dict()
    rest = [stream.next() for _ in range(3)]
    again = RecordStream(list(range(7)), batch_size=3, seed=1)
    again.load_state_dict(state)
    assert [again.next() for _ in range(3)] == rest
    seen = sum(first + rest, [])  # 21 draws over 7 records: every record twice or more, across epochs
    assert all(seen.count(i) >= 2 for i in range(7))


def test_bad_config_values():
    with pytest.raises(ValueError, match="steps"):
        UnlearnConfig(steps=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        UnlearnConfig(lr_schedule="sawtooth")
