"""Relearning attack: full fine-tuning and LoRA on forget samples."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_bit_identical, snapshot
from robustunlearn.attacks import AttackContext, LoraOptions, parse_attack, relearn_attack
from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch
from robustunlearn.core.models import train_tokenizer
from robustunlearn.data.base import QA, Benchmark
from robustunlearn.data.collate import collate_records


def forget_batches() -> list[TokenBatch]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (2, 20), generator=generator)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt that is not scored
    return [TokenBatch(ids, torch.ones_like(ids), labels)]


def log_likelihood(model: torch.nn.Module, batch: TokenBatch) -> float:
    with torch.no_grad():
        return -float(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss)


def test_relearning_raises_likelihood_and_records_the_curve(tiny_llama):
    model = tiny_llama().eval()
    before = snapshot(model)
    batches = forget_batches()
    calls = []

    def eval_fn(evaluated: torch.nn.Module, step: int) -> dict:
        assert not evaluated.training and not torch.is_grad_enabled()
        calls.append(step)
        return {"forget_ll": log_likelihood(evaluated, batches[0])}

    relearned, curve = relearn_attack(model, None, batches, steps=12, lr=1e-2, eval_fn=eval_fn, eval_every=5, seed=0)
    assert_bit_identical(model, before)
    assert [entry["step"] for entry in curve] == calls == [0, 5, 10, 12]
    assert "train_loss" not in curve[0] and all("train_loss" in entry for entry in curve[1:])
    start = log_likelihood(model, batches[0])
    assert curve[0]["forget_ll"] == pytest.approx(start)
    assert log_likelihood(relearned, batches[0]) > start + 1.0
    assert curve[-1]["forget_ll"] > curve[1]["forget_ll"] > curve[0]["forget_ll"]
    assert curve[-1]["forget_ll"] == pytest.approx(log_likelihood(relearned, batches[0]))


def test_relearning_is_deterministic_given_the_seed(tiny_llama):
    pytest.importorskip("peft")
    model = tiny_llama().eval()
    lora = LoraOptions(rank=4, dropout=0.1)  # random adapter init and dropout: the seed matters
    first, _ = relearn_attack(model, None, forget_batches(), steps=3, lr=1e-2, lora=lora, seed=5)
    torch.manual_seed(123)  # the global RNG state must not matter
    second, _ = relearn_attack(model, None, forget_batches(), steps=3, lr=1e-2, lora=lora, seed=5)
    other, _ = relearn_attack(model, None, forget_batches(), steps=3, lr=1e-2, lora=lora, seed=6)
    first, second, other = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_lora_relearning_changes_weights_only_through_the_merged_adapter(tiny_llama):
    pytest.importorskip("peft")
    model = tiny_llama().eval()
    before = snapshot(model)
    batch = forget_batches()[0]
    lora = LoraOptions(rank=2, alpha=4.0, target_modules=("up_proj", "down_proj"))
    relearned, curve = relearn_attack(model, None, [batch], steps=15, lr=2e-2, lora=lora, seed=0)
    assert_bit_identical(model, before)
    assert type(relearned) is type(model)
    state = relearned.state_dict()
    assert state.keys() == before.keys()  # adapters merged away
    for name, tensor in before.items():
        if name.endswith(("up_proj.weight", "down_proj.weight")):
            delta = state[name] - tensor
            assert 0 < int(torch.linalg.matrix_rank(delta.double(), atol=1e-6)) <= 2, name  # B A has rank <= 2
        else:
            assert torch.equal(state[name], tensor), name
    assert all(p.requires_grad for p in relearned.parameters())
    assert log_likelihood(relearned, batch) > log_likelihood(model, batch) + 0.2
    assert [entry["step"] for entry in curve] == [0, 15]


def test_relearning_on_strings_with_a_tokenizer(tiny_llama):
    class CharTokenizer:
        def __call__(self, text, return_tensors):
            return {"input_ids": torch.tensor([[ord(c) % 64 for c in text]])}

    model = tiny_llama().eval()
    text = "the secret is forty two"
    relearned, _ = relearn_attack(model, CharTokenizer(), [text], steps=5, lr=1e-2)
    ids = CharTokenizer()(text, "pt")["input_ids"]
    batch = TokenBatch(ids, torch.ones_like(ids), ids)
    assert log_likelihood(relearned, batch) > log_likelihood(model, batch)


def test_relearning_argument_errors(tiny_llama):
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="tokenizer"):
        relearn_attack(model, None, ["text"], steps=1)
    with pytest.raises(ValueError, match="eval_every"):
        relearn_attack(model, None, forget_batches(), steps=1, eval_every=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        relearn_attack(model, None, forget_batches(), steps=1, optimizer="nope")
    with pytest.raises(ValueError, match="not in the model"):
        relearn_attack(model, None, forget_batches(), steps=1, lora=LoraOptions(target_modules=("c_attn",)))


@pytest.mark.parametrize("name, split", [("relearn", "forget_qa"), ("benign-relearn", "retain_qa")])
def test_the_registry_relearns_on_its_split_in_batches(name, split, tiny_llama):
    qa = {
        role: [QA(f"Where does {role} person {i} live?", f" In town {i}.") for i in range(5)]
        for role in ("forget", "retain")
    }
    benchmark = Benchmark("tiny", "1", {"forget_qa": qa["forget"], "retain_qa": qa["retain"]})
    tokenizer = train_tokenizer([record.question + record.answer for records in qa.values() for record in records], 300)
    model = tiny_llama(vocab_size=len(tokenizer)).eval()

    def probe(evaluated: torch.nn.Module, step: int) -> dict:
        return {"norm": float(evaluated.lm_head.weight.norm())}

    context = AttackContext(
        tokenizer,
        benchmark,
        seed=4,
        batch_size=2,
        relearn_records=tuple(qa["forget"][:3]),
        relearn_steps=3,
        relearn_lr=1e-2,
        relearn_eval_every=2,
        probe=probe,
    )
    attack = parse_attack(name)
    relearned, curve, config = attack.run(model, context)
    records = benchmark.require(split)[:3]
    batches = [collate_records(tokenizer, records[:2]), collate_records(tokenizer, records[2:])]
    expected, expected_curve = relearn_attack(
        model, tokenizer, batches, steps=3, lr=1e-2, eval_fn=probe, eval_every=2, seed=4
    )
    assert attack.family == "relearning" and curve == expected_curve
    assert (config["split"], config["records"], config["steps"], config["lr"]) == (split, 3, 3, 1e-2)
    assert [entry["step"] for entry in curve] == [0, 2, 3]
    assert_bit_identical(relearned, snapshot(expected))
