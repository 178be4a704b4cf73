"""`robustunlearn unlearn` as a user runs it: every engine flag reaches the settings, the dtype
setting reaches the loaded model, two processes (torchrun, accelerate) give what one gives, and a
run killed with SIGKILL resumes to the same final weights, byte for byte."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

import robustunlearn.cli as cli_module
import robustunlearn.study.loading as loading_module
import robustunlearn.study.pipeline as pipeline_module
from helpers import CLI_DATA, CLI_MODEL, free_port, save_cli_model
from robustunlearn.cli import main
from robustunlearn.config import load_settings, unlearn_settings
from robustunlearn.core.errors import UserError
from robustunlearn.core.models import file_sha256, save_model
from robustunlearn.data.base import Benchmark
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic
from robustunlearn.study.loading import load_target
from robustunlearn.train.engine import unlearn
from robustunlearn.train.settings import UnlearnSettings
from test_cli import assert_one_line_error, run_cli

DATA, TINY = CLI_DATA, CLI_MODEL


def recipe_text(**unlearn_settings) -> str:
    # gamma 0 drops NPO's token-averaged retain NLL; its per-sequence forget term weighs every
    # sequence the same whichever process holds it, so 2 processes match 1 up to rounding.
    unlearn_settings = {"lr": 1e-3, "batch_size": 4, "objective_options": {"gamma": 0.0}, **unlearn_settings}
    return yaml.safe_dump({"data": DATA, "unlearn": unlearn_settings})


RECIPE = recipe_text()
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with its own tokenizer, saved as a Hugging Face directory (for --model)."""
    return save_cli_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(RECIPE)
    return path


def unlearn_args(model_dir: Path, recipe: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "unlearn",
        "--model",
        str(model_dir),
        "--config",
        str(recipe),
        "--output-dir",
        str(output_dir),
        "--cache-dir",
        str(output_dir.parent / "cache"),
        *extra,
    ]


def run_unlearn(command: list[str], args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([*command, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


ONE_PROCESS = [sys.executable, "-m", "robustunlearn.cli"]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "final" / "model.safetensors"))


# -- flags ------------------------------------------------------------------------------------------


def capture_settings(monkeypatch, capsys, *args: str):
    captured = {}

    def fake_unlearn_only(settings, output_dir, cache_dir=None, *, resume=False, overwrite=False, console=None):
        captured.update(settings=settings, resume=resume)
        return output_dir / "final"

    monkeypatch.setattr(cli_module, "unlearn_only", fake_unlearn_only)
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *args])
    main()
    capsys.readouterr()
    return captured["settings"]


def test_every_engine_flag_reaches_the_settings(monkeypatch, capsys, tmp_path):
    settings = capture_settings(
        monkeypatch,
        capsys,
        "unlearn",
        "--output-dir",
        str(tmp_path / "o"),
        "--epochs",
        "3",
        "--batch-size",
        "6",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "2",
        "--eval-every",
        "5",
        "--keep-best",
        "retain_qa_rouge",
        "--keep-best-mode",
        "max",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--checkpoint-every",
        "7",
        "--dtype",
        "bfloat16",
    )
    chosen = settings.unlearn
    assert (chosen.epochs, chosen.batch_size, chosen.lr_schedule, chosen.warmup_steps) == (3, 6, "cosine", 2)
    assert (chosen.eval_every, chosen.keep_best, chosen.keep_best_mode) == (5, "retain_qa_rouge", "max")
    assert chosen.lora == {"rank": 4, "alpha": 8.0} and chosen.checkpoint_every == 7
    assert settings.dtype == "bfloat16"
    config = unlearn_settings(settings)  # what the engine gets
    assert (config.epochs, config.keep_best, config.lora["rank"]) == (3, "retain_qa_rouge", 4)


def test_flags_override_the_recipe_and_a_budget_flag_replaces_the_recipes_other_budget(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("unlearn: {epochs: 10, batch_size: 4, lora: {rank: 16, alpha: 32}}\n")
    settings = capture_settings(
        monkeypatch,
        capsys,
        "unlearn",
        "--config",
        str(recipe),
        "--output-dir",
        str(tmp_path / "o"),
        "--steps",
        "5",
        "--lora-alpha",
        "64",
    )
    assert (settings.unlearn.steps, settings.unlearn.epochs) == (5, None)
    assert settings.unlearn.lora == {"rank": 16, "alpha": 64.0} and settings.unlearn.batch_size == 4
    recipe.write_text("unlearn: {steps: 100}\n")
    settings = capture_settings(
        monkeypatch, capsys, "unlearn", "--config", str(recipe), "--output-dir", str(tmp_path / "o"), "--epochs", "2"
    )
    assert (settings.unlearn.epochs, settings.unlearn.steps) == (2, 60)  # the recipe's 100 steps are gone
    assert unlearn_settings(settings).total_steps(16) == 4  # 2 epochs of 16 records, batch 8
    assert load_settings(recipe).unlearn.steps == 100  # the recipe alone keeps its budget


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("--keep-best-mode", "median"), ("keep_best_mode", "'min' or 'max'")),
        (("--lr-schedule", "wavy"), ("wavy", "accepted:", "cosine")),
        (("--keep-best", "forget_qa_rouge"), ("keep_best needs eval_every",)),
        (("--keep-best", "vibes", "--eval-every", "2"), ("vibes", "accepted:", "forget_qa_rouge")),
        (("--steps", "3", "--epochs", "2"), ("--steps or --epochs",)),
        (("--batch-size", "0"), ("unlearn.batch_size",)),
        (("--lora-rank", "0"), ("lora rank must be a positive integer",)),
        (("--lora-alpha", "8"), ("--lora-alpha needs --lora-rank",)),
        (("--dtype", "float8"), ("dtype", "bfloat16")),
        (("--warmup-steps", "soon"), ("--warmup-steps",)),
    ],
)
def test_bad_unlearn_flags_are_one_line_errors(monkeypatch, capsys, tmp_path, args, fragments):
    code, output = run_cli(monkeypatch, capsys, "unlearn", "--output-dir", str(tmp_path / "o"), *args)
    assert code == 2
    assert_one_line_error(output, *fragments)
    assert not (tmp_path / "o").exists()


def test_keep_best_needs_the_metrics_split(monkeypatch, capsys, tmp_path):
    full = generate_synthetic(SyntheticConfig(**DATA))
    without_mcq = Benchmark(full.name, full.schema_version, {k: v for k, v in full.splits.items() if k != "forget_mcq"})
    monkeypatch.setattr(pipeline_module, "load_target", lambda *args, **kwargs: (None, None, without_mcq, None))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("unlearn: {eval_every: 1, keep_best: forget_mcq_accuracy}\n")
    code, output = run_cli(monkeypatch, capsys, "unlearn", "--config", str(recipe), "--output-dir", str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(output, "forget_mcq_accuracy", "forget_mcq")


def test_eval_every_logs_metrics_and_keep_best_puts_the_best_weights_in_final(monkeypatch, model_dir, recipe, tmp_path):
    output = tmp_path / "run"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "robustunlearn",
            *unlearn_args(
                model_dir, recipe, output, "--steps", "4", "--eval-every", "2", "--keep-best", "utility_perplexity"
            ),
        ],
    )
    main()
    evaluated = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    evaluated = {entry["step"]: entry["eval"] for entry in evaluated if "eval" in entry}
    assert sorted(evaluated) == [2, 4] and "forget_qa_rouge" in evaluated[2]
    # NPO raises the perplexity as it goes: the best (lowest) is at the first evaluation
    assert evaluated[2]["utility_perplexity"] < evaluated[4]["utility_perplexity"]
    best = json.loads((output / "final" / "manifest.json").read_text())["best"]
    assert best == {
        "step": 2,
        "metric": "utility_perplexity",
        "value": evaluated[2]["utility_perplexity"],
        "mode": "min",
    }
    kept = load_file(str(output / "best" / "step-2" / "model.safetensors"))
    last = load_file(str(output / "checkpoints" / "step-4" / "model.safetensors"))
    final = final_weights(output)
    assert all(torch.equal(final[name], tensor) for name, tensor in kept.items())
    assert any(not torch.equal(final[name], tensor) for name, tensor in last.items())


# -- dtype ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, expected",
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float16)],
)
def test_the_dtype_setting_reaches_the_loaded_model(model_dir, tmp_path, dtype, expected):
    model, tokenizer, _, _ = load_target(load_settings(overrides={"model_path": str(model_dir), "data": DATA}))
    half = save_model(model.half(), tokenizer, tmp_path / "half")  # saved in float16: what "auto" keeps
    settings = load_settings(overrides={"model_path": str(half), "data": DATA, "dtype": dtype})
    loaded = load_target(settings)[0]
    assert {p.dtype for p in loaded.parameters()} == {expected}


def test_prepare_fine_tunes_a_base_model_in_the_dtype_setting(model_dir, tmp_path):
    settings = load_settings(
        overrides={
            "base_model": str(model_dir),
            "dtype": "bfloat16",
            "data": DATA,
            "train": {"max_epochs": 1, "check_every_epochs": 1},
        }
    )
    prepared = loading_module.prepare_from_settings(settings, tmp_path / "cache", console=Console(file=io.StringIO()))
    for saved in (prepared.target_dir, prepared.retrain_dir):
        assert {t.dtype for t in load_file(str(saved / "model.safetensors")).values()} == {torch.bfloat16}
    as_float32 = loading_module.prepare_config(settings.model_copy(update={"dtype": "float32"}))
    assert as_float32.key() != loading_module.prepare_config(settings).key()  # a separate cache entry


def zo_warning(model, tokenizer, optimizer: str, **options) -> list[str]:
    console = Console(record=True, width=400, file=io.StringIO())
    config = UnlearnSettings(objective="ga", optimizer=optimizer, lr=1e-4, steps=1, batch_size=2, **options)
    unlearn(model, tokenizer, generate_synthetic(SyntheticConfig(**DATA)), config, progress=False, console=console)
    return [line for line in console.export_text().splitlines() if line.startswith("warning:")]


def test_zeroth_order_on_low_precision_weights_warns_in_one_line(model_dir):
    model, tokenizer, _, _ = load_target(load_settings(overrides={"model_path": str(model_dir), "dtype": "bfloat16"}))
    warnings = zo_warning(model, tokenizer, "zo-sgd")
    assert len(warnings) == 1 and "bfloat16" in warnings[0] and "float32" in warnings[0]
    assert len(zo_warning(model, tokenizer, "hybrid")) == 1  # its ZO part perturbs the same weights
    assert zo_warning(model, tokenizer, "adamw") == []  # first order has no round trip to lose
    assert zo_warning(model, tokenizer, "zo-sgd", lora={"rank": 2}) == []  # float32 adapters on a bfloat16 base
    fp32 = load_target(load_settings(overrides={"model_path": str(model_dir)}))[0]
    assert zo_warning(fp32, tokenizer, "zo-sgd") == []


# -- several processes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_run(model_dir, recipe, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("one") / "run"
    run_unlearn(ONE_PROCESS, unlearn_args(model_dir, recipe, output, "--steps", "6"))
    return output


def launcher_command(launcher: str) -> list[str]:
    port = str(free_port())
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "robustunlearn.cli"]
    # --multi_gpu selects accelerate's torchrun launcher, which runs on the CPU with gloo as well;
    # without it accelerate starts a single process on a machine without GPUs.
    return [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port,
        "-m",
        "robustunlearn.cli",
    ]


# The embedded target, sized to prepare in seconds.
TINY_TARGET = """
model: {vocab_size: 400, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4}
train: {max_epochs: 1, check_every_epochs: 1}
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one_process(model_dir, recipe, one_process_run, tmp_path, launcher):
    """torchrun unlearns a --model directory; accelerate the embedded target, which rank 0
    prepares while the other rank waits; a single process then reuses that cache entry."""
    output = tmp_path / "run"
    if launcher == "torchrun":
        args, one_process, start_weights = unlearn_args(model_dir, recipe, output), one_process_run, model_dir
    else:
        embedded = tmp_path / "embedded.yaml"
        embedded.write_text(RECIPE + TINY_TARGET)
        args = [
            "unlearn",
            "--config",
            str(embedded),
            "--output-dir",
            str(output),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
        one_process = tmp_path / "one"
    done = run_unlearn(launcher_command(launcher), [*args, "--steps", "6"], timeout=180)
    assert done.stderr.count("final model in") == 1  # only rank 0 prints
    logged = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]  # one writer
    state = json.loads((output / "checkpoints" / "latest.json").read_text())
    assert len(torch.load(output / "checkpoints" / state["name"] / "state.pt", weights_only=False)["ranks"]) == 2
    if launcher == "accelerate":
        (start_weights,) = (tmp_path / "cache" / "prepared").glob("*/target")  # one entry, complete:
        prepared_at = (start_weights.parent / "prepared.json").stat().st_mtime_ns
        run_unlearn(ONE_PROCESS, [*[str(one_process) if arg == str(output) else arg for arg in args], "--steps", "6"])
        assert (start_weights.parent / "prepared.json").stat().st_mtime_ns == prepared_at  # reused, not rebuilt

    start = load_file(str(start_weights / "model.safetensors"))
    one, two = final_weights(one_process), final_weights(output)
    assert one.keys() == two.keys()
    moved = max(float((one[name] - start[name]).abs().max()) for name in one)
    apart = max(float((one[name] - two[name]).abs().max()) for name in one)
    # float32 gradients summed in another order, which Adam's m/sqrt(v) magnifies where a gradient is
    # near 0: 1.4e-5 apart after 6 steps that moved the weights by 6e-3 (transformers 5.24, torch 2.13)
    assert moved > 1e-3 and apart < 1e-2 * moved, (moved, apart)


# -- kill -9 and resume -------------------------------------------------------------------------------------

KILL_STEPS = 40


def wait_for_checkpoint(process: subprocess.Popen, output: Path, timeout: float = 120) -> int:
    """Poll until the run has written a checkpoint of step 2 or later; return that step."""
    pointer = output / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.exists():
            step = json.loads(pointer.read_text())["step"]
            if step >= 2:
                return step
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint within {timeout} s (exit code {process.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "hybrid"])
def test_kill_9_then_resume_gives_the_final_hash_of_an_uninterrupted_run(model_dir, tmp_path, optimizer):
    recipe = tmp_path / "recipe.yaml"  # the hybrid alternates every step: a kill finds both parts' state in use
    recipe.write_text(recipe_text(optimizer_options={"every": 1} if optimizer == "hybrid" else {}))
    flags = ("--optimizer", optimizer, "--steps", str(KILL_STEPS), "--checkpoint-every", "1")
    whole = tmp_path / "whole"
    run_unlearn(ONE_PROCESS, unlearn_args(model_dir, recipe, whole, *flags))

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*ONE_PROCESS, *unlearn_args(model_dir, recipe, killed, *flags)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_checkpoint(process, killed)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    at_kill = json.loads((killed / "checkpoints" / "latest.json").read_text())["step"]
    assert 2 <= at_kill < KILL_STEPS and not (killed / "final").exists()

    resumed = run_unlearn(ONE_PROCESS, unlearn_args(model_dir, recipe, killed, *flags, "--resume"))
    assert f"resuming from step {at_kill} " in resumed.stderr  # not from scratch, which would match too
    assert file_sha256(killed / "final" / "model.safetensors") == file_sha256(whole / "final" / "model.safetensors")
    logged = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, KILL_STEPS + 1))


def test_unlearn_takes_a_real_benchmarks_data_dir_and_forget_split(monkeypatch, capsys, tmp_path):
    data = tmp_path / "tofu"
    data.mkdir()
    settings = capture_settings(
        monkeypatch,
        capsys,
        "unlearn",
        "--benchmark",
        "tofu",
        "--data-dir",
        str(data),
        "--forget-split",
        "forget05",
        "--output-dir",
        str(tmp_path / "o"),
    )
    assert settings.benchmark_options == {"data_dir": str(data), "forget_split": "forget05"}


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_auto_trains_in_bfloat16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(loading_module, "native_bf16_cpu", lambda: native)
    settings = load_settings(overrides={"data": DATA, "train": {"bf16_autocast": "auto"}})
    resolved = loading_module.prepare_config(settings)
    assert resolved.train.bf16_autocast is native
    # the cache key is that of the arithmetic used: auto shares the entry of the value it resolved to
    explicit = load_settings(overrides={"data": DATA, "train": {"bf16_autocast": native}})
    assert resolved.key() == loading_module.prepare_config(explicit).key()


def test_bf16_autocast_accepts_only_a_boolean_or_auto():
    with pytest.raises(UserError, match="bf16_autocast"):
        load_settings(overrides={"data": DATA, "train": {"bf16_autocast": "sometimes"}})
