"""While `prepare` trains: one line per epoch with its time and an ETA (checked with a fake clock),
and training under bfloat16 autocast."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from robustunlearn.core.models import TinyModelConfig, build_tiny_model, load_model, train_tokenizer
from robustunlearn.data.base import Benchmark
from robustunlearn.data.collate import prompt_and_completion
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic
from robustunlearn.study.loading import prepare_summary_table
from robustunlearn.train.prepare import (
    EpochClock,
    PrepareConfig,
    Prepared,
    TrainConfig,
    epoch_line,
    format_duration,
    prepare,
    stopping_check_questions,
    train_lm,
)

SMALL_DATA = SyntheticConfig(num_people=5, num_utility_passages=2, num_utility_qa=2)
SMALL_MODEL = TinyModelConfig(
    vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
)


@pytest.fixture(scope="module")
def benchmark_and_tokenizer():
    benchmark = generate_synthetic(SMALL_DATA)
    texts = [prompt + completion for prompt, completion in map(prompt_and_completion, benchmark.get("forget_qa"))]
    return benchmark, train_tokenizer(texts, vocab_size=400)


def test_the_eta_is_the_mean_epoch_time_so_far_times_the_epochs_left():
    ticks = iter([100.0, 112.0, 130.0, 137.0])
    clock = EpochClock(max_epochs=5, clock=lambda: next(ticks))
    assert clock.lap(1) == (12.0, 48.0)  # 12 s per epoch, 4 epochs left
    assert clock.lap(2) == (18.0, 45.0)  # 30 s over 2 epochs: 15 s each, 3 left
    seconds, left = clock.lap(3)  # 37 s over 3 epochs, 2 left
    assert seconds == 7.0 and left == pytest.approx(37 / 3 * 2)


@pytest.mark.parametrize(
    "seconds, text",
    [(0.4, "0 s"), (59.4, "59 s"), (59.6, "1 min"), (89.0, "1 min"), (91.0, "2 min"), (3569.0, "59 min")]
    + [(3600.0, "1 h 00 min"), (3600 + 65 * 60, "2 h 05 min")],
)
def test_durations_read_in_seconds_then_minutes_then_hours(seconds, text):
    assert format_duration(seconds) == text


def test_an_epoch_line_has_the_accuracy_on_check_epochs_and_no_eta_after_the_last():
    checked = epoch_line("target", 7, 30, 12.34, 0.41234, 0.8124, 250.0)
    assert checked == "target: epoch 7/30 12.3 s, loss 0.412, QA accuracy 81.2%, ETA 4 min"
    unchecked = epoch_line("retrain", 8, 30, 9.96, 0.4, None, 20.0)
    assert unchecked == "retrain: epoch 8/30 10.0 s, loss 0.400, ETA 20 s"
    assert (
        epoch_line("target", 30, 30, 1.0, 0.1, 0.99, 0.0) == "target: epoch 30/30 1.0 s, loss 0.100, QA accuracy 99.0%"
    )
    sampled = epoch_line("target", 18, 30, 40.0, 0.2, 0.939, 60.0, checked=440)
    assert sampled == "target: epoch 18/30 40.0 s, loss 0.200, QA accuracy 93.9% of 440, ETA 1 min"


def test_prepare_prints_a_line_per_epoch_of_each_model_and_trains_under_bf16_autocast(tmp_path):
    config = PrepareConfig(
        data=SMALL_DATA,
        model=SMALL_MODEL,
        train=TrainConfig(max_epochs=3, batch_tokens=2048, check_every_epochs=2, bf16_autocast=True),
    )
    output = io.StringIO()
    prepared = prepare(config, cache_dir=tmp_path, console=Console(file=output, width=200))
    lines = [line for line in output.getvalue().splitlines() if ": epoch " in line]
    assert [line.split(" s,")[0].rsplit(" ", 1)[0] for line in lines] == [
        f"{name}: epoch {epoch}/3" for name in ("target", "retrain") for epoch in (1, 2, 3)
    ]
    assert ["QA accuracy" in line for line in lines] == [False, True, True] * 2  # checks: every 2nd and the last
    checked = [prepared.report[name]["checked_questions"] for name in ("target", "retrain")]
    assert [line.endswith(f"% of {n}") for n, line in zip(checked, lines[2::3])] == [True, True]
    assert ["ETA" in line for line in lines] == [True, True, False] * 2
    model, _ = load_model(prepared.target_dir)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # autocast keeps weights


def test_bf16_autocast_changes_the_training_arithmetic_not_the_weights_dtype(benchmark_and_tokenizer):
    benchmark, tokenizer = benchmark_and_tokenizer
    trained = {}
    for bf16 in (False, True):
        model = build_tiny_model(SMALL_MODEL, tokenizer, seed=0)
        records = benchmark.get("forget_qa")
        train_lm(model, tokenizer, records, records, TrainConfig(max_epochs=1, bf16_autocast=bf16))
        trained[bf16] = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
        assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert not torch.equal(trained[False], trained[True])


def test_the_summary_table_shows_a_dash_for_a_split_the_benchmark_lacks(tmp_path):
    stats = {
        "parameters": 1000,
        "epochs": 2,
        "seconds": 3.0,
        "qa_accuracy_teacher_forced": {"forget": 0.9, "retain": 1},
    }
    report = {"key": "k", "target": stats, "retrain": stats}
    prepared = Prepared(tmp_path, Benchmark("tofu", "1", {}), tmp_path, tmp_path, report)
    output = io.StringIO()
    Console(file=output, width=200).print(prepare_summary_table(prepared))
    rows = [line for line in output.getvalue().splitlines() if line.lstrip("│ ").startswith(("target", "retrain"))]
    assert len(rows) == 2 and all("90.0%" in row and "100.0%" in row and " - " in row for row in rows)


def test_target_and_retrain_trained_in_two_worker_processes_equal_those_trained_here(tmp_path, capfd):
    # Workers run one torch thread each; the same thread count here must give the same weights.
    config = PrepareConfig(data=SMALL_DATA, model=SMALL_MODEL, train=TrainConfig(max_epochs=2, batch_tokens=2048))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = prepare(config, cache_dir=tmp_path / "here", console=Console(file=io.StringIO()), jobs=1)
    finally:
        torch.set_num_threads(threads)
    in_workers = prepare(config, cache_dir=tmp_path / "workers", console=Console(file=io.StringIO()), jobs=2)
    assert (here.report["workers"], in_workers.report["workers"], in_workers.report["threads"]) == (1, 2, 1)
    for which in ("target_dir", "retrain_dir"):
        expected, _ = load_model(getattr(here, which))
        got, _ = load_model(getattr(in_workers, which))
        for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert in_workers.report["target"]["epochs"] == here.report["target"]["epochs"] == 2
    printed = capfd.readouterr().err  # each worker prints its epoch lines to the inherited stderr
    assert all(f"{name}: epoch {epoch}/2" in printed for name in ("target", "retrain") for epoch in (1, 2))


def test_the_stopping_check_scores_a_seeded_sample_of_each_larger_role(benchmark_and_tokenizer):
    benchmark = benchmark_and_tokenizer[0]
    forget, retain = benchmark.get("forget_qa"), benchmark.get("retain_qa")
    size = len(forget) - 1  # forget is sampled; retain, at most this size, is kept whole
    retain = retain[:size]
    benchmark = benchmark.with_splits(retain_qa=retain)
    sampled = stopping_check_questions(benchmark, ("forget", "retain"), TrainConfig(check_questions=size, seed=0))
    chosen_forget, chosen_retain = sampled[:size], sampled[size:]
    assert len(set(map(id, chosen_forget))) == size and all(qa in forget for qa in chosen_forget)
    assert chosen_retain == list(retain)
    assert sampled == stopping_check_questions(benchmark, ("forget", "retain"), TrainConfig(check_questions=size))
    reseeded = [
        stopping_check_questions(benchmark, ("forget",), TrainConfig(check_questions=size, seed=seed))
        for seed in range(1, 6)
    ]
    assert any(set(map(id, other)) != set(map(id, chosen_forget)) for other in reseeded)
    every = stopping_check_questions(benchmark, ("forget", "retain"), TrainConfig())
    assert every == list(forget) + list(retain)
