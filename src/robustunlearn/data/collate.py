"""Records -> token batches. Every sequence is ``[bos] + tokens(prompt) + tokens(completion) + [eos]``.

The prompt and the completion are tokenized separately and concatenated, so a model queried
with ``[bos] + tokens(prompt)`` sees exactly the prefix it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch
from robustunlearn.data.base import QA, Continuation, Passage, Record
from robustunlearn.data.prompts import PLAIN_TEMPLATE, PromptTemplate


def prompt_and_completion(record: Record, template: PromptTemplate = PLAIN_TEMPLATE, tokenizer=None) -> tuple[str, str]:
    """The (unscored prompt, scored completion) pair a record is trained on: a QA pair in
    ``template``'s format (the chat template needs the ``tokenizer``)."""
    if isinstance(record, QA):
        return template.prompt(record.question, tokenizer), template.completion(record.answer)
    if isinstance(record, Passage):
        return "", record.text
    if isinstance(record, Continuation):
        return "", record.prefix + record.continuation
    raise TypeError(f"cannot train on a {type(record).__name__} record")


def encode_example(
    tokenizer, prompt: str, completion: str, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels (``IGNORE_INDEX`` on the prompt) of one example, truncated on the right."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    ids = [tokenizer.bos_token_id, *prompt_ids, *completion_ids, tokenizer.eos_token_id]
    # bos and the prompt are context; the completion and eos are scored.
    labels = [IGNORE_INDEX] * (1 + len(prompt_ids)) + completion_ids + [tokenizer.eos_token_id]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def pad_examples(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> TokenBatch:
    """Right-pad encoded examples into one batch."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return TokenBatch(input_ids, attention_mask, labels)


def collate_records(
    tokenizer, records: Sequence[Record], max_length: int | None = None, template: PromptTemplate = PLAIN_TEMPLATE
) -> TokenBatch:
    """Tokenize and right-pad records (QA pairs in ``template``'s format) into one training batch."""
    if not records:
        raise ValueError("cannot collate an empty list of records")
    encoded = [encode_example(tokenizer, *prompt_and_completion(r, template, tokenizer), max_length) for r in records]
    return pad_examples(encoded, tokenizer.pad_token_id)
