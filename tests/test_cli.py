"""User errors: one line, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from robustunlearn.cli import main
from robustunlearn.config import TOFU_TINY_RECIPE, packaged_recipe


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err + captured.out


def assert_one_line_error(output: str, *fragments: str) -> None:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error:"), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, output)


def test_unknown_optimizer_lists_accepted(monkeypatch, capsys, tmp_path):
    code, output = run_cli(
        monkeypatch, capsys, "run", "--optimizer", "no-such-optimizer", "--output-dir", str(tmp_path / "o")
    )
    assert code == 2
    assert_one_line_error(output, "no-such-optimizer", "accepted:", "adamw", "zo-sgd", "hybrid", "sophia-g")
    assert not (tmp_path / "o").exists()


def test_unknown_objective_lists_accepted(monkeypatch, capsys, tmp_path):
    code, output = run_cli(monkeypatch, capsys, "run", "--objective", "forgetful", "--output-dir", str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(output, "forgetful", "npo", "graddiff", "rmu")


def test_missing_config_file(monkeypatch, capsys, tmp_path):
    code, output = run_cli(monkeypatch, capsys, "run", "--config", str(tmp_path / "absent.yaml"))
    assert code == 2
    assert_one_line_error(output, "absent.yaml", "does not exist")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("unlearn: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
        ("unlearn:\n  stepz: 3\n", "unlearn.stepz: unknown setting"),
        ("unlearn:\n  steps: -1\n", "unlearn.steps"),
        ("unlearn:\n  optimizer: adamz\n", "accepted:"),
        ("study: {attacks: [int5-magic]}\n", "study.attacks"),
    ],
)
def test_malformed_config(monkeypatch, capsys, tmp_path, content, fragment):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    code, output = run_cli(monkeypatch, capsys, "run", "--config", str(recipe), "--output-dir", str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(output, fragment)
    assert not (tmp_path / "o").exists()


def test_unwritable_output_dir(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, output = run_cli(monkeypatch, capsys, "run", "--output-dir", str(blocker / "out"), "--steps", "1")
    assert code == 2
    assert_one_line_error(output, "not writable")


def test_missing_model_path(monkeypatch, capsys, tmp_path):
    code, output = run_cli(
        monkeypatch, capsys, "run", "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "o")
    )
    assert code == 2
    assert_one_line_error(output, "no-model", "does not exist")
    assert not (tmp_path / "o").exists()


def test_bad_flag_value_is_one_line(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "run", "--steps", "many")
    assert code == 2
    assert_one_line_error(output, "--steps")


def test_console_script_exit_code():
    # The installed entry point behaves like main(): exit 2 and one line on stderr.
    result = subprocess.run(
        [sys.executable, "-m", "robustunlearn.cli", "run", "--optimizer", "no-such-optimizer"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "accepted:")


def test_the_claims_preset_runs_three_seeds_and_the_full_ladders(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["robustunlearn", "study", "--claims", "--output-dir", str(tmp_path), "--dry-run"])
    main()  # a dry run returns
    study = json.loads(capsys.readouterr().out)["study"]
    assert study["seeds"] == [0, 1, 2]
    assert {"rtn-int8", "rtn-int2", "nf4", "gptq-int4", "noise-0.3", "relearn-lr2e-3"} <= set(study["attacks"])


def test_claims_and_a_recipe_together_and_a_zero_budget_are_one_line_errors(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 0\n")
    output_dir = str(tmp_path / "o")
    code, output = run_cli(monkeypatch, capsys, "run", "--claims", "--config", str(recipe), "--output-dir", output_dir)
    assert code == 2
    assert_one_line_error(output, "--claims or --config")
    code, output = run_cli(monkeypatch, capsys, "run", "--budget", "0", "--output-dir", output_dir)
    assert code == 2
    assert_one_line_error(output, "compute_budget")


def test_a_dry_run_names_the_tofu_recipe_for_the_tiny_model_and_none_for_a_given_model(monkeypatch, capsys, tmp_path):
    tofu = ["study", "--benchmark", "tofu", "--data-dir", str(tmp_path), "--forget-split", "forget01"]
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *tofu, "--output-dir", str(tmp_path / "o"), "--dry-run"])
    main()
    captured = capsys.readouterr()
    assert f"base recipe: {packaged_recipe(TOFU_TINY_RECIPE)}" in captured.err
    assert json.loads(captured.out)["train"]["bf16_autocast"] == "auto"  # a value only the TOFU recipe sets
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(
        sys, "argv", ["robustunlearn", *tofu, "--model", str(model), "--output-dir", str(tmp_path / "o"), "--dry-run"]
    )
    main()
    captured = capsys.readouterr()
    assert "base recipe" not in captured.err and json.loads(captured.out)["train"]["bf16_autocast"] is False
