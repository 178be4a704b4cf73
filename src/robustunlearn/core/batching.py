"""Token batches: what objectives, metrics and attacks consume.

Tokenization lives in :mod:`robustunlearn.data.collate`; everything downstream sees only these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens, padding)


@dataclass
class TokenBatch:
    """Right-padded causal-LM batch. ``labels`` equal ``input_ids`` where a token is scored and
    ``IGNORE_INDEX`` elsewhere (padding; the question of a QA pair, so only the answer is scored).
    Labels are *not* shifted: position t's label is token t, as Hugging Face models expect."""

    input_ids: torch.Tensor  # [batch, time] long
    attention_mask: torch.Tensor  # [batch, time] long, 1 = real token
    labels: torch.Tensor  # [batch, time] long

    def to(self, device: torch.device | str) -> "TokenBatch":
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def scored_tokens(self) -> int:
        """The tokens a causal-LM loss averages over: labels other than IGNORE_INDEX after the shift
        (position 0 has no prefix to predict it from)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class UnlearnBatch:
    """One unlearning step's data: forget examples, retain examples, and (for ``idk``) the forget
    questions paired with refusal answers instead of the true ones, and the same questions with
    their true answers (``forget_answered``, row-aligned with ``forget_refusal``: the forget batch
    may also hold passages, which have no refusal)."""

    forget: TokenBatch
    retain: TokenBatch | None = None
    forget_refusal: TokenBatch | None = None
    forget_answered: TokenBatch | None = None

    def to(self, device: torch.device | str) -> "UnlearnBatch":
        def moved(batch: TokenBatch | None) -> TokenBatch | None:
            return None if batch is None else batch.to(device)

        return UnlearnBatch(
            self.forget.to(device), moved(self.retain), moved(self.forget_refusal), moved(self.forget_answered)
        )
