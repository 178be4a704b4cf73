"""Benchmark: batched greedy generation against one prompt at a time, and the preallocated KV
cache against transformers' dynamic one (``robustunlearn bench generation``)."""

from __future__ import annotations

import random
import time

import torch

from robustunlearn.core.models import TinyModelConfig, build_tiny_model, train_tokenizer
from robustunlearn.metrics.generation import generate_greedy

_NAMES = (
    "Alice Moreau",
    "Bruno Tanaka",
    "Chiara Okafor",
    "Dmitri Alves",
    "Elena Lindqvist",
    "Farid Nakamura",
)
_ATTRIBUTES = (
    "birth city",
    "favourite colour",
    "first novel",
    "home town",
    "mother's profession",
    "university",
)


def bench_prompts(n_prompts: int, seed: int = 0) -> list[str]:
    """QA prompts of varied length, like the synthetic benchmark's."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n_prompts):
        subject = " and ".join(rng.sample(_NAMES, rng.randint(1, 3)))
        prompts.append(f"Question: What is the {rng.choice(_ATTRIBUTES)} of {subject} (case {i})?\nAnswer:")
    return prompts


def bench_generation(
    model=None,
    tokenizer=None,
    *,
    n_prompts: int = 64,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict:
    """Time :func:`generate_greedy` on ``n_prompts`` prompts batched and one at a time, and batched
    with transformers' own KV cache instead of the preallocated one; print the speed-ups and return
    ``{"batched_s", "sequential_s", "speedup", "dynamic_cache_s", "cache_speedup", "identical", ...}``.

    Without a model, the embedded tiny Llama (random weights, a tokenizer trained on the prompts)
    is built on ``device``. ``identical`` says whether the three ways gave the same texts."""
    prompts = bench_prompts(n_prompts, seed)
    if model is None or tokenizer is None:
        tokenizer = train_tokenizer(prompts, vocab_size=512)
        model = build_tiny_model(TinyModelConfig(), tokenizer, seed).to(device)
    generate_greedy(model, tokenizer, prompts[:2], max_new_tokens, batch_size)  # warm-up

    def timed(**options) -> tuple[list[str], float]:
        start = time.perf_counter()
        texts = generate_greedy(model, tokenizer, prompts, max_new_tokens, **options)
        return texts, time.perf_counter() - start

    batched, batched_s = timed(batch_size=batch_size)
    sequential, sequential_s = timed(batch_size=1)
    dynamic, dynamic_s = timed(batch_size=batch_size, preallocate=False)
    result = {
        "n_prompts": n_prompts,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "device": str(model.device),
        "batched_s": batched_s,
        "sequential_s": sequential_s,
        "speedup": sequential_s / batched_s,
        "dynamic_cache_s": dynamic_s,
        "cache_speedup": dynamic_s / batched_s,
        "identical": batched == sequential == dynamic,
    }
    print(
        f"greedy generation of {n_prompts} prompts x {max_new_tokens} new tokens on {result['device']}: "
        f"batched (batch size {batch_size}) {batched_s:.2f} s, one at a time {sequential_s:.2f} s, "
        f"speed-up {result['speedup']:.1f}x; batched with transformers' dynamic KV cache {dynamic_s:.2f} s, "
        f"the preallocated cache {result['cache_speedup']:.2f}x faster; identical outputs: {result['identical']}"
    )
    return result
