"""Weight perturbation attacks: Gaussian noise and magnitude pruning."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_bit_identical, snapshot
from robustunlearn.attacks import (
    AttackContext,
    gaussian_noise_attack,
    magnitude_prune_attack,
    parse_attack,
    quantizable_linears,
)


def target_names(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, _ in quantizable_linears(model)}


def test_the_registry_runs_noise_and_pruning_as_the_functions(tiny_llama):
    model = tiny_llama().eval()
    context = AttackContext(
        None, None, seed=3, batch_size=1, relearn_records=(), relearn_steps=1, relearn_lr=1e-3, relearn_eval_every=1
    )
    noise = parse_attack("noise-0.01")
    noisy, curve, config = noise.run(model, context)
    assert noise.family == "perturbation" and curve is None and config["scale"] == 0.01 and config["seed"] == 3
    assert_bit_identical(noisy, snapshot(gaussian_noise_attack(model, 0.01, seed=3)))
    pruned, curve, config = parse_attack("prune-0.25").run(model, context)
    assert curve is None and config == {"sparsity": 0.25, "scope": "per-layer"}
    assert_bit_identical(pruned, snapshot(magnitude_prune_attack(model, 0.25)))


def test_relative_noise_has_the_requested_std(tiny_llama):
    model = tiny_llama(dtype=torch.float64).eval()
    before = snapshot(model)
    noisy = gaussian_noise_attack(model, 0.1, seed=1)
    assert_bit_identical(model, before)
    targets = target_names(model)
    for name, weight in noisy.state_dict().items():
        if name not in targets:
            assert torch.equal(weight, before[name]), name
            continue
        noise = weight - before[name]
        rms = before[name].pow(2).mean().sqrt()
        # >= 2048 samples per matrix: the std estimate is within a few percent
        assert float(noise.std() / (0.1 * rms)) == pytest.approx(1.0, abs=0.06), name
        assert abs(float(noise.mean())) < 0.1 * float(0.1 * rms), name


def test_absolute_noise_and_seeding(tiny_llama):
    model = tiny_llama().eval()
    noisy = gaussian_noise_attack(model, 0.05, relative=False, seed=2)
    noise = torch.cat([(noisy.state_dict()[n] - model.state_dict()[n]).flatten() for n in target_names(model)])
    assert float(noise.std()) == pytest.approx(0.05, rel=0.02)
    again = gaussian_noise_attack(model, 0.05, relative=False, seed=2)
    other = gaussian_noise_attack(model, 0.05, relative=False, seed=3)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(noisy.state_dict()[name], again.state_dict()[name])
    assert not torch.equal(noisy.state_dict()[name], other.state_dict()[name])
    with pytest.raises(ValueError, match="scale"):
        gaussian_noise_attack(model, -1.0)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_per_layer_pruning_zeroes_the_smallest_weights(sparsity, tiny_llama):
    model = tiny_llama().eval()
    before = snapshot(model)
    pruned = magnitude_prune_attack(model, sparsity)
    assert_bit_identical(model, before)
    targets = target_names(model)
    for name, weight in pruned.state_dict().items():
        original = before[name]
        if name not in targets:
            assert torch.equal(weight, original), name
            continue
        zeroed = weight == 0
        assert int(zeroed.sum()) == round(sparsity * weight.numel()), name
        assert torch.equal(weight[~zeroed], original[~zeroed])  # survivors untouched
        if 0 < sparsity:
            assert float(original[~zeroed].abs().min()) >= float(original[zeroed].abs().max()), name


def test_global_pruning_uses_one_threshold_across_layers(tiny_llama):
    model = tiny_llama().eval()
    for _, linear in quantizable_linears(model)[:3]:
        linear.weight.data.mul_(10)  # three layers of large weights: global pruning spares them
    before = snapshot(model)
    pruned = magnitude_prune_attack(model, 0.5, scope="global")
    assert_bit_identical(model, before)
    targets = sorted(target_names(model))
    state = pruned.state_dict()
    total = sum(state[n].numel() for n in targets)
    zeroed = {n: state[n] == 0 for n in targets}
    assert sum(int(z.sum()) for z in zeroed.values()) == round(0.5 * total)
    kept_min = min(float(before[n][~zeroed[n]].abs().min()) for n in targets if (~zeroed[n]).any())
    pruned_max = max(float(before[n][zeroed[n]].abs().max()) for n in targets if zeroed[n].any())
    assert kept_min >= pruned_max
    scaled = [f"{name}.weight" for name, _ in quantizable_linears(model)[:3]]
    assert all(float(zeroed[n].float().mean()) < 0.5 for n in scaled)


def test_pruning_argument_errors(tiny_llama):
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="per-layer, global"):
        magnitude_prune_attack(model, 0.5, scope="per-row")
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune_attack(model, 1.5)
