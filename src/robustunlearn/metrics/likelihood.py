"""Per-token log-probabilities of a completion given a prompt, batched; reused by the
multiple-choice, membership-inference, TOFU and perplexity metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
    similar length. The log-softmax is taken in float64 on each row's completion positions only:
    the model's logits stay the only ``batch x length x vocab`` tensor."""
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
            rows = [encoded[i][0] + encoded[i][1] for i in batch]
            width = max(map(len, rows))
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, : len(row)] = torch.tensor(row)
                attention_mask[r, : len(row)] = 1
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
            for r, i in enumerate(batch):
                start, target = len(encoded[i][0]), encoded[i][1]
                # The logits at position t predict token t + 1.
                log_probs = logits[r, start - 1 : start - 1 + len(target)].double().log_softmax(-1).cpu()
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
