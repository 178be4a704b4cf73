"""Gradient ascent on the forget set, alone (``ga``) or with a retain term (``graddiff``).

Sources: Jang et al. 2023 (gradient ascent for unlearning); Maini et al. 2024, TOFU ("grad_diff",
"KL" baselines); Liu et al. 2022 (gradient difference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from robustunlearn.core.batching import UnlearnBatch
from robustunlearn.objectives.common import RetainTerm, mean_nll, sequence_logprobs


def _ascent(model: nn.Module, batch: UnlearnBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """−NLL_forget (mean over scored forget tokens) and its log."""
    nll = mean_nll(*sequence_logprobs(model, batch.forget))
    return -nll, {"forget_nll": nll.detach()}


@dataclass(kw_only=True)
class GradientAscent:
    """``ga``: L = −NLL_forget = (1/N) Σ_scored log p_θ(y_t | y_<t). No retain term, no
    hyperparameters. Minimizing it is gradient ascent on the forget likelihood."""

    name: ClassVar[str] = "ga"
    needs_reference: ClassVar[bool] = False
    sequence_reference: ClassVar[bool] = False
    batch_parts: ClassVar[frozenset[str]] = frozenset({"forget"})
    forward_passes: ClassVar[int] = 1
    loss_on: ClassVar[str] = "outputs"

    def trainable_parameters(self, model: nn.Module) -> None:
        return None

    def reference_outputs(self, reference_model: nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        return {}

    def loss(
        self, model: nn.Module, batch: UnlearnBatch, reference: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        forget, logs = _ascent(model, batch)
        retain = forget.new_zeros(())
        return {"loss": forget + retain, "forget": forget, "retain": retain, **logs}


@dataclass(kw_only=True)
class GradDiff(RetainTerm):
    """``graddiff``: L = −NLL_forget + γ · R_retain.

    Hyperparameters: ``gamma`` = γ (default 1.0); ``retain_loss`` = ``"nll"`` (retain mean token
    NLL, TOFU's grad_diff, the default) or ``"kl"`` (KL(p_ref ‖ p_θ) per scored retain token,
    TOFU's KL baseline)."""

    name: ClassVar[str] = "graddiff"

    def loss(
        self, model: nn.Module, batch: UnlearnBatch, reference: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        forget, logs = _ascent(model, batch)
        return self.with_retain(model, batch, reference, forget, logs)
