"""A causal LM's logits at the positions of a :class:`~robustunlearn.core.batching.TokenBatch` that
predict a scored token, with the output layer run on those positions only.

The output layer (hidden size x vocabulary) is a large share of a small model's compute: 38% of
the matrix products of the tiny TOFU Llama (hidden 256, 2 blocks, 4k tokens). A QA batch scores only
its answers, so its question tokens and padding (a third of TOFU's positions) need no logits.
:func:`scored_logits` hands the output layer, through a forward pre-hook, the hidden states of the
scored positions alone. Whatever the model does after the layer (a float upcast, Gemma's
soft-capping) is elementwise, so it sees [N, vocabulary] rather than [B, T, vocabulary] and gives
the same values.
"""

from __future__ import annotations

import torch
from torch import nn

from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch


def output_layer(model: nn.Module) -> nn.Module | None:
    """The module that maps hidden states to logits (Hugging Face's ``get_output_embeddings``,
    through a PEFT wrapper too), or None for a model without one."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def scored_logits(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at every position t whose next token (label t + 1) is scored, at least float32,
    ``[N, vocabulary]`` in row-major order of ``batch.labels[:, 1:] != IGNORE_INDEX``; the N target
    tokens; and that mask (``[B, T - 1]``), with which a caller puts per-position values back
    into rows. A model without an output layer to hook computes every position's logits, of
    which the scored ones are returned."""
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE_INDEX
    head = output_layer(model)

    def keep_scored(module: nn.Module, args: tuple) -> tuple:
        hidden, *rest = args
        if hidden.shape[:2] != batch.labels.shape:
            raise ValueError(
                f"the output layer got hidden states of shape {tuple(hidden.shape)}, not one per "
                f"position of the {tuple(batch.labels.shape)} batch"
            )
        return (hidden[:, :-1][scored], *rest)

    handle = None if head is None else head.register_forward_pre_hook(keep_scored)
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if head is None:
        logits = logits[:, :-1][scored]
    return logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[scored], scored


def scatter_rows(values: torch.Tensor, scored: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """Per-position ``values`` ([N], in :func:`scored_logits`'s order) back at their places in a
    ``[B, T - 1]`` tensor, ``fill`` elsewhere; differentiable in ``values``."""
    rows = torch.full(scored.shape, fill, dtype=values.dtype, device=values.device)
    return rows.masked_scatter(scored, values)
