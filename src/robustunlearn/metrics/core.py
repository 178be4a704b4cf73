"""Shared plumbing of the metrics: tokenization convention, inference mode, batching.

Every metric feeds the model ``[bos] + tokens(prompt) + tokens(completion)`` with the prompt and
the completion tokenized separately (the convention of :mod:`robustunlearn.data.collate`), so a
model is queried with exactly the prefixes it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from rich.progress import Progress

T = TypeVar("T")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the empty string gives no tokens)."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def special_ids(tokenizer) -> tuple[int, int, int]:
    """``(bos, eos, pad)`` token ids; raises if the tokenizer lacks one of them."""
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)} token; metrics need bos, eos and pad")
    return ids["bos"], ids["eos"], ids["pad"]


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` for the block, then every submodule's previous
    train/eval flag is restored (a model may be partly in eval mode, e.g. frozen parts)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def chunks(items: Sequence[T], batch_size: int, progress: bool = False, description: str = "") -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``batch_size``; a transient rich progress bar
    counts the items when ``progress`` is set."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    starts = range(0, len(items), batch_size)
    if not progress:
        for start in starts:
            yield items[start : start + batch_size]
        return

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=len(items))
        for start in starts:
            chunk = items[start : start + batch_size]
            yield chunk
            bar.advance(task, len(chunk))
