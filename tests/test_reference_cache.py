"""The reference cache (``reference: cached``): NPO and idk-dpo look the frozen reference's forget
log-probabilities up instead of running a frozen copy, and get the live reference's numbers (float64),
over several steps, under LoRA and across a resume; the run keeps no copy and runs one forward fewer
per step; objectives that need more of the reference run it live, from a copy of the trained weights
only (RMU: its down_proj matrices)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from pydantic import ValidationError
from rich.console import Console

import robustunlearn.train.engine as engine_module
from helpers import Killed, assert_weights_close, dies_at, snapshot
from robustunlearn.core.distributed import DataParallel
from robustunlearn.data.collate import collate_records
from robustunlearn.objectives.common import sequence_logprobs
from robustunlearn.train.reference import REFERENCE_CACHE, build_reference_cache
from robustunlearn.train.settings import UnlearnSettings

FORGET_RECORDS = 9  # the synthetic benchmark's forget QA pairs (8) and passage (1)


def settings(**values) -> UnlearnSettings:
    defaults = {"objective": "npo", "optimizer": "adamw", "lr": 1e-3, "steps": 4, "batch_size": 4}
    return UnlearnSettings(**{**defaults, **values})


def test_the_cache_holds_what_the_reference_computes_in_any_batch(synthetic_setup, fresh_model):
    benchmark, tokenizer = synthetic_setup
    model = fresh_model().double().eval()
    records = benchmark.get("forget_qa") + benchmark.get("forget_text")
    cache, forwards = build_reference_cache(
        model, tokenizer, records, max_length=256, batch_size=4, parallel=DataParallel()
    )
    assert len(cache) == len(records) and forwards == math.ceil(len(records) / 4)
    batch = collate_records(tokenizer, [records[7], records[0], records[8], records[3]], 256)  # other padding
    with torch.no_grad():
        expected = sequence_logprobs(model, batch)[0]
    torch.testing.assert_close(cache.lookup(batch), expected, rtol=0, atol=1e-12)
    with pytest.raises(KeyError, match="row 0"):
        cache.lookup(collate_records(tokenizer, records[:1], 8))  # truncated: another example


@pytest.mark.parametrize(
    "values",
    [
        {"objective": "npo"},
        {"objective": "idk-dpo"},
        {"objective": "npo", "lora": {"rank": 2}},
        {"objective": "npo", "prompt_template": "llama2-chat"},  # the cache encodes in the run's format
    ],
    ids=["npo", "idk-dpo", "npo-lora", "npo-chat-format"],
)
def test_cached_and_live_references_give_the_same_losses_and_weights(run_unlearn, fresh_model, values):
    runs = {}
    for reference in ("cached", "live"):
        model = fresh_model().double()
        runs[reference] = (run_unlearn(settings(reference=reference, **values), model=model), model)
    (cached, cached_model), (live, live_model) = runs["cached"], runs["live"]
    terms = ("loss", "forget", "retain", "log_ratio", "reward_margin")
    for got, expected in zip(cached.history, live.history, strict=True):
        for term in terms:
            if term in expected:
                assert got[term] == pytest.approx(expected[term], rel=1e-12, abs=1e-12), (got["step"], term)
    assert live.history[-1]["forget"] != live.history[0]["forget"]  # the steps moved the loss
    assert_weights_close(snapshot(cached_model), snapshot(live_model), atol=1e-12)


def forward_calls(model) -> list[int]:
    """A list that grows by one at every forward call of ``model`` (and of a deep copy of it)."""
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def test_a_cached_run_keeps_no_copy_and_runs_one_forward_fewer_per_step(synthetic_setup, fresh_model, run_unlearn):
    benchmark, tokenizer = synthetic_setup
    console = Console(file=io.StringIO())
    for values, has_copy in (
        ({"reference": "cached"}, False),
        ({"reference": "live"}, True),
        ({"reference": "live", "lora": {"rank": 2}}, False),  # the disabled adapter is the reference
    ):
        run = engine_module._set_up(fresh_model(), tokenizer, benchmark, settings(**values), None, console)
        assert (run.frozen_weights is not None) == has_copy, values
        assert run.caches_reference == (values["reference"] == "cached")

    forwards = {}
    for reference in ("cached", "live"):
        counts = []
        for steps in (1, 3):
            model = fresh_model()
            calls = forward_calls(model)
            run_unlearn(settings(reference=reference, steps=steps), model=model)
            counts.append(len(calls))
        per_step = (counts[1] - counts[0]) // 2
        forwards[reference] = (counts[0] - per_step, per_step)  # (before the first step, per step)
    # NPO+RT: forget and retain under the model, and live, forget under the reference
    assert forwards == {"cached": (math.ceil(FORGET_RECORDS / 4), 2), "live": (0, 3)}


@pytest.mark.parametrize(
    "values",
    [
        {"objective": "npo", "objective_options": {"retain_loss": "kl"}},
        {"objective": "graddiff", "objective_options": {"retain_loss": "kl"}},
        {"objective": "rmu"},
    ],
    ids=["npo-kl", "graddiff-kl", "rmu"],
)
def test_objectives_that_need_more_than_forget_logprobs_run_the_reference_live(synthetic_setup, fresh_model, values):
    benchmark, tokenizer = synthetic_setup
    run = engine_module._set_up(
        fresh_model(), tokenizer, benchmark, settings(**values), None, Console(file=io.StringIO())
    )
    assert run.config.reference == "cached" and not run.caches_reference
    # the copy holds the trained weights only: all of them, or RMU's down_proj matrices
    assert [p for p, _ in run.frozen_weights] == run.trained
    assert all(torch.equal(p, initial) and p.data_ptr() != initial.data_ptr() for p, initial in run.frozen_weights)
    copied = sum(initial.numel() for _, initial in run.frozen_weights)
    total = sum(p.numel() for p in run.model.parameters())
    assert (copied < total / 5) == (values["objective"] == "rmu") and copied <= total


def test_the_live_reference_is_the_model_with_its_trained_weights_at_their_start_values(synthetic_setup, fresh_model):
    benchmark, tokenizer = synthetic_setup
    config = settings(objective="rmu", reference="live")
    run = engine_module._set_up(fresh_model(), tokenizer, benchmark, config, None, Console(file=io.StringIO()))
    batch = engine_module._draw_batch(run, 1)
    before = engine_module._reference_outputs(run, batch)["retain_activations"]
    with torch.no_grad():
        for p in run.trained:
            p.add_(0.1)  # the run has moved the weights
    moved = [p.detach().clone() for p in run.trained]
    again = engine_module._reference_outputs(run, batch)["retain_activations"]
    assert torch.equal(again, before) and run.model.training
    assert all(torch.equal(p, m) for p, m in zip(run.trained, moved))  # put back


def test_the_reference_setting_is_validated():
    with pytest.raises(ValidationError, match="reference"):
        UnlearnSettings(reference="frozen")


def count_builds(monkeypatch) -> list[int]:
    builds: list[int] = []
    real = engine_module.build_reference_cache
    monkeypatch.setattr(engine_module, "build_reference_cache", lambda *a, **k: builds.append(1) or real(*a, **k))
    return builds


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "rebuilt"])
def test_a_resumed_cached_run_ends_with_the_weights_of_an_uninterrupted_one(
    run_unlearn, fresh_model, tmp_path, monkeypatch, stored
):
    config = settings(steps=5, batch_size=2, checkpoint_every=2, eval_every=1)
    model = fresh_model()
    whole = run_unlearn(config, tmp_path / "whole", model=model, evaluate=lambda m, s: {})
    with pytest.raises(Killed):
        run_unlearn(config, tmp_path / "killed", evaluate=dies_at(4))
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-2"
    assert (checkpoint / REFERENCE_CACHE).is_file()
    if not stored:  # a checkpoint of a version without the cache: built before the checkpoint's weights load
        (checkpoint / REFERENCE_CACHE).unlink()
        checksums = json.loads((checkpoint / "sha256.json").read_text())
        del checksums[REFERENCE_CACHE]
        (checkpoint / "sha256.json").write_text(json.dumps(checksums))

    builds = count_builds(monkeypatch)
    resumed = fresh_model()  # a new process starts from the original weights
    result = run_unlearn(config, tmp_path / "killed", model=resumed, resume=True, evaluate=lambda m, s: {})
    assert result.resumed_from == 2 and len(builds) == (0 if stored else 1)
    for name, tensor in snapshot(model).items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    if stored:
        assert result.passes == whole.passes
