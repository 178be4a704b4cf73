"""Log-likelihood helpers and the retain term shared by the objectives.

Labels follow :mod:`robustunlearn.core.batching`: unshifted, ``IGNORE_INDEX`` where not scored. The
token at position t is predicted from the logits at position t-1, so every helper compares
``logits[:, :-1]`` with ``labels[:, 1:]``; only the scored positions' logits are computed
(:func:`~robustunlearn.core.scoring.scored_logits`). Half-precision logits are upcast to float32
before the log-softmax; float64 stays float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustunlearn.core.batching import TokenBatch, UnlearnBatch
from robustunlearn.core.scoring import scatter_rows, scored_logits

RETAIN_LOSSES = ("nll", "kl")


def check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; use one of {', '.join(accepted)}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def sequence_logprobs(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, log π(y|x) = Σ_t log p(y_t | y_<t, x) over the scored tokens, and |y|.

    Returns two ``[batch]`` tensors: the summed log-probabilities and the scored-token counts."""
    logits, targets, scored = scored_logits(model, batch)
    token_logprobs = -F.cross_entropy(logits, targets, reduction="none")
    # summed along each row with zeros at unscored positions, as a loss over [B, T - 1] would
    return scatter_rows(token_logprobs, scored).sum(dim=1), scored.sum(dim=1)


def reference_logprobs(reference_model: nn.Module, sequences: dict[str, TokenBatch]) -> dict[str, torch.Tensor]:
    """``{name: log π_ref}`` (``[rows]``) of each token batch of ``sequences``, under ``reference_model``."""
    return {name: sequence_logprobs(reference_model, tokens)[0] for name, tokens in sequences.items()}


def mean_nll(logprob_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood averaged over all scored tokens of the batch (what Hugging Face's
    ``model(labels=...).loss`` returns)."""
    return -logprob_sums.sum() / counts.sum().clamp(min=1)


def scored_log_softmax(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """log p(· | prefix) at every scored position: ``[scored tokens, vocab]``."""
    return torch.log_softmax(scored_logits(model, batch)[0], dim=-1)


def kl_from_reference(model: nn.Module, batch: TokenBatch, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) = Σ_v p_ref(v) (log p_ref(v) − log p_θ(v)), averaged over scored tokens.

    ``reference_log_probs`` is :func:`scored_log_softmax` of the frozen model on the same batch."""
    log_probs = scored_log_softmax(model, batch)
    kl = F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="sum")
    return kl / max(log_probs.shape[0], 1)


def require(batch: UnlearnBatch, part: str, objective: str) -> TokenBatch:
    tokens = getattr(batch, part)
    if tokens is None:
        raise ValueError(f"objective {objective!r} needs batch.{part}, but it is None")
    return tokens


@dataclass(kw_only=True)
class RetainTerm:
    """The retain term γ · R added to most objectives.

    R is ``retain_loss="nll"``: the retain set's mean token NLL, or ``"kl"``: KL(p_ref ‖ p_θ) per
    scored retain token, averaged (needs the frozen reference model). ``gamma=0`` drops the term
    and the need for a retain batch.
    """

    name: ClassVar[str]
    batch_parts: ClassVar[frozenset[str]] = frozenset({"forget", "retain"})
    forward_passes: ClassVar[int] = 2  # forget, retain
    loss_on: ClassVar[str] = "outputs"
    gamma: float = 1.0
    retain_loss: str = "nll"

    def __post_init__(self) -> None:
        check_positive("gamma", self.gamma, allow_zero=True)
        check_choice("retain_loss", self.retain_loss, RETAIN_LOSSES)

    @property
    def retain_needs_reference(self) -> bool:
        return self.gamma != 0 and self.retain_loss == "kl"

    # Defaults for objectives whose only use of the reference model is the retain term; those
    # with more (npo, idk-dpo) override needs_reference, sequence_reference and reference_outputs,
    # and add reference_sequences.
    @property
    def needs_reference(self) -> bool:
        return self.retain_needs_reference

    @property
    def sequence_reference(self) -> bool:
        return False

    def trainable_parameters(self, model: nn.Module) -> None:
        return None

    def reference_outputs(self, reference_model: nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        return self.retain_reference(reference_model, batch)

    def retain_reference(self, reference_model: nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        if not self.retain_needs_reference:
            return {}
        retain = require(batch, "retain", self.name)
        return {"retain_log_probs": scored_log_softmax(reference_model, retain)}

    def with_retain(
        self,
        model: nn.Module,
        batch: UnlearnBatch,
        reference: dict[str, torch.Tensor],
        forget: torch.Tensor,
        logs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The objective's output dict: ``forget``, ``retain`` = γ·R, ``loss`` = their sum, logs."""
        if self.gamma == 0:
            retain_term = forget.new_zeros(())
        else:
            retain = require(batch, "retain", self.name)
            if self.retain_loss == "nll":
                value = mean_nll(*sequence_logprobs(model, retain))
            else:
                value = kl_from_reference(model, retain, reference["retain_log_probs"])
            logs = {**logs, f"retain_{self.retain_loss}": value.detach()}
            retain_term = self.gamma * value
        return {"loss": forget + retain_term, "forget": forget, "retain": retain_term, **logs}
