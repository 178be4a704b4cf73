import copy
import itertools

import pytest
import torch
from torch import nn

from robustunlearn.optim import OPTIMIZERS, build_optimizer
from robustunlearn.optim.hybrid import (
    AlternatingHybrid,
    DepthHybrid,
    ObjectiveHybrid,
    decoder_blocks,
    phase_at,
    split_by_depth,
)
from robustunlearn.optim.zo import ZerothOrderOptimizer


def two_term_closure(model, calls=None, requires_grad_log=None):
    """'forget' and 'retain' are the LM losses of two batches; the total is their sum."""
    g = torch.Generator().manual_seed(1)
    data = {
        "forget": torch.randint(0, 64, (4, 16), generator=g),
        "retain": torch.randint(0, 64, (4, 16), generator=g),
    }

    def closure(backward=True, *, sample_labels=False, term=None):
        if calls is not None:
            calls.append((backward, term))
        if requires_grad_log is not None:
            requires_grad_log.append({n: p.requires_grad for n, p in model.named_parameters()})
        with torch.enable_grad() if backward else torch.no_grad():
            if backward:
                model.zero_grad(set_to_none=True)
            names = ("forget", "retain") if term is None else (term,)
            loss = sum(model(input_ids=data[n], labels=data[n]).loss for n in names)
            if backward:
                loss.backward()
        return loss.detach()

    return closure


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# -- the schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("total,every", [(100, 20), (50, 20), (7, 3), (5, 20), (1, 1), (9, 1)])
def test_phase_switches_exactly_every_n_steps_and_ends_on_zo(total, every):
    phases = [phase_at(s, total, every) for s in range(total)]
    assert phases[-1] == "zo"
    blocks = [1]
    for previous, current in itertools.pairwise(phases):
        if current == previous:
            blocks[-1] += 1
        else:
            blocks.append(1)
    # every block but the first (the remainder) is exactly `every` long, and kinds alternate
    assert all(length == every for length in blocks[1:])
    assert 1 <= blocks[0] <= every
    assert sum(blocks) == total
    assert len(blocks) == -(-total // every)


def test_phase_at_layout_example():
    # 50 steps in blocks of 20, laid out from the end: 10 ZO, 20 FO, 20 ZO
    assert [phase_at(s, 50, 20) for s in (0, 9, 10, 29, 30, 49)] == [
        "zo",
        "zo",
        "fo",
        "fo",
        "zo",
        "zo",
    ]
    with pytest.raises(ValueError, match="total_steps=50"):
        phase_at(50, 50, 20)


def test_hybrid_runs_the_planned_phase_each_step_and_stops_after_the_plan(tiny_llama):
    model = tiny_llama()
    opt = build_optimizer("hybrid", model, total_steps=7, every=2, zo_options={"seed": 0})
    assert isinstance(opt, AlternatingHybrid)
    ran = []
    for part, phase in ((opt.fo, "fo"), (opt.zo, "zo")):
        step = part.step
        part.step = lambda closure, step=step, phase=phase: (ran.append(phase), step(closure))[1]
    closure = two_term_closure(model)
    planned = []
    for _ in range(7):
        planned.append(opt.current_phase)
        opt.step(closure)
    assert ran == planned == [phase_at(s, 7, 2) for s in range(7)]
    assert ran == ["fo", "zo", "zo", "fo", "fo", "zo", "zo"]
    with pytest.raises(ValueError, match="outside the planned run"):
        opt.step(closure)
    assert len(ran) == 7 and opt.steps_taken == 7  # the refused step ran neither part


def test_may_stop_only_after_a_finished_zo_block(tiny_llama):
    model = tiny_llama()
    opt = build_optimizer("hybrid", model, total_steps=7, every=2, zo_options={"seed": 0})
    closure = two_term_closure(model)
    may_stop = [opt.may_stop]
    for _ in range(7):
        opt.step(closure)
        may_stop.append(opt.may_stop)
    # phases fo zo zo fo fo zo zo: the ZO blocks end after steps 3 and 7
    assert may_stop == [False, False, False, True, False, False, False, True]


@pytest.mark.parametrize("total,every", [(7, 2), (6, 2), (1, 1), (3, 20)])
def test_current_phase_after_the_last_step_is_the_last_phase(total, every, tiny_llama):
    model = tiny_llama()
    opt = build_optimizer("hybrid", model, total_steps=total, every=every, zo_options={"seed": 0})
    closure = two_term_closure(model)
    for _ in range(total):
        opt.step(closure)
    assert opt.current_phase == phase_at(total - 1, total, every) == "zo"
    with pytest.raises(ValueError, match="outside the planned run"):
        opt.step(closure)
    assert opt.current_phase == "zo"  # a refused step changes nothing


def test_each_phase_keeps_its_own_moments_and_state_dict_resumes_exactly(tiny_llama):
    model = tiny_llama()
    opt = build_optimizer("hybrid", model, total_steps=8, every=2, zo_options={"seed": 3})
    closure = two_term_closure(model)
    for _ in range(4):  # fo fo zo zo
        opt.step(closure)
    adam_steps = {int(s["step"]) for s in opt.fo.state.values()}
    assert adam_steps == {2}  # Adam saw only its own two steps
    assert opt.zo.steps_taken == 2 and all("exp_avg_sq" in s for s in opt.zo.state.values())
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved) >= {"fo", "zo", "steps_taken"}
    for _ in range(4):
        opt.step(closure)
    straight = weights(model)

    resumed = tiny_llama(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer("hybrid", resumed, total_steps=8, every=2, zo_options={"seed": 77})
    opt2.load_state_dict(saved)
    assert opt2.current_phase == "fo"
    closure2 = two_term_closure(resumed)
    for _ in range(4):
        opt2.step(closure2)
    assert all(torch.equal(a, b) for a, b in zip(straight, weights(resumed)))


def test_lr_scheduler_scales_both_learning_rates(tiny_llama):
    model = tiny_llama()
    opt = build_optimizer("hybrid", model, lr=1e-3, zo_lr=1e-5, total_steps=4)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-5]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.fo.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.zo.param_groups[0]["lr"] == pytest.approx(5e-6)
    del scheduler


# -- hybrid-objective ---------------------------------------------------------------------------


def test_hybrid_objective_uses_zo_on_forget_and_fo_on_retain(tiny_llama):
    model = tiny_llama()
    calls = []
    opt = build_optimizer("hybrid-objective", model, total_steps=10, zo_options={"seed": 0})
    assert isinstance(opt, ObjectiveHybrid)
    opt.step(two_term_closure(model, calls))
    # ZO (R-AdaZO, one-sided): L(θ) and L(θ + eps·z) on the forget term, then one FO call on retain
    assert calls == [(False, "forget"), (False, "forget"), (True, "retain")]


# -- hybrid-depth --------------------------------------------------------------------------------


def test_decoder_blocks_and_split_by_depth_on_llama(tiny_llama):
    model = tiny_llama(layers=3)
    assert decoder_blocks(model) is model.model.layers
    params = list(model.parameters())
    top, bottom = split_by_depth(model, params, fo_blocks=1)
    top_ids = {id(p) for p in top}
    expected_top = [
        *model.model.layers[2].parameters(),
        model.model.norm.weight,
        model.lm_head.weight,
    ]
    assert top_ids == {id(p) for p in expected_top}
    assert {id(p) for p in bottom} == {id(p) for p in params} - top_ids
    assert id(model.model.embed_tokens.weight) in {id(p) for p in bottom}


def test_split_by_depth_with_tied_embeddings_keeps_the_shared_weight_in_the_bottom(tiny_llama):
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    top, bottom = split_by_depth(model, list(model.parameters()), fo_blocks=1)
    assert any(p is model.model.embed_tokens.weight for p in bottom)
    assert not any(p is model.model.embed_tokens.weight for p in top)


def test_decoder_blocks_rejects_models_without_a_stack():
    with pytest.raises(ValueError, match="no nn.ModuleList of repeated blocks"):
        decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_hybrid_depth_backward_reaches_only_the_top(tiny_llama):
    model = tiny_llama(layers=3)
    log = []
    opt = build_optimizer("hybrid-depth", model, fo_blocks=1, zo_options={"seed": 0})
    assert isinstance(opt, DepthHybrid)
    closure = two_term_closure(model, requires_grad_log=log)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(closure)
    top = {id(p) for g in opt.fo.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in top}
    assert names == {
        *(f"model.layers.2.{n}" for n, _ in model.model.layers[2].named_parameters()),
        "model.norm.weight",
        "lm_head.weight",
    }
    fo_call = log[-1]  # the FO closure call comes last
    assert {n for n, flag in fo_call.items() if flag} == names
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names)
        assert not torch.equal(p.detach(), before[n])  # both parts moved


# -- all hybrids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hybrid", "hybrid-objective", "hybrid-depth"])
def test_every_hybrid_decreases_a_tiny_lm_loss_and_is_registered(name, tiny_llama):
    spec = OPTIMIZERS[name]
    assert spec.grade == "hybrid" and spec.description
    model = tiny_llama()
    closure = two_term_closure(model)
    start = float(closure(backward=False))
    steps = 40 if name == "hybrid" else 20  # hybrid: 20 Adam steps, then 20 R-AdaZO steps
    opt = build_optimizer(name, model, lr=1e-2, zo_lr=3e-4, total_steps=steps, zo_options={"seed": 0})
    if name == "hybrid":
        assert opt.every == 20  # the paper's N
    for _ in range(steps):
        opt.step(closure)
    assert float(closure(backward=False)) < start - 0.05


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("hybrid", {}, "needs total_steps"),
        ("hybrid", {"total_steps": 5, "fo": "zo-sgd"}, "gradient-based optimizer 'zo-sgd'"),
        ("hybrid", {"total_steps": 5, "zo": "adam"}, "zeroth-order optimizer 'adam'"),
        ("hybrid", {"total_steps": 5, "every": 0}, "every must"),
        ("hybrid-objective", {"blocks": 2}, "unknown hybrid-objective options: blocks"),
        ("hybrid-depth", {"fo_blocks": 3}, r"fo_blocks must be an integer in \[1, 2\]"),
    ],
)
def test_invalid_hybrid_options(name, options, match, tiny_llama):
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, tiny_llama(), **options)


def test_zo_parts_are_zeroth_order_optimizers(tiny_llama):
    for name in ("hybrid", "hybrid-objective", "hybrid-depth"):
        opt = build_optimizer(name, tiny_llama(), total_steps=3)
        assert isinstance(opt.zo, ZerothOrderOptimizer)
        assert isinstance(opt.fo, torch.optim.Adam)
