"""Greedy generation with prompts longer than the model's context (MUSE VerbMem prompts can be)."""

import pytest

from robustunlearn.metrics import generate_greedy

MAX_NEW_TOKENS = 8


def generation_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "robustunlearn.metrics.generation"]


@pytest.fixture(scope="module")
def long_prompt(synthetic_setup) -> str:
    """A prompt of more tokens than the tiny model's 256 positions."""
    benchmark = synthetic_setup.benchmark
    return " ".join(r.text for r in benchmark.get("forget_text") + benchmark.get("retain_text"))


def test_long_prompts_keep_their_last_tokens_with_one_warning(synthetic_setup, fresh_model, long_prompt, caplog):
    tokenizer = synthetic_setup.tokenizer
    model = fresh_model()
    limit = model.config.max_position_embeddings
    long_ids = tokenizer.encode(long_prompt, add_special_tokens=False)
    assert len(long_ids) > limit
    fed = []
    generate = model.generate

    def spy(**inputs):
        fed.extend(row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"]))
        return generate(**inputs)

    model.generate = spy
    prompts = [long_prompt, "a short prompt", long_prompt[1:]]
    texts = generate_greedy(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=2)

    assert len(texts) == 3
    room = limit - MAX_NEW_TOKENS - 1  # prompt tokens beside bos
    assert fed[0] == [tokenizer.bos_token_id, *long_ids[-room:]]
    assert fed[1] == [tokenizer.bos_token_id, *tokenizer.encode("a short prompt", add_special_tokens=False)]
    assert len(fed[2]) + MAX_NEW_TOKENS == limit
    [message] = generation_warnings(caplog)
    assert f"the last {room} tokens of 2 of 3 prompt(s)" in message and f"{limit} positions" in message

    generate_greedy(model, tokenizer, prompts[:1], MAX_NEW_TOKENS)
    assert len(generation_warnings(caplog)) == 2  # once per call


def test_prompts_that_fit_are_fed_whole_without_a_warning(synthetic_setup, fresh_model, caplog):
    generate_greedy(fresh_model(), synthetic_setup.tokenizer, ["a short prompt"], MAX_NEW_TOKENS)
    assert generation_warnings(caplog) == []


def test_max_new_tokens_must_leave_room_for_a_prompt(synthetic_setup, fresh_model):
    model = fresh_model()
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_new_tokens={limit} leaves no room .* {limit} positions"):
        generate_greedy(model, synthetic_setup.tokenizer, ["a"], limit)
