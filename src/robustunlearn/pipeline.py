"""The end-to-end run: prepare -> unlearn -> evaluate -> quantize -> evaluate again.

Each stage is a library function; :func:`run_pipeline` strings them together and writes
``results.json`` atomically.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from robustunlearn.config import RunSettings
from robustunlearn.data import load_benchmark
from robustunlearn.data.base import Benchmark
from robustunlearn.data.synthetic import SyntheticConfig
from robustunlearn.engine import UnlearnConfig, unlearn
from robustunlearn.io import atomic_write_json
from robustunlearn.models import TinyModelConfig, load_model, save_model
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


def evaluate_model(model, tokenizer, benchmark: Benchmark, settings: RunSettings) -> dict[str, float]:
    """Forget and retain knowledge of ``model``: QA ROUGE-L recall and accuracy, VerbMem ROUGE-L F1,
    multiple-choice accuracy, utility perplexity."""
    from robustunlearn.metrics import (
        accuracy_from_answers,
        answer_questions,
        knowmem_from_answers,
        mcq_accuracy,
        perplexity,
        verbmem,
    )

    options = settings.eval
    limit = options.max_examples
    results: dict[str, float] = {}
    for role in ("forget", "retain"):
        questions = _subset(benchmark.require(f"{role}_qa"), limit)
        answers = answer_questions(model, tokenizer, questions, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)
        results[f"{role}_qa_rouge"] = knowmem_from_answers(answers, questions)["mean"]
        results[f"{role}_qa_accuracy"] = accuracy_from_answers(answers, questions)["accuracy"]
    results["forget_verbmem_rouge"] = verbmem(
        model, tokenizer, _subset(benchmark.require("forget_verbmem"), limit),
        max_new_tokens=options.verbmem_max_new_tokens, batch_size=options.batch_size,
    )["mean"]
    results["forget_mcq_accuracy"] = mcq_accuracy(
        model, tokenizer, _subset(benchmark.require("forget_mcq"), limit), batch_size=options.batch_size
    )["acc"]
    if benchmark.get("utility_text"):
        results["utility_perplexity"] = perplexity(
            model, tokenizer, _subset(benchmark.get("utility_text"), limit), batch_size=options.batch_size
        )
    return results


def unlearn_config(settings: RunSettings) -> UnlearnConfig:
    return UnlearnConfig(seed=settings.seed, **settings.unlearn.model_dump())


def run_pipeline(settings: RunSettings, output_dir: Path, cache_dir=None, console=None) -> dict[str, Any]:
    """Prepare, unlearn, evaluate, quantize, evaluate again; write ``results.json``."""
    from robustunlearn.attacks import quantize_model

    started = time.perf_counter()
    if settings.model_path is not None:
        # Load the user's model first: a bad path fails before any data work.
        target, tokenizer = load_model(settings.model_path, trust_remote_code=settings.trust_remote_code)
        benchmark = load_benchmark(settings.benchmark, **asdict(prepare_config(settings).data))
        prepare_report: dict[str, Any] = {"model_path": settings.model_path}
        scores: dict[str, dict[str, float]] = {"target": evaluate_model(target, tokenizer, benchmark, settings)}
    else:
        prepared = prepare_from_settings(settings, cache_dir, console=console)
        target, tokenizer = load_model(prepared.target_dir)
        retrain, _ = load_model(prepared.retrain_dir)
        benchmark = prepared.benchmark
        prepare_report = {k: prepared.report[k] for k in ("key", "target", "retrain")}
        scores = {
            "target": evaluate_model(target, tokenizer, benchmark, settings),
            "retrain": evaluate_model(retrain, tokenizer, benchmark, settings),
        }
        del retrain
    unlearned = copy.deepcopy(target)
    outcome = unlearn(unlearned, tokenizer, benchmark, unlearn_config(settings), output_dir / "unlearn", console=console)
    save_model(unlearned, tokenizer, output_dir / "unlearn" / "final", {"kind": "unlearned", **settings.unlearn.model_dump()})
    scores["unlearned"] = evaluate_model(unlearned, tokenizer, benchmark, settings)

    quantized, quantization_report = quantize_model(unlearned, settings.quantization)
    scores[f"unlearned+{settings.quantization}"] = evaluate_model(quantized, tokenizer, benchmark, settings)
    target_quantized, _ = quantize_model(target, settings.quantization)
    scores[f"target+{settings.quantization}"] = evaluate_model(target_quantized, tokenizer, benchmark, settings)

    results = {
        "settings": settings.model_dump(),
        "benchmark": {"name": benchmark.name, "schema_version": benchmark.schema_version, "splits": benchmark.summary()},
        "prepare": prepare_report,
        "unlearn": {
            "objective": settings.unlearn.objective,
            "optimizer": settings.unlearn.optimizer,
            "steps": outcome.steps_done,
            "seconds": round(outcome.seconds, 2),
            "final_loss": outcome.history[-1].get("loss") if outcome.history else None,
            "model_dir": str(output_dir / "unlearn" / "final"),
        },
        "quantization": {"method": settings.quantization, "report": quantization_report},
        "scores": scores,
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(output_dir / "results.json", results)
    return results


def results_table(results: dict[str, Any]) -> Table:
    """Metrics as rows, models as columns: target, retrain, unlearned, then the quantized ones."""
    unlearn_info = results["unlearn"]
    table = Table(
        title=f"{results['benchmark']['name']}: {unlearn_info['objective']} with {unlearn_info['optimizer']}, "
        f"{unlearn_info['steps']} steps"
    )
    table.add_column("metric", no_wrap=True)
    for name in results["scores"]:
        table.add_column(name, justify="right")
    for key, title in METRIC_COLUMNS.items():
        table.add_row(title, *(f"{m[key]:.3f}" if key in m else "-" for m in results["scores"].values()))
    table.caption = "forget: lower = more forgotten; retain: higher = more utility kept; ppl: lower is better"
    return table
