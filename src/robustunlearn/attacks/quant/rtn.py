"""The pure-torch quantizers: round-to-nearest integers (symmetric per row, asymmetric per group)
and bitsandbytes' 4-bit NF4/FP4 code books, emulated."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from robustunlearn.attacks.quant.core import (
    QuantizationMethod,
    QuantizedTensor,
    check_bits,
    group_params,
    parse_method,
    quantize_affine,
    work_tensor,
)

TORCH_FAMILIES = ("rtn", "nf4", "fp4")  # the methods tensor_quantizer computes

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


def rtn_symmetric(weight: torch.Tensor, bits: int = 8) -> QuantizedTensor:
    """Symmetric round-to-nearest with one scale per output channel (row), as LLM.int8's and
    torchao's int8 weight-only schemes::

        s = max_j |W_ij| / (2^(b-1) - 1),   q = clamp(round(W / s), -(2^(b-1) - 1), 2^(b-1) - 1),   Ŵ = s q

    Codes are signed: -127..127 for int8. An all-zero row gets s = 1."""
    check_bits(bits)
    w = work_tensor(weight)
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1, keepdim=True)
    scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    codes = torch.clamp(torch.round(w / scales), -qmax, qmax)
    return QuantizedTensor(codes.to(torch.int8), scales.squeeze(1), None, (codes * scales).to(weight.dtype))


def rtn_groupwise(weight: torch.Tensor, bits: int = 4, group_size: int | None = 128) -> QuantizedTensor:
    """Asymmetric round-to-nearest with a scale and a zero point (:func:`group_params`) per row
    and group of ``group_size`` consecutive input columns (``None``: one group per row).

    Codes are unsigned, 0..2^b - 1; ``scales`` and ``zeros`` have shape [out, n_groups]. When
    in_features is not a multiple of ``group_size`` the last group is partial: we pad it with
    zeros, which leaves its range unchanged because the range always contains 0. The elementwise
    error is at most s/2."""
    check_bits(bits)
    w = work_tensor(weight)
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
    w = work_tensor(weight)
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
