"""Weight quantization as an attack on an unlearned model.

Zhang et al. (2025, "Catastrophic failure of LLM unlearning via quantization") showed that
quantizing an unlearned model can bring the forgotten knowledge back: unlearning moves weights
by less than a quantization step, so the unlearned and the original weights round to the same
codes ("same bucket"). :func:`quantize_model` applies a quantizer and :func:`code_agreement`
measures how many codes the unlearning actually changed.

Which weights: like weight-only quantization libraries (GPTQ, AWQ, bitsandbytes' ``load_in_4bit``)
we quantize the weights of the ``nn.Linear`` layers inside the transformer blocks (attention
q/k/v/o, MLP gate/up/down). Embeddings, norms and biases stay in full precision, and so does the
output head unless ``include_lm_head=True`` (with tied embeddings the input embedding shares that
weight and is quantized with it).

The returned model is a plain model whose weights are the *dequantized* values (in the weight's
dtype), so every metric runs on it unchanged; the arithmetic is done in float32 (float64 for
float64 weights).

Methods (``QUANTIZATION_METHODS``; case and ``_`` vs ``-`` are ignored, aliases in ``ALIASES``):

* ``rtn-int8``: symmetric round-to-nearest, one scale per output channel (:func:`rtn_symmetric`).
* ``rtn-int{2..7}``: asymmetric round-to-nearest, scale and zero point per group of
  ``group_size`` input columns (:func:`rtn_groupwise`).
* ``nf4``, ``fp4``: bitsandbytes' 4-bit code books emulated in torch (:func:`quantize_code_book`).
* ``gptq-int{2..8}``: GPTQ with error compensation, calibrated on the caller's text
  (:mod:`robustunlearn.attacks.quant.gptq`).
* library backends, used when installed: ``quanto-int{2,4,8}`` (optimum-quanto),
  ``hqq-int{1,2,3,4,8}`` (HQQ), ``torchao-int8``, ``bnb-nf4``/``bnb-fp4``/``bnb-int8``
  (bitsandbytes). Each quantizes one weight at a time and we keep its dequantized weight.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustunlearn.core.errors import UserError
from robustunlearn.core.modules import decoder_blocks

QUANTIZATION_METHODS = (
    "rtn-int8",
    "rtn-int4",
    "rtn-int3",
    "nf4",
    "fp4",
    "gptq-int4",
    "gptq-int8",
    "quanto-int4",
    "quanto-int8",
    "hqq-int4",
    "torchao-int8",
    "bnb-nf4",
    "bnb-fp4",
    "bnb-int8",
)

ALIASES = {
    "int8": "rtn-int8",
    "int4": "rtn-int4",
    "int3": "rtn-int3",
    "gptq": "gptq-int4",
    "quanto": "quanto-int4",
    "hqq": "hqq-int4",
    "torchao": "torchao-int8",
    "bnb-4bit": "bnb-nf4",
    "bnb-8bit": "bnb-int8",
}

# Bit widths each family with an "-int{b}" suffix accepts.
_FAMILY_BITS = {
    "rtn": (2, 3, 4, 5, 6, 7, 8),
    "gptq": (2, 3, 4, 5, 6, 7, 8),
    "quanto": (2, 4, 8),
    "hqq": (1, 2, 3, 4, 8),
}
_FIXED_METHODS = {  # name -> (family, bits)
    "nf4": ("nf4", 4),
    "fp4": ("fp4", 4),
    "torchao-int8": ("torchao", 8),
    "bnb-nf4": ("bnb", 4),
    "bnb-fp4": ("bnb", 4),
    "bnb-int8": ("bnb", 8),
}

CODE_BOOK_BLOCK_SIZE = 64  # bitsandbytes' default blocksize for 4-bit weights

# NF4 (Dettmers et al. 2023, QLoRA): 8 positive and 7 negative quantiles of N(0, 1) at
# probabilities evenly spaced from 0.5 to δ = (1 - 1/30 + 1 - 1/32) / 2, plus an exact 0,
# normalized to [-1, 1]. These are bitsandbytes' float32 values of that construction.
NF4_CODE_BOOK = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 as bitsandbytes implements it: sign x {0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1}. The normal
# e2m1 values (1, 1.5, 2, 3, 4, 6) / 6 give 1/6 .. 1; bitsandbytes' one subnormal is 1/192 where
# OCP e2m1 has 0.5 / 6. Sixteen codes with a -0 and a +0, sorted.
FP4_CODE_BOOK = (
    -1.0,
    -2 / 3,
    -1 / 2,
    -1 / 3,
    -1 / 4,
    -1 / 6,
    -1 / 192,
    -0.0,
    0.0,
    1 / 192,
    1 / 6,
    1 / 4,
    1 / 3,
    1 / 2,
    2 / 3,
    1.0,
)


@dataclass
class QuantizedTensor:
    """A quantized weight: integer ``codes`` (the weight's shape), the ``scales`` and ``zeros``
    (zero points; ``None`` for symmetric and code-book schemes) of its groups, and the
    ``dequantized`` tensor (the weight's dtype) that replaces the weight."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    dequantized: torch.Tensor


@dataclass(frozen=True)
class QuantizationMethod:
    """A parsed method name: ``family`` picks the quantizer, ``bits`` its width."""

    name: str
    family: str
    bits: int


def parse_method(method: str) -> QuantizationMethod:
    """``"GPTQ_int4"`` -> ``QuantizationMethod("gptq-int4", "gptq", 4)``; ValueError on unknown names."""
    name = method.strip().lower().replace("_", "-")
    name = ALIASES.get(name, name)
    if name in _FIXED_METHODS:
        return QuantizationMethod(name, *_FIXED_METHODS[name])
    match = re.fullmatch(r"([a-z]+)-int(\d)", name)
    if match and int(match[2]) in _FAMILY_BITS.get(match[1], ()):
        return QuantizationMethod(name, match[1], int(match[2]))
    families = ", ".join(f"{family}-int{{{','.join(map(str, bits))}}}" for family, bits in _FAMILY_BITS.items())
    raise ValueError(
        f"unknown quantization method {method!r}; accepted: {', '.join(QUANTIZATION_METHODS)} "
        f"(also {families}; aliases {', '.join(sorted(ALIASES))})"
    )


def _work_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A float32 (float64 for float64 weights) 2-D copy to compute on."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.promote_types(weight.dtype, torch.float32))


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")


def rtn_symmetric(weight: torch.Tensor, bits: int = 8) -> QuantizedTensor:
    """Symmetric round-to-nearest with one scale per output channel (row), as LLM.int8's and
    torchao's int8 weight-only schemes::

        s = max_j |W_ij| / (2^(b-1) - 1),   q = clamp(round(W / s), -(2^(b-1) - 1), 2^(b-1) - 1),   Ŵ = s q

    Codes are signed: -127..127 for int8. An all-zero row gets s = 1."""
    _check_bits(bits)
    w = _work_tensor(weight)
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1, keepdim=True)
    scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    codes = torch.clamp(torch.round(w / scales), -qmax, qmax)
    return QuantizedTensor(codes.to(torch.int8), scales.squeeze(1), None, (codes * scales).to(weight.dtype))


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of asymmetric min-max quantization over the last dim of ``w``
    (kept as a size-1 dim). The range is widened to contain 0, as GPTQ does, so 0 is exact::

        lo = min(min w, 0),  hi = max(max w, 0),  s = (hi - lo) / (2^b - 1),  z = round(-lo / s)

    An all-zero group gets s = 1."""
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale)


def quantize_affine(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / s) + z, 0, 2^b - 1)`` (float); they dequantize to ``s (q - z)``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_groupwise(weight: torch.Tensor, bits: int = 4, group_size: int | None = 128) -> QuantizedTensor:
    """Asymmetric round-to-nearest with a scale and a zero point (:func:`group_params`) per row
    and group of ``group_size`` consecutive input columns (``None``: one group per row).

    Codes are unsigned, 0..2^b - 1; ``scales`` and ``zeros`` have shape [out, n_groups]. When
    in_features is not a multiple of ``group_size`` the last group is partial: we pad it with
    zeros, which leaves its range unchanged because the range always contains 0. The elementwise
    error is at most s/2."""
    _check_bits(bits)
    w = _work_tensor(weight)
    rows, cols = w.shape
    size = cols if group_size is None else group_size
    if size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size}")
    n_groups = math.ceil(cols / size)
    groups = F.pad(w, (0, n_groups * size - cols)).view(rows, n_groups, size)
    scale, zero = group_params(groups, bits)
    codes = quantize_affine(groups, scale, zero, bits)
    dequantized = ((codes - zero) * scale).view(rows, -1)[:, :cols]
    return QuantizedTensor(
        codes.view(rows, -1)[:, :cols].to(torch.uint8),
        scale.squeeze(-1),
        zero.squeeze(-1),
        dequantized.to(weight.dtype),
    )


def quantize_code_book(
    weight: torch.Tensor, code_book: Sequence[float], block_size: int = CODE_BOOK_BLOCK_SIZE
) -> QuantizedTensor:
    """Block-wise code-book quantization as bitsandbytes' 4-bit weights: flatten the weight
    (row-major), cut it into blocks of ``block_size``, and per block::

        a = max |w|,   q_i = argmin_k |w_i / a - c_k|,   ŵ_i = c_{q_i} a

    with the sorted code book c (:data:`NF4_CODE_BOOK`, :data:`FP4_CODE_BOOK`). ``scales`` holds
    one absmax per block (kept in full precision: bitsandbytes' optional double quantization of
    the absmax values is not emulated). The last block may be partial; an all-zero block gets a = 1."""
    w = _work_tensor(weight)
    book = torch.tensor(code_book, dtype=w.dtype, device=w.device)
    if book.numel() < 2 or bool((book[1:] < book[:-1]).any()):
        raise ValueError("code_book must hold at least two values in ascending order")
    flat = w.flatten()
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    # nearest code = which interval between consecutive midpoints holds w / a
    codes = torch.bucketize(blocks / absmax, (book[1:] + book[:-1]) / 2)
    dequantized = (book[codes] * absmax).flatten()[: flat.numel()].view_as(w)
    codes = codes.flatten()[: flat.numel()].view_as(w).to(torch.uint8)
    return QuantizedTensor(codes, absmax.squeeze(1), None, dequantized.to(weight.dtype))


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of the ``nn.Linear`` layers that quantization touches, in model order:
    those inside the transformer blocks, plus the output head if ``include_lm_head``."""
    inside = {id(m) for layer in decoder_blocks(model) for m in layer.modules()}
    head = model.get_output_embeddings() if include_lm_head else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (id(module) in inside or module is head)
    ]


def _require(module: str, package: str, method: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(f"quantization method {method!r} needs the {package} package: pip install {package}") from error


def _scratch_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding a copy of ``weight``, for libraries that quantize modules."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def _quanto(weight: torch.Tensor, method: QuantizationMethod) -> torch.Tensor:
    # quanto picks its own int2/int4 group size: 128, or the largest multiple of 32 dividing in_features
    quanto = _require("optimum.quanto", "optimum-quanto", method.name)
    holder = nn.Sequential(_scratch_linear(weight))
    quanto.quantize(holder, weights=getattr(quanto, f"qint{method.bits}"))
    quanto.freeze(holder)
    return holder[0].qweight.dequantize().to(weight.dtype)


def _hqq(weight: torch.Tensor, method: QuantizationMethod, group_size: int | None) -> torch.Tensor:
    # HQQ groups the row-major flattened weight, so a group spans rows when group_size > in_features
    hqq = _require("hqq.core.quantize", "hqq", method.name)
    config = hqq.BaseQuantizeConfig(nbits=method.bits, group_size=group_size or weight.shape[1])
    layer = hqq.HQQLinear(_scratch_linear(weight), config, compute_dtype=weight.dtype, device=str(weight.device))
    return layer.dequantize().reshape(weight.shape).to(weight.dtype)


def _torchao_int8(weight: torch.Tensor, method: QuantizationMethod) -> torch.Tensor:
    quantization = _require("torchao.quantization", "torchao", method.name)
    holder = nn.Sequential(_scratch_linear(weight))
    quantization.quantize_(holder, quantization.Int8WeightOnlyConfig())
    return holder[0].weight.dequantize().to(weight.dtype)


def _bnb(weight: torch.Tensor, method: QuantizationMethod) -> torch.Tensor:
    functional = _require("bitsandbytes.functional", "bitsandbytes", method.name)
    if method.bits == 8:
        # LLM.int8 weights: symmetric int8 per row; outliers are split off activations, not weights
        codes, row_absmax, _ = functional.int8_vectorwise_quant(weight.detach().float())
        return (codes.float() * row_absmax[:, None] / 127).to(weight.dtype)
    quant_type = method.name.removeprefix("bnb-")
    packed, state = functional.quantize_4bit(weight.detach(), blocksize=CODE_BOOK_BLOCK_SIZE, quant_type=quant_type)
    return functional.dequantize_4bit(packed, state).to(weight.dtype)


def tensor_quantizer(
    method: str | QuantizationMethod, group_size: int | None = 128
) -> Callable[[torch.Tensor], QuantizedTensor]:
    """The pure-torch quantizer of ``method`` (``rtn-*``, ``nf4``, ``fp4``): weight -> QuantizedTensor."""
    spec = parse_method(method) if isinstance(method, str) else method
    if spec.family == "rtn":
        if spec.bits == 8:
            return rtn_symmetric
        return lambda weight: rtn_groupwise(weight, spec.bits, group_size)
    if spec.family in ("nf4", "fp4"):
        book = NF4_CODE_BOOK if spec.family == "nf4" else FP4_CODE_BOOK
        return lambda weight: quantize_code_book(weight, book)
    raise ValueError(f"{spec.name!r} has no pure-torch tensor quantizer; those are rtn-int{{2..8}}, nf4, fp4")


def _dequantizer(spec: QuantizationMethod, group_size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if spec.family in ("rtn", "nf4", "fp4"):
        quantize = tensor_quantizer(spec, group_size)
        return lambda weight: quantize(weight).dequantized
    if spec.family == "hqq":
        return lambda weight: _hqq(weight, spec, group_size)
    backend = {"quanto": _quanto, "torchao": _torchao_int8, "bnb": _bnb}[spec.family]
    return lambda weight: backend(weight, spec)


_BACKEND_PACKAGES = {"quanto": "optimum-quanto", "hqq": "hqq", "torchao": "torchao", "bnb": "bitsandbytes"}


def _backend_name(spec: QuantizationMethod) -> str:
    package = _BACKEND_PACKAGES.get(spec.family)
    if package is None:
        return "torch"
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package


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

    The report: ``method``, ``backend``, ``bits``, ``group_size``, ``layers`` (weights quantized),
    ``quantized_params``, ``relative_error`` (‖W - Ŵ‖_F / ‖W‖_F over all of them), ``seconds``.
    The input model is not modified."""
    spec = parse_method(method)
    if spec.family == "gptq" and not calibration:
        raise ValueError(f"{spec.name!r} needs calibration data (retain text): pass calibration=...")
    start = time.perf_counter()
    quantized = copy.deepcopy(model)
    if spec.family == "gptq":
        from robustunlearn.attacks.quant.gptq import gptq_quantize_model

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
        "backend": _backend_name(spec),
        "bits": spec.bits,
        "group_size": group_size if grouped else None,
        "include_lm_head": include_lm_head,
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
    if spec.family == "gptq":
        if not calibration:
            raise ValueError(f"{spec.name!r} needs calibration data: pass calibration=...")
        from robustunlearn.attacks.quant.gptq import gptq_quantize_model

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
        pairs = [(codes_a[name], codes_b.get(name)) for name in codes_a]
    else:
        if spec.family not in ("rtn", "nf4", "fp4"):
            raise ValueError(f"code_agreement supports rtn-*, nf4, fp4 and gptq-*, not {spec.name!r}")
        quantize = tensor_quantizer(spec, group_size)
        linears_b = dict(quantizable_linears(model_b, include_lm_head))
        pairs = []
        for name, linear in quantizable_linears(model_a, include_lm_head):
            other = linears_b.get(name)
            pairs.append((quantize(linear.weight).codes, None if other is None else quantize(other.weight).codes))
    same = total = 0
    for codes_a_layer, codes_b_layer in pairs:
        if codes_b_layer is None or codes_a_layer.shape != codes_b_layer.shape:
            raise ValueError("model_a and model_b must have the same architecture (quantized layers differ)")
        same += int((codes_a_layer == codes_b_layer.to(codes_a_layer.device)).sum())
        total += codes_a_layer.numel()
    return same / total
