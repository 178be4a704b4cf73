"""Batched greedy decoding."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.generation import utils as generation_utils

from robustunlearn.metrics.core import chunks, encode, inference, special_ids

logger = logging.getLogger(__name__)
# generate's cache argument: `cache` in the transformers that list it (past_key_values is deprecated
# there), `past_key_values` in earlier ones
CACHE_ARGUMENT = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


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


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer cache whose keys and values are views of buffers allocated once for
    ``capacity`` positions: a new token is written in place, where :class:`DynamicLayer` copies the
    whole cache with ``torch.cat`` on every token (60% of the tiny model's decoding time at 200 new
    tokens). The views hold the same values in the same shapes, so the logits are bit-identical."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = key_states.new_empty((*key_states.shape[:-2], self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:-2], self.capacity, value_states.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        # in place while the cache is the buffers' first `start` positions (not after a batch
        # reselection, which copies) and the new states fit; else the copying path
        in_buffer = start == 0 or self.keys._base is self.key_buffer
        if not in_buffer or end > self.capacity or key_states.shape[:-2] != self.key_buffer.shape[:-2]:
            return super().update(key_states, value_states, *args, **kwargs)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values


def preallocated_cache(model, capacity: int) -> DynamicCache | None:
    """The model's default cache with each full-attention layer a :class:`PreallocatedLayer` of
    ``capacity`` positions (sliding-window and other layer kinds keep their own); None for a model
    whose config names no layers (``generate`` then makes its own)."""
    cache = DynamicCache(config=model.config)
    if not cache.layers:
        return None
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    *,
    progress: bool = False,
    preallocate: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts``, decoded without special tokens.

    Each prompt is fed as ``[bos] + tokens(prompt)``; decoding stops at ``eos`` (not part of the
    text) or after ``max_new_tokens``. Batches are left-padded with an attention mask (the model
    derives position ids from the mask), so the output equals one-prompt-at-a-time decoding up to
    floating-point noise in the logits.

    When the model has ``config.max_position_embeddings``, a prompt too long for it to fit with
    ``max_new_tokens`` new tokens keeps its last tokens (after ``bos``): past its context a model
    warns, fails or decodes garbage. One warning line counts the prompts cut.

    The KV cache is a :func:`preallocated_cache`; ``preallocate=False`` leaves transformers' own
    (the same outputs, slower: what ``robustunlearn bench generation`` compares)."""
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
                **{
                    CACHE_ARGUMENT: preallocated_cache(model, input_ids.shape[1] + max_new_tokens)
                    if preallocate
                    else None
                },
            )
            # Rows that met eos are padded to the batch's length; both are special tokens.
            texts += tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return texts
