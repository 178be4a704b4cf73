"""Load and save causal LMs and tokenizers; build the embedded tiny Llama and its BPE tokenizer.

Saved models are Hugging Face directories: ``model.safetensors`` + ``config.json`` + tokenizer
files + ``manifest.json`` (what the model is, and the SHA-256 of its weights and of every other
file, so a corrupted or half-written directory is detected instead of silently loaded).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import model_info, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from robustunlearn.core.errors import UserError, first_line
from robustunlearn.core.io import atomic_write_json

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
GGUF_SUFFIX = ".gguf"
HUB_TIMEOUT_SECONDS = 10  # one request to ask the hub whether a model exists, instead of a minute of retries


@dataclass(frozen=True)
class TinyModelConfig:
    """The embedded tiny Llama: ~2.2M parameters with tied embeddings. Wide and shallow, trained
    with small batches, it memorised the synthetic facts in the fewest CPU-seconds of the shapes we
    tried (d=128 with 4 layers needed over twice the epochs)."""

    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    max_position_embeddings: int = 256

    def to_llama_config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return self.llama_config(
            len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

    def llama_config(self, vocab_size: int | None = None, **token_ids: int) -> LlamaConfig:
        """The Llama config of these sizes; ``vocab_size`` None: :attr:`vocab_size` (what the
        tokenizer is trained to, for a plan made before there is one)."""
        return LlamaConfig(
            vocab_size=self.vocab_size if vocab_size is None else vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            **token_ids,
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same texts).

    Byte-level pre-tokenization keeps a leading space with each word, so ``" Lisbon"`` after
    ``"Answer:"`` tokenizes the same alone as in context: prompts and answers can be encoded
    separately (see :mod:`robustunlearn.data.collate`)."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_tiny_model(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (weights depend only on ``seed`` and the configs)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config.to_llama_config(tokenizer))
    return model.float()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The dtypes models load in (RunSettings.dtype); "auto" keeps the dtype the checkpoint was saved in.
DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX). Elsewhere torch
    emulates them: measured on an AMD EPYC with AVX2 only, a 1024x256 by 256x4096 product with its
    backward 5.7x slower than in float32, and a TOFU training epoch of the tiny model 40x slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    model,
    tokenizer,
    directory: str | Path,
    manifest: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save weights (safetensors), config, tokenizer and a manifest, atomically as a directory:
    everything is written to a temporary sibling that is renamed into place at the end.
    ``weights``: the state dict to save instead of the model's own (an FSDP model's, gathered)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise
        model.save_pretrained(staging, state_dict=weights)
        tokenizer.save_pretrained(staging)
        if not (staging / WEIGHTS).exists():
            raise RuntimeError(f"save_pretrained wrote no {WEIGHTS} in {staging}")
        others = sorted(path.name for path in staging.iterdir() if path.is_file() and path.name != WEIGHTS)
        atomic_write_json(
            staging / MANIFEST,
            {
                **(manifest or {}),
                "parameters": count_parameters(model),
                "weights_sha256": file_sha256(staging / WEIGHTS),
                "files_sha256": {name: file_sha256(staging / name) for name in others},
            },
        )
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def verify_model_dir(directory: str | Path) -> dict[str, Any]:
    """Return the manifest of a saved model directory; raise ``ValueError`` naming the file if it is
    incomplete or corrupted (the weights and, in manifests that record them, every other file are
    checked against their SHA-256)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file() or not (directory / WEIGHTS).is_file():
        raise ValueError(f"{directory} is not a complete saved model (missing {MANIFEST} or {WEIGHTS})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} is not a JSON object")
    others = manifest.get("files_sha256") or {}  # manifests written before it record the weights only
    if not isinstance(others, dict):
        raise ValueError(f"{manifest_path}: files_sha256 is not a JSON object")
    recorded = {WEIGHTS: manifest.get("weights_sha256"), **others}
    for name, digest in recorded.items():
        path = directory / name
        if Path(name).name != name or not path.is_file() or path.is_symlink():
            raise ValueError(f"{path}, recorded in {manifest_path}, is missing or not a regular file")
        if file_sha256(path) != digest:
            raise ValueError(f"{path} does not match the SHA-256 in its manifest (corrupted)")
    return manifest


def check_model_reference(name_or_path: str | Path) -> Path | None:
    """The local directory or GGUF file ``name_or_path`` names, or None for a hub name; ``UserError``
    when it looks like a path (starts with ``.``, ``/`` or ``~``, has more than one ``/``, or ends
    in ``.gguf``) that is not there, names a directory without ``config.json`` or a GGUF file
    without the ``gguf`` package installed, or is a hub name that cannot load (:func:`check_hub_model`)."""
    path = Path(name_or_path).expanduser()
    gguf = path.suffix.lower() == GGUF_SUFFIX
    if path.exists():
        if gguf and path.is_file():
            if importlib.util.find_spec("gguf") is None:
                raise UserError(
                    f"loading the GGUF file {path} needs the gguf package: pip install 'robustunlearn[gguf]'"
                )
            return path
        if not path.is_dir():
            raise UserError(f"model path {path} is neither a directory nor a {GGUF_SUFFIX} file")
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json: it is not a Hugging Face model directory")
        return path
    if gguf or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise UserError(f"model path {name_or_path} does not exist")
    check_hub_model(str(name_or_path))
    return None


def _hub_offline() -> bool:
    """Whether Hugging Face downloads are off: huggingface_hub reads the variables at import, a test
    or a wrapper may set them later."""
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(hub_constants.HF_HUB_OFFLINE) or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def check_hub_model(name: str) -> None:
    """``UserError`` in seconds when the hub name ``name`` cannot load: it is not a valid name, or
    it is not in the local Hugging Face cache and downloads are off (``HF_HUB_OFFLINE``), the hub
    cannot be reached or does not have it. (transformers would retry for about a minute first.)"""
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(f"model {name!r} is neither a local path nor a valid Hugging Face hub name") from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: it loads without the network
    if _hub_offline():
        raise UserError(
            f"model {name!r} is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            "download it with the network on, or give a local directory"
        )
    try:
        model_info(name, timeout=HUB_TIMEOUT_SECONDS)
    except GatedRepoError:
        return  # it exists; loading it needs access (HF_TOKEN), which transformers reports itself
    except RepositoryNotFoundError:
        raise UserError(
            f"model {name!r} is neither a local path nor a model on the Hugging Face hub "
            "(nor a private one that HF_TOKEN can read)"
        ) from None
    except HfHubHTTPError as error:
        raise UserError(f"the Hugging Face hub refused model {name!r}: {first_line(error)}") from None
    except Exception as error:  # the HTTP client's own connection and timeout errors: no hub to ask
        raise UserError(
            f"cannot reach the Hugging Face hub to load model {name!r} ({first_line(error)}); "
            "check the network, set HF_HUB_OFFLINE=1 to use the local cache only, or give a local directory"
        ) from None


def _pretrained_source(name_or_path: str | Path, path: Path | None) -> tuple[str, dict[str, Any]]:
    """What ``from_pretrained`` takes for ``name_or_path``: the directory or hub name, and for a GGUF
    file the directory holding it plus ``gguf_file`` (absolute: transformers resolves a bare name
    against the working directory)."""
    if path is not None and path.is_file():
        return str(path.parent), {"gguf_file": str(path.resolve())}
    return str(name_or_path), {}


def _load_errors(path: Path | None) -> tuple[type[Exception], ...]:
    """What a failed load raises: from the hub, a missing file; from a local directory or GGUF
    file, anything: a truncated or garbage file fails in its parser (safetensors, tokenizers, json,
    gguf), each with exceptions of its own."""
    return (Exception,) if path is not None else (OSError,)


def _cannot_load(name_or_path: str | Path, error: Exception) -> UserError:
    return UserError(f"cannot load model {str(name_or_path)!r}: {first_line(error)}")


def load_tokenizer(name_or_path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a local directory, GGUF file (rebuilt from its metadata) or hub name, with a
    pad token (eos when it has none: batching needs one) and a bos token (eos when it has none:
    every sequence starts with one)."""
    path = check_model_reference(name_or_path)
    source, extra = _pretrained_source(name_or_path, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except _load_errors(path) as error:
        raise _cannot_load(name_or_path, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    verify: bool = True,
):
    """Load a causal LM and its tokenizer from a local directory, a GGUF file or a Hugging Face hub name.

    Local directories saved by :func:`save_model` are checked against their manifest. Weights load
    from safetensors only; remote code runs only when ``trust_remote_code`` is asked for. A GGUF
    file (llama.cpp's format, e.g. a Q4 quantized SmolLM2) loads through transformers' GGUF support
    and is dequantized into an ordinary dense model in ``dtype``: unlearning trains every weight,
    and the result saves like any other model."""
    path = check_model_reference(name_or_path)
    if path is not None and path.is_dir() and verify and (path / MANIFEST).exists():
        try:
            verify_model_dir(path)
        except ValueError as error:
            raise UserError(str(error)) from None
    hf_logging.disable_progress_bar()  # "Loading weights" bars for every attacked copy are noise
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    source, extra = _pretrained_source(name_or_path, path)
    if extra:
        # Without dequantize, transformers may keep the weights in GGUF blocks (not trainable, not savable).
        extra["quantization_config"] = GgufConfig(dequantize=True)
    else:
        extra["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except _load_errors(path) as error:
        raise _cannot_load(name_or_path, error) from None
    return model.to(device), tokenizer
