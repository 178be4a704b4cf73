"""Attack ladders: relearning at a learning rate on the study's records, the quantization rungs and
their strengths, and the same-bucket diagnostics against a reference model."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_bit_identical, snapshot
from robustunlearn.attacks import (
    AttackContext,
    gaussian_noise_attack,
    parse_attack,
    parse_method,
    quantizable_linears,
    relearn_attack,
    rtn_groupwise,
    rtn_symmetric,
    tensor_quantizer,
)
from robustunlearn.attacks.quant.diagnostics import bucket_grid, same_bucket_fraction, update_to_step
from robustunlearn.core.batching import IGNORE_INDEX
from robustunlearn.core.models import train_tokenizer
from robustunlearn.data.base import QA, Benchmark, Passage
from robustunlearn.data.collate import collate_records

# ---- same-bucket diagnostics -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn-int8", "rtn-int4", "nf4", "gptq-int4"])
def test_a_model_is_in_its_own_buckets(method, tiny_llama):
    model = tiny_llama().eval()
    assert same_bucket_fraction(model, model, parse_method(method)) == 1.0
    ratios = update_to_step(model, model, parse_method(method))
    assert ratios == {name: 0.0 for name, _ in quantizable_linears(model)}


def _one_step_moves(weight: torch.Tensor, method: str, group_size: int) -> list[tuple[int, int, float]]:
    """(row, column, step) of one weight per row that moves exactly one code up when raised by its
    group's step: not the group's min or max, still below the max after the move, and far from a
    rounding boundary. The grid is computed here from the RTN formulas, not by the diagnostics."""
    moves = []
    for row in range(weight.shape[0]):
        for col in range(weight.shape[1]):
            value = float(weight[row, col])
            if method == "rtn-int8":  # symmetric: the group is the row, its range ±absmax
                step = float(rtn_symmetric(weight, 8).scales[row])
                absmax = float(weight[row].abs().max())
                inside = abs(value) < absmax and abs(value + step) < absmax
            else:
                step = float(rtn_groupwise(weight, 4, group_size).scales[row, col // group_size])
                group = weight[row, col // group_size * group_size :][:group_size]
                inside = float(group.min()) < value and value + step < float(group.max())
            fraction = value / step % 1
            if inside and abs(fraction - 0.5) > 0.1:
                moves.append((row, col, step))
                break
    return moves[:6]


@pytest.mark.parametrize("method, group_size", [("rtn-int4", 16), ("rtn-int8", None)])
def test_moving_weights_by_one_rtn_step_changes_exactly_their_codes(method, group_size, tiny_llama):
    reference = tiny_llama(dtype=torch.float64).eval()
    model = tiny_llama(dtype=torch.float64).eval()
    name, linear = quantizable_linears(model)[0]
    moves = _one_step_moves(linear.weight.detach(), method, group_size or 0)
    assert len(moves) == 6
    with torch.no_grad():
        for row, col, step in moves:
            linear.weight[row, col] += step
    total = sum(module.weight.numel() for _, module in quantizable_linears(model))
    spec = parse_method(method)
    assert same_bucket_fraction(model, reference, spec, group_size=group_size) == pytest.approx(1 - 6 / total)
    # rms of the update over the layer, in units of the layer's mean step (groups are full: 32 = 2 x 16)
    scales = tensor_quantizer(spec, group_size)(dict(quantizable_linears(reference))[name].weight).scales
    expected = math.sqrt(sum(step**2 for _, _, step in moves) / linear.weight.numel()) / float(scales.mean())
    ratios = update_to_step(model, reference, spec, group_size=group_size)
    assert ratios[name] == pytest.approx(expected, rel=1e-12)
    assert all(ratio == 0.0 for other, ratio in ratios.items() if other != name)


def test_nf4_codes_and_steps_by_hand(tiny_llama):
    # each NF4 block of 64 weights repeats (1.2, 0.3, -0.9, 0.05): absmax 1.2, so the scaled values
    # 1, 0.25, -0.75, 0.0417 are nearest to the code values 1, 0.2461, -0.6962, 0.0796 (not 0)
    nf4 = bucket_grid(parse_method("nf4"))
    block = torch.tensor([[1.2, 0.3, -0.9, 0.05]], dtype=torch.float64)
    assert tensor_quantizer(nf4)(block).codes.tolist() == [[15, 10, 1, 8]]
    reference = tiny_llama(dtype=torch.float64).eval()
    name, linear = quantizable_linears(reference)[0]  # 32 x 32: 16 blocks
    with torch.no_grad():
        linear.weight.copy_(block.repeat(1, 256).view(32, 32))
    model = tiny_llama(dtype=torch.float64).eval()
    with torch.no_grad():
        dict(quantizable_linears(model))[name].weight.copy_(linear.weight)
        moved = dict(quantizable_linears(model))[name].weight.view(-1)
        moved[3] = 0.04  # 0.0333 scaled: nearest code 0 (index 7), one code changes
        moved[5] = 0.25  # 0.2083 scaled: still nearest 0.2461 (index 10)
    total = sum(module.weight.numel() for _, module in quantizable_linears(model))
    assert same_bucket_fraction(model, reference, nf4) == pytest.approx(1 - 1 / total)
    step = 1.2 * 2 / 15  # absmax x the mean gap between the 16 code values spanning [-1, 1]
    expected = math.sqrt((0.01**2 + 0.05**2) / 1024) / step
    assert update_to_step(model, reference, nf4)[name] == pytest.approx(expected, rel=1e-12)


def test_bucket_grids_of_the_methods(tiny_llama):
    grids = {name: bucket_grid(parse_method(name)) for name in ("rtn-int3", "nf4", "gptq-int4", "bnb-nf4", "hqq-int1")}
    assert {name: grid and grid.name for name, grid in grids.items()} == {
        "rtn-int3": "rtn-int3",
        "nf4": "nf4",
        "gptq-int4": "rtn-int4",  # GPTQ's codes depend on its calibration: read on the RTN grid
        "bnb-nf4": "nf4",
        "hqq-int1": None,
    }
    model = tiny_llama().eval()
    noisy = gaussian_noise_attack(model, 0.05, seed=1)
    gptq = same_bucket_fraction(noisy, model, parse_method("gptq-int4"))
    assert gptq == same_bucket_fraction(noisy, model, parse_method("rtn-int4")) < 1.0
    with pytest.raises(ValueError, match="no code grid"):
        same_bucket_fraction(noisy, model, parse_method("hqq-int1"))
    with pytest.raises(ValueError, match="same architecture"):
        same_bucket_fraction(model, tiny_llama(intermediate=32), parse_method("rtn-int4"))


# ---- the quantization and noise ladders ------------------------------------------------------


LADDER = ("rtn-int8", "rtn-int4", "rtn-int3", "rtn-int2", "nf4", "gptq-int4")


def _context(tokenizer, benchmark, records=(), **options) -> AttackContext:
    settings = {"seed": 4, "batch_size": 2, "relearn_steps": 3, "relearn_lr": 1e-3, "relearn_eval_every": 2}
    return AttackContext(tokenizer, benchmark, relearn_records=tuple(records), **{**settings, **options})


def test_every_rung_runs_and_orders_its_strength(tiny_llama):
    texts = [f"Person {i} was born in town {i % 7} and works as a baker." for i in range(20)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    benchmark = Benchmark("tiny", "1", {"retain_text": [Passage(text) for text in texts]})
    reference = tiny_llama(vocab_size=len(tokenizer)).eval()
    model = gaussian_noise_attack(reference, 0.05, seed=2)  # an update of 5% of each matrix's RMS
    context = _context(tokenizer, benchmark, reference_model=reference)
    configs = {}
    for name in LADDER:
        attacked, curve, configs[name] = parse_attack(name).run(model, context)
        assert curve is None and any(not torch.equal(a, b) for a, b in zip(attacked.parameters(), model.parameters()))
    strengths = [configs[name]["strength"] for name in LADDER]
    assert strengths[:4] == sorted(strengths[:4]) and len(set(strengths[:4])) == 4  # int8 < int4 < int3 < int2
    assert configs["nf4"]["strength"] == configs["gptq-int4"]["strength"] == configs["rtn-int4"]["strength"]
    names = [name for name, _ in quantizable_linears(model)]
    for name, config in configs.items():
        grid = parse_method("nf4" if name == "nf4" else f"rtn-int{config['bits']}")
        assert config["bucket_grid"] == grid.family
        assert config["same_bucket"] == same_bucket_fraction(model, reference, grid)
        ratios = config["update_to_step"]["per_layer"]
        assert list(ratios) == names and config["update_to_step"]["max"] == max(ratios.values())
    # the same update on grids of 4, 3, 2 bits: steps (hi - lo) / (2^b - 1), so the ratios scale exactly
    for bits, divisor in ((3, 7), (2, 3)):
        per_layer = configs[f"rtn-int{bits}"]["update_to_step"]["per_layer"]
        for layer, ratio in configs["rtn-int4"]["update_to_step"]["per_layer"].items():
            assert per_layer[layer] == pytest.approx(ratio * divisor / 15, rel=1e-5)
    same_bucket = [configs[name]["same_bucket"] for name in LADDER[1:4]]
    assert same_bucket == sorted(same_bucket) and same_bucket[0] < 1.0  # coarser grids keep more codes
    assert "same_bucket" not in parse_attack("rtn-int4").run(model, _context(tokenizer, benchmark)).config
    assert parse_attack("noise-0.02").run(model, context).config["strength"] == 0.02


# ---- relearning at a learning rate, on the study's records -----------------------------------


def test_relearn_lr_parses_its_strength_apart_from_relearn_lora():
    assert (parse_attack("relearn-lr1e-4").spec.name, parse_attack("relearn-lr1e-4").strength) == ("relearn-lr", 1e-4)
    assert parse_attack("relearn-lr0.002").strength == 0.002
    assert (parse_attack("relearn-lora").spec.name, parse_attack("relearn-lora").strength) == ("relearn-lora", None)
    assert parse_attack("relearn").spec.name == "relearn"
    for name in ("relearn-lr0", "relearn-lr-1e-3", "relearn-lrnan", "relearn-lrinf", "relearn-lr"):
        with pytest.raises(ValueError, match="lr > 0"):
            parse_attack(name)


@pytest.fixture(scope="module")
def relearn_setup(tiny_llama):
    forget = [QA(f"Where does person {i} live?", f" In town {i}.", subject=f"p{i % 3}") for i in range(6)]
    retain = [QA(f"What does worker {i} make?", f" Bread {i}.", subject=f"w{i}") for i in range(6)]
    passages = [Passage(f"Person {i} lives in town {i} by the river.", subject=f"p{i}") for i in range(6)]
    texts = [qa.question + qa.answer for qa in forget + retain] + [passage.text for passage in passages]
    tokenizer = train_tokenizer(texts, 300)
    benchmark = Benchmark("tiny", "1", {"forget_qa": forget, "retain_qa": retain, "forget_text": passages})
    return benchmark, tokenizer, tiny_llama(vocab_size=len(tokenizer)).eval()


@pytest.mark.parametrize("split", ["forget_qa", "forget_text"])
def test_relearn_lr_trains_at_its_lr_on_the_given_records_only(split, relearn_setup):
    benchmark, tokenizer, model = relearn_setup
    records = benchmark.require(split)[3:0:-1]  # three records, out of order, from the middle of the split
    steps_seen = []

    def probe(evaluated: torch.nn.Module, step: int) -> dict:
        steps_seen.append(step)
        return {"norm": float(evaluated.lm_head.weight.norm())}

    context = _context(tokenizer, benchmark, records, probe=probe)
    relearned, curve, config = parse_attack("relearn-lr0.05").run(model, context)
    batches = [collate_records(tokenizer, records[:2]), collate_records(tokenizer, records[2:])]
    if split == "forget_text":  # passages are scored on every token after bos
        scored = batches[0].labels[:, 1:] != IGNORE_INDEX
        assert torch.equal(scored, batches[0].attention_mask[:, 1:].bool())
    expected, expected_curve = relearn_attack(
        model, tokenizer, batches, steps=3, lr=0.05, eval_fn=probe, eval_every=2, seed=4
    )
    assert_bit_identical(relearned, snapshot(expected))  # those records, that lr, nothing else
    assert curve == expected_curve and steps_seen == [0, 2, 3, 0, 2, 3]
    assert config == {
        "split": split,
        "records": 3,
        "subjects": sorted({record.subject for record in records}),
        "batch_size": 2,
        "steps": 3,
        "eval_every": 2,
        "lr": 0.05,
        "strength": 0.05,
        "optimizer": "adamw",
        "lora": None,
    }
    at_context_lr, _, config = parse_attack("relearn").run(model, context)
    assert config["lr"] == config["strength"] == 1e-3
    assert any(not torch.equal(a, b) for a, b in zip(at_context_lr.parameters(), relearned.parameters()))


def test_benign_relearning_trains_on_as_many_retain_pairs(relearn_setup):
    benchmark, tokenizer, model = relearn_setup
    context = _context(tokenizer, benchmark, benchmark.require("forget_qa")[:4])
    relearned, _, config = parse_attack("benign-relearn").run(model, context)
    retain = benchmark.require("retain_qa")[:4]
    batches = [collate_records(tokenizer, retain[:2]), collate_records(tokenizer, retain[2:])]
    expected, _ = relearn_attack(model, tokenizer, batches, steps=3, lr=1e-3, eval_every=2, seed=4)
    assert_bit_identical(relearned, snapshot(expected))
    assert (config["split"], config["records"], config["subjects"]) == ("retain_qa", 4, ["w0", "w1", "w2", "w3"])


def test_relearning_needs_records_of_one_kind(relearn_setup):
    benchmark, tokenizer, model = relearn_setup
    with pytest.raises(ValueError, match="at least one record"):
        parse_attack("relearn").run(model, _context(tokenizer, benchmark))
    mixed = [benchmark.require("forget_qa")[0], benchmark.require("forget_text")[0]]
    with pytest.raises(ValueError, match="one kind"):
        parse_attack("relearn-lr0.01").run(model, _context(tokenizer, benchmark, mixed))
