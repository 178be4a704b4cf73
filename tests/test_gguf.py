"""GGUF files (llama.cpp's format) load through transformers + gguf into the model and tokenizer
they were written from: a tiny Llama and its byte-level BPE tokenizer are written with the gguf
package's writer, the way llama.cpp's converter lays them out, then loaded back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import model_and_tokenizer
from robustunlearn.core.errors import UserError
from robustunlearn.core.models import check_model_reference, load_model, save_model

gguf = pytest.importorskip("gguf", reason="loading GGUF files needs the gguf package (robustunlearn[gguf])")

TEXTS = [
    "Question: Where was Ada Lovelace born?\nAnswer: London",
    "Question: What is the capital of Portugal?\nAnswer: Lisbon",
    "The analytical engine weaves algebraic patterns just as the loom weaves flowers and leaves.",
]


def interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's query/key rows from transformers' rotary layout (the first elements of
    all rotated pairs, then the second ones) to llama.cpp's (each pair's two elements adjacent)."""
    rows, columns = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, columns).transpose(0, 2, 1, 3).reshape(rows, columns)


def write_llama_gguf(model, tokenizer, path) -> None:
    """Write a float32 Llama with tied embeddings and its byte-level BPE tokenizer as a GGUF file."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    special_ids = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL for i in range(len(tokenizer))]
    )
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: GGUF stores no output matrix then
            continue
        module, suffix = name.rsplit(".", 1)
        array = tensor.float().numpy()
        if module.endswith("q_proj"):
            array = interleave_rotary_rows(array, heads)
        elif module.endswith("k_proj"):
            array = interleave_rotary_rows(array, kv_heads)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def source():
    return model_and_tokenizer(TEXTS * 4, seed=3)


@pytest.fixture(scope="module")
def gguf_file(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_llama_gguf(*source, path)
    return path


@pytest.fixture(scope="module")
def loaded(gguf_file):
    return load_model(gguf_file)


def test_loaded_model_computes_the_source_logits(source, loaded):
    model, tokenizer = source
    gguf_model = loaded[0]
    assert type(gguf_model) is type(model) and gguf_model.dtype == torch.float32
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
        actual = gguf_model(**batch).logits
    assert actual.shape == expected.shape
    assert expected.std() > 0.1  # a non-degenerate model: the check would catch a wrong permutation
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_loaded_tokenizer_round_trips(source, loaded):
    tokenizer, gguf_tokenizer = source[1], loaded[1]
    for text in TEXTS + ["unseen wörds ✓ 123", "  two leading spaces"]:
        ids = gguf_tokenizer.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        assert gguf_tokenizer.decode(ids) == text
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(gguf_tokenizer, name) == getattr(tokenizer, name), name


def test_loaded_model_is_a_plain_trainable_model_that_saves(source, loaded, tmp_path):
    gguf_model, gguf_tokenizer = loaded
    assert getattr(gguf_model, "hf_quantizer", None) is None
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in gguf_model.parameters())
    reloaded = load_model(save_model(gguf_model, gguf_tokenizer, tmp_path / "saved"))[0]
    batch = source[1](TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, gguf_model(**batch).logits)


def test_gguf_honours_the_requested_dtype(gguf_file):
    assert load_model(gguf_file, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_gguf_reference_errors(tmp_path, monkeypatch, gguf_file):
    with pytest.raises(UserError, match="does not exist"):
        check_model_reference("missing-model.gguf")
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"x")
    with pytest.raises(UserError, match="neither a directory nor a .gguf file"):
        check_model_reference(not_a_model)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="cannot load model .*garbage.gguf"):
        load_model(garbage)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "gguf" else object())
    with pytest.raises(UserError, match=r"pip install 'robustunlearn\[gguf\]'"):
        check_model_reference(gguf_file)
