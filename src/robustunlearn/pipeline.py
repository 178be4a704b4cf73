"""The end-to-end run: prepare -> unlearn -> evaluate -> quantize -> evaluate again.

Each stage is a library function; :func:`run_pipeline` strings them together and writes
``results.json`` atomically.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from robustunlearn.config import RunSettings
from robustunlearn.data.base import Benchmark
from robustunlearn.data.synthetic import SyntheticConfig
from robustunlearn.distributed import data_parallel, local_device
from robustunlearn.engine import UnlearnConfig, restore_best, unlearn
from robustunlearn.errors import UserError
from robustunlearn.io import atomic_write_json
from robustunlearn.models import DTYPES, TinyModelConfig, load_model, save_model
from robustunlearn.prepare import PrepareConfig, Prepared, TrainConfig, prepare

# Metric key -> column title of the results table.
METRIC_COLUMNS: dict[str, str] = {
    "forget_qa_rouge": "forget QA ROUGE",
    "forget_qa_accuracy": "forget QA acc",
    "forget_verbmem_rouge": "forget VerbMem",
    "forget_mcq_accuracy": "forget MCQ acc",
    "retain_qa_rouge": "retain QA ROUGE",
    "retain_qa_accuracy": "retain QA acc",
    "utility_perplexity": "utility ppl",
}


def prepare_config(settings: RunSettings) -> PrepareConfig:
    return PrepareConfig(
        data=SyntheticConfig(seed=settings.seed, **settings.data.model_dump()),
        model=TinyModelConfig(**settings.model.model_dump()),
        train=TrainConfig(seed=settings.seed, **settings.train.model_dump()),
        benchmark=settings.benchmark,
        benchmark_options=tuple(sorted(settings.benchmark_options.items())),
        base_model=settings.base_model,
        dtype=settings.dtype,
    )


def prepare_from_settings(settings: RunSettings, cache_dir=None, console=None, force: bool = False) -> Prepared:
    return prepare(prepare_config(settings), cache_dir, console=console, force=force)


def prepare_summary_table(prepared: Prepared) -> Table:
    table = Table(title=f"prepared {prepared.benchmark.name} ({prepared.report['key']})")
    for column in ("model", "parameters", "epochs", "seconds", "forget QA", "retain QA", "holdout QA"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name in ("target", "retrain"):
        stats = prepared.report[name]
        accuracy = stats["qa_accuracy_teacher_forced"]
        table.add_row(
            name, f"{stats['parameters']:,}", str(stats["epochs"]), f"{stats['seconds']:.0f}",
            *(f"{accuracy[role]:.1%}" for role in ("forget", "retain", "holdout")),
        )
    table.caption = "QA: share of questions whose answer greedy decoding reproduces"
    return table


def _subset(records: list, limit: int | None) -> list:
    return records if limit is None else records[:limit]


METRIC_SPLITS = {
    "forget_qa_rouge": "forget_qa",
    "forget_qa_accuracy": "forget_qa",
    "forget_verbmem_rouge": "forget_verbmem",
    "forget_mcq_accuracy": "forget_mcq",
    "retain_qa_rouge": "retain_qa",
    "retain_qa_accuracy": "retain_qa",
    "utility_perplexity": "utility_text",
}
UTILITY_METRIC = "retain_qa_rouge"  # the utility the study's learning-rate sweep maximises


def evaluate_model(
    model, tokenizer, benchmark: Benchmark, settings: RunSettings, metrics: Sequence[str] | None = None
) -> dict[str, float]:
    """Forget and retain knowledge of ``model`` (all of :data:`METRIC_COLUMNS`, or just ``metrics``):
    QA ROUGE-L recall and accuracy (one greedy pass per role), VerbMem ROUGE-L F1, multiple-choice
    accuracy, utility perplexity."""
    from robustunlearn.metrics import (
        accuracy_from_answers,
        answer_questions,
        knowmem_from_answers,
        mcq_accuracy,
        perplexity,
        verbmem,
    )

    wanted = set(METRIC_COLUMNS if metrics is None else metrics)
    unknown = wanted - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; accepted: {', '.join(METRIC_COLUMNS)}")
    if metrics is None:  # everything the benchmark has the splits for (TOFU has no verbmem or MCQ)
        wanted = {key for key in wanted if benchmark.get(METRIC_SPLITS[key])}
    options = settings.eval
    limit = options.max_examples
    results: dict[str, float] = {}
    for role in ("forget", "retain"):
        if not wanted & {f"{role}_qa_rouge", f"{role}_qa_accuracy"}:
            continue
        questions = _subset(benchmark.require(f"{role}_qa"), limit)
        answers = answer_questions(model, tokenizer, questions, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)
        results[f"{role}_qa_rouge"] = knowmem_from_answers(answers, questions)["mean"]
        results[f"{role}_qa_accuracy"] = accuracy_from_answers(answers, questions)["accuracy"]
    if "forget_verbmem_rouge" in wanted:
        results["forget_verbmem_rouge"] = verbmem(
            model, tokenizer, _subset(benchmark.require("forget_verbmem"), limit),
            max_new_tokens=options.verbmem_max_new_tokens, batch_size=options.batch_size,
        )["mean"]
    if "forget_mcq_accuracy" in wanted:
        results["forget_mcq_accuracy"] = mcq_accuracy(
            model, tokenizer, _subset(benchmark.require("forget_mcq"), limit), batch_size=options.batch_size
        )["acc"]
    if "utility_perplexity" in wanted:
        results["utility_perplexity"] = perplexity(
            model, tokenizer, _subset(benchmark.get("utility_text"), limit), batch_size=options.batch_size
        )
    return {key: results[key] for key in METRIC_COLUMNS if key in results and key in wanted}


def tofu_scores(
    model, tokenizer, benchmark: Benchmark, settings: RunSettings, retrain_truth_ratios: Sequence[float] | None = None
) -> dict[str, Any] | None:
    """TOFU's metrics when ``settings.eval.tofu_metrics`` asks for them (by default: on the tofu
    benchmark) and the benchmark carries their evaluation sets (QA with perturbed answers):
    forget truth ratio, forget quality (KS-test p-value against the retrain model's forget truth
    ratios, when given) and model utility; ``forget_truth_ratios`` are kept for that comparison."""
    from robustunlearn.data.tofu import tofu_eval_sets
    from robustunlearn.metrics import forget_quality, model_utility, tofu_eval_set

    options = settings.eval
    if not (options.tofu_metrics if options.tofu_metrics is not None else benchmark.name == "tofu"):
        return None
    sets = tofu_eval_sets(benchmark)
    if "forget" not in sets:
        return None
    evaluated = {
        name: tofu_eval_set(
            model, tokenizer, _subset(records, options.max_examples), forget=name == "forget",
            normalise_prob=name in ("real_authors", "world_facts"), batch_size=options.batch_size,
        )
        for name, records in sets.items()
    }
    forget = evaluated.pop("forget")
    result: dict[str, Any] = {
        "forget_truth_ratio": forget["truth_ratio"],
        "forget_truth_ratios": forget["truth_ratios"],
        "forget_prob": forget["prob"],
        "forget_rouge": forget["rouge"],
        "model_utility": model_utility(evaluated) if evaluated else None,
        "utility_sets": {name: {k: v[k] for k in ("prob", "rouge", "truth_ratio")} for name, v in evaluated.items()},
    }
    if retrain_truth_ratios:
        result["forget_quality"] = forget_quality(forget["truth_ratios"], retrain_truth_ratios)
    return result


def unlearn_config(settings: RunSettings) -> UnlearnConfig:
    """The engine's config from the settings, with the embedded benchmark's tuned defaults
    (learning rate, objective and optimizer options) where the settings leave them open."""
    from robustunlearn.study import learning_rate, objective_options, optimizer_options

    options = settings.unlearn
    return UnlearnConfig(
        seed=settings.seed,
        **{**options.model_dump(), "lr": learning_rate(settings, options.optimizer, {}),
           "objective_options": objective_options(settings, options.objective),
           "optimizer_options": optimizer_options(settings, options.optimizer)},
    )


def load_target(settings: RunSettings, cache_dir=None, console=None, device: str | torch.device = "cpu"):
    """The model to unlearn (in ``settings.dtype``, on ``device``), its tokenizer, the benchmark,
    and the prepared bundle (None for a user's model)."""
    dtype = DTYPES[settings.dtype]
    if settings.model_path is not None:
        # Load the user's model first: a bad path fails before any data work.
        model, tokenizer = load_model(
            settings.model_path, dtype=dtype, device=device, trust_remote_code=settings.trust_remote_code
        )
        return model, tokenizer, prepare_config(settings).load_benchmark(), None
    prepared = prepare_from_settings(settings, cache_dir, console=console)
    model, tokenizer = load_model(prepared.target_dir, dtype=dtype, device=device)
    return model, tokenizer, prepared.benchmark, prepared


def unlearn_only(settings: RunSettings, output_dir: Path, cache_dir=None, *, resume: bool = False, console=None) -> Path:
    """Unlearn the target and save it to ``output_dir/final``; with ``resume``, continue a killed run.

    With ``unlearn.eval_every`` the model is evaluated (:func:`evaluate_model`) every so many
    steps and the metrics are logged; with ``unlearn.keep_best`` the final model holds the weights
    of the best evaluation instead of the last ones (its record is in the manifest's ``best``).

    Launched in several processes (torchrun, accelerate launch), each loads the model on its
    :func:`~robustunlearn.distributed.local_device` and the run is data parallel; rank 0 alone
    prepares the target (the others wait, then read its cache entry), evaluates and writes the files."""
    parallel = data_parallel()  # joins the launcher's process group, if any
    if parallel.enabled and settings.model_path is None:
        if parallel.is_main:
            prepare_from_settings(settings, cache_dir, console=console)
        parallel.barrier()
    model, tokenizer, benchmark, _ = load_target(settings, cache_dir, console, device=local_device())
    options = settings.unlearn
    if options.keep_best is not None and not benchmark.get(METRIC_SPLITS[options.keep_best]):
        raise UserError(
            f"--keep-best {options.keep_best} needs the {METRIC_SPLITS[options.keep_best]} split, "
            f"which benchmark {benchmark.name!r} lacks"
        )

    def evaluate(unlearned, step: int) -> dict[str, float]:
        return evaluate_model(unlearned, tokenizer, benchmark, settings)

    result = unlearn(model, tokenizer, benchmark, unlearn_config(settings), output_dir, resume=resume,
                     evaluate=evaluate if options.eval_every else None, console=console)
    final_dir = output_dir / "final"
    if parallel.is_main:
        manifest = {"kind": "unlearned", **options.model_dump()}
        if result.best is not None:
            restore_best(result.model, output_dir)
            manifest["best"] = result.best
        final = result.model.merge_and_unload() if options.lora else result.model  # a plain model, adapters merged
        save_model(final, tokenizer, final_dir, manifest)
    parallel.barrier()  # every rank returns once the final model is there
    return final_dir


def run_pipeline(settings: RunSettings, output_dir: Path, cache_dir=None, console=None, lr_sweep: bool = False) -> dict[str, Any]:
    """The main job: a small grade study (``settings.study``) on one benchmark; writes the study's
    files (results.jsonl, report.md/html, plots) and ``results.json``, a summary per model."""
    from robustunlearn.study import run_study

    started = time.perf_counter()
    rows = run_study(settings, settings.study, output_dir, cache_dir, console, lr_sweep=lr_sweep)
    references = rows[0]["reference"]
    scores: dict[str, dict[str, float]] = {"target": references["target"]}
    if references["retrain"] is not None:
        scores["retrain"] = references["retrain"]
    for row in rows:
        cell = row["cell"]
        name = f"{cell['objective']}/{cell['optimizer']}" + (f"/seed{cell['seed']}" if len(settings.study.seeds) > 1 else "")
        scores[name if row["attack"] == "none" else f"{name}+{row['attack']}"] = {**row["forget"], **row["utility"]}
    results = {
        "settings": settings.model_dump(mode="json"),
        "benchmark": {"name": settings.benchmark},
        "cells": [
            {**row["cell"], **row["cost"]} for row in rows if row["attack"] == "none"
        ],
        "scores": scores,
        "files": sorted(p.name for p in output_dir.iterdir() if p.is_file()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(output_dir / "results.json", results)
    return results


def results_table(results: dict[str, Any]) -> Table:
    """Models as rows (target, retrain, each unlearned cell and its attacked versions), metrics as columns."""
    table = Table(title=f"{results['benchmark']['name']}: forgetting and utility before and after attacks")
    table.add_column("model", no_wrap=True)
    for title in METRIC_COLUMNS.values():
        table.add_column(title.replace(" ", "\n", 1), justify="right")  # two-line headers fit 80 columns
    for name, metrics in results["scores"].items():
        table.add_row(name, *(f"{metrics[key]:.3f}" if key in metrics else "-" for key in METRIC_COLUMNS))
    table.caption = "forget: lower = more forgotten; retain: higher = more utility kept; ppl: lower is better"
    return table
