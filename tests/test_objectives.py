"""Objectives against values computed independently: per-sequence log-probabilities from a loop
over each unpadded sequence run alone, so padding, label shifting and masking are checked too."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from helpers import tiny_llama
from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch, UnlearnBatch
from robustunlearn.objectives import OBJECTIVES, build_objective
from robustunlearn.objectives.common import mean_nll, sequence_logprobs
from robustunlearn.objectives.rmu import random_direction

VOCAB = 64


def perturbed(model: LlamaForCausalLM, scale: float = 0.05, seed: int = 1) -> LlamaForCausalLM:
    """A different but nearby model, standing in for the frozen reference."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return other


def token_batch(seed: int, lengths: list[int], prompt_len: int = 3) -> TokenBatch:
    """Right-padded random sequences; the first ``prompt_len`` tokens are the unscored prompt."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=generator)
        attention_mask[row, :n] = 1
    labels = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)
    labels[:, :prompt_len] = IGNORE_INDEX
    return TokenBatch(input_ids, attention_mask, labels)


def unlearn_batch() -> UnlearnBatch:
    return UnlearnBatch(
        forget=token_batch(10, [9, 6, 8]),
        retain=token_batch(11, [7, 9, 5, 8]),
        forget_refusal=token_batch(12, [5, 8, 7]),
    )


def loop_logprobs(model, tokens: TokenBatch) -> tuple[list[torch.Tensor], list[int]]:
    """Per sequence: log p(scored tokens) summed, and their count, one position at a time."""
    sums, counts = [], []
    for ids, mask, labels in zip(tokens.input_ids, tokens.attention_mask, tokens.labels):
        n = int(mask.sum())
        logits = model(input_ids=ids[:n].unsqueeze(0)).logits[0]
        total, count = torch.zeros((), dtype=logits.dtype), 0
        for t in range(1, n):
            if labels[t] != IGNORE_INDEX:
                total = total + torch.log_softmax(logits[t - 1], dim=-1)[labels[t]]
                count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def loop_nll(model, tokens: TokenBatch) -> torch.Tensor:
    sums, counts = loop_logprobs(model, tokens)
    return -sum(sums) / sum(counts)


def loop_kl(reference, model, tokens: TokenBatch) -> torch.Tensor:
    """KL(p_ref || p_model) per scored token, averaged."""
    total, count = 0.0, 0
    for ids, mask, labels in zip(tokens.input_ids, tokens.attention_mask, tokens.labels):
        n = int(mask.sum())
        ref_logits = reference(input_ids=ids[:n].unsqueeze(0)).logits[0]
        logits = model(input_ids=ids[:n].unsqueeze(0)).logits[0]
        for t in range(1, n):
            if labels[t] != IGNORE_INDEX:
                log_p = torch.log_softmax(ref_logits[t - 1], dim=-1)
                log_q = torch.log_softmax(logits[t - 1], dim=-1)
                total = total + (log_p.exp() * (log_p - log_q)).sum()
                count += 1
    return total / count


def evaluate(objective, model, batch, reference_model=None):
    with torch.no_grad():
        reference = objective.reference_outputs(reference_model or model, batch)
    return objective.loss(model, batch, reference)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(vocab_size=VOCAB, layers=4, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(model) -> LlamaForCausalLM:
    return perturbed(model)


@pytest.fixture(scope="module")
def batch() -> UnlearnBatch:
    return unlearn_batch()


# ---- shared helpers --------------------------------------------------------------------------


def test_sequence_logprobs_match_loop_and_hf_loss(model, batch):
    sums, counts = sequence_logprobs(model, batch.forget)
    expected_sums, expected_counts = loop_logprobs(model, batch.forget)
    torch.testing.assert_close(sums, torch.stack(expected_sums))
    assert counts.tolist() == expected_counts == [6, 3, 5]
    hf_loss = model(**vars(batch.forget)).loss  # HF: mean over scored tokens, in float32
    torch.testing.assert_close(mean_nll(sums, counts).float(), hf_loss)


# ---- values on the tiny case -----------------------------------------------------------------


def test_ga_is_minus_forget_nll(model, batch):
    objective = build_objective("ga")
    assert not objective.needs_reference and objective.reference_outputs(model, batch) == {}
    out = evaluate(objective, model, batch)
    torch.testing.assert_close(out["forget"], -loop_nll(model, batch.forget))
    assert out["retain"].item() == 0.0


def test_graddiff_nll(model, batch):
    out = evaluate(build_objective("graddiff", gamma=2.0), model, batch)
    torch.testing.assert_close(out["forget"], -loop_nll(model, batch.forget))
    torch.testing.assert_close(out["retain"], 2.0 * loop_nll(model, batch.retain))


def test_graddiff_kl(model, reference, batch):
    objective = build_objective("graddiff", retain_loss="kl", gamma=0.5)
    assert objective.needs_reference
    out = evaluate(objective, model, batch, reference)
    expected = 0.5 * loop_kl(reference, model, batch.retain)
    assert expected > 1e-4  # the perturbation is visible
    torch.testing.assert_close(out["retain"], expected)
    at_reference = evaluate(objective, model, batch, model)
    assert abs(at_reference["retain"].item()) < 1e-12


def test_npo_value(model, reference, batch):
    beta = 0.5
    out = evaluate(build_objective("npo", beta=beta, gamma=0.0), model, batch, reference)
    sums, _ = loop_logprobs(model, batch.forget)
    ref_sums, _ = loop_logprobs(reference, batch.forget)
    expected = torch.stack([-(2 / beta) * F.logsigmoid(-beta * (s - r)) for s, r in zip(sums, ref_sums)]).mean()
    torch.testing.assert_close(out["forget"], expected)
    assert out["retain"].item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_at_reference_is_log2_and_sequence_summed_ga_gradient(model, batch, beta):
    """At Δ = 0: (2/β) softplus(0) = (2/β) log 2, and d/dθ (2/β) softplus(βΔ) = 2σ(0)∇Δ =
    ∇ log π_θ, the batch mean over sequences of summed log-probs. GA's loss is the token mean
    of log p, so NPO's gradient = GA's gradient × (scored tokens / sequences)."""
    params = list(model.parameters())
    npo = evaluate(build_objective("npo", beta=beta, gamma=0.0), model, batch)
    torch.testing.assert_close(npo["forget"], torch.tensor(2 / beta * math.log(2), dtype=torch.float64))
    ga = evaluate(build_objective("ga"), model, batch)
    npo_grads = torch.autograd.grad(npo["forget"], params)
    ga_grads = torch.autograd.grad(ga["forget"], params)
    tokens_per_sequence = (batch.forget.labels[:, 1:] != IGNORE_INDEX).sum() / len(batch.forget)
    for g_npo, g_ga in zip(npo_grads, ga_grads):
        torch.testing.assert_close(g_npo, g_ga * tokens_per_sequence)


def test_simnpo_value(model, batch):
    beta, delta, weight = 0.5, 1.0, 0.3
    objective = build_objective("simnpo", beta=beta, delta=delta, forget_weight=weight, gamma=0.7)
    assert not objective.needs_reference
    out = evaluate(objective, model, batch)
    sums, counts = loop_logprobs(model, batch.forget)
    expected = (
        weight * torch.stack([-(2 / beta) * F.logsigmoid(-(beta / n) * s - delta) for s, n in zip(sums, counts)]).mean()
    )
    torch.testing.assert_close(out["forget"], expected)
    torch.testing.assert_close(out["retain"], 0.7 * loop_nll(model, batch.retain))


def test_simnpo_defaults_follow_the_paper():
    objective = build_objective("simnpo")
    assert (objective.beta, objective.delta, objective.forget_weight, objective.gamma) == (
        2.5,
        0.0,
        0.1375,
        1.0,
    )


def test_idk_sft_is_refusal_nll(model, batch):
    objective = build_objective("idk")
    assert not objective.needs_reference
    out = evaluate(objective, model, batch)
    torch.testing.assert_close(out["forget"], loop_nll(model, batch.forget_refusal))


def test_idk_dpo_value(model, reference, batch):
    beta = 0.5
    objective = build_objective("idk-dpo", beta=beta, gamma=0.0)
    assert objective.mode == "dpo" and objective.needs_reference
    out = evaluate(objective, model, batch, reference)
    win, _ = loop_logprobs(model, batch.forget_refusal)
    win_ref, _ = loop_logprobs(reference, batch.forget_refusal)
    lose, _ = loop_logprobs(model, batch.forget)
    lose_ref, _ = loop_logprobs(reference, batch.forget)
    margins = [(w - w_ref) - (y - y_ref) for w, w_ref, y, y_ref in zip(win, win_ref, lose, lose_ref)]
    expected = torch.stack([-(2 / beta) * F.logsigmoid(beta * m) for m in margins]).mean()
    torch.testing.assert_close(out["forget"], expected)
    at_reference = evaluate(build_objective("idk", mode="dpo", beta=beta), model, batch)
    torch.testing.assert_close(at_reference["forget"], torch.tensor(2 / beta * math.log(2), dtype=torch.float64))


def test_rmu_value_from_hidden_states(model, reference, batch):
    objective = build_objective("rmu", layer=2, steering_coeff=3.0, alpha=5.0, seed=7)
    assert objective.update_layers == (0, 1, 2) and objective.needs_reference
    out = evaluate(objective, model, batch, reference)

    def scored_hidden(m, tokens):  # output of decoder layer 2 = hidden_states[3]
        hidden = m(**vars(tokens), output_hidden_states=True).hidden_states[3]
        return hidden[tokens.labels != IGNORE_INDEX]

    generator = torch.Generator().manual_seed(7)
    u = torch.rand(32, generator=generator, dtype=torch.float64)
    control = 3.0 * u / u.norm()
    forget_hidden = scored_hidden(model, batch.forget)
    assert forget_hidden.shape == (14, 32)
    expected_forget = ((forget_hidden - control) ** 2).mean()
    expected_retain = 5.0 * ((scored_hidden(model, batch.retain) - scored_hidden(reference, batch.retain)) ** 2).mean()
    torch.testing.assert_close(out["forget"], expected_forget)
    torch.testing.assert_close(out["retain"], expected_retain)


def test_rmu_stops_the_forward_pass_after_layer(model, batch):
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        evaluate(build_objective("rmu", layer=1, alpha=0.0), model, batch)
    finally:
        handle.remove()
    assert calls == []


# ---- RMU parameters and scaling --------------------------------------------------------------


def test_rmu_trainable_parameters_are_the_chosen_down_projections(model):
    objective = build_objective("rmu", model)  # 4 layers -> layer 2, update 0, 1, 2
    assert objective.layer == 2
    params = objective.trainable_parameters(model)
    expected = [model.model.layers[i].mlp.down_proj.weight for i in (0, 1, 2)]
    assert len(params) == 3 and all(p is q for p, q in zip(params, expected))
    (only,) = build_objective("rmu", layer=3, update_layers=[3]).trainable_parameters(model)
    assert only is model.model.layers[3].mlp.down_proj.weight


def test_rmu_under_lora_trains_the_down_proj_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(vocab_size=VOCAB, layers=4, dtype=torch.float64),
        peft.LoraConfig(r=2, target_modules=["down_proj", "q_proj"]),
    )
    objective = build_objective("rmu", model)
    names = {id(p): n for n, p in model.named_parameters()}
    trained = sorted(names[id(p)] for p in objective.trainable_parameters(model))
    assert trained == sorted(
        f"base_model.model.model.layers.{i}.mlp.down_proj.lora_{ab}.default.weight" for i in (0, 1, 2) for ab in "AB"
    )
    with torch.no_grad(), model.disable_adapter():  # the reference: the adapter switched off
        reference = objective.reference_outputs(model, unlearn_batch())
    assert objective.loss(model, unlearn_batch(), reference)["retain"].item() == 0.0  # LoRA B = 0


def test_rmu_defaults_reproduce_wmdp_for_7b_and_scale_down():
    def shape(layers, hidden):
        return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden))

    seven_b = build_objective("rmu", shape(32, 4096))
    assert (seven_b.layer, seven_b.update_layers, seven_b.steering_coeff, seven_b.alpha) == (
        7,
        (5, 6, 7),
        6.5,
        1200.0,
    )
    assert build_objective("rmu") == seven_b  # no model: the WMDP constants
    tiny = build_objective("rmu", shape(6, 256))
    assert (tiny.layer, tiny.update_layers, tiny.alpha) == (3, (1, 2, 3), 1200.0)
    assert tiny.steering_coeff == pytest.approx(6.5 * math.sqrt(256 / 4096))
    assert build_objective("rmu", shape(6, 256), steering_coeff=2.0).steering_coeff == 2.0


def test_random_direction_is_seeded_unit_and_positive():
    u = random_direction(16, seed=3)
    assert torch.equal(u, random_direction(16, seed=3)) and not torch.equal(u, random_direction(16, seed=4))
    assert u.norm().item() == pytest.approx(1.0) and (u >= 0).all()


def with_tokens_in(tokens: TokenBatch, low: int, high: int) -> TokenBatch:
    input_ids = tokens.input_ids % (high - low) + low
    labels = torch.where(tokens.labels == IGNORE_INDEX, IGNORE_INDEX, input_ids)
    return TokenBatch(input_ids, tokens.attention_mask, labels)


def test_rmu_loss_decreases_with_adam_on_its_parameters():
    # disjoint vocabularies, so that forget and retain activations can be told apart
    batch = unlearn_batch()
    batch = UnlearnBatch(with_tokens_in(batch.forget, 0, 32), with_tokens_in(batch.retain, 32, 64))
    model = tiny_llama(3, vocab_size=VOCAB, layers=4)
    frozen = copy.deepcopy(model).requires_grad_(False)
    objective = build_objective("rmu", model)
    params = objective.trainable_parameters(model)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(params, lr=1e-2)
    with torch.no_grad():
        reference = objective.reference_outputs(frozen, batch)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        out = objective.loss(model, batch, reference)
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}


# ---- gradient directions ---------------------------------------------------------------------


def sgd_steps(name: str, steps: int = 10, lr: float = 0.5, **hparams) -> LlamaForCausalLM:
    model = tiny_llama(5, vocab_size=VOCAB, layers=4)
    objective = build_objective(name, **hparams)
    batch = unlearn_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        evaluate(objective, model, batch)["loss"].backward()
        optimizer.step()
    return model


def nll(model, tokens: TokenBatch) -> float:
    with torch.no_grad():
        return mean_nll(*sequence_logprobs(model, tokens)).item()


def test_ga_raises_forget_nll_and_graddiff_protects_retain():
    batch = unlearn_batch()
    start = tiny_llama(5, vocab_size=VOCAB, layers=4)
    ga, graddiff = sgd_steps("ga"), sgd_steps("graddiff")
    assert nll(ga, batch.forget) > nll(start, batch.forget) + 0.5
    assert nll(graddiff, batch.retain) < nll(ga, batch.retain) - 0.5


def test_npo_and_simnpo_raise_forget_nll():
    batch = unlearn_batch()
    start = nll(tiny_llama(5, vocab_size=VOCAB, layers=4), batch.forget)
    # NPO with θ_ref = θ_0: evaluate() uses the current model as reference, so pass it frozen
    model = tiny_llama(5, vocab_size=VOCAB, layers=4)
    frozen = copy.deepcopy(model).requires_grad_(False)
    npo = build_objective("npo", gamma=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        evaluate(npo, model, batch, frozen)["loss"].backward()
        optimizer.step()
    assert nll(model, batch.forget) > start + 0.2
    simnpo = sgd_steps("simnpo", lr=20.0, gamma=0.0, beta=0.1)
    assert nll(simnpo, batch.forget) > start + 0.2


def test_idk_sft_lowers_refusal_nll():
    batch = unlearn_batch()
    start = nll(tiny_llama(5, vocab_size=VOCAB, layers=4), batch.forget_refusal)
    assert nll(sgd_steps("idk", lr=0.1, gamma=0.0), batch.forget_refusal) < start - 0.2


# ---- the interface ---------------------------------------------------------------------------

ALL_CONFIGS = [
    ("ga", {}),
    ("graddiff", {}),
    ("graddiff", {"retain_loss": "kl"}),
    ("npo", {}),
    ("npo", {"retain_loss": "kl", "gamma": 0.3}),
    ("simnpo", {}),
    ("rmu", {"layer": 2}),
    ("idk", {}),
    ("idk", {"mode": "dpo", "retain_loss": "kl"}),
    ("idk-dpo", {}),
]


def test_every_objective_is_tested():
    assert {name for name, _ in ALL_CONFIGS} == set(OBJECTIVES)


@pytest.mark.parametrize("name,hparams", ALL_CONFIGS)
def test_forget_plus_retain_is_loss(model, reference, batch, name, hparams):
    objective = build_objective(name, **hparams)
    with torch.no_grad():
        ref = objective.reference_outputs(reference, batch)
    assert bool(ref) == objective.needs_reference
    assert all(not t.requires_grad for t in ref.values())
    out = objective.loss(model, batch, ref)
    assert torch.equal(out["forget"] + out["retain"], out["loss"])
    assert out["loss"].requires_grad and out["loss"].shape == ()
    logs = set(out) - {"loss", "forget", "retain"}
    assert all(not out[k].requires_grad for k in logs)
    assert objective.name == name


def test_unknown_names_and_bad_hparams_raise():
    with pytest.raises(ValueError, match="unknown objective 'sgd'.*graddiff"):
        build_objective("sgd")
    with pytest.raises(ValueError, match="lr.*accepted: gamma, retain_loss, beta"):
        build_objective("npo", lr=1e-3)
    with pytest.raises(ValueError, match="accepted: none"):
        build_objective("ga", gamma=1.0)
    with pytest.raises(ValueError, match="retain_loss='mse'.*nll, kl"):
        build_objective("graddiff", retain_loss="mse")
    with pytest.raises(ValueError, match="mode='kto'"):
        build_objective("idk", mode="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        build_objective("npo", beta=0.0)
    with pytest.raises(ValueError, match="update_layers"):
        build_objective("rmu", layer=2, update_layers=(3,))


def test_missing_batches_and_layers_raise(model):
    forget_only = UnlearnBatch(forget=token_batch(10, [9, 6]))
    with pytest.raises(ValueError, match="needs batch.retain"):
        build_objective("graddiff").loss(model, forget_only, {})
    with pytest.raises(ValueError, match="needs batch.forget_refusal"):
        build_objective("idk", gamma=0.0).loss(model, forget_only, {})
    assert build_objective("npo", gamma=0.0).reference_outputs(model, forget_only).keys() == {"forget_logprobs"}
    with pytest.raises(ValueError, match="4 decoder layers"):
        build_objective("rmu").trainable_parameters(model)  # WMDP layer 7 in a 4-layer model
