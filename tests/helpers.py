"""Setup shared by several test files: tiny Llamas, weight snapshots, a quadratic, closures, the small
synthetic benchmark with its tokenizer, and WMDP-layout questions with an lm-eval task over them.

conftest.py hands most of these to tests as fixtures; a module imports them itself only where a
fixture cannot reach (module-level helpers, subclasses, constants, spawned workers)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from robustunlearn.cli import main
from robustunlearn.core.models import TinyModelConfig, build_tiny_model, save_model, train_tokenizer
from robustunlearn.data.base import Benchmark
from robustunlearn.data.prompts import mcq_prompt
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic

# ---- tiny Llamas and weights -------------------------------------------------------------------


def tiny_llama(
    seed: int = 0,
    *,
    vocab_size: int = 64,
    layers: int = 2,
    intermediate: int = 64,
    max_positions: int = 64,
    dtype: torch.dtype = torch.float32,
    attention: str | None = None,
    tie: bool = False,
    attention_dropout: float = 0.0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (hidden 32, 4 heads, MLP width ``intermediate``) in training
    mode; ``seed`` fixes its weights through the global RNG. ``attention`` None keeps transformers'
    default kernel; ``tie`` shares the input embeddings with the output head; ``attention_dropout``
    drops that share of the attention weights in training mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        attn_implementation=attention,
        tie_word_embeddings=tie,
        attention_dropout=attention_dropout,
    )
    return LlamaForCausalLM(config).to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name].flatten().view(torch.uint8), tensor.flatten().view(torch.uint8)), name


def saved_and_loaded(state: Any) -> Any:
    """``state`` after a round trip through ``torch.save`` and ``torch.load``, as a resumed run reads
    it back from disk."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


# ---- a quadratic and the optimizer closure protocol --------------------------------------------


class Quadratic(nn.Module):
    """L(θ) = ½‖r‖², r = S(θ − θ*), A = SᵀS positive definite, so ∇L(x) = A(x − θ*)."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        self.register_buffer("sqrt_a", torch.eye(dim, dtype=torch.float64) + noise / dim**0.5)
        self.register_buffer("target", torch.randn(dim, generator=generator, dtype=torch.float64))
        self.theta = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    @property
    def a(self) -> torch.Tensor:
        return self.sqrt_a.T @ self.sqrt_a

    def gradient_at(self, x: torch.Tensor) -> torch.Tensor:
        return self.a @ (x - self.target)

    def residual(self) -> torch.Tensor:
        return self.sqrt_a @ (self.theta - self.target)

    def loss(self) -> torch.Tensor:
        return 0.5 * self.residual().square().sum()


def closure_for(
    module: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    *,
    sampled_loss_fn: Callable[[], torch.Tensor] | None = None,
    calls: list[tuple[bool, str | None, bool]] | None = None,
):
    """The optimizer closure protocol around ``loss_fn``: with ``backward`` it zeroes the gradients,
    runs backward and returns the loss detached. ``sample_labels`` calls ``sampled_loss_fn`` where
    there is one (``loss_fn`` otherwise); ``term`` is ignored. ``calls``, where given, records
    ``(backward, term, grad enabled)`` for every call."""

    def closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None):
        if calls is not None:
            calls.append((backward, term, torch.is_grad_enabled()))
        loss = sampled_loss_fn() if sample_labels and sampled_loss_fn is not None else loss_fn()
        if not backward:
            return loss
        module.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    return closure


def next_token_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, *, generator: torch.Generator | None = None
) -> Callable[[], torch.Tensor]:
    """Mean cross-entropy of every next token of ``input_ids``; with ``generator``, of targets drawn
    from the model's own softmax instead."""

    def loss() -> torch.Tensor:
        logits = model(input_ids=input_ids).logits[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        if generator is None:
            targets = input_ids[:, 1:].reshape(-1)
        else:
            targets = torch.multinomial(flat.detach().softmax(-1), 1, generator=generator).squeeze(-1)
        return F.cross_entropy(flat, targets)

    return loss


def lm_closure(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    seed: int = 0,
    model_loss: bool = False,
    calls: list[tuple[bool, str | None, bool]] | None = None,
):
    """The closure over the next-token NLL of ``input_ids``; with ``sample_labels`` the targets are
    drawn from the model's own softmax by a generator seeded with ``seed``. ``model_loss`` takes the
    loss the model computes itself from ``labels=input_ids`` (logits in float32) instead of our
    cross-entropy. ``calls`` as in :func:`closure_for`."""

    def model_computed_loss() -> torch.Tensor:
        return model(input_ids=input_ids, labels=input_ids).loss

    loss_fn = model_computed_loss if model_loss else next_token_loss(model, input_ids)
    sampled = next_token_loss(model, input_ids, generator=torch.Generator().manual_seed(seed))
    return closure_for(model, loss_fn, sampled_loss_fn=sampled, calls=calls)


# ---- tiny models with tokenizers ---------------------------------------------------------------

# The model of the engine's tests: two blocks of width 32 over a 400-token vocabulary.
TINY_MODEL = TinyModelConfig(
    vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
# Twice as wide, for tests that score text (lm-eval, GGUF round trips).
WIDE_MODEL = TinyModelConfig(
    vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)


class SyntheticSetup(NamedTuple):
    benchmark: Benchmark
    tokenizer: PreTrainedTokenizerFast


def synthetic_setup(
    num_people: int = 5,
    num_utility_passages: int = 4,
    num_utility_qa: int = 2,
    *,
    vocab_size: int = 400,
    repeats: int = 2,
) -> SyntheticSetup:
    """A small synthetic benchmark and a tokenizer trained on its forget and retain passages, each
    seen ``repeats`` times."""
    benchmark = generate_synthetic(
        SyntheticConfig(num_people=num_people, num_utility_passages=num_utility_passages, num_utility_qa=num_utility_qa)
    )
    texts = [r.text for r in benchmark.get("forget_text") + benchmark.get("retain_text")]
    return SyntheticSetup(benchmark, train_tokenizer(texts * repeats, vocab_size))


def model_and_tokenizer(
    texts: list[str], *, seed: int, config: TinyModelConfig = WIDE_MODEL
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised tiny model in eval mode and a tokenizer of ``config.vocab_size``
    trained on ``texts``."""
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    return build_tiny_model(config, tokenizer, seed=seed).eval(), tokenizer


class Killed(Exception):
    """Stands in for the process dying in the middle of a run."""


def dies_at(step: int, metrics: Callable[[int], dict[str, Any]] = lambda step: {}):
    """An ``evaluate`` callback for ``unlearn`` that returns ``metrics(step)`` until ``step``, where the
    process dies (raises :class:`Killed`)."""

    def evaluate(model: nn.Module, at: int) -> dict[str, Any]:
        if at == step:
            raise Killed
        return metrics(at)

    return evaluate


# ---- WMDP-layout questions and an lm-eval task over them ---------------------------------------

WMDP_QUESTIONS = [
    ("Which organelle produces most of a cell's ATP?", ["Ribosome", "Mitochondrion", "Golgi apparatus", "Lysosome"], 1),
    ("Which molecule carries amino acids to the ribosome?", ["tRNA", "mRNA", "DNA polymerase", "Glucose"], 0),
    ("What does a centrifuge separate particles by?", ["Colour", "Charge only", "Density", "Smell"], 2),
    ("Which enzyme copies DNA?", ["Amylase", "Lipase", "Pepsin", "DNA polymerase"], 3),
    ("What is the basic unit of life?", ["The cell", "The atom", "The organ", "The tissue"], 0),
    ("Which gas do plants take in for photosynthesis?", ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"], 1),
    ("Where is genetic material stored in a eukaryotic cell?", ["Membrane", "Cytoplasm", "Nucleus", "Vacuole"], 2),
    ("What kind of organism is yeast?", ["A fungus", "A bacterium", "A virus", "A plant"], 0),
]
WMDP_TASK = "tiny_wmdp_bio"


def write_questions_and_task(root: Path) -> Path:
    """WMDP's local layout in ``root`` (read by our loader) and, in ``root/tasks``, an lm-eval task
    YAML over the same file."""
    questions = root / "wmdp-bio.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in WMDP_QUESTIONS),
        encoding="utf-8",
    )
    tasks = root / "tasks"
    tasks.mkdir()
    task = {
        "task": WMDP_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(questions)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Our prompt with lm-eval's Jinja field; lm-eval puts its default " " before each choice.
        "doc_to_text": mcq_prompt("{{question}}"),
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (tasks / f"{WMDP_TASK}.yaml").write_text(json.dumps(task, indent=2), encoding="utf-8")  # JSON is YAML
    return root


def mcq_model_and_tokenizer() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised tiny Llama with a tokenizer trained on the WMDP-layout questions."""
    texts = [mcq_prompt(q) + " " + " ".join(c) for q, c, _ in WMDP_QUESTIONS]
    return model_and_tokenizer(texts * 3, seed=1)


# A six-person benchmark and a tiny model with its own tokenizer: what the CLI tests unlearn with --model.
CLI_DATA = {"num_people": 6, "num_utility_passages": 4, "num_utility_qa": 2}
CLI_MODEL = TinyModelConfig(
    vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)


def save_cli_model(directory: Path) -> Path:
    """The tiny model of CLI_MODEL, trained on nothing, saved as a Hugging Face directory (for --model)."""
    benchmark = generate_synthetic(SyntheticConfig(**CLI_DATA))
    tokenizer = train_tokenizer([r.text for r in benchmark.get("forget_text") + benchmark.get("retain_text")] * 2, 400)
    return save_model(build_tiny_model(CLI_MODEL, tokenizer, seed=0), tokenizer, directory)


# ---- several processes on the CPU (gloo) ---------------------------------------------------------

WORLD_SIZE = 2


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, port: int) -> None:
    """The variables a launcher (torchrun) sets for ``rank`` of ``WORLD_SIZE`` on this host, which
    ``data_parallel()`` reads to join the process group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank)
    )


def join_ranks(worker: Callable[..., None], args: tuple, deadline_s: float, poll_s: float = 2.0) -> None:
    """Run ``worker(rank, *args)`` in ``WORLD_SIZE`` spawned processes and wait for them all; fail the
    test (killing them) if they are not done within ``deadline_s``, as a deadlock would leave them."""
    context = mp.start_processes(worker, args=args, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=poll_s):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} processes did not finish within {deadline_s} s (deadlock?)")


def assert_weights_close(actual: dict, expected: dict, atol: float) -> None:
    """The same tensor names, each within ``atol`` (no relative tolerance)."""
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=atol, msg=name)


def cli_result(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``robustunlearn ARGS`` in this process: its exit code, standard output and standard error."""
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *args])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
