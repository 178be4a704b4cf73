"""Perplexity of general text (the utility check)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from robustunlearn.data.base import Passage
from robustunlearn.metrics.likelihood import completion_logprobs


def perplexity(
    model,
    tokenizer,
    records: Sequence[Passage],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> float:
    """``exp(sum of token NLLs / number of tokens)`` over all passages: every text token after
    ``bos`` is scored, ``eos`` is not; long passages weigh by their token count."""
    if not records:
        raise ValueError("cannot compute the perplexity of an empty list of passages")
    logprobs = completion_logprobs(
        model,
        tokenizer,
        [""] * len(records),
        [r.text for r in records],
        batch_size=batch_size,
        progress=progress,
    )
    total = sum(lp.sum().item() for lp in logprobs)
    count = sum(lp.numel() for lp in logprobs)
    return math.exp(-total / count)
