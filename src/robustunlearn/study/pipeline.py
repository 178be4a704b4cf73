"""The end-to-end run: prepare -> unlearn -> evaluate -> quantize -> evaluate again.

Each stage is a library function; :func:`run_pipeline` strings them together and writes
``results.json`` atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from robustunlearn.config import RunSettings, unlearn_settings
from robustunlearn.core.distributed import data_parallel, full_state_dict, local_device
from robustunlearn.core.errors import UserError
from robustunlearn.core.io import atomic_write_json
from robustunlearn.core.lock import LOCK_NAME
from robustunlearn.core.models import save_model
from robustunlearn.metrics.suite import METRICS, evaluate_model
from robustunlearn.study.grid import run_study
from robustunlearn.study.loading import load_target, prepare_from_settings
from robustunlearn.study.rows import NO_ATTACK
from robustunlearn.study.timing import study_time, time_summary
from robustunlearn.train.checkpoint import best_weights, clear_run, restore_best
from robustunlearn.train.engine import unlearn


def unlearn_only(
    settings: RunSettings,
    output_dir: Path,
    cache_dir=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console=None,
) -> Path:
    """Unlearn the target and save it to ``output_dir/final``; with ``resume``, continue a killed run;
    with ``overwrite``, first remove what an earlier run left there (:func:`clear_run`).

    With ``unlearn.eval_every`` the model is evaluated (:func:`evaluate_model`) every so many
    steps and the metrics are logged; with ``unlearn.keep_best`` the final model holds the weights
    of the best evaluation instead of the last ones (its record is in the manifest's ``best``).

    Launched in several processes (torchrun, accelerate launch), each loads the model on its
    :func:`~robustunlearn.core.distributed.local_device` and the run is data parallel; rank 0 alone
    prepares the target (the others wait, then read its cache entry), evaluates and writes the files.
    In parallel mode fsdp each loads the model on the CPU, the engine moves its shards to the device,
    every rank evaluates (each forward pass gathers the weights), and ``final/`` is the model
    gathered on rank 0."""
    parallel = data_parallel()  # joins the launcher's process group, if any
    sharded = parallel.enabled and settings.parallel.mode == "fsdp"
    if parallel.is_main:
        if overwrite and not resume:
            clear_run(output_dir)
        if parallel.enabled and settings.model_path is None:
            prepare_from_settings(settings, cache_dir, console=console)
    parallel.barrier()  # the others read the run directory and the cache entry once rank 0 is done with them
    device = "cpu" if sharded else local_device()  # fully_shard moves each block's shards to the GPU
    model, tokenizer, benchmark, _ = load_target(settings, cache_dir, console, device=device)
    options = settings.unlearn
    if options.keep_best is not None and not benchmark.get(METRICS[options.keep_best].split):
        raise UserError(
            f"--keep-best {options.keep_best} needs the {METRICS[options.keep_best].split} split, "
            f"which benchmark {benchmark.name!r} lacks"
        )

    def evaluate(unlearned, step: int) -> dict[str, float]:
        return evaluate_model(unlearned, tokenizer, benchmark, settings.eval)

    result = unlearn(
        model,
        tokenizer,
        benchmark,
        unlearn_settings(settings),
        output_dir,
        resume=resume,
        evaluate=evaluate if options.eval_every else None,
        console=console,
    )
    final_dir = output_dir / "final"
    if sharded:
        _save_gathered(result, tokenizer, final_dir, output_dir, {"kind": "unlearned", **options.model_dump()})
    elif parallel.is_main:
        manifest = {"kind": "unlearned", **options.model_dump()}
        if result.best is not None:
            restore_best(result.model, output_dir)
            manifest["best"] = result.best
        final = result.model.merge_and_unload() if options.lora else result.model  # a plain model, adapters merged
        save_model(final, tokenizer, final_dir, manifest)
    parallel.barrier()  # every rank returns once the final model is there
    return final_dir


def _save_gathered(result, tokenizer, final_dir: Path, output_dir: Path, manifest: dict[str, Any]) -> None:
    """Save an FSDP run's model to ``final_dir`` as a plain Hugging Face directory: every rank
    takes part in gathering the whole weights on rank 0's CPU, which writes them (with the kept
    best weights in place of the last ones, if any)."""
    weights = full_state_dict(result.model, sharded=True)
    if not data_parallel().is_main:
        return
    if result.best is not None:
        weights.update(best_weights(output_dir))
        manifest["best"] = result.best
    save_model(result.model, tokenizer, final_dir, manifest, weights=weights)


def run_pipeline(
    settings: RunSettings, output_dir: Path, cache_dir=None, console=None, lr_sweep: bool = False
) -> dict[str, Any]:
    """The main job: a small grade study (``settings.study``) on one benchmark; writes the study's
    files (results.jsonl, report.md/html, plots) and ``results.json``, a summary per model with
    ``time``, where the study's time went (:func:`robustunlearn.study.timing.study_time`), which
    the console gets as one line (:func:`robustunlearn.study.timing.time_summary`). Under a launch
    of several processes, rank 0 writes ``results.json``; every rank returns the summary."""
    started = time.perf_counter()
    rows = run_study(settings, settings.study, output_dir, cache_dir, console, lr_sweep=lr_sweep)
    parallel = data_parallel()  # the process group run_study joined, if any
    references = rows[0].reference
    scores: dict[str, dict[str, float]] = {"target": references.target}
    if references.retrain is not None:
        scores["retrain"] = references.retrain
    for row in rows:
        name = f"{row.cell.objective}/{row.cell.optimizer}" + (
            f"/seed{row.cell.seed}" if len(settings.study.seeds) > 1 else ""
        )
        scores[name if row.attack == NO_ATTACK else f"{name}+{row.attack}"] = {**row.forget, **row.utility}
    results = {
        "settings": settings.model_dump(mode="json"),
        "benchmark": {"name": settings.benchmark},
        "cells": [{**row.cell.to_json(), **row.cost.to_json()} for row in rows if row.attack == NO_ATTACK],
        "scores": scores,
        "files": sorted(p.name for p in output_dir.iterdir() if p.is_file() and p.name != LOCK_NAME),
        "seconds": round(time.perf_counter() - started, 1),
        "time": study_time(output_dir),
    }
    if parallel.is_main:
        atomic_write_json(output_dir / "results.json", results)
    parallel.barrier()  # every rank returns once the study's files are there
    if console is not None and parallel.is_main and results["time"] is not None:
        console.print(time_summary(results["time"]), highlight=False, soft_wrap=True)
    return results


def results_table(results: dict[str, Any]) -> Table:
    """Models as rows (target, retrain, each unlearned cell and its attacked versions), metrics as columns."""
    table = Table(title=f"{results['benchmark']['name']}: forgetting and utility before and after attacks")
    table.add_column("model", no_wrap=True)
    for spec in METRICS.values():
        table.add_column(spec.title.replace(" ", "\n", 1), justify="right")  # two-line headers fit 80 columns
    for name, metrics in results["scores"].items():
        table.add_row(name, *(f"{metrics[key]:.3f}" if key in metrics else "-" for key in METRICS))
    table.caption = "forget: lower = more forgotten; retain: higher = more utility kept; ppl: lower is better"
    return table
