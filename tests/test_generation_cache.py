"""The preallocated KV cache of greedy generation: the same logits as transformers' own cache,
with keys written in place, and other layer kinds left alone."""

from types import SimpleNamespace

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from robustunlearn.metrics.generation import CACHE_ARGUMENT, PreallocatedLayer, left_pad, preallocated_cache

NEW_TOKENS = 40


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=299,  # never the argmax of these weights over 40 tokens, so every row decodes to the end
    )
    return LlamaForCausalLM(config).eval()


def greedy_logits(model, cache) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[1, 5, 9, 17], [1, 40], [1, 7, 7, 7, 7, 7, 3], [1, 250, 100]]
    input_ids, attention_mask = left_pad(rows, pad_id=0)
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=299, return_dict_in_generate=True
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            **{CACHE_ARGUMENT: cache},
            output_logits=True,
        )
    return out.sequences, torch.stack(out.logits)


def test_preallocated_cache_gives_the_logits_of_the_default_cache_bit_for_bit():
    model = tiny_llama()
    tokens, logits = greedy_logits(model, None)
    cache = preallocated_cache(model, 7 + NEW_TOKENS)
    tokens_prealloc, logits_prealloc = greedy_logits(model, cache)
    assert tokens.shape[1] == 7 + NEW_TOKENS
    assert torch.equal(tokens_prealloc, tokens)
    assert torch.equal(logits_prealloc, logits)
    # every position was written in place: the cache is its buffers, full
    for layer in cache.layers:
        assert isinstance(layer, PreallocatedLayer)
        assert layer.keys._base is layer.key_buffer and layer.keys.shape[-2] == layer.capacity - 1


def test_layer_matches_dynamic_layer_through_overflow_and_batch_reselection():
    torch.manual_seed(1)
    plain, prealloc = DynamicLayer(), PreallocatedLayer(capacity=6)

    def step(length: int, batch: int = 3) -> None:
        keys, values = torch.randn(batch, 2, length, 4), torch.randn(batch, 2, length, 4)
        expected = plain.update(keys, values)
        got = prealloc.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))

    step(3)
    step(1)
    assert prealloc.keys._base is prealloc.key_buffer  # in place so far
    plain.batch_select_indices(torch.tensor([2, 0]))
    prealloc.batch_select_indices(torch.tensor([2, 0]))
    step(1, batch=2)  # a reselected cache is a copy: the copying path, still right
    step(3, batch=2)  # past the capacity
    assert prealloc.get_seq_length() == plain.get_seq_length() == 8


def test_other_layer_kinds_keep_their_own_cache():
    config = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
    )
    cache = preallocated_cache(SimpleNamespace(config=config), capacity=16)
    assert [type(layer) for layer in cache.layers] == [PreallocatedLayer, DynamicSlidingWindowLayer]
