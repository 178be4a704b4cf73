"""The ``hybrid`` block layouts (``align``: counted back from the end, or a full FO block first)
and its option to start every block with a fresh optimizer state."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_llama
from robustunlearn.optim import build_optimizer, make_closure
from robustunlearn.optim.hybrid import AlternatingHybrid, phase_at

IDS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))


def lm_closure(model):
    def loss(term):
        logits = model(input_ids=IDS).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten())

    return make_closure(model, loss)


def blocks(phases: list[str]) -> list[tuple[str, int]]:
    return [(kind, len(list(run))) for kind, run in itertools.groupby(phases)]


# -- phase_at in both layouts ----------------------------------------------------------------------


@pytest.mark.parametrize("total,every", [(40, 20), (12, 3), (2, 1), (8, 4)])
def test_aligned_at_the_start_full_blocks_begin_with_fo_and_end_with_zo(total, every):
    phases = [phase_at(s, total, every, "start") for s in range(total)]
    assert blocks(phases) == [("fo", every), ("zo", every)] * (total // (2 * every))


@pytest.mark.parametrize("total,every", [(40, 20), (12, 3), (80, 20)])
def test_both_layouts_agree_when_the_budget_is_a_multiple_of_two_blocks(total, every):
    assert [phase_at(s, total, every, "start") for s in range(total)] == [
        phase_at(s, total, every, "end") for s in range(total)
    ]


def test_aligned_at_the_end_the_partial_block_comes_first():
    # 50 steps in blocks of 20 from the end: 10 ZO, 20 FO, 20 ZO (the default layout)
    phases = [phase_at(s, 50, 20) for s in range(50)]
    assert phases == [phase_at(s, 50, 20, "end") for s in range(50)]
    assert blocks(phases) == [("zo", 10), ("fo", 20), ("zo", 20)]


@pytest.mark.parametrize("total,every,advice", [(50, 20, "use 40 or 80 steps"), (3, 2, "use 4 steps")])
def test_aligned_at_the_start_a_budget_off_the_blocks_is_refused(total, every, advice):
    with pytest.raises(ValueError, match=f"multiple of 2·every = {2 * every}.*{advice}.*align='end'"):
        phase_at(0, total, every, "start")
    with pytest.raises(ValueError, match="multiple of 2·every"):
        build_optimizer("hybrid", tiny_llama(), total_steps=total, every=every, align="start")


def test_an_unknown_alignment_is_refused():
    with pytest.raises(ValueError, match="unknown align 'middle'; accepted: end, start"):
        build_optimizer("hybrid", tiny_llama(), total_steps=4, every=2, align="middle")


def test_the_hybrid_runs_the_start_aligned_layout_and_keeps_it_in_its_state_dict():
    model = tiny_llama()
    opt = build_optimizer("hybrid", model, total_steps=4, every=1, align="start", zo_options={"seed": 0})
    assert isinstance(opt, AlternatingHybrid)
    ran = []
    for _ in range(4):
        ran.append(opt.current_phase)
        opt.step(lm_closure(model))
    assert ran == ["fo", "zo", "fo", "zo"] and opt.may_stop
    assert opt.state_dict()["align"] == "start"
    other = build_optimizer("hybrid", tiny_llama(), total_steps=4, every=1, zo_options={"seed": 0})
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.align == "start"


# -- state across blocks ---------------------------------------------------------------------------


def test_by_default_each_part_resumes_its_state_from_its_previous_block():
    model = tiny_llama()
    opt = build_optimizer("hybrid", model, total_steps=8, every=2, align="start", zo_options={"seed": 0})
    for _ in range(5):  # fo fo zo zo fo: the second FO block's first step
        opt.step(lm_closure(model))
    assert {int(s["step"]) for s in opt.fo.state.values()} == {3}  # Adam's count went on


@pytest.mark.parametrize("reset", [True, False])
def test_with_reset_state_each_block_a_new_block_starts_from_a_fresh_state(reset):
    model = tiny_llama()
    opt = build_optimizer(
        "hybrid",
        model,
        lr=1e-3,
        total_steps=8,
        every=2,
        align="start",
        reset_state_each_block=reset,
        zo="zo-adam",
        zo_options={"seed": 0},
    )
    closure = lm_closure(model)
    for _ in range(4):  # fo fo zo zo
        opt.step(closure)
    assert {int(s["step"]) for s in opt.fo.state.values()} == {2}
    assert {int(s["step"]) for s in opt.zo.state.values()} == {2}
    # the second FO block starts: with the reset, the step is a new Adam's first step
    fresh_model = copy.deepcopy(model)
    torch.optim.Adam(fresh_model.parameters(), lr=1e-3).step(lm_closure(fresh_model))
    opt.step(closure)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))
    assert same == reset
    assert {int(s["step"]) for s in opt.fo.state.values()} == ({1} if reset else {3})
    assert {int(s["step"]) for s in opt.zo.state.values()} == {2}  # the ZO part waits for its block
    for _ in range(2):  # fo, then the second ZO block's first step
        opt.step(closure)
    assert {int(s["step"]) for s in opt.zo.state.values()} == ({1} if reset else {3})
    assert opt.zo.steps_taken == 3  # its direction seeds go on either way


def test_a_resumed_run_with_block_resets_matches_an_uninterrupted_one():
    options = {"total_steps": 8, "every": 2, "align": "start", "reset_state_each_block": True}

    def hybrid(model, seed):
        return build_optimizer("hybrid", model, lr=1e-3, zo="zo-adam", zo_options={"seed": seed}, **options)

    model = tiny_llama()
    opt = hybrid(model, seed=0)
    for _ in range(3):  # stopped inside the ZO block: the FO block's reset is ahead
        opt.step(lm_closure(model))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(5):
        opt.step(lm_closure(model))

    resumed = tiny_llama(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = hybrid(resumed, seed=9)  # the saved seed wins
    opt2.load_state_dict(saved)
    for _ in range(5):
        opt2.step(lm_closure(resumed))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
