"""Reliability: resume resumes the same run, one process per run directory (and per prepare cache
entry), and every bad input ends in one line with exit code 2 (3 for a diverged run), leaving
behind nothing the command created."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import robustunlearn.cli as cli_module
import robustunlearn.train.prepare as prepare_module
from helpers import CLI_DATA, CLI_MODEL, save_cli_model
from robustunlearn.config import load_settings, unlearn_settings
from robustunlearn.core.lock import LOCK_NAME, DirectoryInUse, directory_lock
from robustunlearn.study.loading import prepare_from_settings
from robustunlearn.train.checkpoint import Checkpointer, CheckpointError, check_resume_settings, run_state
from robustunlearn.train.engine import NonFiniteLossError
from robustunlearn.train.settings import UnlearnSettings
from test_cli import assert_one_line_error

DATA, TINY = CLI_DATA, CLI_MODEL
RECIPE = {"data": DATA, "unlearn": {"lr": 1e-3, "batch_size": 4}}
# The embedded target, sized to prepare in seconds.
PREPARED = {
    "data": DATA,
    "model": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
    "train": {"max_epochs": 1, "check_every_epochs": 1},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def quiet() -> Console:
    return Console(file=io.StringIO())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_cli_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def unlearn_args(model_dir: Path, recipe: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["unlearn", "--model", str(model_dir), "--config", str(recipe), "--output-dir", str(output_dir), *extra]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The exit code (0 when main returns) and everything printed."""
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *args])
    try:
        cli_module.main()
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def files_under(path: Path) -> list[Path]:
    return sorted(path.rglob("*")) if path.exists() else []


# -- resume checks what it resumes ----------------------------------------------------------------------------


STORED = UnlearnSettings(objective="npo", optimizer="adamw", lr=1e-3, steps=20, batch_size=4, checkpoint_every=5)


def stored_settings() -> dict:
    return json.loads(json.dumps(STORED.model_dump(mode="json")))  # as progress.json gives it back


def test_resuming_with_the_same_settings_passes():
    assert check_resume_settings(stored_settings(), STORED) == []


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"lr": 2e-3}, "lr 0.001 -> 0.002"),
        ({"steps": 40}, "steps 20 -> 40"),
        ({"epochs": 2}, "epochs null -> 2"),
        ({"objective": "ga"}, 'objective "npo" -> "ga"'),
        ({"optimizer_options": {"betas": [0.8, 0.9]}}, 'optimizer_options {} -> {"betas": [0.8, 0.9]}'),
        ({"seed": 1}, "seed 0 -> 1"),
        ({"lora": {"rank": 4}}, 'lora null -> {"rank": 4}'),
        ({"forget_splits": ("forget_qa",)}, 'forget_splits ["forget_qa", "forget_text"] -> ["forget_qa"]'),
    ],
)
def test_a_changed_setting_that_alters_the_computation_is_refused(change, shown):
    with pytest.raises(CheckpointError) as error:
        check_resume_settings(stored_settings(), STORED.model_copy(update=change))
    assert shown in str(error.value) and "--overwrite" in str(error.value)


def test_every_changed_setting_is_listed():
    with pytest.raises(CheckpointError) as error:
        check_resume_settings(stored_settings(), STORED.model_copy(update={"lr": 2e-3, "batch_size": 8}))
    assert "batch_size 4 -> 8; lr 0.001 -> 0.002" in str(error.value)


def test_cosmetic_changes_are_allowed_and_noted():
    notes = check_resume_settings(stored_settings(), STORED.model_copy(update={"checkpoint_every": 1, "eval_every": 3}))
    assert len(notes) == 1 and "checkpoint_every 5 -> 1; eval_every 0 -> 3" in notes[0]


def test_a_setting_added_since_the_checkpoint_counts_as_its_default():
    stored = stored_settings()
    del stored["max_length"]  # as if written before max_length existed
    stored["retired_setting"] = 1  # and with a setting since removed
    assert check_resume_settings(stored, STORED) == []
    with pytest.raises(CheckpointError, match=r"max_length 256 -> 128"):
        check_resume_settings(stored, STORED.model_copy(update={"max_length": 128}))
    assert "not checked" in check_resume_settings(None, STORED)[0]  # an old checkpoint without settings


def test_what_the_engine_stores_is_what_a_run_checks(model_dir, recipe, tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    code, _ = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2"))
    assert code == 0
    progress = json.loads((output / "checkpoints" / "step-2" / "progress.json").read_text())
    settings = unlearn_settings(load_settings(recipe, {"model_path": str(model_dir), "unlearn": {"steps": 2}}))
    assert check_resume_settings(progress["config"], settings) == []
    # Loading a checkpoint with other settings is refused before anything is loaded (no model needed).
    checkpointer = Checkpointer(output)
    with pytest.raises(CheckpointError, match=r"optimizer \"adamw\" -> \"sgd\""):
        checkpointer.load(
            checkpointer.latest(), None, None, None, {}, None, settings=settings.model_copy(update={"optimizer": "sgd"})
        )


# -- the unlearn command's resume rules ----------------------------------------------------------------------


def test_resume_needs_a_checkpoint(monkeypatch, capsys, tmp_path, model_dir, recipe):
    missing = tmp_path / "missing"
    code, output = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, missing, "--resume"))
    assert code == 2
    assert_one_line_error(output, "--resume:", "does not exist", "--resume-if-exists")
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, empty, "--resume"))
    assert code == 2
    assert_one_line_error(output, "holds no checkpoint")
    assert empty.is_dir() and not any(empty.iterdir())  # not created by the command: kept, empty


def test_resume_if_exists_starts_afresh_then_resumes(monkeypatch, capsys, tmp_path, model_dir, recipe):
    output = tmp_path / "run"
    code, printed = run_cli(
        monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2", "--resume-if-exists")
    )
    assert code == 0 and "resuming" not in printed
    assert run_state(output).finished and run_state(output).checkpoint_step == 2
    code, printed = run_cli(
        monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2", "--resume-if-exists")
    )
    assert code == 0 and "resuming from step 2" in printed


def test_resume_refuses_changed_settings_and_notes_cosmetic_ones(monkeypatch, capsys, tmp_path, model_dir, recipe):
    output = tmp_path / "run"
    assert run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2"))[0] == 0
    for change, shown in (("--lr", "lr"), ("--optimizer", "optimizer"), ("--batch-size", "batch_size")):
        value = {"--lr": "0.5", "--optimizer": "sgd", "--batch-size": "2"}[change]
        code, printed = run_cli(
            monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2", "--resume", change, value)
        )
        assert code == 2, printed
        assert_one_line_error(printed, "cannot resume", shown)
    code, printed = run_cli(
        monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2", "--resume", "--eval-every", "1")
    )
    assert code == 0 and "resuming from step 2" in printed and "note:" in printed and "eval_every" in printed


def test_a_run_directory_is_replaced_only_with_overwrite(monkeypatch, capsys, tmp_path, model_dir, recipe):
    output = tmp_path / "run"
    assert run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2"))[0] == 0
    (output / "notes.txt").write_text("mine")
    code, printed = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "1"))
    assert code == 2
    assert_one_line_error(printed, "holds a finished run", "--overwrite")
    code, _ = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "1", "--overwrite"))
    assert code == 0
    assert [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["latest.json", "step-1"]
    assert (output / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_an_unfinished_run_needs_resume_or_overwrite(monkeypatch, capsys, tmp_path, model_dir, recipe):
    output = tmp_path / "run"
    assert run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2"))[0] == 0
    shutil.rmtree(output / "final")
    (output / "status.json").unlink()  # as if killed after its last checkpoint
    code, printed = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "2"))
    assert code == 2
    assert_one_line_error(printed, "unfinished run (checkpoint of step 2)", "--resume", "--overwrite")


@pytest.mark.parametrize("flags", [("--resume", "--overwrite"), ("--resume", "--resume-if-exists")])
def test_resume_flags_exclude_each_other(monkeypatch, capsys, tmp_path, model_dir, recipe, flags):
    code, output = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, tmp_path / "o", *flags))
    assert code == 2
    assert_one_line_error(output, "give one of --resume, --resume-if-exists and --overwrite")


# -- one process per directory --------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from robustunlearn.core.lock import directory_lock
directory, lock_file, seconds = sys.argv[1:]
with directory_lock(directory, lock_file=lock_file):
    print("locked", flush=True)
    time.sleep(float(seconds))
"""


def hold_lock(directory: Path, lock_file: Path | None = None, seconds: float = 600) -> subprocess.Popen:
    """Another process that holds ``directory``'s lock (in ``lock_file``, default the directory's
    own) for ``seconds``, or until it is killed."""
    lock_file = lock_file or directory / LOCK_NAME
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory), str(lock_file), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_until_the_first_dies(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(DirectoryInUse) as error:
            with directory_lock(tmp_path):
                pass
        assert str(error.value) == f"{tmp_path} is in use by process {holder.pid}"
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel releases the lock
        holder.wait()
    with directory_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()  # released and removed


def test_waiting_takes_the_lock_once_the_holder_releases_it(tmp_path):
    holder = hold_lock(tmp_path, seconds=1.0)
    waited_for = []
    try:
        started = time.monotonic()
        with directory_lock(tmp_path, wait=True, on_wait=waited_for.append):
            assert holder.poll() is not None or time.monotonic() - started > 0.5
    finally:
        holder.kill()
        holder.wait()
    assert waited_for == [holder.pid]


def test_the_unlearn_command_refuses_a_directory_in_use(monkeypatch, capsys, tmp_path, model_dir, recipe):
    output = tmp_path / "run"
    output.mkdir()
    holder = hold_lock(output)
    try:
        code, printed = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output, "--steps", "1"))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert_one_line_error(printed, f"{output} is in use by process {holder.pid}")
    assert not (output / "checkpoints").exists()


def test_the_study_command_refuses_a_directory_in_use(monkeypatch, capsys, tmp_path, model_dir):
    output = tmp_path / "study"
    output.mkdir()
    monkeypatch.setattr(cli_module, "run_pipeline", lambda *args, **kwargs: pytest.fail("the study ran"))
    holder = hold_lock(output)
    try:
        code, printed = run_cli(monkeypatch, capsys, "study", "--output-dir", str(output), "--model", str(model_dir))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert_one_line_error(printed, f"{output} is in use by process {holder.pid}")


@pytest.fixture(scope="module")
def prepared_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    prepare_from_settings(load_settings(None, PREPARED), cache, console=quiet())
    return cache


def copy_of(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the prepared cache and the directory of its one entry."""
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (entry,) = (copy / "prepared").iterdir()
    return copy, entry


def test_a_second_prepare_waits_for_the_first_then_reuses_its_entry(prepared_cache, tmp_path, monkeypatch):
    cache, entry = copy_of(prepared_cache, tmp_path)
    monkeypatch.setattr(prepare_module, "_build", lambda *args: pytest.fail("the entry was built twice"))
    holder = hold_lock(entry, entry.parent / f"{entry.name}.lock", seconds=1.0)  # the first, still preparing
    console = Console(record=True, file=io.StringIO(), width=300)
    try:
        prepared = prepare_from_settings(load_settings(None, PREPARED), cache, console=console)
    finally:
        holder.kill()
        holder.wait()
    assert f"waiting for process {holder.pid}, which is preparing {entry}" in console.export_text()
    assert prepared.directory == entry
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # the lock file is gone


# -- the prepare cache: integrity and leftovers --------------------------------------------------------------


@pytest.mark.parametrize(
    "corrupted",
    [
        "target/tokenizer.json",
        "target/config.json",
        "retrain/tokenizer_config.json",
        "target/model.safetensors",
        "target/manifest.json",
        "prepared.json",
        "benchmark.json",
        "sha256.json",
    ],
)
def test_a_corrupt_cache_entry_is_rebuilt(prepared_cache, tmp_path, monkeypatch, corrupted):
    cache, entry = copy_of(prepared_cache, tmp_path)
    (entry / corrupted).write_bytes(b"{garbage")
    rebuilt = []
    monkeypatch.setattr(prepare_module, "_build", lambda config, directory, console, jobs: rebuilt.append(directory))
    console = Console(record=True, file=io.StringIO(), width=300)
    prepare_from_settings(load_settings(None, PREPARED), cache, console=console)
    assert rebuilt == [entry] and "rebuilding incomplete or corrupted cache entry" in console.export_text()


def test_a_failed_prepare_leaves_no_folders_behind(monkeypatch, capsys, tmp_path):
    tofu = tmp_path / "tofu"  # a directory without TOFU's files: the loader fails once the run has started
    tofu.mkdir()
    output, cache = tmp_path / "deep" / "out", tmp_path / "new-cache"
    code, printed = run_cli(
        monkeypatch,
        capsys,
        "unlearn",
        "--benchmark",
        "tofu",
        "--data-dir",
        str(tofu),
        "--forget-split",
        "forget01",
        "--output-dir",
        str(output),
        "--cache-dir",
        str(cache),
    )
    assert code == 2
    assert_one_line_error(printed, "TOFU directory", "forget01")
    assert not (tmp_path / "deep").exists() and not cache.exists()


# -- bad inputs: one line, exit code 2 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("--benchmark", "tofu", "--forget-split", "forget07"), ("forget07", "forget01", "forget05", "forget10")),
        (("--forget-split", "forget01"), ("synthetic benchmark takes none", "forget_split")),
        (("--benchmark", "muse", "--forget-split", "forget01"), ("forget_split", "'muse'", "accepted:")),
    ],
)
def test_benchmark_options_are_checked_up_front(monkeypatch, capsys, tmp_path, args, fragments):
    output = tmp_path / "o"
    for command in ("unlearn", "study", "prepare", "eval"):
        extra = ["--output-dir", str(output)] if command in ("unlearn", "study") else []
        code, printed = run_cli(monkeypatch, capsys, command, *args, *extra, "--cache-dir", str(tmp_path / "c"))
        assert code == 2, command
        assert_one_line_error(printed, *fragments)
    assert not output.exists() and not (tmp_path / "c").exists()


def test_a_data_dir_with_the_synthetic_benchmark_is_an_error(monkeypatch, capsys, tmp_path):
    code, printed = run_cli(monkeypatch, capsys, "prepare", "--data-dir", str(tmp_path))
    assert code == 2
    assert_one_line_error(printed, "synthetic benchmark takes none", "data_dir")


@pytest.mark.parametrize(
    "section, fragments",
    [
        ({"objective": "npo", "objective_options": {"gama": 0.5}}, ("gama", "'npo'", "accepted:", "gamma", "beta")),
        ({"objective": "npo", "objective_options": {"beta": -1.0}}, ("beta must be > 0",)),
        ({"optimizer": "sgd", "optimizer_options": {"momentm": 0.9}}, ("momentm", "'sgd'", "accepted:", "momentum")),
        ({"optimizer": "zo-sgd", "optimizer_options": {"qq": 2}}, ("qq", "'zo-sgd'", "q, ")),
    ],
)
def test_unknown_training_options_name_the_accepted_ones(monkeypatch, capsys, tmp_path, model_dir, section, fragments):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"unlearn": section}))
    code, printed = run_cli(
        monkeypatch,
        capsys,
        "unlearn",
        "--config",
        str(recipe),
        "--model",
        str(model_dir),
        "--output-dir",
        str(tmp_path / "o"),
    )
    assert code == 2
    assert_one_line_error(printed, *fragments)
    assert not (tmp_path / "o").exists()


def test_the_study_checks_the_options_of_each_of_its_optimizers(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"unlearn": {"optimizer_options": {"beta": 0.9}}}))  # signadam's, not adam's
    code, printed = run_cli(
        monkeypatch,
        capsys,
        "study",
        "--config",
        str(recipe),
        "--optimizers",
        "signadam,adam",
        "--output-dir",
        str(tmp_path / "o"),
    )
    assert code == 2
    assert_one_line_error(printed, "unknown option(s) beta for optimizer 'adam'")


def test_an_unwritable_cache_dir_is_refused_up_front(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for command in (("prepare",), ("unlearn", "--output-dir", str(tmp_path / "o"))):
        code, printed = run_cli(monkeypatch, capsys, *command, "--cache-dir", str(blocker / "cache"))
        assert code == 2
        assert_one_line_error(printed, "cache directory", "not writable")
    assert not (tmp_path / "o").exists()


def broken_copy(model_dir: Path, tmp_path: Path, broken: str, content: bytes | None) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    if content is None:
        (copy / broken).unlink()
    else:
        (copy / broken).write_bytes(content)
    return copy


@pytest.mark.parametrize(
    "broken, content, keep_manifest, fragments",
    [
        ("manifest.json", b"garbage", True, ("manifest.json is not valid JSON",)),
        ("manifest.json", b"[1, 2]", True, ("manifest.json is not a JSON object",)),
        ("model.safetensors", b"\x00" * 20, True, ("model.safetensors does not match the SHA-256",)),
        ("tokenizer.json", b"{", True, ("tokenizer.json does not match the SHA-256",)),
        ("model.safetensors", b"\x00" * 20, False, ("cannot load model",)),
        ("tokenizer.json", b"{", False, ("cannot load model",)),
        ("config.json", None, False, ("has no config.json",)),
    ],
)
def test_a_broken_model_directory_is_one_line(
    monkeypatch, capsys, tmp_path, model_dir, broken, content, keep_manifest, fragments
):
    model = broken_copy(model_dir, tmp_path, broken, content)
    if not keep_manifest:
        (model / "manifest.json").unlink()
    code, printed = run_cli(monkeypatch, capsys, "eval", "--model", str(model))
    assert code == 2
    assert_one_line_error(printed, *fragments)


def test_an_offline_hub_name_fails_in_seconds(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    code, printed = run_cli(
        monkeypatch, capsys, "unlearn", "--model", "no-org/no-model", "--output-dir", str(tmp_path / "o")
    )
    assert code == 2 and time.monotonic() - started < 5
    assert_one_line_error(printed, "'no-org/no-model'", "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert not (tmp_path / "o").exists()


def test_a_diverged_run_is_one_line_with_exit_code_3(monkeypatch, capsys, tmp_path, model_dir, recipe):
    def diverge(*args, **kwargs):
        raise NonFiniteLossError(7, "loss = [nan]")

    monkeypatch.setattr(cli_module, "unlearn_only", diverge)
    code, printed = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, tmp_path / "o"))
    assert code == 3
    assert_one_line_error(printed, "diverged", "non-finite loss at step 7: loss = [nan]")


def test_dry_run_prints_the_settings_and_writes_nothing(monkeypatch, capsys, tmp_path, model_dir, recipe):
    output = tmp_path / "o"
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *unlearn_args(model_dir, recipe, output, "--dry-run")])
    cli_module.main()
    printed = json.loads(capsys.readouterr().out)
    assert printed["model_path"] == str(model_dir) and printed["unlearn"]["lr"] == 1e-3
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "unlearn, fragment",
    [
        ({"optimizer": "adam", "optimizer_options": {"betas": [2, 3]}}, "optimizer adam: "),
        ({"optimizer": "hybrid", "optimizer_options": {"every": -3}}, "optimizer hybrid: "),
        ({"objective": "npo", "objective_options": {"beta": -1.0}}, "unlearn.objective_options: beta must be > 0"),
    ],
)
def test_an_option_value_a_library_refuses_is_one_line(monkeypatch, capsys, tmp_path, model_dir, unlearn, fragment):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "unlearn": {**RECIPE["unlearn"], **unlearn}}))
    code, printed = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, tmp_path / "run", "--steps", "2"))
    assert code == 2, printed
    assert_one_line_error(printed, fragment)
