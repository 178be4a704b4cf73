"""A run directory handed over by someone else (a shared checkpoint, a downloaded run) can neither
delete anything outside it, nor run code on resume, nor pass off corrupted files: each is refused
with one line naming the file, through the engine and through the CLI (exit code 2)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robustunlearn.cli import main
from robustunlearn.core.models import TinyModelConfig, build_tiny_model, file_sha256, save_model, train_tokenizer
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic
from robustunlearn.train.checkpoint import CHECKSUMS, CheckpointError, restore_best
from robustunlearn.train.engine import unlearn
from robustunlearn.train.settings import UnlearnSettings
from test_cli import assert_one_line_error, run_cli

DATA = {"num_people": 5, "num_utility_passages": 4, "num_utility_qa": 2}
TINY = TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CONFIG = UnlearnSettings(objective="npo", optimizer="adamw", lr=1e-3, steps=2, batch_size=2)


@pytest.fixture(scope="module")
def setup():
    benchmark = generate_synthetic(SyntheticConfig(**DATA))
    tokenizer = train_tokenizer([r.text for r in benchmark.get("forget_text") + benchmark.get("retain_text")] * 2, 400)
    return benchmark, tokenizer


def run(setup, output_dir: Path, *, resume: bool = False, config: UnlearnSettings = CONFIG, **options):
    benchmark, tokenizer = setup
    model = build_tiny_model(TINY, tokenizer, seed=0)
    return unlearn(model, tokenizer, benchmark, config, output_dir, resume=resume, progress=False, **options)


@pytest.fixture(scope="module")
def finished_run(setup, tmp_path_factory) -> Path:
    """A run of 2 steps whose last checkpoint is ``checkpoints/step-2``; tests tamper with copies."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    run(setup, output_dir)
    return output_dir


@pytest.fixture
def handed_over(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    copy.mkdir()
    for file in finished_run.rglob("*"):
        if file.is_file():
            (copy / file.relative_to(finished_run)).parent.mkdir(parents=True, exist_ok=True)
            (copy / file.relative_to(finished_run)).write_bytes(file.read_bytes())
    return copy


def make_victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


def point_at(output_dir: Path, name: str) -> Path:
    pointer = output_dir / "checkpoints" / "latest.json"
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(json.dumps({"name": name, "step": 1}))
    return pointer


def rewrite_checksums(snapshot: Path) -> None:
    """What someone forging a checkpoint does: make ``sha256.json`` match the forged files."""
    checksums = {f.name: file_sha256(f) for f in snapshot.iterdir() if f.name != CHECKSUMS}
    (snapshot / CHECKSUMS).write_text(json.dumps(checksums))


# -- deletion outside the run -------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("relative", [False, True])
def test_a_pointer_out_of_the_checkpoints_deletes_nothing(setup, tmp_path, relative, resume):
    victim = make_victim(tmp_path)
    output_dir = tmp_path / "run"
    name = "../../victim" if relative else str(victim)
    pointer = point_at(output_dir, name)
    with pytest.raises(CheckpointError) as error:
        run(setup, output_dir, resume=resume)
    assert str(error.value) == (
        f"{pointer} names snapshot {name!r}, which is not a step-N directory inside {output_dir / 'checkpoints'}"
    )
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_snapshot_linked_out_of_the_checkpoints_deletes_nothing(setup, tmp_path):
    victim = make_victim(tmp_path)
    output_dir = tmp_path / "run"
    pointer = point_at(output_dir, "step-2")
    (output_dir / "checkpoints" / "step-2").symlink_to(victim)  # the step the run writes next
    with pytest.raises(CheckpointError, match="not a step-N directory inside"):
        run(setup, output_dir)
    assert (victim / "precious.txt").read_text() == "keep me" and pointer.exists()


def test_a_run_deletes_only_the_snapshots_and_staging_it_writes(setup, tmp_path):
    output_dir = tmp_path / "run"
    checkpoints = output_dir / "checkpoints"
    # a hidden directory shaped like the old staging pattern, a linked staging name, a foreign directory
    for kept in (".my-notes", "notes"):
        (checkpoints / kept).mkdir(parents=True)
        (checkpoints / kept / "note.txt").write_text("mine")
    victim = make_victim(tmp_path)
    (checkpoints / ".step-9-abcdefgh").symlink_to(victim)
    run(setup, output_dir)
    assert (checkpoints / ".my-notes" / "note.txt").exists() and (checkpoints / "notes" / "note.txt").exists()
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-")) == ["step-2"]


def test_the_unlearn_command_refuses_a_pointer_out_of_the_run(monkeypatch, capsys, tmp_path, model_dir, recipe):
    victim = make_victim(tmp_path)
    output_dir = tmp_path / "run"
    point_at(output_dir, str(victim))
    code, output = run_cli(monkeypatch, capsys, *unlearn_args(model_dir, recipe, output_dir, "--steps", "1"))
    assert code == 2
    assert_one_line_error(output, "latest.json", "not a step-N directory inside")
    assert (victim / "precious.txt").read_text() == "keep me"


# -- code execution on resume -------------------------------------------------------------------------------


class Payload:
    """Unpickled, it creates the directory ``marker``: what a forged state.pt could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_forged_state_pt_is_refused_without_running_its_code(setup, handed_over, tmp_path):
    snapshot = handed_over / "checkpoints" / "step-2"
    marker = tmp_path / "payload-ran"
    torch.save({"optimizer": Payload(marker)}, snapshot / "state.pt")
    rewrite_checksums(snapshot)
    with pytest.raises(CheckpointError) as error:
        run(setup, handed_over, resume=True)
    assert str(error.value) == (
        f"checkpoint {snapshot / 'state.pt'} holds objects other than tensors and plain Python values; "
        "refusing to unpickle it (it could run code)"
    )
    assert not marker.exists()
    torch.load(snapshot / "state.pt", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.is_dir()


# -- integrity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["model.safetensors", "state.pt", "progress.json"])
def test_a_corrupted_checkpoint_file_is_named(setup, handed_over, file):
    corrupted = handed_over / "checkpoints" / "step-2" / file
    corrupted.write_bytes(os.urandom(corrupted.stat().st_size))
    with pytest.raises(CheckpointError) as error:
        run(setup, handed_over, resume=True)
    assert str(error.value) == f"checkpoint {corrupted} does not match its SHA-256 (corrupted)"


def test_checkpoint_files_must_all_be_recorded(setup, handed_over):
    snapshot = handed_over / "checkpoints" / "step-2"
    (snapshot / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"extra\.pt is not recorded in .*sha256\.json"):
        run(setup, handed_over, resume=True)
    (snapshot / "extra.pt").unlink()
    (snapshot / "progress.json").unlink()
    with pytest.raises(CheckpointError, match=r"progress\.json is missing or not a regular file"):
        run(setup, handed_over, resume=True)
    (snapshot / CHECKSUMS).unlink()
    with pytest.raises(CheckpointError, match=r"step-2 has no sha256\.json; its files cannot be verified"):
        run(setup, handed_over, resume=True)


def test_a_pointer_to_a_missing_snapshot_is_an_error_not_a_restart(setup, handed_over):
    pointer = point_at(handed_over, "step-7")
    with pytest.raises(CheckpointError) as error:
        run(setup, handed_over, resume=True)
    assert str(error.value) == f"{pointer} names {handed_over / 'checkpoints' / 'step-7'}, which does not exist"


@pytest.mark.parametrize("content", ["{not json", '["step-2"]', "\xff\xfe"])
def test_a_garbage_pointer_is_named(setup, handed_over, content):
    pointer = handed_over / "checkpoints" / "latest.json"
    pointer.write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(pointer))} is not "):
        run(setup, handed_over, resume=True)


def test_corrupted_best_weights_are_named(setup, tmp_path):
    config = CONFIG.model_copy(update={"eval_every": 1, "keep_best": "forget_qa_rouge"})
    output_dir = tmp_path / "run"
    result = run(setup, output_dir, config=config, evaluate=lambda model, step: {"forget_qa_rouge": float(step)})
    weights = output_dir / "best" / f"step-{result.best['step']}" / "model.safetensors"
    assert (weights.parent / CHECKSUMS).is_file()
    weights.write_bytes(os.urandom(weights.stat().st_size))
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(weights))} does not match its SHA-256"):
        restore_best(result.model, output_dir)


def test_the_unlearn_command_names_a_corrupted_checkpoint(monkeypatch, capsys, tmp_path, model_dir, recipe):
    output_dir = tmp_path / "run"
    args = unlearn_args(model_dir, recipe, output_dir, "--steps", "2")
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *args])
    main()
    capsys.readouterr()
    weights = output_dir / "checkpoints" / "step-2" / "model.safetensors"
    weights.write_bytes(os.urandom(weights.stat().st_size))
    code, output = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 2
    assert_one_line_error(output, f"checkpoint {weights} does not match its SHA-256 (corrupted)")


def test_the_unlearn_command_names_a_garbage_pointer(monkeypatch, capsys, tmp_path, model_dir, recipe):
    output_dir = tmp_path / "run"
    pointer = output_dir / "checkpoints" / "latest.json"
    pointer.parent.mkdir(parents=True)
    pointer.write_text("{garbage")
    code, output = run_cli(
        monkeypatch, capsys, *unlearn_args(model_dir, recipe, output_dir, "--steps", "2", "--resume")
    )
    assert code == 2
    assert_one_line_error(output, f"{pointer} is not valid JSON")


# -- the CLI's inputs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(setup, tmp_path_factory) -> Path:
    _, tokenizer = setup
    return save_model(build_tiny_model(TINY, tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump({"data": DATA, "unlearn": {"lr": 1e-3, "batch_size": 2}}))
    return path


def unlearn_args(model_dir: Path, recipe: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "unlearn",
        *("--model", str(model_dir), "--config", str(recipe), "--output-dir", str(output_dir)),
        *("--cache-dir", str(output_dir.parent / "cache"), *extra),
    ]
