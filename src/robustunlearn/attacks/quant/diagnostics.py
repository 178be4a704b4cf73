"""The "same bucket" diagnostics of a quantization attack (Zhang et al. 2025): how many of a
model's quantization codes equal those of a reference model (the model before unlearning), and
how far its weights moved from the reference's in units of the reference's quantization step.
An update much smaller than a step leaves most codes in their bucket, and quantization then
restores the reference's behaviour.

Both read a method's *grid*, how it maps a weight to integer codes (:func:`bucket_grid`):
round-to-nearest and the NF4/FP4 code books have their own; GPTQ, whose codes depend on its
calibration, and the library methods are read on the round-to-nearest grid of the same bits and
group size, the grid they refine. Each model is quantized on its own grid (its own scales and
zero points), as a user quantizing either checkpoint would. The weights are those the
attacks quantize (:func:`~robustunlearn.attacks.quant.core.quantizable_linears`)."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from robustunlearn.attacks.quant.core import QuantizationMethod, parse_method, quantizable_linears, work_tensor
from robustunlearn.attacks.quant.rtn import (
    CODE_BOOK_BLOCK_SIZE,
    FP4_CODE_BOOK,
    NF4_CODE_BOOK,
    TORCH_FAMILIES,
    tensor_quantizer,
)

CODE_BOOKS = {"nf4": NF4_CODE_BOOK, "fp4": FP4_CODE_BOOK}
Q4_1_BLOCK_SIZE = 32  # llama.cpp's Q4_1: 32 consecutive weights of a row share a scale and a minimum
Q4_1_LEVELS = 15  # codes 0..15
# A weight matrix counts as read from a Q4_1 file when re-encoding it reproduces every weight to within
# this fraction of its block's step (a dequantized Q4_1 matrix is reproduced exactly, up to float rounding).
ON_GRID_TOLERANCE = 1e-3


def bucket_grid(method: QuantizationMethod) -> QuantizationMethod | None:
    """The method whose codes the diagnostics read for ``method``: itself for ``rtn-*``, ``nf4``
    and ``fp4``; the emulated code book for ``bnb-nf4`` and ``bnb-fp4``; ``rtn-int<b>`` for the
    other integer methods (``gptq``, ``quanto``, ``hqq``, ``torchao``, ``bnb-int8``; the RTN int8
    grid, symmetric per row, is torchao's and bitsandbytes' own); None where RTN has no grid of
    that width (``hqq-int1``)."""
    if method.family in TORCH_FAMILIES:
        return method
    if method.name in ("bnb-nf4", "bnb-fp4"):
        return parse_method(method.name.removeprefix("bnb-"))
    if 2 <= method.bits <= 8:
        return parse_method(f"rtn-int{method.bits}")
    return None


def _grid_of(method: QuantizationMethod) -> QuantizationMethod:
    grid = bucket_grid(method)
    if grid is None:
        raise ValueError(f"{method.name!r} has no code grid to compare (RTN grids have 2 to 8 bits)")
    return grid


def step_per_weight(weight: torch.Tensor, grid: QuantizationMethod, group_size: int | None = 128) -> torch.Tensor:
    """The quantization step of each weight on ``grid`` (a tensor of the weight's shape): its
    group's scale s for RTN (per row for int8, per ``group_size`` input columns below), and
    ``a · (c_max − c_min) / (K − 1)`` for a code book of K values c, with a the absmax of the
    weight's block (the mean gap between consecutive code values, scaled as the block is)."""
    quantized = tensor_quantizer(grid, group_size)(weight)
    rows, cols = weight.shape
    if grid.family == "rtn" and grid.bits == 8:  # symmetric, one scale per row
        return quantized.scales[:, None].expand(rows, cols)
    if grid.family == "rtn":
        size = cols if group_size is None else group_size
        return quantized.scales.repeat_interleave(size, dim=1)[:, :cols]
    book = CODE_BOOKS[grid.name]
    gap = (book[-1] - book[0]) / (len(book) - 1)
    return (quantized.scales.repeat_interleave(CODE_BOOK_BLOCK_SIZE)[: weight.numel()] * gap).view(rows, cols)


def _layer_pairs(
    model: nn.Module, reference: nn.Module, include_lm_head: bool
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, weight, reference weight)`` of each quantized linear layer, in model order."""
    reference_linears = dict(quantizable_linears(reference, include_lm_head))
    linears = quantizable_linears(model, include_lm_head)
    if [name for name, _ in linears] != list(reference_linears) or any(
        linear.weight.shape != reference_linears[name].weight.shape for name, linear in linears
    ):
        raise ValueError("model and reference must have the same architecture (quantized layers differ)")
    return [(name, linear.weight, reference_linears[name].weight) for name, linear in linears]


@torch.no_grad()
def same_bucket_fraction(
    model: nn.Module,
    reference: nn.Module,
    method: QuantizationMethod,
    *,
    group_size: int | None = 128,
    include_lm_head: bool = False,
) -> float:
    """The fraction of quantized weights whose code on ``method``'s grid (:func:`bucket_grid`)
    equals the reference's code on the reference's own grid: RTN's integer code
    ``q = clamp(round(w / s) + z, 0, 2^b − 1)`` (int8: ``clamp(round(w / s), ±127)``), a code
    book's index ``argmin_k |w / a − c_k|``. 1.0: quantization cannot tell the models apart."""
    quantize = tensor_quantizer(_grid_of(method), group_size)
    same = total = 0
    for _, weight, reference_weight in _layer_pairs(model, reference, include_lm_head):
        codes = quantize(weight).codes
        same += int((codes == quantize(reference_weight).codes.to(codes.device)).sum())
        total += codes.numel()
    return same / total


@torch.no_grad()
def update_to_step(
    model: nn.Module,
    reference: nn.Module,
    method: QuantizationMethod,
    *,
    group_size: int | None = 128,
    include_lm_head: bool = False,
) -> dict[str, float]:
    """Per quantized linear layer (by module name), the update in units of the reference's
    quantization step on ``method``'s grid::

        rms(W − W_ref) / mean over the layer's weights of step_ref

    with the steps of :func:`step_per_weight`. Below 1/2, most weights stay in their bucket."""
    grid = _grid_of(method)
    ratios = {}
    for name, weight, reference_weight in _layer_pairs(model, reference, include_lm_head):
        update = work_tensor(weight) - work_tensor(reference_weight).to(weight.device)
        step = step_per_weight(reference_weight, grid, group_size).mean()
        ratios[name] = float(update.pow(2).mean().sqrt().cpu() / step.cpu())
    return ratios


def bucket_report(
    model: nn.Module, reference: nn.Module, method: QuantizationMethod, *, group_size: int | None = 128
) -> dict[str, Any]:
    """What a quantization attack records of the diagnostics: ``same_bucket``
    (:func:`same_bucket_fraction`), ``bucket_grid`` (the grid's family: ``rtn``, ``nf4``,
    ``fp4``) and ``update_to_step`` (``median`` and ``max`` over the layers, ``per_layer``)."""
    ratios = update_to_step(model, reference, method, group_size=group_size)
    return {
        "same_bucket": same_bucket_fraction(model, reference, method, group_size=group_size),
        "bucket_grid": _grid_of(method).family,
        "update_to_step": {
            "median": statistics.median(ratios.values()),
            "max": max(ratios.values()),
            "per_layer": ratios,
        },
    }


@torch.no_grad()
def q4_1_encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's Q4_1 encoding of a [out, in] weight (``in`` a multiple of 32), as ggml and the
    gguf package quantize it: per block of 32 consecutive weights of a row, the minimum m and the
    step d = (max − min) / 15, both stored in float16, and the codes::

        q = clamp(trunc((w − m) / d + 1/2), 0, 15)

    Returns ``(codes, dequantized)``: the uint8 codes (the weight's shape) and ``d·q + m`` in the
    weight's dtype, what a GGUF reader such as transformers' makes of the file. Re-encoding a
    dequantized Q4_1 matrix gives back the file's codes: its block's extremes are ``m`` and
    ``15·d + m``."""
    w = work_tensor(weight)
    rows, cols = w.shape
    if cols % Q4_1_BLOCK_SIZE:
        raise ValueError(f"Q4_1 needs rows of a multiple of {Q4_1_BLOCK_SIZE} weights, got {cols}")
    blocks = w.reshape(rows, cols // Q4_1_BLOCK_SIZE, Q4_1_BLOCK_SIZE)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = (high - low) / Q4_1_LEVELS
    inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    codes = torch.trunc((blocks - low) * inverse + 0.5).clamp(0, Q4_1_LEVELS)
    stored_step, stored_low = (value.half().to(w.dtype) for value in (step, low))
    dequantized = (stored_step * codes + stored_low).view(rows, cols)
    return codes.view(rows, cols).to(torch.uint8), dequantized.to(weight.dtype)


@torch.no_grad()
def q4_1_reference_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Q4_1 codes of ``model``'s quantizable linear layers that lie on the Q4_1 grid (re-encoding
    reproduces them to within :data:`ON_GRID_TOLERANCE` of a step): the codes of the GGUF file a
    model was read from. Layers stored in another type (or trained since) are left out."""
    codes = {}
    for name, linear in quantizable_linears(model):
        weight = linear.weight
        if weight.shape[1] % Q4_1_BLOCK_SIZE:
            continue
        layer_codes, dequantized = q4_1_encode(weight)
        blocks = work_tensor(weight).reshape(weight.shape[0], -1, Q4_1_BLOCK_SIZE)
        step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / Q4_1_LEVELS
        error = (work_tensor(dequantized) - work_tensor(weight)).abs().reshape(blocks.shape)
        if bool((error <= ON_GRID_TOLERANCE * step).all()):
            codes[name] = layer_codes
    return codes


@torch.no_grad()
def q4_1_same_code_fraction(model: nn.Module, reference_codes: dict[str, torch.Tensor]) -> float:
    """The share of the weights in ``reference_codes``' layers whose Q4_1 code (``model``'s own blocks'
    scales and minima, as re-exporting it to Q4_1 would give) equals the reference's: 1.0 means
    ``model`` in Q4_1 is the original GGUF file."""
    if not reference_codes:
        raise ValueError("no layer of the reference is on the Q4_1 grid")
    linears = dict(quantizable_linears(model))
    same = total = 0
    for name, codes in reference_codes.items():
        if name not in linears or linears[name].weight.shape != codes.shape:
            raise ValueError(f"model has no layer {name} of shape {tuple(codes.shape)}, as the reference has")
        own = q4_1_encode(linears[name].weight)[0]
        same += int((own == codes.to(own.device)).sum())
        total += codes.numel()
    return same / total
