"""Cells in worker processes (core/parallel.py): how many workers and threads, and a study whose
cells ran in two spawned workers giving the numbers of the same study run one cell after the other."""

from __future__ import annotations

import json
import sys

import pytest

import robustunlearn.core.parallel as parallel
from robustunlearn.cli import main
from robustunlearn.core.parallel import plan_workers

TINY_RECIPE = """
seed: 0
data: {num_people: 12, forget_fraction: 0.2, num_utility_passages: 4, num_utility_qa: 2}
model: {vocab_size: 400, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4}
train: {lr: 1.0e-2, max_epochs: 40, batch_tokens: 256, check_every_epochs: 10}
unlearn: {lr: 1.0e-3, batch_size: 4}
eval: {max_examples: 12, verbmem_max_new_tokens: 8}
study:
  optimizers: [adamw, zo-sgd]
  seeds: [0, 1]
  attacks: [noise-0.1, relearn]
  max_steps: 6
  check_every: 3
  relearn_steps: 4
  relearn_eval_every: 2
  relearn_subjects: 1
  landscape: false
"""


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
        kept = {k: row[k] for k in ("forget", "utility", "curve", "unlearning_curve", "control", "scores")}
        keyed[(row["cell"]["optimizer"], row["cell"]["seed"], row["attack"])] = {**kept, "cost": cost}
    return keyed


@pytest.mark.slow
def test_cells_in_two_workers_give_the_numbers_of_one_process(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    cache = tmp_path / "cache"

    def study(output, jobs: int) -> None:
        args = ["study", "--config", str(recipe), "--output-dir", str(output), "--cache-dir", str(cache)]
        monkeypatch.setattr(sys, "argv", ["robustunlearn", *args, "--jobs", str(jobs)])
        main()

    study(tmp_path / "one", jobs=1)  # torch threads: 1 (conftest)
    monkeypatch.setattr(parallel, "available_cores", lambda: 2)
    study(tmp_path / "two", jobs=2)  # two workers of 2 // 2 = 1 thread
    printed = capsys.readouterr().err
    assert "running 4 cells in 2 worker processes, 1 torch thread(s) each" in printed
    assert "cell 4/4 done" in printed

    sequential, parallel_rows = numbers(tmp_path / "one"), numbers(tmp_path / "two")
    assert len(sequential) == 12 and parallel_rows == sequential
    # The controls were computed once per seed and attack, by whichever worker came first.
    assert sorted(p.name for p in (tmp_path / "two" / "controls" / "seed1").glob("*.json")) == [
        "noise-0.1.json",
        "none.json",
        "relearn.json",
    ]
    time = json.loads((tmp_path / "two" / "results.json").read_text())["time"]
    assert time["workers"] == 2 and time["threads"] == 1
    assert all(cell["seconds"] > 0 and "unlearn" in cell["phases"] for cell in time["cells"].values())
    assert "worker processes" in (tmp_path / "two" / "report.md").read_text()
