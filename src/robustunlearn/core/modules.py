"""What the rest of the package needs to know about a model's structure, each in one place: its
stack of transformer blocks, a hook that captures one module's input or output and ends the
forward pass there, LoRA adapters through peft, and reading and writing the trainable weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustunlearn.core.errors import UserError

LLAMA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (``model.model.layers`` in a Hugging Face Llama, also
    under a peft wrapper): the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules when the
    model has that config, else the largest ``ModuleList`` of two or more modules of one class."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(c) for c in m}) == 1
    ]
    if count is not None:
        matching = [m for m in stacks if len(m) == count]
        if matching:
            return matching[0]
    repeated = [m for m in stacks if len(m) >= 2]
    if not repeated:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList of repeated blocks"
            + (f" and none of config.num_hidden_layers={count} modules" if count is not None else "")
        )
    return max(repeated, key=lambda s: sum(p.numel() for p in s.parameters()))


class _StopForward(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def run_until(
    module: nn.Module, forward: Callable[[], Any], *, inputs: bool = False
) -> tuple[tuple, dict[str, Any]] | Any:
    """Run ``forward()`` until ``module`` is reached and return what it saw: with ``inputs`` its
    ``(args, kwargs)``, else its output. The pass ends there, so later layers and the head cost nothing."""
    captured: list[Any] = []

    def before(_: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    def after(_: nn.Module, args: tuple, output: Any) -> None:
        captured.append(output)
        raise _StopForward

    if inputs:
        handle = module.register_forward_pre_hook(before, with_kwargs=True)
    else:
        handle = module.register_forward_hook(after)
    try:
        forward()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(module).__name__} did not run in the forward pass")
    return captured[0]


@dataclass(frozen=True)
class LoraOptions:
    """LoRA adapters (Hu et al. 2021) through peft: W + (alpha / rank) B A on the ``target_modules``
    (names of Llama's attention and MLP projections by default)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_LINEAR_NAMES


def lora_options(options: dict[str, Any] | None) -> LoraOptions | None:
    """A settings mapping as :class:`LoraOptions` (None: no LoRA); unknown or bad options raise ValueError."""
    if options is None:
        return None
    accepted = [f.name for f in fields(LoraOptions)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown lora option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    if "target_modules" in options:
        options = {**options, "target_modules": tuple(options["target_modules"])}
    chosen = LoraOptions(**options)
    if isinstance(chosen.rank, bool) or not isinstance(chosen.rank, int) or chosen.rank < 1:
        raise ValueError(f"lora rank must be a positive integer, got {chosen.rank!r}")
    if isinstance(chosen.alpha, bool) or not isinstance(chosen.alpha, (int, float)) or chosen.alpha <= 0:
        raise ValueError(f"lora alpha must be positive, got {chosen.alpha!r}")
    return chosen


def add_lora(model: nn.Module, lora: LoraOptions) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place (only they stay trainable); returns the peft wrapper."""
    try:
        # optional heavy dependency: only LoRA runs need peft
        peft = importlib.import_module("peft")
    except ImportError as error:
        raise UserError("LoRA needs the peft package: pip install 'robustunlearn[lora]'") from error
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted(set(lora.target_modules) - present)
    if missing:
        raise ValueError(f"LoRA target module(s) {missing} not in the model; its linear layers are {sorted(present)}")
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    return peft.get_peft_model(model, config)


def save_trainable_weights(model: nn.Module, path: Path) -> None:
    """Write the weights that require grad (the ones a run changes) to a safetensors file."""
    save_weights({name: p for name, p in model.named_parameters() if p.requires_grad}, path)


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Write named tensors to a safetensors file."""
    save_file({name: tensor.detach().contiguous() for name, tensor in weights.items()}, str(path))


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy the weights saved in ``path`` into the parameters of ``model`` with the same names."""
    parameters = dict(model.named_parameters())
    saved = load_file(str(path))
    unknown = sorted(name for name in saved if name not in parameters or parameters[name].shape != saved[name].shape)
    if unknown:
        raise ValueError(f"{path} holds weights this model lacks or shapes it differs in: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, tensor in saved.items():
            parameters[name].copy_(tensor)
