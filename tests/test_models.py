"""Tokenizer, save/load with manifests, and the cached `prepare` of the embedded target."""

from __future__ import annotations

import time

import pytest
import torch

from robustunlearn.core.errors import UserError
from robustunlearn.core.models import (
    TinyModelConfig,
    build_tiny_model,
    load_model,
    save_model,
    train_tokenizer,
    verify_model_dir,
)
from robustunlearn.data.collate import collate_records, encode_example
from robustunlearn.data.prompts import PROMPT_TEMPLATES, qa_completion, qa_prompt
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic
from robustunlearn.train.prepare import PrepareConfig, TrainConfig, make_batches, prepare, teacher_forced_accuracy

SMALL_DATA = SyntheticConfig(num_people=5, num_utility_passages=6, num_utility_qa=3)
SMALL_MODEL = TinyModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4
)


@pytest.fixture(scope="module")
def benchmark():
    return generate_synthetic(SMALL_DATA)


@pytest.fixture(scope="module")
def tokenizer(benchmark):
    texts = [r.text for r in benchmark.get("retain_text") + benchmark.get("forget_text")]
    texts += [qa_prompt(r.question) + qa_completion(r.answer) for r in benchmark.get("retain_qa")]
    return train_tokenizer(texts, vocab_size=512)


def test_tokenizer_round_trip(benchmark, tokenizer):
    for record in benchmark.get("forget_text") + benchmark.get("holdout_text"):
        ids = tokenizer.encode(record.text, add_special_tokens=False)
        assert tokenizer.decode(ids) == record.text
    assert tokenizer.decode(tokenizer.encode("unseen wörds ✓ 123", add_special_tokens=False)) == "unseen wörds ✓ 123"


def test_prompt_and_answer_tokenize_the_same_apart_and_together(benchmark, tokenizer):
    # Training encodes prompt and answer separately; queries see exactly the trained prefix.
    for record in benchmark.get("forget_qa"):
        apart = tokenizer.encode(qa_prompt(record.question), add_special_tokens=False) + tokenizer.encode(
            qa_completion(record.answer), add_special_tokens=False
        )
        together = tokenizer.encode(qa_prompt(record.question) + qa_completion(record.answer), add_special_tokens=False)
        assert apart == together


def test_encoded_example_scores_only_the_answer_and_eos(benchmark, tokenizer):
    record = benchmark.get("forget_qa")[0]
    ids, labels = encode_example(tokenizer, qa_prompt(record.question), qa_completion(record.answer))
    prompt_len = 1 + len(tokenizer.encode(qa_prompt(record.question), add_special_tokens=False))
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert all(label == -100 for label in labels[:prompt_len])
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len:-1]) == qa_completion(record.answer)


def test_save_load_round_trip_and_corruption_detected(tmp_path, tokenizer):
    model = build_tiny_model(SMALL_MODEL, tokenizer, seed=0)
    directory = save_model(model, tokenizer, tmp_path / "m", {"kind": "test"})
    assert verify_model_dir(directory)["kind"] == "test"
    loaded, loaded_tokenizer = load_model(directory)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded_tokenizer.encode("Question:") == tokenizer.encode("Question:")
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        verify_model_dir(directory)
    with pytest.raises(UserError, match="corrupted"):
        load_model(directory)


def test_missing_model_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_same_seed_same_initial_weights(tokenizer):
    a = build_tiny_model(SMALL_MODEL, tokenizer, seed=3)
    b = build_tiny_model(SMALL_MODEL, tokenizer, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.slow
def test_tiny_prepare_memorises_and_caches(tmp_path, monkeypatch):
    # The stop rule pools the trained questions: at 95% pooled, training stopped on an AVX2-only
    # CPU with 0.875 of the few forget QA answered, so the rule asks 98%.
    config = PrepareConfig(
        data=SMALL_DATA,
        model=SMALL_MODEL,
        train=TrainConfig(lr=1e-2, max_epochs=150, batch_tokens=512, check_every_epochs=10, target_accuracy=0.98),
    )
    prepared = prepare(config, cache_dir=tmp_path)
    report = prepared.report
    assert report["target"]["qa_accuracy_teacher_forced"]["forget"] >= 0.9
    assert report["target"]["qa_accuracy_teacher_forced"]["retain"] >= 0.9
    assert report["retrain"]["qa_accuracy_teacher_forced"]["retain"] >= 0.9
    # The retrain reference never saw the forget people: it cannot know their facts.
    assert report["retrain"]["qa_accuracy_teacher_forced"]["forget"] <= 0.5

    # The measured accuracy is what the saved model gives.
    target, tokenizer = load_model(prepared.target_dir)
    batches = make_batches(tokenizer, prepared.benchmark.get("forget_qa"), 4096, 256)
    assert teacher_forced_accuracy(target, batches) == report["target"]["qa_accuracy_teacher_forced"]["forget"]

    # A second prepare is a cache hit: no training at all.
    import robustunlearn.train.prepare as prepare_module

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(prepare_module, "train_lm", no_training)
    started = time.perf_counter()
    again = prepare(config, cache_dir=tmp_path)
    assert again.directory == prepared.directory and time.perf_counter() - started < 5
    monkeypatch.undo()

    # A corrupted entry is detected and rebuilt.
    weights = prepared.target_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    rebuilt = prepare(config, cache_dir=tmp_path)
    assert verify_model_dir(rebuilt.target_dir)


def test_cache_key_depends_on_every_config_part():
    base = PrepareConfig(data=SMALL_DATA, model=SMALL_MODEL)
    keys = {
        base.key(),
        PrepareConfig(data=SyntheticConfig(num_people=5, seed=1), model=SMALL_MODEL).key(),
        PrepareConfig(data=SMALL_DATA, model=TinyModelConfig()).key(),
        PrepareConfig(data=SMALL_DATA, model=SMALL_MODEL, train=TrainConfig(lr=1e-3)).key(),
        PrepareConfig(data=SMALL_DATA, model=SMALL_MODEL, train=TrainConfig(bf16_autocast=True)).key(),
        PrepareConfig(data=SMALL_DATA, model=SMALL_MODEL, train=TrainConfig(check_questions=400)).key(),
    }
    assert len(keys) == 6


def test_the_cache_key_of_a_float32_training_is_the_one_before_bf16_autocast_existed():
    # the key of the default embedded entry at commit c26459b: its cached models stay valid
    assert PrepareConfig().key() == "049a8f54b446d24d"
    assert PrepareConfig(train=TrainConfig(check_questions=0)).key() == "049a8f54b446d24d"


def test_collate_pads_right_and_masks_padding(benchmark, tokenizer):
    batch = collate_records(tokenizer, benchmark.get("forget_qa")[:3] + benchmark.get("forget_text")[:1])
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    padded = batch.attention_mask == 0
    assert (batch.input_ids[padded] == tokenizer.pad_token_id).all()
    assert (batch.labels[padded] == -100).all()
    # right padding: every row's real tokens come first
    assert (batch.attention_mask.cumprod(-1) == batch.attention_mask).all()


def test_collate_trains_qa_in_the_template_a_model_is_asked_in(benchmark, tokenizer):
    # unlearn.prompt_template: the chat template's prompt is context, the answer after it is scored
    chat = PROMPT_TEMPLATES["chat-template"]
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map)
    tokenizer.chat_template = "{% for m in messages %}<user>{{ m['content'] }}\n{% endfor %}<assistant>"
    record = benchmark.get("forget_qa")[0]
    batch = collate_records(tokenizer, [record], template=chat)
    prompt = tokenizer.encode(f"<user>{record.question}\n<assistant>", add_special_tokens=False)
    answer = tokenizer.encode(f" {record.answer}", add_special_tokens=False)
    assert batch.input_ids[0].tolist() == [tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id]
    assert batch.labels[0].tolist() == [-100] * (1 + len(prompt)) + answer + [tokenizer.eos_token_id]
    assert collate_records(tokenizer, [record]).input_ids[0].tolist() != batch.input_ids[0].tolist()
