"""LoRA unlearning through peft: only adapter weights move, the reference is the disabled adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import robustunlearn.train.engine as engine_module
from helpers import Killed, dies_at, snapshot
from robustunlearn.objectives import OBJECTIVES
from robustunlearn.optim import OPTIMIZERS
from robustunlearn.train.settings import UnlearnSettings

pytest.importorskip("peft")

LORA = {"rank": 4, "alpha": 8.0}
# options a two-block model needs: hybrid-depth must leave blocks to its zeroth-order part
TINY_OPTIONS = {"hybrid-depth": {"fo_blocks": 1}}


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    """The peft model's base weights under the plain model's names."""
    return {
        name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor
        for name, tensor in peft_model.state_dict().items()
        if "lora_" not in name
    }


def adapter_weights(peft_model) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in peft_model.state_dict().items() if "lora_" in name}


def assert_only_adapters_moved(result, before: dict[str, torch.Tensor]) -> None:
    base = base_weights(result.model)
    assert base.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(base[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name
    # peft starts every lora_B at zero: the run must have moved some of them
    assert any(t.abs().max() > 0 for n, t in adapter_weights(result.model).items() if "lora_B" in n)


@pytest.mark.parametrize("optimizer", ["adamw", "zo-sgd"])
def test_lora_run_changes_only_adapter_weights_and_merges_to_a_plain_model(run_unlearn, optimizer, fresh_model):
    model = fresh_model()
    before = snapshot(model)
    config = UnlearnSettings(objective="npo", optimizer=optimizer, lr=1e-2, steps=3, batch_size=2, lora=LORA)
    result = run_unlearn(config, model=model)
    assert_only_adapters_moved(result, before)

    merged = result.model.merge_and_unload()
    after = merged.state_dict()
    assert after.keys() == before.keys()  # a plain Hugging Face model again
    assert any(not torch.equal(after[name], tensor) for name, tensor in before.items())


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("optimizer", ["adamw", "zo-sgd"])
def test_every_objective_runs_under_lora(run_unlearn, objective, optimizer, fresh_model):
    model = fresh_model()
    before = snapshot(model)
    config = UnlearnSettings(
        objective=objective,
        optimizer=optimizer,
        lr=1e-2,
        steps=2,
        batch_size=2,
        lora=LORA,
        forget_splits=("forget_qa",),
    )
    result = run_unlearn(config, model=model)
    assert_only_adapters_moved(result, before)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_runs_under_lora(run_unlearn, optimizer, fresh_model):
    model = fresh_model()
    before = snapshot(model)
    config = UnlearnSettings(
        objective="npo",
        optimizer=optimizer,
        lr=1e-2,
        steps=2,
        batch_size=2,
        lora=LORA,
        optimizer_options=TINY_OPTIONS.get(optimizer, {}),
    )
    result = run_unlearn(config, model=model)
    assert_only_adapters_moved(result, before)


def test_rmu_under_lora_trains_only_the_down_proj_adapters_of_its_layers(run_unlearn, fresh_model):
    model = fresh_model()
    config = UnlearnSettings(objective="rmu", optimizer="adamw", lr=1e-2, steps=2, batch_size=2, lora=LORA)
    result = run_unlearn(config, model=model)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all("mlp.down_proj.lora_" in n for n in trained)
    moved = [n for n, t in adapter_weights(result.model).items() if "lora_B" in n and t.abs().max() > 0]
    assert moved and all("mlp.down_proj" in n for n in moved)


def test_npo_reference_under_lora_is_the_disabled_adapter_not_a_copy(run_unlearn, monkeypatch, fresh_model):
    model = fresh_model()
    frozen_base = copy.deepcopy(model).eval()
    seen = []
    real_build = engine_module.build_objective

    def recording_build(name, model=None, **hparams):
        objective = real_build(name, model=model, **hparams)
        real_reference = objective.reference_outputs

        def reference_outputs(reference_model, batch):
            outputs = real_reference(reference_model, batch)
            seen.append((reference_model, batch, outputs))
            return outputs

        objective.reference_outputs = reference_outputs
        return objective

    monkeypatch.setattr(engine_module, "build_objective", recording_build)
    config = UnlearnSettings(
        objective="npo", optimizer="adamw", lr=1e-2, steps=3, batch_size=2, lora=LORA, reference="live"
    )
    result = run_unlearn(config, model=model)

    assert len(seen) == 3 and all(reference_model is result.model for reference_model, _, _ in seen)
    for _, batch, outputs in seen:  # at every step, even after the adapters moved: the base model's values
        expected = real_build("npo").reference_outputs(frozen_base, batch)
        torch.testing.assert_close(outputs["forget_logprobs"], expected["forget_logprobs"], rtol=0, atol=1e-5)
    # at step 1 the adapter is still zero, so the model is its reference: log ratio 0, loss (2/β)·log 2 + retain
    assert abs(result.history[0]["log_ratio"]) < 1e-5
    assert result.history[0]["forget"] == pytest.approx(2 / 0.1 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)


def test_lora_checkpoints_hold_adapter_weights_only_and_resume_identically(run_unlearn, tmp_path):
    config = UnlearnSettings(
        objective="npo",
        optimizer="zo-adam",
        lr=1e-2,
        steps=4,
        batch_size=2,
        lora=LORA,
        checkpoint_every=2,
        eval_every=1,
    )
    whole = run_unlearn(config, tmp_path / "whole", evaluate=lambda m, s: {})
    with pytest.raises(Killed):
        run_unlearn(config, tmp_path / "killed", evaluate=dies_at(3))
    latest = json.loads((tmp_path / "killed" / "checkpoints" / "latest.json").read_text())
    saved = load_file(tmp_path / "killed" / "checkpoints" / latest["name"] / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)

    resumed = run_unlearn(config, tmp_path / "killed", resume=True, evaluate=lambda m, s: {})
    assert resumed.resumed_from == 2
    expected = snapshot(whole.model)
    for name, tensor in snapshot(resumed.model).items():
        assert torch.equal(tensor, expected[name]), name
