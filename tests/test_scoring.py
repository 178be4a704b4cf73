"""The output layer runs on the scored positions only, and gives what the full logits give there."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM

from helpers import tiny_llama
from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch
from robustunlearn.core.scoring import output_layer, scatter_rows, scored_logits
from robustunlearn.objectives.common import sequence_logprobs
from robustunlearn.train.prepare import teacher_forced_accuracy

VOCAB = 64


def qa_batch(prompts: list[int], answers: list[int], seed: int = 0) -> TokenBatch:
    """Right-padded rows of ``prompts[r]`` unscored then ``answers[r]`` scored random tokens."""
    generator = torch.Generator().manual_seed(seed)
    width = max(p + a for p, a in zip(prompts, answers))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        input_ids[row, : p + a] = torch.randint(1, VOCAB, (p + a,), generator=generator)
        attention_mask[row, : p + a] = 1
        labels[row, p : p + a] = input_ids[row, p : p + a]
    return TokenBatch(input_ids, attention_mask, labels)


BATCH = qa_batch([3, 6, 2, 5], [4, 2, 7, 3])


def full_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Every position's logits, [B, T - 1, V], as a plain forward gives them."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]


def test_the_output_layer_sees_only_the_scored_positions_and_gives_their_full_logits():
    model = tiny_llama(vocab_size=VOCAB, dtype=torch.float64)
    seen = []
    output_layer(model).register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    logits, targets, scored = scored_logits(model, BATCH)
    expected_mask = BATCH.labels[:, 1:] != IGNORE_INDEX
    assert seen == [(int(expected_mask.sum()), 32)]  # 16 of the 4 x 11 positions
    assert torch.equal(scored, expected_mask)
    assert torch.equal(targets, BATCH.labels[:, 1:][expected_mask])
    torch.testing.assert_close(logits, full_logits(model, BATCH)[expected_mask], rtol=1e-12, atol=1e-12)


def test_sequence_logprobs_and_their_gradients_match_the_full_logits_in_float64():
    model = tiny_llama(vocab_size=VOCAB, dtype=torch.float64)
    sums, counts = sequence_logprobs(model, BATCH)
    sums.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    log_probs = full_logits(model, BATCH).log_softmax(-1)
    targets = BATCH.labels[:, 1:]
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = torch.where(targets != IGNORE_INDEX, picked, 0).sum(1)
    expected.square().sum().backward()
    torch.testing.assert_close(sums, expected, rtol=1e-12, atol=1e-12)
    assert counts.tolist() == [4, 2, 7, 3]
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_mean_over_scored_logits_is_hugging_faces_loss():
    """What prepare trains on (Hugging Face computes its loss in float32, whatever the model's dtype)."""
    model = tiny_llama(vocab_size=VOCAB)
    logits, targets, _ = scored_logits(model, BATCH)
    hf_loss = model(input_ids=BATCH.input_ids, attention_mask=BATCH.attention_mask, labels=BATCH.labels).loss
    torch.testing.assert_close(F.cross_entropy(logits, targets), hf_loss, rtol=1e-6, atol=1e-6)


def test_soft_capping_after_the_output_layer_still_applies():
    """Gemma 2 soft-caps its logits after the layer: elementwise, so it works on the scored rows."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # small enough that capping changes every logit
    )
    model = Gemma2ForCausalLM(config).double().eval()
    logits, _, scored = scored_logits(model, BATCH)
    assert logits.abs().max() < 0.5
    torch.testing.assert_close(logits, full_logits(model, BATCH)[scored], rtol=1e-12, atol=1e-12)


class HeadlessLM(nn.Module):
    """A model with no ``get_output_embeddings``: every position's logits come back."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.embed(input_ids))


def test_a_model_without_an_output_layer_gets_its_scored_positions_picked():
    model = HeadlessLM()
    logits, targets, scored = scored_logits(model, BATCH)
    assert torch.equal(logits, model.embed(BATCH.input_ids)[:, :-1][scored])
    assert len(targets) == 16


class LastPositionLM(HeadlessLM):
    """Runs its output layer on the last position alone."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(VOCAB, VOCAB)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)[:, -1:]))


def test_an_output_layer_not_run_per_position_is_an_error():
    with pytest.raises(ValueError, match="not one per position"):
        scored_logits(LastPositionLM(), BATCH)


def test_scatter_rows_puts_values_back_and_passes_gradients():
    scored = torch.tensor([[True, False, True], [False, True, False]])
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    rows = scatter_rows(values, scored, fill=-1.0)
    assert rows.tolist() == [[1.0, -1.0, 2.0], [-1.0, 3.0, -1.0]]
    (rows * torch.arange(6.0).view(2, 3)).sum().backward()
    assert values.grad.tolist() == [0.0, 2.0, 4.0]


def test_teacher_forced_accuracy_counts_rows_whose_answer_but_eos_is_the_argmax():
    """A model that always predicts token 5: a row counts when every scored token but its last is 5."""

    class Fives(HeadlessLM):
        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return SimpleNamespace(logits=F.one_hot(torch.full_like(input_ids, 5), VOCAB).double())

    batch = qa_batch([2, 2, 3], [3, 3, 2])
    labels = batch.labels.clone()
    labels[0, 2:4] = 5  # answer 5, 5, x: right
    labels[1, 2:5] = 5
    labels[1, 3] = 6  # answer 5, 6, 5: wrong in the middle
    labels[2, 3] = 5  # answer 5, x: right (only the eos differs)
    batch = TokenBatch(batch.input_ids, batch.attention_mask, labels)
    assert teacher_forced_accuracy(Fives(), [batch]) == pytest.approx(2 / 3)
