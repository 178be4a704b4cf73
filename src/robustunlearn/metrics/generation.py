"""Batched greedy decoding."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from robustunlearn.metrics.core import chunks, encode, inference, special_ids

logger = logging.getLogger(__name__)


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row padded on the left to the longest one, so the
    next token of every row is predicted at the same (last) position."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    *,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts``, decoded without special tokens.

    Each prompt is fed as ``[bos] + tokens(prompt)``; decoding stops at ``eos`` (not part of the
    text) or after ``max_new_tokens``. Batches are left-padded with an attention mask (the model
    derives position ids from the mask), so the output equals one-prompt-at-a-time decoding up to
    floating-point noise in the logits.

    When the model has ``config.max_position_embeddings``, a prompt too long for it to fit with
    ``max_new_tokens`` new tokens keeps its last tokens (after ``bos``): past its context a model
    warns, fails or decodes garbage. One warning line counts the prompts cut."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    bos, eos, pad = special_ids(tokenizer)
    rows = [encode(tokenizer, p) for p in prompts]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None:
        room = max_positions - max_new_tokens - 1  # prompt tokens that fit beside bos and the new tokens
        if room < 0:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {max_positions} positions"
            )
        cut = sum(len(row) > room for row in rows)
        if cut:
            logger.warning(
                f"generation: kept the last {room} tokens of {cut} of {len(rows)} prompt(s), so that they "
                f"and {max_new_tokens} new tokens fit the model's {max_positions} positions"
            )
            rows = [row[len(row) - room :] if len(row) > room else row for row in rows]
    # An explicit config, so sampling settings stored in a checkpoint's generation_config are ignored.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    texts: list[str] = []
    with inference(model):
        for batch in chunks(rows, batch_size, progress, "generating"):
            input_ids, attention_mask = left_pad([[bos, *row] for row in batch], pad)
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                generation_config=config,
            )
            # Rows that met eos are padded to the batch's length; both are special tokens.
            texts += tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return texts
