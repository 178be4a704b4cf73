"""FSDP2 unlearning (parallel mode fsdp): 2 gloo processes on the CPU, each holding half of every
weight, give what 1 process gives on the same global batch, for first-order, compressed and
second-order optimizers; a run stopped mid-way resumes from its sharded checkpoint to the weights
of an uninterrupted one; and a sharded checkpoint's index is read without unpickling code.

Sophia-G samples its labels per rank (each rank draws its shard's labels from a generator seeded by
its rank), so no 2-process run draws what 1 process draws: it is compared with 2 data-parallel
(ddp) processes, which draw the same labels and average the same gradients, unsharded.

The model is float64 and the batch's sequences have equal token counts (test_distributed's
tokenizer): the one difference from one process is the order of the gradient sums (each rank's
half of the batch, then the reduce-scatter), a few ulps of float64 per step, so 1e-9 is the
tolerance after 4 steps; the sign optimizers would differ by 2·lr in a coordinate where a sum's
rounding flipped a sign, which float64 does not come near at these weights.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import WORLD_SIZE, assert_weights_close, free_port, join_ranks, rank_environment, snapshot
from robustunlearn.config import load_settings, unlearn_settings
from robustunlearn.core.distributed import full_state_dict
from robustunlearn.core.errors import UserError
from robustunlearn.core.models import file_sha256
from robustunlearn.optim import build_optimizer, hooks
from robustunlearn.train.engine import unlearn
from robustunlearn.train.settings import ParallelSettings, UnlearnSettings
from robustunlearn.train.sharded import SafeReader, UnsafeShardIndexError
from test_cli_unlearn import (
    ENV,
    ONE_PROCESS,
    final_weights,
    launcher_command,
    recipe_text,
    run_unlearn,
    unlearn_args,
    wait_for_checkpoint,
)
from test_cli_unlearn import model_dir as model_dir  # a fixture
from test_distributed import CharTokenizer, make_benchmark, make_model

DEADLINE_S = 240
FSDP = ParallelSettings(mode="fsdp")
MIXED = ParallelSettings(mode="fsdp", mixed_precision="bf16")


def config(optimizer: str, objective: str = "npo", **options) -> UnlearnSettings:
    return UnlearnSettings(
        objective=objective,
        optimizer=optimizer,
        lr=1e-2,
        steps=4,
        batch_size=4,
        forget_splits=("forget_qa",),
        retain_splits=("retain_text",),
        parallel=FSDP,
        **options,
    )


CASES = {
    "adamw": config("adamw"),
    "signadam": config("signadam"),
    "sophia-g": config("sophia-g", optimizer_options={"hessian_period": 2}),  # refreshes ĥ at steps 1 and 3
    "sophia-g-ddp": config("sophia-g", optimizer_options={"hessian_period": 2}).model_copy(
        update={"parallel": ParallelSettings()}
    ),
    "lion": config("lion"),
    "qadam-2": config("qadam-2", optimizer_options={"error_feedback": True}),  # a per-tensor max|d| scale
    "onebit-adam": config("onebit-adam", optimizer_options={"warmup_steps": 2}),  # then a per-tensor ‖c‖₂ scale
    "rmu": config("adamw", "rmu"),  # a forward pass stopped after one block, on the model and the reference
    # bfloat16 forward and backward, float32 reduction, the master weights in the model's dtype
    "adamw-bf16": config("adamw").model_copy(update={"parallel": MIXED}),
}
RESUMED = config("sophia-g", optimizer_options={"hessian_period": 2}, eval_every=1, checkpoint_every=1)


def run(case: UnlearnSettings, directory: Path | None = None, **options):
    return unlearn(make_model(), CharTokenizer(), make_benchmark(), case, directory, progress=False, **options)


def forget_loss(model, step: int) -> dict[str, float]:
    """An evaluation that runs a forward pass (under FSDP on every rank, which gather the weights)."""
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return {"step": step, "loss": float(model(input_ids=ids, labels=ids).loss)}


class Killed(Exception):
    pass


def killed_at_3(model, step: int) -> dict[str, float]:
    """An evaluation that dies during step 3, after the checkpoint of step 2 (on every rank, as
    a kill of the launch ends them all)."""
    if step == 3:
        raise Killed
    return forget_loss(model, step)


def _worker(rank: int, port: int, out: Path) -> None:
    rank_environment(rank, port)
    torch.set_num_threads(1)
    try:
        for name, case in CASES.items():
            started = time.perf_counter()
            result = run(case)
            sharded = case.parallel.mode == "fsdp"
            shard = result.model.model.layers[0].mlp.down_proj.weight
            weights = full_state_dict(result.model, sharded=sharded)  # every rank gathers, rank 0 gets them
            if rank == 0:
                local_rows = shard.to_local().shape[0] if sharded else shard.shape[0]
                record = {"weights": weights, "history": result.history, "local_rows": local_rows}
                torch.save({**record, "seconds": time.perf_counter() - started}, out / f"{name}.pt")
        # killed during step 3, then resumed from its sharded checkpoint of step 2
        try:
            run(RESUMED, out / "resumed", evaluate=killed_at_3)
        except Killed:
            pass
        result = run(RESUMED, out / "resumed", evaluate=forget_loss, resume=True)
        weights = full_state_dict(result.model, sharded=True)
        if rank == 0:
            torch.save(
                {"weights": weights, "history": result.history, "resumed_from": result.resumed_from},
                out / "resumed.pt",
            )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    join_ranks(_worker, (free_port(), out), DEADLINE_S, poll_s=5)
    return out


def assert_same_run(sharded: dict, weights: dict, history: list[dict]) -> None:
    assert sharded["local_rows"] == weights["model.layers.0.mlp.down_proj.weight"].shape[0] // WORLD_SIZE
    start = snapshot(make_model())
    assert any(not torch.equal(weights[k], start[k]) for k in weights)  # the run moved the weights
    assert_weights_close(sharded["weights"], weights, atol=1e-9)
    logged = [h["loss"] for h in sharded["history"]]  # averaged over ranks
    assert logged == pytest.approx([h["loss"] for h in history], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CASES) - {"sophia-g", "sophia-g-ddp", "adamw-bf16"}))
def test_two_sharded_processes_match_one_process(two_processes, name):
    single = run(CASES[name].model_copy(update={"parallel": ParallelSettings()}))
    assert_same_run(torch.load(two_processes / f"{name}.pt"), snapshot(single.model), single.history)


@pytest.mark.slow
def test_mixed_precision_computes_in_bfloat16_and_keeps_the_master_weights(two_processes):
    full = torch.load(two_processes / "adamw.pt")
    mixed = torch.load(two_processes / "adamw-bf16.pt")
    assert {t.dtype for t in mixed["weights"].values()} == {torch.float64}  # the masters the optimizer steps on
    losses, exact = [h["loss"] for h in mixed["history"]], [h["loss"] for h in full["history"]]
    assert losses != exact and losses == pytest.approx(exact, rel=1e-2)  # bfloat16 rounding, 8 bits of mantissa


def test_optimizers_say_whether_they_run_on_sharded_parameters(tiny_llama):
    model, mesh = tiny_llama(), SimpleNamespace(get_group=lambda: None)  # a one-rank mesh, as far as they ask
    for name in ("adamw", "sgd", "signadam", "lion", "qadam-4", "onebit-adam", "sophia-g", "sam"):
        hooks(build_optimizer(name, model)).enable_fsdp(model, mesh)  # accepted
    # sophia-h refuses; zo-sgd accepts sharded parameters only (tests/test_optim_fsdp_zo.py runs it sharded)
    for name, fragment in [("sophia-h", "sophia-g"), ("zo-sgd", "sharded along its first dimension")]:
        with pytest.raises(ValueError, match=fragment):
            hooks(build_optimizer(name, model)).enable_fsdp(model, mesh)


def test_parallel_settings_are_checked(tmp_path):
    assert load_settings(None, {"parallel": {"mode": "fsdp"}}).parallel.mode == "fsdp"
    assert unlearn_settings(load_settings(None, {"parallel": {"mode": "fsdp"}})).parallel.mode == "fsdp"
    for overrides, fragment in [
        ({"parallel": {"mixed_precision": "bf16"}}, "needs parallel.mode fsdp"),
        ({"parallel": {"mode": "fsdp", "mixed_precision": "bf16"}, "dtype": "bfloat16"}, "float32 master weights"),
        ({"unlearn": {"parallel": {"mode": "fsdp"}}}, "top-level parallel"),
        ({"parallel": {"mode": "zero3"}}, "'ddp' or 'fsdp'"),
    ]:
        with pytest.raises(UserError, match=fragment):
            load_settings(None, overrides)


@pytest.mark.slow
def test_sophia_g_sharded_matches_sophia_g_data_parallel(two_processes):
    replicated = torch.load(two_processes / "sophia-g-ddp.pt")
    sharded = torch.load(two_processes / "sophia-g.pt")
    assert_same_run(sharded, replicated["weights"], replicated["history"])
    # the unclipped share counts the coordinates of both shards
    fractions = [h["last_unclipped_fraction"] for h in sharded["history"]]
    assert fractions == pytest.approx([h["last_unclipped_fraction"] for h in replicated["history"]], abs=1e-12)
    assert 0 < min(fractions) and max(fractions) < 1


@pytest.mark.slow
def test_a_stopped_sharded_run_resumes_to_the_uninterrupted_weights(two_processes):
    """Sophia-G: the resumed run needs the moments, the curvature and the label sampler's state."""
    whole, resumed = torch.load(two_processes / "sophia-g.pt"), torch.load(two_processes / "resumed.pt")
    assert resumed["resumed_from"] == 2
    assert_weights_close(resumed["weights"], whole["weights"], atol=0)  # bit for bit
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    evaluated = [h["eval"]["step"] for h in resumed["history"]]  # every rank evaluated, rank 0's metrics logged
    assert evaluated == [1, 2, 3, 4]
    checkpoint = two_processes / "resumed" / "checkpoints" / "step-4"
    names = sorted(p.name for p in checkpoint.iterdir())
    # each rank's shards, DCP's index, NPO's reference cache (the same on every rank), no whole-model weights
    shards = [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert names == [*shards, "progress.json", "reference.safetensors", "sha256.json", "state.pt"]


@pytest.mark.slow
def test_a_sharded_index_that_would_run_code_is_refused(two_processes, tmp_path):
    checkpoint = two_processes / "resumed" / "checkpoints" / "step-4"
    index = SafeReader(checkpoint).read_metadata()  # the index DCP wrote reads back
    assert any(key.startswith("model.") for key in index.state_dict_metadata)
    assert any(key.startswith("optimizer.state.") for key in index.state_dict_metadata)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UnsafeShardIndexError, match="system, which is not part of a DCP index"):
        SafeReader(tmp_path).read_metadata()


class Exploit:
    def __reduce__(self):
        return os.system, ("echo unpickled",)


# -- the command line: torchrun --parallel fsdp, killed with SIGKILL, then resumed ------------------------

CLI_STEPS = 12


@pytest.mark.slow
def test_kill_9_of_a_sharded_launch_then_resume_gives_the_uninterrupted_final_model(model_dir, tmp_path):
    """final/ is a plain Hugging Face directory gathered on rank 0; a launch killed with SIGKILL
    (torchrun and both ranks) and relaunched with --resume writes the same final/model.safetensors,
    byte for byte, as an uninterrupted launch; and both are within float32 rounding of 1 process.
    The recipe drops NPO's token-averaged retain term (test_cli_unlearn), whose shards weigh differently."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text())
    flags = ("--parallel", "fsdp", "--steps", str(CLI_STEPS), "--checkpoint-every", "1")
    whole = tmp_path / "whole"
    done = run_unlearn(launcher_command("torchrun"), unlearn_args(model_dir, recipe, whole, *flags), timeout=240)
    assert done.stderr.count("final model in") == 1
    final = load_file(str(whole / "final" / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(whole / "final")  # a plain model of whole tensors
    assert {n: tuple(p.shape) for n, p in reloaded.named_parameters()} == {n: tuple(t.shape) for n, t in final.items()}
    assert all(torch.equal(p.detach(), final[n]) for n, p in reloaded.named_parameters())

    killed = tmp_path / "killed"
    launch = [*launcher_command("torchrun"), *unlearn_args(model_dir, recipe, killed, *flags)]
    process = subprocess.Popen(launch, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(process, killed, timeout=180)
    finally:
        # torchrun starts each rank in a session of its own: kill the ranks by their ids, then torchrun
        for rank in psutil.Process(process.pid).children(recursive=True):
            rank.send_signal(signal.SIGKILL)
        process.send_signal(signal.SIGKILL)
        process.wait()
    at_kill = json.loads((killed / "checkpoints" / "latest.json").read_text())["step"]
    assert 2 <= at_kill < CLI_STEPS and not (killed / "final").exists()
    relaunch = unlearn_args(model_dir, recipe, killed, *flags, "--resume")
    resumed = run_unlearn(launcher_command("torchrun"), relaunch, timeout=240)
    assert f"resuming from step {at_kill} " in resumed.stderr
    assert file_sha256(killed / "final" / "model.safetensors") == file_sha256(whole / "final" / "model.safetensors")

    one = tmp_path / "one"
    run_unlearn(ONE_PROCESS, unlearn_args(model_dir, recipe, one, "--steps", str(CLI_STEPS)))
    single, start = final_weights(one), load_file(str(model_dir / "model.safetensors"))
    moved = max(float((single[name] - start[name]).abs().max()) for name in single)
    apart = max(float((single[name] - final[name]).abs().max()) for name in single)
    # float32: the two sums of each gradient differ in their last bits, and Adam's m/√v magnifies that
    # where a gradient is near 0 (measured 1.4e-5 after 12 steps of lr 1e-3; 1 and 2 ddp processes: < 1e-5 in 6)
    assert moved > 1e-3 and apart < 5e-5, (moved, apart)
