"""Library quantizers, used when installed: optimum-quanto, HQQ, torchao and bitsandbytes.

Each quantizes one weight at a time and we keep its dequantized weight. The libraries are optional
heavy dependencies: each is imported when a method that needs it runs, and a missing one is a
:class:`~robustunlearn.core.errors.UserError` naming the package to install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robustunlearn.attacks.quant.core import QuantizationMethod
from robustunlearn.attacks.quant.rtn import CODE_BOOK_BLOCK_SIZE
from robustunlearn.core.errors import UserError

_BACKEND_PACKAGES = {"quanto": "optimum-quanto", "hqq": "hqq", "torchao": "torchao", "bnb": "bitsandbytes"}


def _require(module: str, package: str, method: str) -> Any:
    try:
        # optional heavy dependency: only this method needs it
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
    # The 4-bit blocks run over the row-major flattened weight either way, and the CPU kernel of
    # AVX-512/AMX machines mishandles 2-D weights whose rows are shorter than a block: quantize the
    # flat weight and restore the shape.
    flat = weight.detach().flatten()
    packed, state = functional.quantize_4bit(flat, blocksize=CODE_BOOK_BLOCK_SIZE, quant_type=quant_type)
    return functional.dequantize_4bit(packed, state).reshape(weight.shape).to(weight.dtype)


def backend_dequantizer(method: QuantizationMethod, group_size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """weight -> its dequantized value under the library ``method`` (``group_size``: HQQ's only)."""
    if method.family == "hqq":
        return lambda weight: _hqq(weight, method, group_size)
    backend = {"quanto": _quanto, "torchao": _torchao_int8, "bnb": _bnb}[method.family]
    return lambda weight: backend(weight, method)


def backend_name(method: QuantizationMethod) -> str:
    """What computes ``method``: ``"torch"``, or the library package and its installed version."""
    package = _BACKEND_PACKAGES.get(method.family)
    if package is None:
        return "torch"
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package
