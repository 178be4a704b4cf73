"""Where a study's time went: the phase clock's nesting, the ledger across a resumed study,
``results.json``'s time table, the report's section, the one-line summary and evaluation's
progress bar."""

from __future__ import annotations

import io
import json
import os
import re
import shutil

import pytest
from rich.console import Console

import robustunlearn.study.grid as grid_module
from robustunlearn.config import load_settings
from robustunlearn.metrics.suite import evaluate_model
from robustunlearn.study.cells import grid_cells
from robustunlearn.study.pipeline import run_pipeline
from robustunlearn.study.timing import (
    TIMING_FILE,
    PhaseClock,
    StudyTimes,
    load_phase,
    percentages,
    study_time,
    time_summary,
)
from robustunlearn.train.engine import UnlearnResult
from robustunlearn.train.prepare import CHECKSUMS, Prepared


class FakeTimer:
    """A timer that reads ``now``, which the test advances by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timer():
    return FakeTimer()


def test_a_nested_phase_counts_only_in_itself_and_the_records_add_up_to_the_wall_time(timer):
    clock = PhaseClock(timer)
    with clock.phase("attack", cell="a", detail="rtn-4"):
        timer.now += 2
        with clock.phase("evaluate", cell="a"):
            timer.now += 3
            with clock.phase("scoring", cell="a"):
                timer.now += 1
        timer.now += 4
    with pytest.raises(RuntimeError), clock.phase("load") as loading:
        timer.now += 5
        loading.phase = "prepare"  # renamed inside the block; recorded although it raised
        raise RuntimeError
    seconds = {record.phase: record.seconds for record in clock.records}
    assert seconds == {"scoring": 1, "evaluate": 3, "attack": 6, "prepare": 5}
    assert sum(seconds.values()) == clock.elapsed() == 15
    assert [(r.cell, r.detail) for r in clock.records][2] == ("a", "rtn-4")
    assert len(clock.take()) == 4 and clock.records == []


def test_the_ledger_keeps_earlier_cells_times_across_a_resumed_run(tmp_path, timer):
    first = StudyTimes(tmp_path, PhaseClock(timer))
    with first.clock.phase("prepare"):
        timer.now += 30
    first.save()
    for name, unlearning in (("a", 10), ("b", 20)):
        with first.running(name):
            with first.clock.phase("unlearn", cell=name):
                timer.now += unlearning
            with first.clock.phase("attack", cell=name, detail="rtn-4"):
                timer.now += 4
            with first.clock.phase("control", cell=name, detail="rtn-4"):
                timer.now += 1
    timer.now += 5  # untimed: "other"
    first.save()

    second = StudyTimes(tmp_path, PhaseClock(timer))
    with second.clock.phase("load"):
        timer.now += 2
    second.resumed("a")
    assert second.cell_line("b", 1) == "cell 1/1: b"
    with second.running("b"):  # b's rows were removed: it is redone, its first times dropped
        with second.clock.phase("unlearn", cell="b"):
            timer.now += 7
    assert second.cell_line("c", 3) == "cell 2/3: c (about 14.0s left)"  # 7 s per cell, two to go
    with second.clock.phase("landscape", cell="a", detail="lmc"):  # a resumed cell's curve, drawn now
        timer.now += 3
    second.save()

    table = study_time(tmp_path)
    assert table["runs"] == 2
    assert table["cells"]["a"] == {
        "seconds": 18.0,
        "phases": {"unlearn": 10.0, "attack": 4.0, "control": 1.0, "landscape": 3.0},
        "attacks": {"rtn-4": 4.0},
        "controls": {"rtn-4": 1.0},
        "resumed": True,
    }
    assert table["cells"]["b"]["phases"] == {"unlearn": 7.0} and not table["cells"]["b"]["resumed"]
    phases = {"prepare": 30.0, "load": 2.0, "unlearn": 17.0, "attack": 4.0, "control": 1.0, "landscape": 3.0}
    assert table["phases"] == {**phases, "other": 5.0}  # run 1's untimed seconds
    assert table["seconds"] == 62.0 == 75 + 12 - 25  # the two runs' wall seconds less b's discarded first run
    assert table["attacks"] == {"rtn-4": 4.0}


def test_a_cell_without_times_shows_none_and_a_study_without_a_ledger_has_no_table(tmp_path, timer):
    assert study_time(tmp_path) is None
    times = StudyTimes(tmp_path, PhaseClock(timer))
    times.resumed("old")  # finished before studies kept times
    times.save()
    assert study_time(tmp_path)["cells"]["old"]["seconds"] is None


def test_loading_is_prepare_only_when_the_cache_entry_was_completed_since(tmp_path):
    (tmp_path / CHECKSUMS).write_text("{}")
    os.utime(tmp_path / CHECKSUMS, (1000.0, 1000.0))
    prepared = Prepared(tmp_path, None, tmp_path / "target", tmp_path / "retrain", {})
    assert load_phase(prepared, since=999.0) == "prepare"
    assert load_phase(prepared, since=1001.0) == "load"
    assert load_phase(None, since=0.0) == "load"


def test_the_summary_line_names_the_groups_by_share_and_the_shares_add_up_to_100():
    phases = {"unlearn": 41.0, "attack": 24.0, "control": 9.0, "evaluate": 18.0, "landscape": 6.0, "references": 2.0}
    table = {"seconds": 100.0, "phases": {**phases, "report": 0.2}}  # under half a percent: left out
    assert time_summary(table) == (
        "time: 1m40s — unlearning 41%, attacks 33% (controls 9%), evaluation 18%, landscape 6%, references 2%"
    )
    thirds = percentages({"a": 1.0, "b": 1.0, "c": 1.0})
    assert sorted(thirds.values()) == [33, 33, 34]
    assert time_summary({"seconds": 7500.0, "phases": {"unlearn": 7500.0}}) == "time: 2h05m — unlearning 100%"


def test_evaluation_shows_a_progress_bar_only_with_a_console_and_scores_the_same(tiny_random):
    benchmark, model, tokenizer = tiny_random
    settings = load_settings(None, {"eval": {"max_examples": 2, "batch_size": 4, "verbmem_max_new_tokens": 4}})
    metrics = ("forget_qa_rouge", "utility_perplexity")
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=120)
    shown = evaluate_model(model, tokenizer, benchmark, settings.eval, metrics=metrics, console=console)
    assert "evaluate utility_perplexity" in output.getvalue() and "2/2" in output.getvalue()
    assert evaluate_model(model, tokenizer, benchmark, settings.eval, metrics=metrics) == shown
    one_metric, log_file = Console(file=io.StringIO(), force_terminal=True), Console(file=io.StringIO())
    for console, asked in ((one_metric, metrics[:1]), (log_file, metrics)):
        evaluate_model(model, tokenizer, benchmark, settings.eval, metrics=asked, console=console)
        assert console.file.getvalue() == ""  # no bar for one metric, nor off a terminal


def test_a_resumed_study_reports_the_time_of_cells_finished_earlier(tiny_random, tmp_path, monkeypatch):
    benchmark, model, tokenizer = tiny_random
    monkeypatch.setattr(grid_module, "load_target", lambda *args, **kwargs: (model, tokenizer, benchmark, None))
    monkeypatch.setattr(
        grid_module, "unlearn", lambda model, *a, **k: UnlearnResult(model=model, steps_done=0, history=[], seconds=0)
    )
    monkeypatch.setattr(grid_module, "mia_privacy", lambda *args, **kwargs: {"aucs": None, "reason": "not here"})
    scores = {"forget_qa_rouge": 0.5, "retain_qa_rouge": 0.75}  # fixed: the study's phases are timed, not scored
    monkeypatch.setattr(grid_module, "evaluate_model", lambda *args, metrics=None, **kwargs: dict(scores))
    flat = [{"scale": 0.01, "mean_loss_increase": 0.0, "std": 0.0}]
    monkeypatch.setattr(grid_module, "sharpness", lambda *args, **kwargs: flat)
    study = {"optimizers": ["adam", "signadam"], "seeds": [0], "attacks": ["noise-0.01"], "lmc_points": 2}
    overrides = {"study": study, "eval": {"max_examples": 2, "batch_size": 4, "verbmem_max_new_tokens": 4}}
    settings = load_settings(None, overrides)
    run_pipeline(settings, tmp_path)
    cells = sorted(cell.name for cell in grid_cells(settings, settings.study, {}))  # at the tuned lrs
    assert len(cells) == 2 and sorted(path.name for path in (tmp_path / "cells").iterdir()) == cells
    earlier = json.loads((tmp_path / "cells" / cells[0] / TIMING_FILE).read_text())
    shutil.rmtree(tmp_path / "cells" / cells[1])  # as if killed in the second cell

    output = io.StringIO()
    results = run_pipeline(settings, tmp_path, console=Console(file=output, width=200))
    table = json.loads((tmp_path / "results.json").read_text())["time"]
    assert table == results["time"] == study_time(tmp_path) and table["runs"] == 2
    first, second = (table["cells"][name] for name in cells)
    assert first["resumed"] and not second["resumed"]
    assert first["seconds"] == pytest.approx(sum(record["seconds"] for record in earlier["phases"]), abs=0.05)
    for cell in (first, second):
        assert set(cell["phases"]) == {"unlearn", "evaluate", "attack", "control", "scoring", "landscape"}
        assert set(cell["attacks"]) == {"noise-0.01"} and set(cell["controls"]) == {"none", "noise-0.01"}
    redone = json.loads((tmp_path / "cells" / cells[1] / TIMING_FILE).read_text())["phases"]
    # the LMC curve from adam's model to signadam's is signadam's, drawn after its cell
    assert [r["detail"] for r in redone if r["phase"] == "landscape"] == ["sharpness", "lmc"]
    assert {"load", "references", "unlearn", "report"} <= set(table["phases"])
    line = next(line for line in output.getvalue().splitlines() if line.startswith("time: "))
    assert sum(map(int, re.findall(r"(\d+)%", re.sub(r"\(controls \d+%\)", "", line)))) == 100
    report = (tmp_path / "report.md").read_text()
    assert "## Where the time went" in report and f"| {cells[0]} (earlier run) |" in report
