"""Quantization attacks: RTN, NF4/FP4 emulation, GPTQ, library backends, code agreement."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from helpers import assert_bit_identical, snapshot
from robustunlearn.attacks import (
    FP4_CODE_BOOK,
    NF4_CODE_BOOK,
    QUANTIZATION_METHODS,
    AttackContext,
    calibration_inputs,
    code_agreement,
    gaussian_noise_attack,
    gptq_quantize_model,
    gptq_quantize_weight,
    parse_attack,
    parse_method,
    quantizable_linears,
    quantize_code_book,
    quantize_model,
    rtn_groupwise,
    rtn_symmetric,
)
from robustunlearn.core.batching import TokenBatch
from robustunlearn.core.errors import UserError
from robustunlearn.core.models import train_tokenizer
from robustunlearn.data.base import QA, Benchmark, Passage
from robustunlearn.data.collate import collate_records


def calibration(seed: int = 1, batches: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 24), generator=generator) for _ in range(batches)]


def expand_groups(per_group: torch.Tensor, group_size: int, columns: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size, dim=1)[:, :columns]


# ---- round to nearest ---------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (4, 128), (2, None)])
def test_rtn_groupwise_codes_error_and_idempotence(bits, group_size):
    weight = torch.randn(24, 200, dtype=torch.float64)
    result = rtn_groupwise(weight, bits, group_size)
    assert result.codes.dtype == torch.uint8 and result.codes.shape == weight.shape
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= 2**bits - 1
    size = group_size or 200
    scale = expand_groups(result.scales, size, 200)
    zero = expand_groups(result.zeros, size, 200)
    torch.testing.assert_close(result.dequantized, (result.codes.double() - zero) * scale)
    assert bool(((result.dequantized - weight).abs() <= scale / 2 + 1e-12).all())
    again = rtn_groupwise(result.dequantized, bits, group_size)
    assert torch.equal(again.codes, result.codes)
    torch.testing.assert_close(again.dequantized, result.dequantized, rtol=0, atol=1e-12)


def test_rtn_groupwise_last_partial_group_is_quantized_on_its_own():
    weight = torch.randn(8, 100)
    result = rtn_groupwise(weight, 4, 32)
    assert result.scales.shape == (8, 4)
    tail = rtn_groupwise(weight[:, 96:], 4, 32)
    assert torch.equal(result.codes[:, 96:], tail.codes)
    torch.testing.assert_close(result.scales[:, 3], tail.scales[:, 0])


def test_rtn_groupwise_represents_zero_exactly():
    weight = torch.randn(4, 64)
    weight[:, ::5] = 0
    assert bool((rtn_groupwise(weight, 3, 32).dequantized[:, ::5] == 0).all())


def test_rtn_symmetric_int8():
    weight = torch.randn(16, 96, dtype=torch.float64)
    result = rtn_symmetric(weight, 8)
    assert result.codes.dtype == torch.int8 and result.zeros is None
    assert int(result.codes.abs().max()) <= 127
    assert bool((result.codes.abs().amax(dim=1) == 127).all())  # each row's absmax maps to ±127
    scale = result.scales[:, None]
    assert bool(((result.dequantized - weight).abs() <= scale / 2 + 1e-12).all())
    again = rtn_symmetric(result.dequantized, 8)
    assert torch.equal(again.codes, result.codes)
    torch.testing.assert_close(again.dequantized, result.dequantized, rtol=0, atol=1e-12)


def test_rtn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        rtn_groupwise(torch.randn(4, 8), bits=9)
    with pytest.raises(ValueError, match="2-D"):
        rtn_symmetric(torch.randn(8))
    with pytest.raises(ValueError, match="group_size"):
        rtn_groupwise(torch.randn(4, 8), 4, 0)


# ---- NF4 / FP4 ------------------------------------------------------------------------------


def test_nf4_code_book_is_the_qlora_quantile_construction():
    book = torch.tensor(NF4_CODE_BOOK, dtype=torch.float64)
    assert book.numel() == 16 and bool((book[1:] > book[:-1]).all())
    assert book[0] == -1 and book[-1] == 1 and 0.0 in NF4_CODE_BOOK
    assert int((book > 0).sum()) == 8 and int((book < 0).sum()) == 7
    from scipy.stats import norm

    offset = (1 - 1 / 30 + 1 - 1 / 32) / 2
    positive = norm.ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    derived = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    torch.testing.assert_close(book, derived / derived.max(), rtol=0, atol=1e-6)


def test_fp4_code_book_is_e2m1_with_the_bitsandbytes_subnormal():
    book = torch.tensor(FP4_CODE_BOOK, dtype=torch.float64)
    assert book.numel() == 16 and bool((book[1:] >= book[:-1]).all())
    magnitudes = sorted({abs(v) for v in FP4_CODE_BOOK})
    e2m1_normals = [m / 6 for m in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]
    assert magnitudes == pytest.approx([0.0, 1 / 192, *e2m1_normals])
    assert sorted(FP4_CODE_BOOK) == sorted(-v for v in FP4_CODE_BOOK)


@pytest.mark.parametrize("book", [NF4_CODE_BOOK, FP4_CODE_BOOK], ids=["nf4", "fp4"])
def test_code_book_quantization_picks_the_nearest_value_per_block(book):
    weight = torch.randn(10, 50, dtype=torch.float64)  # 500 values: 7 full blocks of 64 and a partial one
    result = quantize_code_book(weight, book, block_size=64)
    assert result.scales.shape == (8,) and int(result.codes.max()) <= 15
    values = torch.tensor(book, dtype=torch.float64)
    flat = weight.flatten()
    absmax = result.scales.repeat_interleave(64)[: flat.numel()]
    torch.testing.assert_close(absmax[:64].max(), flat[:64].abs().max())
    torch.testing.assert_close(result.dequantized.flatten(), values[result.codes.flatten().long()] * absmax)
    distance = (flat / absmax)[:, None].sub(values).abs()
    chosen = distance.gather(1, result.codes.flatten().long()[:, None])[:, 0]
    assert bool((chosen <= distance.min(dim=1).values + 1e-12).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_book_emulation_matches_bitsandbytes(quant_type):
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(48, 100)
    packed, state = functional.quantize_4bit(weight.clone(), blocksize=64, quant_type=quant_type)
    reference = functional.dequantize_4bit(packed, state)
    book = NF4_CODE_BOOK if quant_type == "nf4" else FP4_CODE_BOOK
    torch.testing.assert_close(quantize_code_book(weight, book).dequantized, reference, rtol=0, atol=1e-6)


# ---- GPTQ --------------------------------------------------------------------------------------


def correlated_inputs(columns: int, samples: int = 1500, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(columns) + torch.randn(columns, columns, generator=generator) / 8
    features = torch.randn(samples, columns, generator=generator) @ mixing
    return (features * torch.linspace(0.1, 3.0, columns)).double()


def test_gptq_beats_rtn_on_its_calibration_data():
    weight = torch.randn(32, 96, dtype=torch.float64)
    inputs = correlated_inputs(96)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    gptq = gptq_quantize_weight(weight, hessian, bits=4, group_size=32)
    rtn = rtn_groupwise(weight, 4, 32)
    gptq_error = ((weight - gptq.dequantized) @ inputs.T).norm()
    rtn_error = ((weight - rtn.dequantized) @ inputs.T).norm()
    assert gptq_error < 0.95 * rtn_error
    assert gptq.codes.dtype == torch.uint8 and int(gptq.codes.max()) <= 15
    assert gptq.scales.shape == gptq.zeros.shape == (32, 3)
    scale, zero = expand_groups(gptq.scales, 32, 96), expand_groups(gptq.zeros, 32, 96)
    torch.testing.assert_close(gptq.dequantized, (gptq.codes.double() - zero) * scale)


def test_gptq_with_a_diagonal_hessian_is_rtn():
    # no correlation between inputs: no error to compensate, GPTQ must round like RTN
    weight = torch.randn(16, 64, dtype=torch.float64)
    hessian = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)
    gptq = gptq_quantize_weight(weight, hessian, bits=4, group_size=16)
    assert torch.equal(gptq.codes, rtn_groupwise(weight, 4, 16).codes)


def test_gptq_lazy_block_updates_do_not_change_the_result():
    weight = torch.randn(8, 64, dtype=torch.float64)
    inputs = correlated_inputs(64, samples=400)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    small = gptq_quantize_weight(weight, hessian, bits=3, group_size=16, block_size=16)
    large = gptq_quantize_weight(weight, hessian, bits=3, group_size=16, block_size=64)
    assert torch.equal(small.codes, large.codes)
    per_row = gptq_quantize_weight(weight, hessian, bits=3, group_size=None, block_size=8)
    assert per_row.scales.shape == (8, 1) and int(per_row.codes.max()) <= 7


def q_proj_inputs(model, batches) -> torch.Tensor:
    captured = []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(
        lambda module, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    handle.remove()
    return torch.cat(captured)


def test_gptq_model_beats_rtn_on_a_layer_and_leaves_the_input_alone(tiny_llama):
    model = tiny_llama().eval()
    before = snapshot(model)
    batches = calibration()
    gptq_model, report = quantize_model(model, "gptq-int4", group_size=16, calibration=batches)
    rtn_model, _ = quantize_model(model, "rtn-int4", group_size=16)
    assert_bit_identical(model, before)
    assert report["method"] == "gptq-int4" and report["calibration_batches"] == 4 and report["layers"] == 14
    inputs = q_proj_inputs(model, batches)  # block 0's inputs do not depend on quantization
    weight = model.model.layers[0].self_attn.q_proj.weight

    def output_error(quantized) -> float:
        with torch.no_grad():
            return float(((weight - quantized.model.layers[0].self_attn.q_proj.weight) @ inputs.T).norm())

    assert output_error(gptq_model) < output_error(rtn_model)


def test_gptq_model_codes_and_padding(tiny_llama):
    model = tiny_llama().eval()
    ids = calibration(batches=2)
    codes = gptq_quantize_model(tiny_llama().eval(), ids, bits=3, group_size=16)
    assert set(codes) == {name for name, _ in quantizable_linears(model)}
    assert all(c.dtype == torch.uint8 and int(c.max()) <= 7 for c in codes.values())
    # right padding masked out of the Hessians gives the same quantization as no padding
    padded = []
    for batch in ids:
        extra = torch.randint(0, 64, (batch.shape[0], 5))
        mask = torch.cat([torch.ones_like(batch), torch.zeros_like(extra)], dim=1)
        padded.append(TokenBatch(torch.cat([batch, extra], dim=1), mask, torch.full_like(mask, -100)))
    padded_codes = gptq_quantize_model(tiny_llama().eval(), padded, bits=3, group_size=16)
    assert all(torch.equal(codes[name], padded_codes[name]) for name in codes)


def test_gptq_quantizes_lm_head_when_asked_and_takes_strings(tiny_llama):
    class CharTokenizer:  # ids = character codes mod 64, enough to tokenize calibration text
        def __call__(self, text, return_tensors):
            return {"input_ids": torch.tensor([[ord(c) % 64 for c in text]])}

    pairs = calibration_inputs(["some retain text", "more of it"], CharTokenizer())
    assert [tuple(ids.shape) for ids, _ in pairs] == [(1, 16), (1, 10)]
    model = tiny_llama().eval()
    quantized, report = quantize_model(
        model,
        "gptq-int4",
        calibration=["some retain text", "more of it"],
        tokenizer=CharTokenizer(),
        include_lm_head=True,
        group_size=16,
    )
    assert report["layers"] == 15
    assert not torch.equal(quantized.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_inputs(["text"])


# ---- quantize_model ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn-int8", "rtn-int4", "rtn-int3", "nf4", "fp4"])
def test_quantize_model_replaces_block_linears_only(method, tiny_llama):
    model = tiny_llama().eval()
    before = snapshot(model)
    quantized, report = quantize_model(model, method, group_size=32)
    assert_bit_identical(model, before)
    targets = {f"{name}.weight" for name, _ in quantizable_linears(model)}
    assert len(targets) == 14 and "lm_head.weight" not in targets
    state = quantized.state_dict()
    for name, tensor in before.items():
        assert torch.equal(state[name], tensor) != (name in targets), name
    assert report["layers"] == 14 and report["quantized_params"] == sum(before[t].numel() for t in targets)
    assert 0 < report["relative_error"] < (0.02 if method == "rtn-int8" else 0.3)
    from robustunlearn.attacks import tensor_quantizer

    expected = tensor_quantizer(method, 32)(model.model.layers[1].mlp.down_proj.weight).dequantized
    assert torch.equal(quantized.model.layers[1].mlp.down_proj.weight, expected)


def test_quantize_model_include_lm_head(tiny_llama):
    model = tiny_llama().eval()
    quantized, report = quantize_model(model, "rtn-int4", include_lm_head=True)
    assert report["layers"] == 15
    assert not torch.equal(quantized.lm_head.weight, model.lm_head.weight)
    assert torch.equal(quantized.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_method_names(tiny_llama):
    assert parse_method("GPTQ_INT4").name == "gptq-int4"
    assert parse_method("int8") == parse_method("rtn-int8")
    assert parse_method("bnb-4bit").name == "bnb-nf4"
    assert parse_method("rtn-int2").bits == 2
    assert all(parse_method(name).name == name for name in QUANTIZATION_METHODS)
    with pytest.raises(ValueError, match="rtn-int4"):
        parse_method("awq")
    with pytest.raises(ValueError, match="unknown"):
        parse_method("quanto-int3")
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_llama().eval(), "gptq-int4")


def test_the_registry_runs_quantization_as_quantize_model(tiny_llama):
    texts = [f"Person {i} was born in town {i % 7} and works as a baker." for i in range(20)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    benchmark = Benchmark("tiny", "1", {"retain_text": [Passage(text) for text in texts]})
    model = tiny_llama(vocab_size=len(tokenizer)).eval()
    context = AttackContext(
        tokenizer,
        benchmark,
        seed=0,
        batch_size=1,
        relearn_records=(),
        relearn_steps=1,
        relearn_lr=1e-3,
        relearn_eval_every=1,
    )
    retain_batch = collate_records(tokenizer, benchmark.get("retain_text")[:16])
    assert bool((retain_batch.attention_mask == 0).any())  # the texts differ in length: the batch has pads
    for name, calibration in (("rtn-int4", None), ("nf4", None), ("gptq-int4", [retain_batch])):
        attack = parse_attack(name)
        attacked, curve, config = attack.run(model, context)
        expected, report = quantize_model(model, name, calibration=calibration, tokenizer=tokenizer)
        assert attack.family == "quantization" and curve is None
        assert config == {**{k: v for k, v in report.items() if k != "seconds"}, "strength": 16 - report["bits"]}
        assert config["full_precision"] == "embeddings, norms, biases, output head" and config["scheme"]
        assert_bit_identical(attacked, snapshot(expected))
    # GPTQ calibrates with the attention mask: pad tokens stay out of its Hessians
    padded, _ = quantize_model(model, "gptq-int4", calibration=[retain_batch.input_ids], tokenizer=tokenizer)
    masked = parse_attack("gptq-int4").run(model, context).model
    assert any(not torch.equal(a, b) for a, b in zip(masked.parameters(), padded.parameters()))


def test_gptq_calibrates_on_retain_qa_where_a_benchmark_has_no_passages(tiny_llama):
    pairs = [QA(f"Where was person {i} born?", f"In town {i % 7}.", subject=f"p{i}") for i in range(20)]
    tokenizer = train_tokenizer([q.question + " " + q.answer for q in pairs], vocab_size=300)
    benchmark = Benchmark("tofu-like", "1", {"retain_qa": pairs})  # TOFU has no retain_text
    model = tiny_llama(vocab_size=len(tokenizer)).eval()
    context = AttackContext(tokenizer, benchmark, 0, 1, (), 1, 1e-3, 1)
    attacked, _, config = parse_attack("gptq-int4").run(model, context)
    expected, _ = quantize_model(model, "gptq-int4", calibration=[collate_records(tokenizer, pairs[:16])])
    assert config["calibration_batches"] == 1
    assert_bit_identical(attacked, snapshot(expected))


# ---- library backends ------------------------------------------------------------------------

BACKENDS = [
    ("quanto-int4", "optimum.quanto", 0.15),
    ("quanto-int8", "optimum.quanto", 0.01),
    ("hqq-int4", "hqq", 0.15),
    ("torchao-int8", "torchao", 0.01),
    ("bnb-nf4", "bitsandbytes", 0.15),
    ("bnb-int8", "bitsandbytes", 0.01),
]


@pytest.mark.parametrize("method,module,max_error", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_library_backend(method, module, max_error, tiny_llama):
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} is not installed")
    model = tiny_llama().eval()
    before = snapshot(model)
    quantized, report = quantize_model(model, method, group_size=32)
    assert_bit_identical(model, before)
    assert 0 < report["relative_error"] < max_error
    assert report["backend"].split()[0] in {"optimum-quanto", "hqq", "torchao", "bitsandbytes"}
    assert torch.equal(quantized.lm_head.weight, model.lm_head.weight)


def test_bitsandbytes_backend_agrees_with_the_emulation(tiny_llama):
    pytest.importorskip("bitsandbytes")
    model = tiny_llama().eval()
    for library, emulation in (("bnb-nf4", "nf4"), ("bnb-int8", "rtn-int8")):
        a, _ = quantize_model(model, library)
        b, _ = quantize_model(model, emulation)
        for (_, x), (_, y) in zip(quantizable_linears(a), quantizable_linears(b), strict=True):
            torch.testing.assert_close(x.weight, y.weight, rtol=0, atol=1e-6)


def test_missing_backend_names_the_package(monkeypatch, tiny_llama):
    monkeypatch.setitem(sys.modules, "hqq", None)  # makes `import hqq...` fail
    monkeypatch.setitem(sys.modules, "hqq.core", None)
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    with pytest.raises(UserError, match="pip install hqq"):
        quantize_model(tiny_llama().eval(), "hqq-int4")


# ---- code agreement --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn-int4", "rtn-int8", "nf4", "fp4"])
def test_code_agreement(method, tiny_llama):
    model = tiny_llama().eval()
    assert code_agreement(model, model, method, group_size=32) == 1.0
    tiny_update = gaussian_noise_attack(model, 1e-4, seed=3)
    large_update = gaussian_noise_attack(model, 0.3, seed=3)
    # a 1e-4 relative update flips a few codes; a 0.3 one most of them
    assert 0.99 < code_agreement(model, tiny_update, method, group_size=32) < 1.0
    assert code_agreement(model, large_update, method, group_size=32) < 0.5


def test_code_agreement_gptq_and_errors(tiny_llama):
    model = tiny_llama().eval()
    batches = calibration(batches=2)
    assert code_agreement(model, model, "gptq-int4", calibration=batches, group_size=16) == 1.0
    with pytest.raises(ValueError, match="code_agreement supports"):
        code_agreement(model, model, "bnb-nf4")
    other = tiny_llama(intermediate=32)
    with pytest.raises(ValueError, match="same architecture"):
        code_agreement(model, other, "rtn-int4")
