"""What every quantizer shares: the method names, the :class:`QuantizedTensor` result, the affine
(scale and zero point) helpers and :func:`quantizable_linears`, the weights quantization touches.
See :mod:`robustunlearn.attacks.quant` for the methods."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

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
FAMILY_BITS = {
    "rtn": (2, 3, 4, 5, 6, 7, 8),
    "gptq": (2, 3, 4, 5, 6, 7, 8),
    "quanto": (2, 4, 8),
    "hqq": (1, 2, 3, 4, 8),
}
FIXED_METHODS = {  # name -> (family, bits)
    "nf4": ("nf4", 4),
    "fp4": ("fp4", 4),
    "torchao-int8": ("torchao", 8),
    "bnb-nf4": ("bnb", 4),
    "bnb-fp4": ("bnb", 4),
    "bnb-int8": ("bnb", 8),
}


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
    if name in FIXED_METHODS:
        return QuantizationMethod(name, *FIXED_METHODS[name])
    match = re.fullmatch(r"([a-z]+)-int(\d)", name)
    if match and int(match[2]) in FAMILY_BITS.get(match[1], ()):
        return QuantizationMethod(name, match[1], int(match[2]))
    families = ", ".join(f"{family}-int{{{','.join(map(str, bits))}}}" for family, bits in FAMILY_BITS.items())
    raise ValueError(
        f"unknown quantization method {method!r}; accepted: {', '.join(QUANTIZATION_METHODS)} "
        f"(also {families}; aliases {', '.join(sorted(ALIASES))})"
    )


def work_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A float32 (float64 for float64 weights) 2-D copy to compute on."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.promote_types(weight.dtype, torch.float32))


def check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")


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
