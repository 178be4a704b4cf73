"""What the engine does with the optimizer details: zeroth-order loss values without dropout
(NPO at θ = ref is exactly its reference value), the log's ``terms_at`` label, and that the
embedded tiny Llama, which has no dropout, computes the same numbers in both modes."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console

from robustunlearn.core.models import TinyModelConfig, build_tiny_model, train_tokenizer
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic
from robustunlearn.optim import OPTIMIZERS, OptimizerMemory, OptimizerSpec
from robustunlearn.optim.base import OptimizerHooks
from robustunlearn.train.engine import unlearn
from robustunlearn.train.settings import UnlearnSettings

TINY = TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def setup():
    benchmark = generate_synthetic(SyntheticConfig(num_people=5, num_utility_passages=4, num_utility_qa=2))
    tokenizer = train_tokenizer([r.text for r in benchmark.get("forget_text") + benchmark.get("retain_text")] * 2, 400)
    return benchmark, tokenizer


def with_attention_dropout(model, rate: float):
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = rate
    model.config.attention_dropout = rate
    return model


class FunctionValues(OptimizerHooks, torch.optim.Optimizer):
    """Moves nothing: reads the loss twice at θ, as a zeroth-order optimizer reads it."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.values: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure):
        self.values += [closure(backward=False), closure(backward=False)]
        return self.values[-1]


def test_zeroth_order_npo_at_theta_ref_is_exactly_its_reference_value_despite_dropout(setup, monkeypatch):
    benchmark, tokenizer = setup
    built = []

    def build(model, params, lr, options):
        built.append(FunctionValues(params, lr))
        return built[-1]

    memory = OptimizerMemory(state=0, backward_graphs=0)
    monkeypatch.setitem(
        OPTIMIZERS, "function-values", OptimizerSpec("function-values", "zeroth-order", 1e-3, "", build, memory=memory)
    )
    model = with_attention_dropout(build_tiny_model(TINY, tokenizer, seed=0), 0.5)
    config = UnlearnSettings(objective="npo", optimizer="function-values", steps=2, batch_size=4)
    result = unlearn(model, tokenizer, benchmark, config, progress=False)
    first, second, *_ = built[0].values
    assert torch.equal(first, second)
    for entry in result.history:
        assert entry["log_ratio"] == 0.0
        assert entry["forget"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)  # (2/β)·log 2


def test_training_mode_keeps_the_dropout_of_first_order_steps(setup):
    # the control: a first-order step's loss (with backward, in training mode, at θ = ref) sees dropout
    benchmark, tokenizer = setup
    model = with_attention_dropout(build_tiny_model(TINY, tokenizer, seed=0), 0.5)
    config = UnlearnSettings(objective="npo", optimizer="sgd", lr=1e-3, steps=1, batch_size=4)
    (entry,) = unlearn(model, tokenizer, benchmark, config, progress=False).history
    assert entry["log_ratio"] != 0.0


@pytest.mark.parametrize(
    "optimizer,options,where",
    [
        ("adamw", {}, ["θ", "θ"]),
        ("zo-sgd", {}, ["θ − eps·z", "θ − eps·z"]),
        ("hybrid", {"every": 1, "align": "start"}, ["θ", "θ + eps·z"]),
    ],
)
def test_the_log_says_where_its_loss_terms_were_taken(setup, optimizer, options, where):
    benchmark, tokenizer = setup
    config = UnlearnSettings(
        objective="npo", optimizer=optimizer, lr=1e-3, steps=2, batch_size=2, optimizer_options=options
    )
    history = unlearn(build_tiny_model(TINY, tokenizer, seed=0), tokenizer, benchmark, config, progress=False).history
    assert [entry["terms_at"] for entry in history] == where


def test_the_embedded_tiny_llama_computes_the_same_loss_in_training_and_eval_mode(setup):
    # it has no dropout, so taking zeroth-order losses in eval mode changes none of its numbers
    _, tokenizer = setup
    model = build_tiny_model(TINY, tokenizer, seed=0)
    ids = torch.randint(0, 400, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train = model.train()(input_ids=ids).logits
        evaluated = model.eval()(input_ids=ids).logits
    assert torch.equal(train, evaluated)


@pytest.mark.parametrize(
    "objective,optimizer,options,warned",
    [
        ("rmu", "sophia-g", {}, True),
        ("rmu", "hybrid", {"fo": "sophia-g", "every": 1}, True),
        ("rmu", "sophia-h", {}, False),
        ("npo", "sophia-g", {}, False),
    ],
)
def test_sophia_g_on_rmu_is_warned_about_once(setup, objective, optimizer, options, warned):
    benchmark, tokenizer = setup
    output = io.StringIO()
    config = UnlearnSettings(
        objective=objective, optimizer=optimizer, lr=1e-3, steps=2, batch_size=2, optimizer_options=options
    )
    model = build_tiny_model(TINY, tokenizer, seed=0)
    unlearn(model, tokenizer, benchmark, config, progress=False, console=Console(file=output, width=400))
    expected = f"warning: {optimizer} estimates curvature from labels sampled from the model's outputs"
    assert output.getvalue().count(expected) == int(warned)
    assert ("use sophia-h" in output.getvalue()) == warned
