"""Cells in worker processes (core/parallel.py): how many workers and threads, and a study whose
cells ran in two spawned workers giving the numbers of the same study run one cell after the other."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

import robustunlearn.core.parallel as parallel
from robustunlearn.cli import main
from robustunlearn.core.parallel import plan_workers
from test_e2e import TINY_RECIPE


def two_seed_recipe() -> str:
    """test_e2e's tiny study, with two seeds (so that two cells share each seed's controls), a
    noise rung for the quantization one, 3-point LMC curves and a shorter prepare."""
    recipe = yaml.safe_load(TINY_RECIPE)
    recipe["train"]["max_epochs"] = 40
    recipe["eval"]["verbmem_max_new_tokens"] = 8
    recipe["study"].update(seeds=[0, 1], attacks=["noise-0.1", "relearn"], lmc_points=3)
    return yaml.safe_dump(recipe)


@pytest.mark.parametrize(
    ("jobs", "cells", "cores", "expected"),
    [
        (None, 10, 2, (2, 1)),  # auto: a worker per core, one thread each
        (None, 1, 2, (1, 2)),  # one cell: in process, with both cores' threads
        (None, 3, 8, (3, 2)),  # no more workers than cells; the cores shared out
        (None, 10, 1, (1, 1)),
        (4, 10, 2, (4, 1)),  # asked for more workers than cores: at least one thread each
        (1, 10, 8, (1, 8)),
    ],
)
def test_workers_and_threads(jobs, cells, cores, expected):
    assert plan_workers(jobs, cells, cores) == expected


def numbers(output) -> dict[tuple, dict]:
    """Each row's numbers (no timings) keyed by cell and attack."""
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    keyed = {}
    for row in rows:
        cost = {k: v for k, v in row["cost"].items() if k != "seconds"}
        kept = {k: row[k] for k in ("forget", "utility", "curve", "unlearning_curve", "control", "scores", "landscape")}
        keyed[(row["cell"]["optimizer"], row["cell"]["seed"], row["attack"])] = {**kept, "cost": cost}
    return keyed


@pytest.mark.slow
def test_cells_in_two_workers_give_the_numbers_of_one_process(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(two_seed_recipe())
    cache = tmp_path / "cache"

    def study(output, jobs: int) -> None:
        args = ["study", "--config", str(recipe), "--output-dir", str(output), "--cache-dir", str(cache)]
        monkeypatch.setattr(sys, "argv", ["robustunlearn", *args, "--jobs", str(jobs)])
        main()

    study(tmp_path / "one", jobs=1)  # torch threads: 1 (conftest)
    monkeypatch.setattr(parallel, "available_cores", lambda: 2)
    study(tmp_path / "two", jobs=2)  # two workers of 2 // 2 = 1 thread
    printed = capsys.readouterr().err
    # each cell's unlearning, then each of its two attacks, as a task of its own
    assert "running 4 cells (12 tasks) in 2 worker processes, 1 torch thread(s) each" in " ".join(printed.split())
    assert "cell 4/4 done" in printed

    sequential, parallel_rows = numbers(tmp_path / "one"), numbers(tmp_path / "two")
    assert len(sequential) == 12 and parallel_rows == sequential  # the LMC curves too, drawn in the workers
    rows = [json.loads(line) for line in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    assert [row["attack"] for row in rows[:3]] == ["none", "noise-0.1", "relearn"]  # a cell's rows in ladder order
    assert [len(sequential[("zo-sgd", seed, "none")]["landscape"]["lmc"]) for seed in (0, 1)] == [3, 3]
    # The controls were computed once per seed and attack, by whichever worker came first.
    assert sorted(p.name for p in (tmp_path / "two" / "controls" / "seed1").glob("*.json")) == [
        "noise-0.1.json",
        "none.json",
        "relearn.json",
    ]
    time = json.loads((tmp_path / "two" / "results.json").read_text())["time"]
    assert time["workers"] == 2 and time["threads"] == 1
    assert all(cell["seconds"] > 0 and "unlearn" in cell["phases"] for cell in time["cells"].values())
    assert all(time["cells"][f"npo-zo-sgd-seed{seed}-lr0.001"]["phases"]["landscape"] > 0 for seed in (0, 1))
    assert "worker processes" in (tmp_path / "two" / "report.md").read_text()
