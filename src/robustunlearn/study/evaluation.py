"""``eval``: one model's forget and retain metrics on a benchmark, its membership-inference AUCs
and PrivLeak where the benchmark has members and non-members (:mod:`robustunlearn.metrics.privacy`),
and optionally lm-eval-harness tasks (:mod:`robustunlearn.metrics.lm_eval_backend`) on the same
loaded model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from robustunlearn.config import RunSettings
from robustunlearn.metrics.lm_eval_backend import lm_eval_scores, require_lm_eval, run_lm_eval, task_manager
from robustunlearn.metrics.privacy import mia_privacy, muse_corpus, with_privleak
from robustunlearn.metrics.suite import METRICS, describe_eval, evaluate_model, tofu_scores
from robustunlearn.study.pipeline import load_target

TOFU_COLUMNS = {
    "forget_truth_ratio": "forget truth ratio",
    "forget_prob": "forget prob",
    "model_utility": "model utility",
}
MIA_COLUMNS = {
    "auc_loss": "MIA AUC loss",
    "auc_zlib": "MIA AUC zlib",
    "auc_min_k": "MIA AUC Min-K%",
    "auc_min_k_plus_plus": "MIA AUC Min-K%++",
}
MUSE_COLUMNS = {  # MUSE's names for the QA ROUGE metrics
    "forget_qa_rouge": "forget KnowMem (QA ROUGE)",
    "retain_qa_rouge": "retain KnowMem (QA ROUGE)",
}


def evaluate_from_settings(
    settings: RunSettings,
    cache_dir=None,
    *,
    console=None,
    metrics: bool = True,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_include: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``settings.model_path`` (a directory, GGUF file or hub name), or the prepared
    target when it is None: with ``metrics``, :func:`~robustunlearn.study.pipeline.evaluate_model` on
    the benchmark (plus TOFU's truth ratio and model utility on TOFU) and, as ``privacy``,
    :func:`~robustunlearn.metrics.privacy.mia_privacy` with PrivLeak (no retrain model is loaded:
    on MUSE against MUSE's published retrain AUC, elsewhere "no reference"); with ``lm_eval_tasks``,
    those lm-eval tasks. lm-eval's presence and the task names are checked before the model loads.
    ``settings.eval`` sets the batch size and caps the examples per split (and per lm-eval task)."""
    manager = None
    if lm_eval_tasks:
        require_lm_eval()
        manager = task_manager(lm_eval_tasks, lm_eval_include)
    started = time.perf_counter()
    model, tokenizer, benchmark, prepared = load_target(settings, cache_dir, console)
    if console is not None:  # printed once the model loaded: a loading error stays the only line
        console.print(f"evaluation: {describe_eval(settings.eval)}", highlight=False, soft_wrap=True)
    model.eval()
    report: dict[str, Any] = {
        "model": settings.model_path or str(prepared.target_dir),
        "benchmark": benchmark.name,
        "settings": settings.model_dump(mode="json"),
    }
    if metrics:
        report["metrics"] = evaluate_model(model, tokenizer, benchmark, settings.eval)
        tofu = tofu_scores(model, tokenizer, benchmark, settings.eval)
        if tofu is not None:
            report["metrics"].update({key: tofu[key] for key in TOFU_COLUMNS if tofu.get(key) is not None})
        mia = mia_privacy(model, tokenizer, benchmark, settings.eval)
        report["privacy"] = with_privleak(mia, muse=muse_corpus(benchmark))
    if lm_eval_tasks:
        options = settings.eval
        results = run_lm_eval(
            model, tokenizer, lm_eval_tasks, manager=manager, batch_size=options.batch_size, limit=options.max_examples
        )
        report["lm_eval"] = {
            "tasks": list(lm_eval_tasks),
            "include_path": str(lm_eval_include) if lm_eval_include is not None else None,
            "scores": lm_eval_scores(results),
            "versions": results["versions"],
            "n_samples": results["n-samples"],
        }
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def evaluation_table(report: dict[str, Any]) -> Table:
    """Metric / value rows: ours first (MUSE's names on MUSE), the membership-inference AUCs and
    PrivLeak with its reference, then each requested lm-eval task's numbers."""
    table = Table(title=f"{report['model']} on {report['benchmark']}")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right")
    titles = {**{name: spec.title for name, spec in METRICS.items()}, **TOFU_COLUMNS}
    if report["benchmark"].startswith("muse-"):
        titles.update(MUSE_COLUMNS)
    for key, value in report.get("metrics", {}).items():
        table.add_row(titles[key], f"{value:.4f}")
    privacy = report.get("privacy")
    notes = []
    if privacy is not None and privacy["aucs"] is None:
        notes.append(f"no membership inference: {privacy['reason']}")
    elif privacy is not None:
        for key, value in privacy["aucs"].items():
            table.add_row(MIA_COLUMNS[key], f"{value:.4f}")
        leak = privacy["privleak"]
        table.add_row(f"PrivLeak % (vs {privacy['privleak_reference']})", "—" if leak is None else f"{leak:.2f}")
        notes.append(f"MIA: {privacy['source']}, {privacy['members']} members, {privacy['nonmembers']} non-members")
    lm_eval = report.get("lm_eval")
    if lm_eval:
        scores = lm_eval["scores"]
        # A tag (a name lm-eval expands to tasks) has no entry of its own: show every task then.
        shown = [name for name in lm_eval["tasks"] if name in scores]
        for name in shown if len(shown) == len(lm_eval["tasks"]) else list(scores):
            for metric, value in scores[name].items():
                if "_stderr" in metric:
                    continue
                stderr = scores[name].get(_stderr_key(metric))
                table.add_row(
                    f"lm-eval {name} {metric}", f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                )
    notes.insert(0, "forget: lower = more forgotten; retain and utility: higher = more kept; ppl: lower is better")
    if privacy is not None and privacy["aucs"] is not None:
        notes.insert(
            1, "MIA AUC: 0.5 = chance; PrivLeak: 0 = as private as retraining, negative = forget set recognisable"
        )
    table.caption = "\n".join(notes)
    return table


def _stderr_key(metric: str) -> str:
    """``acc`` -> ``acc_stderr``; ``exact_match,strict-match`` -> ``exact_match_stderr,strict-match``."""
    name, comma, filter_name = metric.partition(",")
    return f"{name}_stderr{comma}{filter_name}"
