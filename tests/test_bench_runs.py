"""The benchmarks end to end at tiny sizes (structure, not speed), what each timed call does, the
targets' verdicts on built rows, and the bench command's options."""

from __future__ import annotations

import json
import time

import pytest
import torch
from rich.console import Console

from helpers import cli_result
from robustunlearn.bench.common import cost_clock, pairs_cell
from robustunlearn.bench.objectives import (
    bench_objectives,
    plain_nll,
    random_unlearn_batch,
    reference_cache,
    step_calls,
)
from robustunlearn.bench.optimizers import bench_optimizers
from robustunlearn.bench.targets import check_targets, target_lines
from robustunlearn.bench.timing import BASELINE, TimingSettings
from robustunlearn.objectives import build_objective
from robustunlearn.optim import build_optimizer

MICRO = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
FAST = TimingSettings(min_pairs=3, budget_s=0.0)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, out, err = cli_result(monkeypatch, capsys, *args)
    return code, err + out


# ---- what is timed -------------------------------------------------------------------------------


def test_random_batches_hold_the_parts_each_objective_reads():
    ga = random_unlearn_batch(build_objective("ga").batch_parts, (2, 8), 64, torch.device("cpu"))
    assert ga.retain is None and ga.forget_refusal is None and ga.forget_answered is None
    dpo = random_unlearn_batch(build_objective("idk-dpo").batch_parts, (2, 8), 64, torch.device("cpu"))
    assert dpo.retain.input_ids.shape == dpo.forget_refusal.input_ids.shape == (2, 8)
    assert dpo.forget_answered is None  # idk-dpo's dispreferred side is then the forget batch
    assert torch.equal(dpo.forget.labels, dpo.forget.input_ids)  # every token scored
    again = random_unlearn_batch(build_objective("idk-dpo").batch_parts, (2, 8), 64, torch.device("cpu"))
    assert torch.equal(again.retain.input_ids, dpo.retain.input_ids)


def test_plain_nll_is_the_sum_of_each_token_batchs_mean_next_token_loss(tiny_llama):
    model = tiny_llama()
    batch = random_unlearn_batch({"forget", "retain"}, (2, 8), 64, torch.device("cpu"))
    expected = sum(model(input_ids=b.input_ids, labels=b.input_ids).loss for b in (batch.forget, batch.retain))
    assert plain_nll(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_each_timed_call_does_what_its_name_says(tiny_llama):
    model = tiny_llama()
    objective = build_objective("npo")
    reference_model = tiny_llama().eval().requires_grad_(False)
    optimizer = build_optimizer("adamw", model, lr=1e-2)
    batch = random_unlearn_batch(objective.batch_parts, (2, 8), 64, torch.device("cpu"))
    cache = reference_cache(reference_model, objective, batch)
    calls = step_calls(model, objective, reference_model, optimizer, batch, cache)
    assert list(calls) == [BASELINE, "plain_step", "step", "reference", "cached_step"]

    def snapshot():
        return [p.detach().clone() for p in model.parameters()]

    before = snapshot()
    calls[BASELINE]()  # forward and backward only
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    assert all(p.grad is not None for p in model.parameters())
    reference = calls["reference"]()
    assert set(reference) == {"forget_logprobs"} and not reference["forget_logprobs"].requires_grad
    assert torch.equal(cache.lookup(batch.forget), reference["forget_logprobs"])  # what cached_step reads
    for name in ("plain_step", "step", "cached_step"):
        before = snapshot()
        calls[name]()
        assert any(not torch.equal(a, b) for a, b in zip(before, snapshot())), name


def test_an_objective_without_reference_has_no_reference_call(tiny_llama):
    model = tiny_llama()
    objective = build_objective("simnpo")
    batch = random_unlearn_batch(objective.batch_parts, (2, 8), 64, torch.device("cpu"))
    calls = step_calls(model, objective, None, build_optimizer("zo-sgd", model), batch)
    assert list(calls) == [BASELINE, "plain_step", "step"]


def test_one_thread_is_timed_in_cpu_time_several_in_wall_time():
    cpu = torch.device("cpu")
    assert cost_clock(cpu, 1) == (time.process_time, "process CPU time")
    assert cost_clock(cpu, 2) == (time.perf_counter, "wall time")
    assert cost_clock(torch.device("cuda"), 1) == (time.perf_counter, "wall time")
    assert [pairs_cell({"pairs": 12, "stop": stop}) for stop in ("precise", "budget")] == ["12", "12*"]


# ---- end to end ----------------------------------------------------------------------------------


def test_bench_objectives_rows_json_targets_and_threads(tmp_path):
    path = tmp_path / "objectives.json"
    output = tmp_path / "table.txt"
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)  # the bench's threads differ from the caller's, which come back after
    with open(output, "w") as table:
        rows = bench_objectives(
            sizes=[MICRO],
            shapes=[(2, 16)],
            objectives=["ga", "npo"],
            optimizers=["zo-sgd"],  # adamw: the command-line run below
            json_path=path,
            console=Console(file=table, width=200),
            timing=FAST,
            threads=1,
        )
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads_before)
    assert [(r["objective"], r["optimizer"]) for r in rows] == [("ga", "zo-sgd"), ("npo", "zo-sgd")]
    for row in rows:
        assert (row["size"], row["batch"], row["seq_len"], row["threads"]) == ("custom-0", 2, 16, 1)
        assert row["pairs"] == 3 and row["stop"] in ("precise", "budget")  # budget 0: min_pairs rounds
        for name in ("step_over_forward_backward", "plain_step_over_forward_backward", "step_over_plain_step"):
            assert 0 < row[f"{name}_q1"] <= row[name] <= row[f"{name}_q3"]
        assert (row["reference_share"] > 0) == (row["objective"] == "npo")
        assert 0 <= row["reference_share"] < 1
    ga, npo = rows
    assert "cached_step_s" not in ga and "live_peak_bytes" not in ga
    assert 0 < npo["cached_step_over_plain_step_q1"] <= npo["cached_step_over_plain_step"]
    assert npo["cached_step_over_plain_step"] <= npo["cached_step_over_plain_step_q3"]
    # each peak from its own process; the live one holds a copy of the model, the cached one none
    assert 0 < npo["cached_peak_bytes"] and 0 < npo["live_peak_bytes"]
    assert npo["cached_peak_over_live_peak"] == npo["cached_peak_bytes"] / npo["live_peak_bytes"]
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert (saved["environment"]["threads"], saved["environment"]["clock"]) == (1, "process CPU time")
    assert saved["timing"]["min_pairs"] == 3
    npo_worst = npo["cached_step_over_plain_step"]
    assert saved["targets"] == [
        {
            "target": "npo step with a cached reference / plain step of the same optimizer",
            "bound": 1.05,
            "measured": npo_worst,
            "where": saved["targets"][0]["where"],
            "passed": npo_worst <= 1.05,
        }
    ]
    text = output.read_text()
    assert "npo step with a cached reference / plain step" in text and "1 torch thread(s)" in text
    assert "mem cached/live" in text


def test_bench_objectives_rejects_a_hybrid_and_unknown_names():
    with pytest.raises(ValueError, match="hybrid"):
        bench_objectives(sizes=[MICRO], optimizers=["hybrid"], timing=FAST)
    with pytest.raises(ValueError, match="forgetful"):
        bench_objectives(sizes=[MICRO], objectives=["forgetful"], timing=FAST)


@pytest.mark.slow
def test_bench_optimizers_reports_the_promised_fields(tmp_path):
    path = tmp_path / "bench.json"
    with open(tmp_path / "table.txt", "w") as table:
        rows = bench_optimizers(
            sizes=[MICRO],
            shapes=((2, 32), (2, 16)),
            optimizers=["zo-sgd", "adam", "hybrid"],
            json_path=path,
            console=Console(file=table, width=200),
            timing=FAST,
            threads=1,
        )
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert (saved["environment"]["threads"], saved["environment"]["clock"]) == (1, "process CPU time")
    assert [(r["optimizer"], r["seq_len"]) for r in rows] == [
        (name, seq) for name in ("zo-sgd", "adam", "hybrid") for seq in (16, 32)
    ]
    for row in rows:
        assert row["threads"] == 1 and row["pairs"] == 3
        assert 0 < row["step_over_forward_q1"] <= row["step_over_forward"] <= row["step_over_forward_q3"]
        assert row["peak_mem_over_inference"] > 0
    state = {r["optimizer"]: r["state_over_params"] for r in rows}
    assert state == {"zo-sgd": 0.0, "adam": pytest.approx(2.0, abs=0.01), "hybrid": pytest.approx(4.0, abs=0.01)}
    assert {r["grade"] for r in rows} == {"zeroth-order", "first-order", "hybrid"}
    assert [t["target"] for t in saved["targets"]] == [
        "zo-sgd step / forward at 8x512",
        "stateless ZO peak memory / inference",
        "adamw step / forward",
    ]
    assert saved["targets"][0]["passed"] is None and saved["targets"][2]["passed"] is None  # not measured
    text = (tmp_path / "table.txt").read_text()
    assert "zo-sgd" in text and "SKIP adamw step / forward" in text


# ---- targets -------------------------------------------------------------------------------------


def _optimizer_row(optimizer, grade, size, shape, step_over_forward, mem, state):
    return {
        "optimizer": optimizer,
        "grade": grade,
        "size": size,
        "batch": shape[0],
        "seq_len": shape[1],
        "step_over_forward": step_over_forward,
        "peak_mem_over_inference": mem,
        "state_over_params": state,
    }


def test_targets_judge_the_worst_row_they_cover():
    rows = [
        _optimizer_row("zo-sgd", "zeroth-order", "1M", (8, 512), 1.9, 1.02, 0.0),
        _optimizer_row("zo-sgd", "zeroth-order", "5M", (8, 512), 2.3, 1.01, 0.0),
        _optimizer_row("zo-sgd", "zeroth-order", "5M", (8, 128), 3.0, 1.01, 0.0),  # not 8x512
        _optimizer_row("zo-adam", "zeroth-order", "5M", (8, 512), 2.5, 1.30, 2.0),  # keeps state
        _optimizer_row("sgd", "first-order", "5M", (8, 512), 3.9, 2.0, 0.0),  # not ZO
        _optimizer_row("adamw", "first-order", "1M", (8, 128), 3.0, 2.1, 2.0),
        _optimizer_row("adamw", "first-order", "5M", (8, 512), 3.2, 2.9, 2.0),
    ]
    assert target_lines(check_targets("optimizers", rows)) == [
        "FAIL zo-sgd step / forward at 8x512 <= 2.10: 2.30 (worst: zo-sgd 5M 8x512)",
        "PASS stateless ZO peak memory / inference <= 1.05: 1.02 (worst: zo-sgd 1M 8x512)",
        "PASS adamw step / forward <= 3.30: 3.20 (worst: adamw 5M 8x512)",
    ]
    objective_rows = [
        {
            "objective": "npo",
            "optimizer": "adamw",
            "size": "1M",
            "batch": 8,
            "seq_len": 128,
            "cached_step_over_plain_step": 1.3,
        },
        {
            "objective": "ga",
            "optimizer": "adamw",
            "size": "1M",
            "batch": 8,
            "seq_len": 128,
            "cached_step_over_plain_step": 2.0,
        },
    ]
    [npo] = check_targets("objectives", objective_rows)
    assert (npo["measured"], npo["where"], npo["passed"]) == (1.3, "npo adamw 1M 8x128", False)
    assert target_lines(check_targets("objectives", [])) == [
        "SKIP npo step with a cached reference / plain step of the same optimizer <= 1.05: not measured in this run"
    ]


# ---- the command ---------------------------------------------------------------------------------


def test_bench_options_reach_the_benchmark(monkeypatch, capsys, tmp_path):
    calls = {}
    monkeypatch.setattr("robustunlearn.cli.bench_optimizers", lambda **kwargs: calls.setdefault("optimizers", kwargs))
    monkeypatch.setattr("robustunlearn.cli.bench_objectives", lambda **kwargs: calls.setdefault("objectives", kwargs))
    out = tmp_path / "new" / "run.json"
    code, _ = run_cli(
        monkeypatch,
        capsys,
        "bench",
        "optimizers",
        "--quick",
        "--threads",
        "2",
        "--time-budget",
        "5",
        "--output",
        str(out),
    )
    assert code == 0 and out.parent.is_dir()
    options = calls["optimizers"]
    assert (options["quick"], options["threads"], options["json_path"]) == (True, 2, out)
    assert options["timing"] == TimingSettings(budget_s=5.0)
    assert options["sizes"] is None and options["optimizers"] is None  # the quick preset fills them
    code, _ = run_cli(monkeypatch, capsys, "bench", "objectives", "--objectives", "npo,ga", "--sizes", "1M")
    assert code == 0
    options = calls["objectives"]
    assert (options["objectives"], options["optimizers"], options["sizes"]) == (
        ("npo", "ga"),
        ("adamw", "zo-sgd"),
        ("1M",),
    )
    assert options["timing"] is None and options["threads"] is None and not options["quick"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["optimizers", "--optimizers", "adamz"], ["adamz", "accepted:", "zo-sgd"]),
        (["optimizers", "--sizes", "7B"], ["7B", "accepted:", "1M"]),
        (["objectives", "--objectives", "forgetful"], ["forgetful", "npo"]),
        (["objectives", "--optimizers", "hybrid"], ["hybrid", "phase"]),
        (["objectives", "--threads", "0"], ["--threads"]),
    ],
)
def test_bad_bench_options_are_one_line_errors(monkeypatch, capsys, args, fragments):
    code, output = run_cli(monkeypatch, capsys, "bench", *args)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), output
    assert all(fragment in lines[0] for fragment in fragments), output


def test_bench_objectives_quick_runs_from_the_command_line(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run.json"
    args = ["--quick", "--sizes", "0.1M", "--objectives", "npo", "--optimizers", "adamw", "--threads", "1"]
    code, output = run_cli(
        monkeypatch, capsys, "bench", "objectives", *args, "--time-budget", "0", "--output", str(out)
    )
    assert code == 0, output
    [row] = json.loads(out.read_text())["rows"]
    assert (row["objective"], row["size"], row["batch"], row["seq_len"], row["pairs"]) == ("npo", "0.1M", 8, 128, 10)
    assert "npo step with a cached reference / plain step" in output
