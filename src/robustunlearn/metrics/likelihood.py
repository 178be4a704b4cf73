"""Per-token log-probabilities of a completion given a prompt, batched; reused by the
multiple-choice, membership-inference, TOFU and perplexity metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from robustunlearn.core.batching import IGNORE_INDEX
from robustunlearn.core.scoring import scored_logits
from robustunlearn.data.collate import pad_examples
from robustunlearn.metrics.core import chunks, encode, inference, special_ids


@dataclass(frozen=True)
class TokenScores:
    """Scores of the completion tokens ``x_1..x_n`` of one sequence (float64, on the CPU).

    ``logprobs[t] = log p(x_t | x_<t)``. With distribution statistics, ``mean[t]`` and ``std[t]``
    are the mean and standard deviation of ``log p(z)`` for ``z ~ p(. | x_<t)`` (Min-K%++)."""

    logprobs: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per token."""
        return -self.logprobs.mean().item()


def next_token_stats(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``log p(z)`` under ``z ~ p`` for log-distributions over the
    last dimension: ``mu = sum_z p(z) log p(z)`` (minus the entropy) and
    ``sigma = sqrt(sum_z p(z) log p(z)^2 - mu^2)``."""
    probs = log_probs.exp()
    # p * log p is 0 where p underflows to 0 (log p = -inf would give nan).
    weighted = torch.where(probs > 0, probs * log_probs, torch.zeros_like(log_probs))
    mean = weighted.sum(-1)
    second = torch.where(probs > 0, weighted * log_probs, torch.zeros_like(log_probs)).sum(-1)
    return mean, (second - mean.square()).clamp_min(0).sqrt()


def completion_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    add_eos: bool = False,
    distribution_stats: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> list[TokenScores]:
    """Score ``tokens(completion)`` (then ``eos`` if ``add_eos``) after ``[bos] + tokens(prompt)``.

    An empty prompt scores the whole text after ``bos``. Sequences are right-padded in batches of
    similar length. Logits are computed at the completion positions only
    (:func:`~robustunlearn.core.scoring.scored_logits`), and their log-softmax taken in float64."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    bos, eos, pad = special_ids(tokenizer)
    encoded = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        target = encode(tokenizer, completion) + ([eos] if add_eos else [])
        if not target:
            raise ValueError(f"completion {i} ({completion!r}) has no tokens to score")
        encoded.append(([bos, *encode(tokenizer, prompt)], target))
    # Longest first, so each batch holds similar lengths (little padding) and memory peaks early.
    order = sorted(range(len(encoded)), key=lambda i: -sum(map(len, encoded[i])))
    results: list[TokenScores | None] = [None] * len(encoded)
    with inference(model):
        for batch in chunks(order, batch_size, progress, "scoring"):
            # each row: the prompt as context, the completion scored
            rows = [(encoded[i][0] + encoded[i][1], [IGNORE_INDEX] * len(encoded[i][0]) + encoded[i][1]) for i in batch]
            logits, _, _ = scored_logits(model, pad_examples(rows, pad).to(model.device))
            # row-major: each row's completion positions in order, one row after another
            for i, row_logits in zip(batch, logits.split([len(encoded[i][1]) for i in batch])):
                target = encoded[i][1]
                log_probs = row_logits.double().log_softmax(-1).cpu()
                token_logprobs = log_probs.gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)
                stats = next_token_stats(log_probs) if distribution_stats else (None, None)
                results[i] = TokenScores(token_logprobs, *stats)
    return results  # type: ignore[return-value]


def completion_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    add_eos: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each completion given its prompt (see :func:`completion_scores`)."""
    scores = completion_scores(
        model, tokenizer, prompts, completions, add_eos=add_eos, batch_size=batch_size, progress=progress
    )
    return [s.logprobs for s in scores]
