"""Setup shared by several test files: tiny Llamas, weight snapshots, a quadratic, closures."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    seed: int = 0,
    *,
    vocab_size: int = 64,
    layers: int = 2,
    max_positions: int = 64,
    dtype: torch.dtype = torch.float32,
    attention: str | None = None,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (hidden 32, MLP 64, 4 heads) in training mode; ``seed`` fixes
    its weights through the global RNG. ``attention`` None keeps transformers' default kernel."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        attn_implementation=attention,
    )
    return LlamaForCausalLM(config).to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name].flatten().view(torch.uint8), tensor.flatten().view(torch.uint8)), name


class Quadratic(nn.Module):
    """L(θ) = ½‖r‖², r = S(θ − θ*), A = SᵀS positive definite."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        self.register_buffer("sqrt_a", torch.eye(dim, dtype=torch.float64) + noise / dim**0.5)
        self.register_buffer("target", torch.randn(dim, generator=generator, dtype=torch.float64))
        self.theta = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def residual(self) -> torch.Tensor:
        return self.sqrt_a @ (self.theta - self.target)

    def loss(self) -> torch.Tensor:
        return 0.5 * self.residual().square().sum()


def closure_for(module: nn.Module, loss_fn: Callable[[], torch.Tensor]):
    """The optimizer closure protocol around ``loss_fn``; it ignores ``sample_labels`` and ``term``."""

    def closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None):
        loss = loss_fn()
        if not backward:
            return loss
        module.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    return closure


def next_token_loss(model: LlamaForCausalLM, input_ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Mean cross-entropy of every next token of ``input_ids``."""

    def loss() -> torch.Tensor:
        logits = model(input_ids=input_ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))

    return loss
