"""Quantizing a whole model (:func:`quantize_model`), the "same bucket" diagnostic
(:func:`code_agreement`; GPTQ's own codes, the other methods' through
:mod:`robustunlearn.attacks.quant.diagnostics`), and the quantization attacks of the registry
(``SPECS``). See :mod:`robustunlearn.attacks.quant` for the methods."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from robustunlearn.attacks.quant.backends import backend_dequantizer, backend_name
from robustunlearn.attacks.quant.core import (
    FAMILY_BITS,
    FIXED_METHODS,
    QuantizationMethod,
    parse_method,
    quantizable_linears,
)
from robustunlearn.attacks.quant.diagnostics import (
    bucket_grid,
    bucket_report,
    q4_1_same_code_fraction,
    same_bucket_fraction,
)
from robustunlearn.attacks.quant.gptq import gptq_quantize_model
from robustunlearn.attacks.quant.rtn import CODE_BOOK_BLOCK_SIZE, TORCH_FAMILIES, tensor_quantizer
from robustunlearn.attacks.spec import (
    GPTQ_CALIBRATION_TEXTS,
    QUANTIZATION,
    AttackContext,
    AttackOutcome,
    AttackSpec,
    Strength,
)

ATTACK_GROUP_SIZE = 128  # input columns per group of the grouped quantization attacks


def _dequantizer(spec: QuantizationMethod, group_size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if spec.family in TORCH_FAMILIES:
        quantize = tensor_quantizer(spec, group_size)
        return lambda weight: quantize(weight).dequantized
    return backend_dequantizer(spec, group_size)


def quantization_scheme(spec: QuantizationMethod) -> str:
    """How ``spec`` maps a weight to codes, in words: symmetric or not, and over what it groups."""
    if spec.family in ("nf4", "fp4") or spec.name in ("bnb-nf4", "bnb-fp4"):
        return f"code book, absmax per block of {CODE_BOOK_BLOCK_SIZE} (row-major flattened weight)"
    if spec.bits == 8 and spec.family in ("rtn", "bnb", "torchao"):
        return "symmetric, one scale per output row"
    if spec.family in ("rtn", "gptq"):
        return "asymmetric min-max, scale and zero point per group of input columns"
    if spec.family == "hqq":
        return "asymmetric, scale and zero point per group of the row-major flattened weight (HQQ)"
    return f"{spec.family}'s own (library default)"


def quantize_model(
    model: nn.Module,
    method: str,
    *,
    group_size: int | None = 128,
    calibration: Sequence[Any] | None = None,
    tokenizer: Any = None,
    include_lm_head: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize a copy of ``model`` with ``method`` (see the module docstring) and return it with
    its weights dequantized, plus a report.

    ``group_size`` applies to ``rtn-int{2..7}``, ``gptq-*`` and ``hqq-*`` (``None``: one group per
    row); the other methods fix their own grouping. ``calibration`` (GPTQ only, required there):
    ``TokenBatch``es, input-id tensors, or strings with ``tokenizer``; use retain text.

    The report: ``method``, ``backend``, ``bits``, ``group_size``, ``scheme`` (:func:`quantization_scheme`),
    ``include_lm_head``, ``full_precision`` (what stays unquantized), ``layers`` (weights quantized),
    ``quantized_params``, ``relative_error`` (‖W - Ŵ‖_F / ‖W‖_F over all of them), ``seconds``.
    The input model is not modified."""
    spec = parse_method(method)
    if spec.family == "gptq" and not calibration:
        raise ValueError(f"{spec.name!r} needs calibration data (retain text): pass calibration=...")
    start = time.perf_counter()
    quantized = copy.deepcopy(model)
    if spec.family == "gptq":
        gptq_quantize_model(
            quantized,
            calibration,
            bits=spec.bits,
            group_size=group_size,
            tokenizer=tokenizer,
            include_lm_head=include_lm_head,
        )
    else:
        dequantize = _dequantizer(spec, group_size)
        with torch.no_grad():
            for _, linear in quantizable_linears(quantized, include_lm_head):
                linear.weight.copy_(dequantize(linear.weight))

    before = quantizable_linears(model, include_lm_head)
    after = quantizable_linears(quantized, include_lm_head)
    error = norm = 0.0
    with torch.no_grad():
        for (_, old), (_, new) in zip(before, after, strict=True):
            error += float((new.weight.double() - old.weight.double()).pow(2).sum())
            norm += float(old.weight.double().pow(2).sum())
    grouped = spec.family in ("gptq", "hqq") or (spec.family == "rtn" and spec.bits < 8)
    report = {
        "method": spec.name,
        "backend": backend_name(spec),
        "bits": spec.bits,
        "group_size": group_size if grouped else None,
        "scheme": quantization_scheme(spec),
        "include_lm_head": include_lm_head,
        "full_precision": "embeddings, norms, biases" + ("" if include_lm_head else ", output head"),
        "layers": len(after),
        "quantized_params": sum(linear.weight.numel() for _, linear in after),
        "relative_error": math.sqrt(error / norm) if norm > 0 else 0.0,
        "seconds": time.perf_counter() - start,
    }
    if spec.family == "gptq":
        report["calibration_batches"] = len(calibration)
    return quantized, report


def code_agreement(
    model_a: nn.Module,
    model_b: nn.Module,
    method: str,
    *,
    group_size: int | None = 128,
    calibration: Sequence[Any] | None = None,
    tokenizer: Any = None,
    include_lm_head: bool = False,
) -> float:
    """The "same bucket" diagnostic: the fraction of quantized weights whose integer code is the
    same in ``model_a`` and ``model_b`` (1.0: quantization cannot tell them apart; the fraction of
    codes that unlearning changed is 1 minus this).

    Each model is quantized on its own, with its own scales and zero points, as a user
    quantizing either checkpoint would (so a code can also change because its group's range
    did). Methods: ``rtn-*``, ``nf4``, ``fp4`` and ``gptq-*`` (each model then runs its own GPTQ
    on ``calibration``); library backends do not expose comparable codes."""
    spec = parse_method(method)
    if spec.family not in (*TORCH_FAMILIES, "gptq"):
        raise ValueError(f"code_agreement supports rtn-*, nf4, fp4 and gptq-*, not {spec.name!r}")
    if spec.family != "gptq":
        return same_bucket_fraction(model_a, model_b, spec, group_size=group_size, include_lm_head=include_lm_head)
    if not calibration:
        raise ValueError(f"{spec.name!r} needs calibration data: pass calibration=...")

    def gptq_codes(model: nn.Module) -> dict[str, torch.Tensor]:
        return gptq_quantize_model(
            copy.deepcopy(model),
            calibration,
            bits=spec.bits,
            group_size=group_size,
            tokenizer=tokenizer,
            include_lm_head=include_lm_head,
        )

    codes_a, codes_b = gptq_codes(model_a), gptq_codes(model_b)
    if codes_a.keys() != codes_b.keys() or any(codes_a[name].shape != codes_b[name].shape for name in codes_a):
        raise ValueError("model_a and model_b must have the same architecture (quantized layers differ)")
    same = sum(int((codes_a[name] == codes_b[name].to(codes_a[name].device)).sum()) for name in codes_a)
    return same / sum(codes.numel() for codes in codes_a.values())


def _quantize(model: nn.Module, method: QuantizationMethod, context: AttackContext) -> AttackOutcome:
    """The attack: ``method`` grouped per ATTACK_GROUP_SIZE columns where it groups; GPTQ calibrates
    on the context's retain text. The config is :func:`quantize_model`'s report (less the time)
    with ``strength`` = 16 - bits, the bits dropped from a 16-bit weight (the rungs of one method's
    ladder, weakest first: int8 8, int4 and nf4 12, int3 13, int2 14), and, given a reference
    model, the same-bucket diagnostics of ``model`` against it (:func:`bucket_report`: ``same_bucket``,
    ``bucket_grid``, ``update_to_step``) where the method has a grid (:func:`bucket_grid`), and, given
    the original GGUF file's Q4_1 codes, ``gguf_q4_1_same_code``: the share of them that ``model``
    (``unlearned``) and the attacked model (``attacked``) keep when re-encoded in Q4_1."""
    calibration = context.calibration if method.family == "gptq" else None
    quantized, report = quantize_model(
        model, method.name, group_size=ATTACK_GROUP_SIZE, calibration=calibration, tokenizer=context.tokenizer
    )
    config = {key: value for key, value in report.items() if key != "seconds"}
    config["strength"] = 16 - method.bits
    if context.reference_model is not None and bucket_grid(method) is not None:
        config.update(bucket_report(model, context.reference_model, method, group_size=ATTACK_GROUP_SIZE))
    if context.original_codes:
        config["gguf_q4_1_same_code"] = {
            "unlearned": q4_1_same_code_fraction(model, context.original_codes),
            "attacked": q4_1_same_code_fraction(quantized, context.original_codes),
            "layers": len(context.original_codes),
        }
    return AttackOutcome(quantized, None, config)


def _quantize_fixed(model: nn.Module, _: None, context: AttackContext, *, method: QuantizationMethod) -> AttackOutcome:
    """The attack of a method named without a strength (``nf4``, ``bnb-int8``, ...)."""
    return _quantize(model, method, context)


def _bits(family: str, accepted: Sequence[int]) -> Strength:
    """The bit width of ``<family>-int<bits>``, parsed into its method."""

    def method(text: str) -> QuantizationMethod:
        if text not in [str(bits) for bits in accepted]:
            raise ValueError(f"{family} has no {text}-bit method")
        return parse_method(f"{family}-int{text}")

    if list(accepted) == list(range(accepted[0], accepted[-1] + 1)):
        rule = f"{accepted[0]} <= bits <= {accepted[-1]}"
    else:
        rule = f"bits in {{{','.join(map(str, accepted))}}}"
    return Strength("bits", rule, method)


_DESCRIPTIONS = {  # a family of "<family>-int<bits>" methods, or a fixed method -> its help text
    "rtn": "round-to-nearest (int8: per row; below: per 128 columns)",
    "gptq": f"GPTQ, per 128 columns, calibrated on {GPTQ_CALIBRATION_TEXTS} retain passages",
    "quanto": "optimum-quanto",
    "hqq": "HQQ, per 128 columns",
    "nf4": "bitsandbytes' NF4 code book, emulated",
    "fp4": "bitsandbytes' FP4 code book, emulated",
    "torchao-int8": "torchao int8 weight-only",
    "bnb-nf4": "bitsandbytes NF4",
    "bnb-fp4": "bitsandbytes FP4",
    "bnb-int8": "bitsandbytes LLM.int8 weights",
}

SPECS = (
    *(
        AttackSpec(f"{family}-int", QUANTIZATION, _DESCRIPTIONS[family], _quantize, _bits(family, bits))
        for family, bits in FAMILY_BITS.items()
    ),
    *(
        AttackSpec(name, QUANTIZATION, _DESCRIPTIONS[name], partial(_quantize_fixed, method=parse_method(name)))
        for name in FIXED_METHODS
    ),
)
