"""Teach refusals on the forget questions: supervised (``idk``) or by preference (``idk-dpo``).

Sources: Maini et al. 2024, TOFU ("idk" baseline); Rafailov et al. 2023 (DPO); Zhang et al. 2024
(NPO; its TOFU code runs DPO with refusal = preferred, true answer = dispreferred, scaled by 2/β).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustunlearn.core.batching import TokenBatch, UnlearnBatch
from robustunlearn.objectives.common import (
    RetainTerm,
    check_choice,
    check_positive,
    mean_nll,
    reference_logprobs,
    require,
    sequence_logprobs,
)

IDK_MODES = ("sft", "dpo")


@dataclass(kw_only=True)
class Idk(RetainTerm):
    """``idk``: make the model answer forget questions with a refusal.

    ``mode="sft"`` (default): L = NLL(refusal answers | forget questions) + γ · R_retain, on
    ``batch.forget_refusal``.

    ``mode="dpo"``: with w = refusal answer (``batch.forget_refusal``), l = true answer
    (``batch.forget_answered``: the same questions; passages in the forget batch take no part),
    Δ_a = log π_θ(a|x) − log π_ref(a|x) summed over answer tokens,
    L = −(2/β) E log σ(β (Δ_w − Δ_l)) + γ · R_retain. This is DPO scaled by 2/β, the scale of the
    NPO reference code, so that its gradient at θ = ref is −∇ E(log π_θ(w) − log π_θ(l)) whatever
    β: summed-NLL fine-tuning on the refusal plus ascent on the true answer.

    Hyperparameters: ``mode``, ``beta`` = β (default 0.1, DPO only), ``gamma`` = γ (default 1.0),
    ``retain_loss`` = ``"nll"`` (default) or ``"kl"``.
    """

    name: ClassVar[str] = "idk"
    batch_parts: ClassVar[frozenset[str]] = frozenset({"forget", "retain", "refusal"})
    mode: str = "sft"
    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("mode", self.mode, IDK_MODES)
        check_positive("beta", self.beta)

    @property
    def forward_passes(self) -> int:
        """The refusals and retain; DPO also scores the true answers (the forget records take no part)."""
        return 3 if self.mode == "dpo" else 2

    @property
    def needs_reference(self) -> bool:
        return self.mode == "dpo" or self.retain_needs_reference

    @property
    def sequence_reference(self) -> bool:
        return self.mode == "dpo" and not self.retain_needs_reference

    def reference_sequences(self, batch: UnlearnBatch) -> dict[str, TokenBatch]:
        if self.mode != "dpo":
            return {}
        refusal = require(batch, "forget_refusal", self.name)
        return {"refusal_logprobs": refusal, "forget_logprobs": self._answered(batch)}

    def reference_outputs(self, reference_model: nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        sequences = reference_logprobs(reference_model, self.reference_sequences(batch))
        return {**self.retain_reference(reference_model, batch), **sequences}

    def _answered(self, batch: UnlearnBatch):
        """The dispreferred side of each DPO pair: the refusal's question with its true answer
        (``batch.forget`` itself when a caller built no separate one: a forget batch of QA only)."""
        return batch.forget if batch.forget_answered is None else batch.forget_answered

    def loss(
        self, model: nn.Module, batch: UnlearnBatch, reference: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        refusal_logprobs, refusal_counts = sequence_logprobs(model, require(batch, "forget_refusal", self.name))
        refusal_nll = mean_nll(refusal_logprobs, refusal_counts)
        if self.mode == "sft":
            return self.with_retain(model, batch, reference, refusal_nll, {"refusal_nll": refusal_nll.detach()})
        forget_logprobs, forget_counts = sequence_logprobs(model, self._answered(batch))
        margin = (refusal_logprobs - reference["refusal_logprobs"]) - (forget_logprobs - reference["forget_logprobs"])
        forget = (2 / self.beta) * F.softplus(-self.beta * margin).mean()
        logs = {
            "refusal_nll": refusal_nll.detach(),
            "forget_nll": mean_nll(forget_logprobs, forget_counts).detach(),
            "reward_margin": margin.mean().detach(),
        }
        return self.with_retain(model, batch, reference, forget, logs)


@dataclass(kw_only=True)
class IdkDPO(Idk):
    """``idk-dpo``: :class:`Idk` with ``mode="dpo"`` by default (TOFU's IdkDPO)."""

    name: ClassVar[str] = "idk-dpo"
    mode: str = "dpo"
