"""The unlearning loop: logging, checkpoints, resume identity, the non-finite guard, epoch
budgets, keeping the best weights, and the 7B recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import robustunlearn
import robustunlearn.train.checkpoint as checkpoint_module
import robustunlearn.train.engine as engine_module
from helpers import Killed, dies_at
from robustunlearn.config import load_settings, unlearn_settings
from robustunlearn.core.errors import UserError
from robustunlearn.objectives import IdkDPO
from robustunlearn.optim import OPTIMIZERS, OptimizerMemory, OptimizerSpec
from robustunlearn.optim.base import OptimizerHooks
from robustunlearn.train.checkpoint import restore_best
from robustunlearn.train.engine import NonFiniteLossError, RecordStream
from robustunlearn.train.settings import UnlearnSettings


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_logs_every_step_and_finishes(run_unlearn, tmp_path):
    config = UnlearnSettings(objective="graddiff", optimizer="adamw", lr=1e-3, steps=3, batch_size=2)
    result = run_unlearn(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all({"loss", "forget", "retain", "lr"} <= set(line) for line in lines)
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"
    assert result.steps_done == 3 and (tmp_path / "checkpoints" / "step-3" / "model.safetensors").exists()


def test_ga_raises_forget_nll_through_the_engine(run_unlearn):
    config = UnlearnSettings(
        objective="ga", optimizer="adamw", lr=1e-2, steps=8, batch_size=4, forget_splits=("forget_qa",)
    )
    result = run_unlearn(config)
    # ga's loss is the negative forget NLL: it must go down, i.e. the NLL up.
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.5


@pytest.mark.parametrize("optimizer,stops_at", [("adamw", 2), ("hybrid", 5)])
def test_an_early_stop_waits_for_the_end_of_a_hybrid_zo_block(run_unlearn, optimizer, stops_at):
    # hybrid with 9 steps in blocks of 2: zo fo fo zo zo fo fo zo zo; asked to stop at step 2, it
    # runs on through the next ZO block (steps 4-5), so the run still ends in the robust regime.
    options = {"every": 2} if optimizer == "hybrid" else {}
    config = UnlearnSettings(
        objective="npo", optimizer=optimizer, lr=1e-3, steps=9, batch_size=2, eval_every=1, optimizer_options=options
    )
    result = run_unlearn(
        config,
        evaluate=lambda model, step: {"step": step},
        should_stop=lambda m: "level" if m["step"] >= 2 else None,
    )
    assert result.steps_done == stops_at and result.stopped_early == "level"
    if optimizer == "hybrid":
        assert [h["current_phase"] for h in result.history] == ["zo", "fo", "fo", "zo", "zo"]


@pytest.mark.parametrize("optimizer", ["adamw", "signum", "sophia-g", "zo-sgd", "hybrid"])
def test_resume_after_kill_gives_identical_weights(run_unlearn, fresh_model, tmp_path, optimizer):
    options = {"every": 2} if optimizer == "hybrid" else {}
    config = UnlearnSettings(
        objective="npo",
        optimizer=optimizer,
        lr=1e-3,
        steps=6,
        batch_size=2,
        checkpoint_every=2,
        eval_every=1,
        optimizer_options=options,
    )

    reference = fresh_model()
    run_unlearn(config, tmp_path / "whole", model=reference, evaluate=lambda m, s: {})

    with pytest.raises(Killed):
        run_unlearn(config, tmp_path / "killed", evaluate=dies_at(5))
    resumed = fresh_model()  # a new process starts from the original weights
    result = run_unlearn(config, tmp_path / "killed", model=resumed, resume=True, evaluate=lambda m, s: {})
    assert result.resumed_from == 4
    for name, tensor in weights(reference).items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_resume_skips_the_partial_log_line_of_a_run_killed_while_logging(run_unlearn, tmp_path):
    config = UnlearnSettings(
        objective="ga", optimizer="adamw", lr=1e-3, steps=4, batch_size=2, checkpoint_every=2, eval_every=1
    )
    with pytest.raises(Killed):
        run_unlearn(config, tmp_path, evaluate=dies_at(3))
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write('{"step": 3, "lr": 0.00')  # cut off by the kill
    result = run_unlearn(config, tmp_path, resume=True, evaluate=lambda model, step: {})
    assert result.resumed_from == 2
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2, "lr"\n{"step": 3}\n')  # damage inside is an error
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        run_unlearn(config, tmp_path, resume=True)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(run_unlearn, tmp_path, monkeypatch):
    real_build = engine_module.build_objective
    calls = {"n": 0}

    def poisoned_build(name, model=None, **hparams):
        objective = real_build(name, model=model, **hparams)
        real_loss = objective.loss

        def loss(model, batch, reference):
            calls["n"] += 1
            terms = real_loss(model, batch, reference)
            if calls["n"] >= 3:
                terms["forget"] = terms["forget"] * float("nan")
                terms["loss"] = terms["forget"] + terms["retain"]
            return terms

        objective.loss = loss
        return objective

    monkeypatch.setattr(engine_module, "build_objective", poisoned_build)
    config = UnlearnSettings(
        objective="graddiff", optimizer="adamw", lr=1e-3, steps=5, batch_size=2, checkpoint_every=1
    )
    with pytest.raises(NonFiniteLossError) as error:
        run_unlearn(config, tmp_path)
    assert error.value.step == 3 and "nan" in error.value.cause
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 3
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2


def test_record_stream_resumes_mid_epoch():
    stream = RecordStream(list(range(7)), batch_size=3, seed=1)
    first = [stream.next() for _ in range(4)]
    state = stream.state_dict()
    rest = [stream.next() for _ in range(3)]
    again = RecordStream(list(range(7)), batch_size=3, seed=1)
    again.load_state_dict(state)
    assert [again.next() for _ in range(3)] == rest
    seen = sum(first + rest, [])  # 21 draws over 7 records: every record twice or more, across epochs
    assert all(seen.count(i) >= 2 for i in range(7))


def test_bad_config_values():
    with pytest.raises(ValueError, match="steps"):
        UnlearnSettings(steps=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        UnlearnSettings(lr_schedule="sawtooth")


def test_epochs_set_the_step_budget_and_the_schedule(synthetic_setup, run_unlearn):
    forget = len(synthetic_setup.benchmark.get("forget_qa"))
    config = UnlearnSettings(
        objective="ga",
        optimizer="sgd",
        lr=1e-3,
        epochs=2,
        batch_size=3,
        lr_schedule="linear",
        forget_splits=("forget_qa",),
    )
    result = run_unlearn(config)
    assert result.total_steps == result.steps_done == len(result.history) == math.ceil(2 * forget / 3) != config.steps
    assert result.history[-1]["lr"] == 0.0  # the linear schedule ends at the epoch budget


SCORES = {1: 5.0, 2: 1.0, 3: 4.0, 4: 2.0}
# four graddiff steps, each evaluated, keeping the weights of the best forget_qa_rouge
KEEP_BEST = {
    "objective": "graddiff",
    "optimizer": "adamw",
    "lr": 1e-3,
    "steps": 4,
    "batch_size": 2,
    "eval_every": 1,
    "keep_best": "forget_qa_rouge",
}


@pytest.mark.parametrize(("mode", "best_step"), [("min", 2), ("max", 1)])
def test_keep_best_keeps_the_weights_of_the_best_evaluation(run_unlearn, tmp_path, mode, best_step):
    seen = {}

    def evaluate(model, step):
        seen[step] = weights(model)
        return {"forget_qa_rouge": SCORES[step], "note": "not a number"}

    config = UnlearnSettings(**KEEP_BEST, keep_best_mode=mode)
    result = run_unlearn(config, tmp_path, evaluate=evaluate)
    expected = {"step": best_step, "metric": "forget_qa_rouge", "value": SCORES[best_step], "mode": mode}
    assert result.best == expected
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["best.json", f"step-{best_step}"]
    final = weights(result.model)
    assert any(not torch.equal(final[name], tensor) for name, tensor in seen[best_step].items())
    record = restore_best(result.model, tmp_path)
    assert {k: record[k] for k in expected} == expected
    for name, tensor in seen[best_step].items():
        assert torch.equal(result.model.state_dict()[name], tensor), name


def test_keep_best_survives_a_resume(run_unlearn, tmp_path):
    config = UnlearnSettings(**KEEP_BEST, checkpoint_every=2)
    with pytest.raises(Killed):
        run_unlearn(config, tmp_path, evaluate=dies_at(3, lambda step: {"forget_qa_rouge": SCORES[step]}))
    # the resumed run sees only steps 3 and 4; step 2 stays the best
    result = run_unlearn(config, tmp_path, resume=True, evaluate=lambda model, step: {"forget_qa_rouge": SCORES[step]})
    assert result.resumed_from == 2 and result.best["step"] == 2


def test_keep_best_errors(run_unlearn, fresh_model, tmp_path):
    config = UnlearnSettings(
        objective="ga", optimizer="sgd", steps=2, batch_size=2, eval_every=1, keep_best="forget_qa_rouge"
    )
    with pytest.raises(ValueError, match="needs an evaluate callback"):
        run_unlearn(config, tmp_path)
    with pytest.raises(ValueError, match=r"not a number the evaluation returns; it returns \['accuracy'\]"):
        run_unlearn(config, tmp_path, evaluate=lambda model, step: {"accuracy": 0.5})
    with pytest.raises(ValueError, match="needs eval_every"):
        UnlearnSettings(keep_best="forget_qa_rouge")
    with pytest.raises(ValueError, match="keep_best_mode"):
        UnlearnSettings(keep_best="forget_qa_rouge", eval_every=1, keep_best_mode="lowest")
    with pytest.raises(ValueError, match="unknown keep_best metric"):
        UnlearnSettings(keep_best="rouge", eval_every=1)
    with pytest.raises(ValueError, match="no best weights"):
        restore_best(fresh_model(), tmp_path / "elsewhere")


def test_settings_refuse_conflicting_budgets_and_unknown_lora_options():
    with pytest.raises(UserError, match="steps or unlearn.epochs, not both"):
        load_settings(overrides={"unlearn": {"steps": 10, "epochs": 2}})
    with pytest.raises(UserError, match="unknown lora option.*rnk.*accepted: rank"):
        load_settings(overrides={"unlearn": {"lora": {"rnk": 8}}})
    with pytest.raises(UserError, match="keep_best needs eval_every"):
        load_settings(overrides={"unlearn": {"keep_best": "forget_qa_rouge"}})
    with pytest.raises(ValueError, match="unknown lora option"):
        UnlearnSettings(lora={"rnk": 8})


# The unlearning recipes of 7B models; the others are the tiny model's base layers (embedded, tofu-tiny:
# test_config.py) and the studies' (claims; the SmolLM2 studies run in test_smollm2_recipes.py).
NOT_7B = ("embedded", "tofu-tiny", "claims", "smollm2-facts", "smollm2-knowledge")
RECIPES = sorted(p for p in (Path(robustunlearn.__file__).parent / "recipes").glob("*.yaml") if p.stem not in NOT_7B)


def test_the_7b_recipes_are_there():
    stems = {"muse-news-npo", "wmdp-rmu", "tofu-npo"}
    assert {p.stem for p in RECIPES} >= stems | {f"{stem}-fsdp" for stem in stems}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_into_an_engine_config(recipe):
    settings = load_settings(recipe)
    assert settings.benchmark in ("muse", "wmdp", "tofu") and settings.model_path is not None
    if recipe.stem.endswith("-fsdp"):  # float32 masters sharded, bfloat16 compute
        assert settings.dtype == "float32" and settings.parallel.mixed_precision == "bf16"
        plain = load_settings(recipe.with_name(recipe.stem.removesuffix("-fsdp") + ".yaml"))
        assert settings.unlearn == plain.unlearn and settings.eval == plain.eval  # the same run otherwise
    else:
        assert settings.dtype == "bfloat16"
    config = unlearn_settings(settings)  # as the pipeline builds it
    engine_module.build_objective(config.objective, **config.objective_options)


def test_a_snapshot_commit_clears_staging_left_by_a_killed_writer(tmp_path):
    snapshots = checkpoint_module.Snapshots(tmp_path, "latest.json")
    leftover = tmp_path / ".step-4-abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    final = snapshots.commit(
        "step-6", lambda staging: (staging / "model.safetensors").write_bytes(b"whole"), {"step": 6}
    )
    assert not leftover.exists() and (final / "model.safetensors").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-6"]


@pytest.mark.parametrize("optimizer", ["adamw", "zo-sgd"])
def test_idk_dpo_pairs_refusals_with_their_questions_when_the_forget_batch_mixes_in_passages(
    synthetic_setup, run_unlearn, optimizer
):
    # The default forget splits hold QA pairs and passages; only the QA rows have a refusal, and
    # DPO must compare each refusal with its own question's true answer (it used to take the whole
    # forget batch: 8 rows against 6 refusals).
    benchmark, tokenizer = synthetic_setup
    config = UnlearnSettings(objective="idk-dpo", optimizer=optimizer, lr=1e-3, steps=4, batch_size=8, seed=1)
    assert config.forget_splits == ("forget_qa", "forget_text")
    questions, passages = benchmark.get("forget_qa")[:5], benchmark.get("forget_text")[:3]
    assert questions and passages
    batch = engine_module._shard_batch(
        questions + passages,
        benchmark.get("retain_qa")[:8],
        0,
        engine_module.data_parallel(),
        tokenizer,
        256,
        parts=IdkDPO.batch_parts,
    )
    assert len(batch.forget) == len(questions) + len(passages)
    assert len(batch.forget_refusal) == len(batch.forget_answered) == len(questions)
    assert torch.equal(
        batch.forget_answered.input_ids[0], batch.forget.input_ids[0, : batch.forget_answered.input_ids.shape[1]]
    )
    result = run_unlearn(config)
    assert result.steps_done == 4 and all(math.isfinite(h["reward_margin"]) for h in result.history)


@pytest.mark.parametrize(
    ("objective", "parts"),
    [("ga", {"forget"}), ("npo", {"forget", "retain"}), ("idk", {"forget", "retain", "refusal"})],
)
def test_the_engine_builds_only_the_batch_parts_the_objective_reads(run_unlearn, monkeypatch, objective, parts):
    real_build = engine_module.build_objective
    batches = []

    def recording_build(name, model=None, **hparams):
        built = real_build(name, model=model, **hparams)
        real_loss = built.loss
        built.loss = lambda model, batch, reference: batches.append(batch) or real_loss(model, batch, reference)
        return built

    monkeypatch.setattr(engine_module, "build_objective", recording_build)
    config = UnlearnSettings(objective=objective, optimizer="sgd", steps=2, batch_size=4)
    run_unlearn(config)
    assert real_build(objective).batch_parts == parts and len(batches) == 2
    for batch in batches:
        assert batch.forget is not None and (batch.retain is not None) == ("retain" in parts)
        assert (batch.forget_refusal is not None) == (batch.forget_answered is not None) == ("refusal" in parts)


class HookedSGD(OptimizerHooks, torch.optim.SGD):
    """SGD that answers every hook: it records what the engine tells it and asks to stop only
    after its third step."""

    wants_batch_tokens = True

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.batch_tokens, self.steps_taken = [], 0

    def step(self, closure):
        self.steps_taken += 1
        return super().step(closure)

    def set_batch_tokens(self, count):
        self.batch_tokens.append(count)

    def log_fields(self):
        return {"hooked_step": self.steps_taken}

    @property
    def may_stop(self):
        return self.steps_taken >= 3


def test_the_engine_reaches_the_optimizer_through_its_hooks(run_unlearn, monkeypatch):
    built = []

    def build(model, params, lr, options):
        built.append(HookedSGD(params, lr))
        return built[-1]

    spec = OptimizerSpec("hooked-sgd", "first-order", 1e-3, "test", build, memory=OptimizerMemory(state=0))
    monkeypatch.setitem(OPTIMIZERS, "hooked-sgd", spec)
    config = UnlearnSettings(objective="ga", optimizer="hooked-sgd", steps=5, batch_size=2, eval_every=1)
    result = run_unlearn(config, evaluate=lambda model, step: {}, should_stop=lambda metrics: "asked at once")
    assert [h["hooked_step"] for h in result.history] == [1, 2, 3]  # the stop waited for may_stop
    assert result.stopped_early == "asked at once" and list(result.history[0])[-2:] == ["hooked_step", "eval"]
    assert len(built[0].batch_tokens) == 3 and all(isinstance(n, int) and n > 0 for n in built[0].batch_tokens)


def test_the_engine_logs_sophias_unclipped_fraction_and_no_other_optimizers(run_unlearn):
    for optimizer, logged in (("sophia-g", True), ("adamw", False)):
        config = UnlearnSettings(objective="ga", optimizer=optimizer, steps=2, batch_size=2)
        history = run_unlearn(config).history
        if logged:
            assert all(0.0 <= h["last_unclipped_fraction"] <= 1.0 for h in history)
        else:
            assert all("last_unclipped_fraction" not in h and "current_phase" not in h for h in history)
