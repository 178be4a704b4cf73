"""lm-evaluation-harness as an optional backend: its tasks (``wmdp_bio``, ``mmlu``, ... or task
YAMLs of your own in an include directory) run on a model that is already loaded.

lm-eval is imported only here, when tasks run; without it :func:`require_lm_eval` raises one
:class:`~robustunlearn.core.errors.UserError` naming the extra to install. lm-eval's ``HFLM`` wraps the
loaded model and tokenizer (nothing is reloaded), and ``lm_eval.simple_evaluate`` runs the tasks.

Every scored sequence starts with the tokenizer's bos token, as in :mod:`robustunlearn.metrics`:
a multiple-choice task whose prompt is :func:`~robustunlearn.data.prompts.mcq_prompt` and whose
choices follow after one space gets the same log-likelihoods, and so the same ``acc`` and
``acc_norm``, as :func:`~robustunlearn.metrics.mcq.mcq_accuracy`. Tokenizers that add bos on their
own (Llama's) are unchanged; for the others (SmolLM2's, the embedded tiny one) the scores differ
from lm-eval's command line, which adds none there.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from robustunlearn.core.errors import UserError

INSTALL_HINT = "pip install 'robustunlearn[lm-eval]'"
DEFAULT_FILTER = ",none"  # lm-eval's results key metrics as "acc,none": metric, then filter


def require_lm_eval() -> None:
    """``UserError`` with the install command when lm-eval is not importable."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"lm-eval tasks need lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks`` (tasks, groups or tags);
    ``UserError`` naming an unknown one and the closest known names."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        include_path = Path(include_path)
        if not include_path.is_dir():
            raise UserError(f"lm-eval include directory {include_path} does not exist")
        # Indexing lm-eval's own ~15,000 task names takes about 20 s on two cores: skip it when the
        # include directory defines every task asked for.
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" (neither lm-eval's own nor in {include_path})" if include_path is not None else ""
            raise UserError(f"unknown lm-eval task {name!r}{where}{hint}")
    return manager


def tokenizer_with_bos(tokenizer):
    """``tokenizer``, or a copy of it, whose ``encode`` (with special tokens) starts with bos."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no bos token to start sequences with")
    if tokenizer.encode("a")[:1] == [bos]:
        return tokenizer
    with_bos = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own behaviour
    with_bos.add_bos_token = True  # transformers rebuilds the post-processor around bos
    if with_bos.encode("a")[:1] != [bos]:
        raise ValueError(f"cannot make {type(tokenizer).__name__} start its encodings with bos")
    return with_bos


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    manager=None,
    batch_size: int = 16,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run the lm-eval ``tasks`` on ``model`` and return lm-eval's results dictionary (``results``:
    per task and group, metric keys like ``"acc,none"``; ``samples`` with ``log_samples``).

    ``include_path`` is a directory of extra task YAMLs (lm-eval's ``--include_path``), e.g. tasks
    whose ``dataset_path: json`` reads local files when the hub is out of reach; ``manager``, a
    :func:`task_manager` already built for ``tasks``, saves building it again; ``limit`` caps the
    examples per task. The model is left in the train/eval mode it came in. Like lm-eval's
    command line, this seeds Python's, NumPy's and torch's global generators."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    manager = manager or task_manager(tasks, include_path)
    was_training = model.training
    # HFLM warns that a pre-loaded model ignores its loading options: true, and nothing to act on.
    with _quiet("lm_eval.models.huggingface"):
        wrapped = HFLM(
            pretrained=model, tokenizer=tokenizer_with_bos(tokenizer), batch_size=batch_size, add_bos_token=True
        )
    try:
        return lm_eval.simple_evaluate(
            model=wrapped, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples
        )
    except ConnectionError as error:
        raise UserError(
            f"lm-eval could not fetch a task's dataset ({error}); offline, point --lm-eval-include at "
            "task YAMLs whose dataset_path reads local files (e.g. dataset_path: json with data_files)"
        ) from None
    finally:
        model.train(was_training)


def lm_eval_scores(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task or group: {metric: value}}`` from lm-eval's results: numbers only (a stderr lm-eval
    did not compute is ``"N/A"``), default-filter metrics under their bare names (``acc``,
    ``acc_stderr``), others as ``metric,filter``."""
    scores: dict[str, dict[str, float]] = {}
    for name, entry in results["results"].items():
        scores[name] = {
            key.removesuffix(DEFAULT_FILTER): float(value)
            for key, value in entry.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return scores
