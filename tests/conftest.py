"""Fixtures any test module may ask for. What they build lives in helpers.py, which each fixture
imports when first asked for: helpers imports transformers (seconds), which the light test modules
(rows, reports, data loaders) never need."""

from __future__ import annotations

import pytest
import torch

import robustunlearn.core.parallel as parallel  # standard library only: light


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny models gain nothing from more threads, and OpenMP threads that spin while competing
    # for two cores make every test several times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- factories: call them in a test, once or many times ----------------------------------------


@pytest.fixture(scope="session")
def tiny_llama():
    """``tiny_llama(seed=0, *, vocab_size=64, layers=2, intermediate=64, max_positions=64,
    dtype=torch.float32, attention=None, tie=False)``: a new randomly initialised Llama (hidden 32)
    in training mode."""
    from helpers import tiny_llama

    return tiny_llama


@pytest.fixture(scope="session")
def quadratic():
    """``quadratic(dim=8, seed=0)``: a fresh float64 quadratic ½‖S(θ − θ*)‖² with θ at zero (its
    ``loss``, ``a``, ``gradient_at`` and parameter ``theta``)."""
    from helpers import Quadratic

    return Quadratic


@pytest.fixture(scope="session")
def lm_closure():
    """``lm_closure(model, input_ids, *, seed=0, model_loss=False, calls=None)``: the optimizer closure
    over the next-token NLL of ``input_ids``, sampling labels from the model when asked to."""
    from helpers import lm_closure

    return lm_closure


# ---- a small synthetic benchmark, its tokenizer and models for it ------------------------------


@pytest.fixture(scope="module")
def synthetic_setup():
    """``(benchmark, tokenizer)``: the five-person synthetic benchmark and a 400-token tokenizer."""
    from helpers import synthetic_setup

    return synthetic_setup()


@pytest.fixture(scope="module")
def fresh_model(synthetic_setup):
    """``fresh_model(seed=0)``: a new tiny model (helpers.TINY_MODEL) for the synthetic tokenizer;
    the same seed gives the same weights, as a new process starting a run would load."""
    from helpers import TINY_MODEL
    from robustunlearn.core.models import build_tiny_model

    return lambda seed=0: build_tiny_model(TINY_MODEL, synthetic_setup.tokenizer, seed=seed)


@pytest.fixture(scope="module")
def run_unlearn(synthetic_setup, fresh_model):
    """``run_unlearn(config, output_dir=None, *, model=None, **options)``: ``unlearn`` of the synthetic
    benchmark from ``model`` (a new ``fresh_model()`` where None), without a progress bar."""
    from robustunlearn.train.engine import unlearn

    def run(config, output_dir=None, *, model=None, **options):
        benchmark, tokenizer = synthetic_setup
        model = fresh_model() if model is None else model
        return unlearn(model, tokenizer, benchmark, config, output_dir, progress=False, **options)

    return run


# ---- WMDP-layout questions, an lm-eval task over them and a model to score -----------------------


@pytest.fixture(scope="module")
def wmdp_task_dir(tmp_path_factory):
    """A directory with the WMDP-layout questions of helpers.WMDP_QUESTIONS and, in ``tasks``, the
    lm-eval task helpers.WMDP_TASK over them."""
    from helpers import write_questions_and_task

    return write_questions_and_task(tmp_path_factory.mktemp("wmdp"))


@pytest.fixture(scope="module")
def mcq_model():
    """``(model, tokenizer)``: a random tiny Llama in eval mode, its tokenizer trained on the questions."""
    from helpers import mcq_model_and_tokenizer

    return mcq_model_and_tokenizer()


@pytest.fixture(scope="module")
def tiny_random(synthetic_setup):
    """``(benchmark, model, tokenizer)``: the small synthetic benchmark and a random one-layer tiny
    model in eval mode, for tests of the study's plumbing rather than of learning."""
    from robustunlearn.core.models import TinyModelConfig, build_tiny_model

    benchmark, tokenizer = synthetic_setup
    config = TinyModelConfig(
        vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return benchmark, build_tiny_model(config, tokenizer, seed=0).eval(), tokenizer


@pytest.fixture(autouse=True)
def _one_core_for_studies(monkeypatch):
    # A study runs its cells in one worker process per core; the tests' tiny studies would spend
    # more time starting workers than running cells. Tests of the workers ask for them themselves.
    monkeypatch.setattr(parallel, "available_cores", lambda: 1)
