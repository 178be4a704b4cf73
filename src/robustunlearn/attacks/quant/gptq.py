"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), written for CPU and GPU alike.

Per ``nn.Linear`` layer with calibration inputs X (one row per real token), GPTQ minimizes
‖WXᵀ - ŴXᵀ‖² by quantizing one input column at a time and spreading each column's rounding
error over the columns not yet quantized, through the inverse Hessian H⁻¹ of that objective,
H = 2XᵀX / n.

Calibration is sequential, as in the paper: the inputs of block i are computed by blocks < i
that are already quantized, so each block corrects the error that reaches it. All linear layers
of one block see the same pass through the unquantized block (no "true-sequential" split
inside a block); the output head, if included, is calibrated last with one pass through the
fully quantized model. Padding tokens (``attention_mask == 0``) do not enter H.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from robustunlearn.attacks.quant.core import QuantizedTensor, check_bits, group_params, quantize_affine, work_tensor
from robustunlearn.core.batching import TokenBatch
from robustunlearn.core.modules import decoder_blocks, run_until


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> QuantizedTensor:
    """Quantize ``weight`` [out, in] with GPTQ given ``hessian`` [in, in] = 2XᵀX / n.

    With U the upper Cholesky factor of (H + λI)⁻¹, λ = ``percdamp`` · mean(diag H), column j
    is rounded to q_j and the columns after it absorb its error::

        δ = (w_j - q_j) / U_jj,      W[:, j+1:] -= δ U[j, j+1:]

    Updates are applied within a block of ``block_size`` columns at once and to later columns
    once per block (the paper's lazy batch updates). Quantization is asymmetric with a scale
    and zero point per row and group of ``group_size`` columns (``None``: per row, set from
    the original weight); a group's parameters come from its error-compensated values when its
    first column is reached, so the block size is rounded to a multiple of the group size and a
    group never straddles two blocks. Columns that saw no input (H_jj = 0) get H_jj = 1: they
    are rounded without spreading error. Input columns are taken in order (no act-order)."""
    check_bits(bits)
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size}")
    if not 0 <= percdamp:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    w = work_tensor(weight).clone()
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be [{cols}, {cols}] for a weight of shape {tuple(w.shape)}, got {tuple(hessian.shape)}"
        )
    h = hessian.to(w).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    if group_size is None:
        scale, zero = group_params(w, bits)
        block = block_size
    else:
        block = max(block_size // group_size, 1) * group_size
    codes = torch.empty_like(w)
    dequantized = torch.empty_like(w)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        errors = torch.empty_like(w_block)
        for i in range(end - start):
            if group_size is not None and (start + i) % group_size == 0:
                scale, zero = group_params(w_block[:, i : i + group_size], bits)
                scales.append(scale)
                zeros.append(zero)
            code = quantize_affine(w_block[:, i : i + 1], scale, zero, bits)
            q = (code - zero) * scale
            codes[:, start + i] = code[:, 0]
            dequantized[:, start + i] = q[:, 0]
            errors[:, i] = (w_block[:, i] - q[:, 0]) / u_block[i, i]
            w_block[:, i:] -= errors[:, i : i + 1] * u_block[i : i + 1, i:]
        w[:, end:] -= errors @ u[start:end, end:]
    if group_size is None:
        scales, zeros = [scale], [zero]
    return QuantizedTensor(
        codes.to(torch.uint8),
        torch.cat(scales, dim=1),
        torch.cat(zeros, dim=1),
        dequantized.to(weight.dtype),
    )


def calibration_inputs(calibration: Sequence[Any], tokenizer: Any = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` pairs, each [batch, time], from a list of ``TokenBatch``es,
    input-id tensors ([time] or [batch, time], no padding) or strings (tokenized one by one
    with ``tokenizer``)."""
    if not calibration:
        raise ValueError("calibration is empty: pass retain text, token batches or input-id tensors")
    pairs = []
    for item in calibration:
        if isinstance(item, TokenBatch):
            pairs.append((item.input_ids, item.attention_mask))
            continue
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("calibration strings need a tokenizer: pass tokenizer=...")
            item = tokenizer(item, return_tensors="pt")["input_ids"]
        if not isinstance(item, torch.Tensor) or item.dim() not in (1, 2):
            raise ValueError(
                f"calibration items must be TokenBatch, str or a 1-D/2-D input-id tensor, got {type(item).__name__}"
            )
        ids = item.long().reshape(-1, item.shape[-1])
        pairs.append((ids, torch.ones_like(ids)))
    return pairs


def _hidden_states(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first_block_inputs(
    model: nn.Module, block: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` each batch passes to the first block (hidden states, attention
    mask, rotary embeddings, ...), so the blocks can be replayed one at a time."""
    device = next(model.parameters()).device
    return [
        run_until(
            block,
            lambda: model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False),
            inputs=True,
        )
        for ids, mask in batches
    ]


def _hessians(
    linears: list[tuple[str, nn.Linear]], runs: list[tuple[torch.Tensor, Callable[[], Any]]]
) -> dict[str, torch.Tensor]:
    """H = 2XᵀX / n for each linear layer, X its inputs at the real tokens of every batch.
    ``runs`` pairs each batch's attention mask with a call that runs the batch through the part
    of the model holding the layers."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys((name for name, _ in linears), 0)
    current_mask: list[torch.Tensor] = []

    def hook_for(name: str) -> Callable:
        def accumulate(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            x = x[current_mask[0].reshape(-1).to(x.device).bool()]
            x = x.to(torch.promote_types(module.weight.dtype, torch.float32))
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] += x.shape[0]

        return accumulate

    handles = [linear.register_forward_hook(hook_for(name)) for name, linear in linears]
    try:
        for mask, run in runs:
            current_mask[:] = [mask]
            run()
    finally:
        for handle in handles:
            handle.remove()
    if not all(counts.values()):
        raise ValueError("calibration has no real tokens (every attention_mask is 0)")
    return {name: 2 * sums[name] / counts[name] for name in counts}


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calibration: Sequence[Any],
    *,
    bits: int = 4,
    group_size: int | None = 128,
    block_size: int = 128,
    percdamp: float = 0.01,
    tokenizer: Any = None,
    include_lm_head: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantize ``model``'s block linear layers (and its output head if ``include_lm_head``)
    *in place* with GPTQ, calibrated block by block on ``calibration`` (see
    :func:`calibration_inputs`); each weight is replaced by its dequantized value. Returns each
    quantized weight's integer codes (uint8, on CPU) by module name."""
    batches = calibration_inputs(calibration, tokenizer)
    names = {id(module): name for name, module in model.named_modules()}
    was_training = model.training
    model.eval()
    codes: dict[str, torch.Tensor] = {}

    def quantize(linears: list[tuple[str, nn.Linear]], hessians: dict[str, torch.Tensor]) -> None:
        for name, linear in linears:
            result = gptq_quantize_weight(
                linear.weight,
                hessians[name],
                bits=bits,
                group_size=group_size,
                block_size=block_size,
                percdamp=percdamp,
            )
            linear.weight.copy_(result.dequantized)
            codes[name] = result.codes.cpu()

    try:
        blocks = decoder_blocks(model)
        inputs = _first_block_inputs(model, blocks[0], batches)
        for block in blocks:
            linears = [(names[id(m)], m) for m in block.modules() if isinstance(m, nn.Linear)]
            runs = [
                (mask, partial(block, *args, **kwargs))
                for (_, mask), (args, kwargs) in zip(batches, inputs, strict=True)
            ]
            quantize(linears, _hessians(linears, runs))
            inputs = [
                _with_hidden_states(args, kwargs, _hidden_states(block(*args, **kwargs))) for args, kwargs in inputs
            ]
        if include_lm_head:
            head = model.get_output_embeddings()
            device = next(model.parameters()).device
            runs = [
                (
                    mask,
                    partial(model, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False),
                )
                for ids, mask in batches
            ]
            linears = [(names[id(head)], head)]
            quantize(linears, _hessians(linears, runs))
    finally:
        model.train(was_training)
    return codes
