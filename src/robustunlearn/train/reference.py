"""The frozen reference model's sequence log-probabilities of every forget example, computed once.

NPO and DPO (``idk-dpo``) read the reference model only through log π_ref(y|x) of forget-side
examples (the forget records, and for DPO each forget question with each refusal answer). The
forget set is fixed and the reference frozen, so these values are computed once, before the first
step, and looked up at every step: a step does one forward fewer, and no copy of the model stays
in memory (docs/engine.md, "Reference cache").

Each example is keyed by the SHA-256 of its token ids and labels (unpadded), so a lookup finds it
whatever the batch it lands in, on whichever data-parallel rank and after a resume; an example the
cache lacks (other tokenization, other ``max_length``) is an error, not a silent recomputation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustunlearn.core.batching import TokenBatch
from robustunlearn.core.distributed import DataParallel
from robustunlearn.data.base import Record
from robustunlearn.data.collate import encode_example, pad_examples, prompt_and_completion
from robustunlearn.data.prompts import PLAIN_TEMPLATE, PromptTemplate
from robustunlearn.objectives.common import sequence_logprobs

REFERENCE_CACHE = "reference.safetensors"  # in each checkpoint of a run that caches its reference


def _key(input_ids: list[int], labels: list[int]) -> bytes:
    return hashlib.sha256(torch.tensor([input_ids, labels], dtype=torch.int64).numpy().tobytes()).digest()


def example_keys(tokens: TokenBatch) -> list[bytes]:
    """The key of each row of a right-padded batch: the SHA-256 of its real tokens and their labels."""
    lengths = tokens.attention_mask.sum(dim=1).tolist()
    ids, labels = tokens.input_ids.tolist(), tokens.labels.tolist()
    return [_key(row_ids[:n], row_labels[:n]) for row_ids, row_labels, n in zip(ids, labels, lengths)]


class ReferenceCache:
    """Summed log-probabilities (over scored tokens) of the frozen reference model, per example key;
    held on the CPU."""

    def __init__(self, keys: Sequence[bytes], logprobs: torch.Tensor):
        self.logprobs = logprobs.detach().cpu()
        self.index = {key: row for row, key in enumerate(keys)}

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, tokens: TokenBatch) -> torch.Tensor:
        """``[rows]`` log π_ref of the rows of ``tokens``, on their device: what
        ``sequence_logprobs(reference_model, tokens)[0]`` computes."""
        rows = []
        for row, key in enumerate(example_keys(tokens)):
            if key not in self.index:
                raise KeyError(f"row {row} of the batch is not an example the reference cache was built on")
            rows.append(self.index[key])
        return self.logprobs[rows].to(tokens.input_ids.device)

    def save(self, path: Path) -> None:
        keys = torch.frombuffer(bytearray(b"".join(self.index)), dtype=torch.uint8).view(len(self), 32)
        save_file({"keys": keys, "logprobs": self.logprobs.contiguous()}, str(path))

    @classmethod
    def load(cls, path: Path) -> ReferenceCache:
        tensors = load_file(str(path))
        return cls([bytes(row) for row in tensors["keys"].tolist()], tensors["logprobs"])


def build_reference_cache(
    frozen: nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    max_length: int,
    batch_size: int,
    parallel: DataParallel,
    template: PromptTemplate = PLAIN_TEMPLATE,
) -> tuple[ReferenceCache, int]:
    """The cache of ``records`` (encoded as the engine's batches encode them: in ``template``'s
    format) under ``frozen``, and
    the forward passes it counts on each rank.

    Examples are taken in order, duplicates once, in batches of ``batch_size``: the global batch,
    whatever the number of ranks, so the values (which can differ in the last bits with a batch's
    shape) do not depend on it, and a run of N processes matches one of 1. Rank r runs batches r,
    r + N, ...; every rank receives every value. Under FSDP every forward needs every rank (each
    gathers the weights with the others), so each rank runs every batch and no values are sent: N
    times the work, once per run, for the same values. Each batch holds N ranks' shares of a step, and
    each rank counts one pass per batch (the work of all ranks over N), so all ranks count alike,
    as a compute budget needs to stop them at the same step."""
    examples: dict[bytes, tuple[list[int], list[int]]] = {}
    for record in records:
        ids, labels = encode_example(tokenizer, *prompt_and_completion(record, template, tokenizer), max_length)
        examples.setdefault(_key(ids, labels), (ids, labels))
    keys = list(examples)
    chunks = [keys[start : start + batch_size] for start in range(0, len(keys), batch_size)]
    device = next(frozen.parameters()).device
    mine: list[tuple[list[bytes], torch.Tensor]] = []
    with torch.no_grad():
        for chunk in chunks if parallel.sharded else chunks[parallel.rank :: parallel.world_size]:
            tokens = pad_examples([examples[key] for key in chunk], tokenizer.pad_token_id).to(device)
            mine.append((chunk, sequence_logprobs(frozen, tokens)[0].cpu()))
    gathered = mine if parallel.sharded else [pair for rank in parallel.gather_objects(mine) for pair in rank]
    cache = ReferenceCache(
        [key for chunk, _ in gathered for key in chunk], torch.cat([values for _, values in gathered])
    )
    return cache, len(chunks)
