"""The metric registry and the evaluation every command runs.

Each :class:`MetricSpec` names one number a model gets on a benchmark: the split it reads, its
direction (``lower`` or ``higher`` is better), its chance level, its column title and how to
compute it. Config validation (``keep_best``, the study's level metric), the study, the CLI's
tables and the report all read :data:`METRICS`; nothing guesses a metric's meaning from its name.

To add a metric: write its function, and a ``MetricSpec`` for it in :data:`METRICS` below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from robustunlearn.core.settings import Strict, check_name
from robustunlearn.data.base import QA, Benchmark, Record
from robustunlearn.data.muse import FEW_SHOT_SPLITS, few_shot_examples
from robustunlearn.data.prompts import PROMPT_TEMPLATES, PromptTemplate
from robustunlearn.data.tofu import tofu_eval_sets
from robustunlearn.metrics.mcq import McqFormat, mcq_accuracy
from robustunlearn.metrics.muse import knowmem_from_answers, verbmem
from robustunlearn.metrics.perplexity import perplexity
from robustunlearn.metrics.presets import DEFAULT_PRESET, EVAL_PRESETS, SYNTHETIC_VALUES
from robustunlearn.metrics.qa import accuracy_from_answers, answer_questions
from robustunlearn.metrics.tofu import forget_quality, model_utility, tofu_eval_set


class EvalSettings(Strict):
    """How models are scored: the benchmark's preset (:mod:`robustunlearn.metrics.presets`), any of
    whose fields a recipe overrides, plus batch size and caps for quick looks.

    The defaults are the ``synthetic`` preset's values; a field left unset takes ``preset``'s."""

    preset: str = DEFAULT_PRESET
    batch_size: int = Field(32, ge=1)
    max_examples: int | None = Field(None, ge=1)  # cap per split, for quick looks
    # TOFU's truth ratio, forget quality and model utility. None: on the tofu benchmark only; the
    # synthetic benchmark has the perturbed answers they need, but they add ~1k scored QA per model.
    tofu_metrics: bool | None = None
    # The preset fields (see robustunlearn.metrics.presets); defaults: the synthetic preset's.
    max_new_tokens: int = Field(SYNTHETIC_VALUES["max_new_tokens"], ge=1)
    verbmem_max_new_tokens: int = Field(SYNTHETIC_VALUES["verbmem_max_new_tokens"], ge=1)
    qa_rouge: Literal["recall", "f1"] = SYNTHETIC_VALUES["qa_rouge"]
    rouge_stemmer: bool = SYNTHETIC_VALUES["rouge_stemmer"]
    few_shot: bool = SYNTHETIC_VALUES["few_shot"]
    prompt_template: str = SYNTHETIC_VALUES["prompt_template"]
    stop_strings: tuple[str, ...] = SYNTHETIC_VALUES["stop_strings"]
    mcq_format: McqFormat = SYNTHETIC_VALUES["mcq_format"]
    tofu_max_new_tokens: int = Field(SYNTHETIC_VALUES["tofu_max_new_tokens"], ge=1)
    tofu_eval_size: int | None = Field(SYNTHETIC_VALUES["tofu_eval_size"], ge=1)
    level_tolerance: float = Field(SYNTHETIC_VALUES["level_tolerance"], ge=0)

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        return check_name("evaluation preset", value, EVAL_PRESETS)

    @field_validator("prompt_template")
    @classmethod
    def _prompt_template(cls, value: str) -> str:
        return check_name("prompt template", value, PROMPT_TEMPLATES)

    @model_validator(mode="after")
    def _fill_from_preset(self) -> EvalSettings:
        unset = [name for name in EVAL_PRESETS[self.preset].values if name not in self.model_fields_set]
        if unset:
            preset = EvalSettings.model_validate({**EVAL_PRESETS[self.preset].values, "preset": self.preset})
            # Validated values written in place: the model is frozen, and a validator must return self.
            self.__dict__.update({name: getattr(preset, name) for name in unset})
        return self

    @property
    def template(self) -> PromptTemplate:
        return PROMPT_TEMPLATES[self.prompt_template]


def describe_eval(settings: EvalSettings) -> str:
    """One line naming the preset ``settings`` come from, its source, what it scores with, and the
    fields a recipe overrode: what ``eval`` and ``study`` print before scoring."""
    stops = ", ".join(repr(stop) for stop in settings.stop_strings) or "none (eos only)"
    stemmer = " with Porter stemmer" if settings.rouge_stemmer else ""
    few_shot = " after the in-context examples" if settings.few_shot else ""
    tofu_size = settings.tofu_eval_size or "all"
    overrides = [
        f"{name}={getattr(settings, name)!r}"
        for name in type(settings).model_fields
        if name in settings.model_fields_set and name != "preset"
    ]
    return (
        f"eval preset {settings.preset} ({EVAL_PRESETS[settings.preset].source}): QA {settings.max_new_tokens} new "
        f"tokens{few_shot}, ROUGE-L {settings.qa_rouge}{stemmer}, prompt {settings.prompt_template}, stop at {stops}; "
        f"VerbMem {settings.verbmem_max_new_tokens} tokens; MCQ {settings.mcq_format}; TOFU sets {tofu_size} "
        f"records, {settings.tofu_max_new_tokens} new tokens; level tolerance {settings.level_tolerance}"
        + (f"; overrides: {', '.join(overrides)}" if overrides else "")
    )


@dataclass
class EvalContext:
    """One model under evaluation; greedy answers are generated once per split and shared by
    every metric that reads them (QA ROUGE and QA accuracy)."""

    model: Any
    tokenizer: Any
    benchmark: Benchmark
    settings: EvalSettings
    _answers: dict[str, list[str]] = field(default_factory=dict)

    def records(self, split: str) -> list[Record]:
        records = self.benchmark.require(split)
        limit = self.settings.max_examples
        return records if limit is None else records[:limit]

    def few_shot(self, split: str) -> list[QA]:
        """The benchmark's in-context examples for ``split`` when the settings ask for them."""
        if not self.settings.few_shot or split not in FEW_SHOT_SPLITS:
            return []
        return few_shot_examples(self.benchmark, split)

    def answers(self, split: str) -> list[str]:
        if split not in self._answers:
            self._answers[split] = answer_questions(
                self.model,
                self.tokenizer,
                self.records(split),
                few_shot=self.few_shot(split),
                template=self.settings.template,
                stop_strings=self.settings.stop_strings,
                max_new_tokens=self.settings.max_new_tokens,
                batch_size=self.settings.batch_size,
            )
        return self._answers[split]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    title: str  # column title in tables and the report
    split: str  # the benchmark split it reads
    direction: Literal["lower", "higher"]  # which values are better for the model's owner
    chance: float | None  # what a model that knows nothing scores (None: no such level)
    compute: Callable[[EvalContext], float]

    @property
    def forget(self) -> bool:
        """A forget metric measures what is left of the forget set (the rest measure utility)."""
        return self.split.startswith("forget_")


def _qa_rouge(context: EvalContext, split: str) -> float:
    options = context.settings
    answers, records = context.answers(split), context.records(split)
    return knowmem_from_answers(answers, records, options.qa_rouge, use_stemmer=options.rouge_stemmer)["mean"]


def _qa_accuracy(context: EvalContext, split: str) -> float:
    return accuracy_from_answers(context.answers(split), context.records(split))["accuracy"]


def _verbmem(context: EvalContext) -> float:
    options = context.settings
    return verbmem(
        context.model,
        context.tokenizer,
        context.records("forget_verbmem"),
        max_new_tokens=options.verbmem_max_new_tokens,
        batch_size=options.batch_size,
    )["mean"]


def _mcq(context: EvalContext) -> float:
    options = context.settings
    return mcq_accuracy(
        context.model,
        context.tokenizer,
        context.records("forget_mcq"),
        mcq_format=options.mcq_format,
        template=options.template,
        batch_size=options.batch_size,
    )["acc"]


def _perplexity(context: EvalContext) -> float:
    records = context.benchmark.get("utility_text")
    limit = context.settings.max_examples
    records = records if limit is None else records[:limit]
    return perplexity(context.model, context.tokenizer, records, batch_size=context.settings.batch_size)


def _registry(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {spec.name: spec for spec in specs}


METRICS: dict[str, MetricSpec] = _registry(
    MetricSpec("forget_qa_rouge", "forget QA ROUGE", "forget_qa", "lower", 0.0, lambda c: _qa_rouge(c, "forget_qa")),
    MetricSpec(
        "forget_qa_accuracy", "forget QA acc", "forget_qa", "lower", 0.0, lambda c: _qa_accuracy(c, "forget_qa")
    ),
    MetricSpec("forget_verbmem_rouge", "forget VerbMem", "forget_verbmem", "lower", 0.0, _verbmem),
    MetricSpec("forget_mcq_accuracy", "forget MCQ acc", "forget_mcq", "lower", 0.25, _mcq),
    MetricSpec("retain_qa_rouge", "retain QA ROUGE", "retain_qa", "higher", 0.0, lambda c: _qa_rouge(c, "retain_qa")),
    MetricSpec(
        "retain_qa_accuracy", "retain QA acc", "retain_qa", "higher", 0.0, lambda c: _qa_accuracy(c, "retain_qa")
    ),
    MetricSpec("utility_perplexity", "utility ppl", "utility_text", "lower", None, _perplexity),
)
FORGET_METRICS = tuple(name for name, spec in METRICS.items() if spec.forget)
# The utility the study's learning-rate sweep maximises and its scores report beside robustness.
UTILITY_METRIC = "retain_qa_rouge"


def evaluate_model(
    model,
    tokenizer,
    benchmark: Benchmark,
    settings: EvalSettings,
    metrics: Sequence[str] | None = None,
    console=None,
) -> dict[str, float]:
    """``model``'s value of each of ``metrics`` (default: every registered metric whose split the
    benchmark has; TOFU has no VerbMem or MCQ), in registry order. With a rich ``console`` and
    more than one metric, a progress bar (metrics done, elapsed, ETA) shows while it works, on a
    terminal only (in a log file it would leave a line per model)."""
    if metrics is None:
        wanted = [name for name, spec in METRICS.items() if benchmark.get(spec.split)]
    else:
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; accepted: {', '.join(METRICS)}")
        wanted = [name for name in METRICS if name in metrics]
    context = EvalContext(model, tokenizer, benchmark, settings)
    columns = (
        TextColumn("evaluate {task.fields[metric]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    # transient: a study evaluates many models, and a finished bar says nothing the results do not
    shown = console is not None and console.is_terminal and len(wanted) > 1
    with Progress(*columns, console=console, disable=not shown, transient=True) as bar:
        task = bar.add_task("evaluate", total=len(wanted), metric="")
        values = {}
        for name in wanted:
            bar.update(task, metric=name)
            values[name] = METRICS[name].compute(context)
            bar.advance(task)
    return values


def tofu_scores(
    model, tokenizer, benchmark: Benchmark, settings: EvalSettings, retrain_truth_ratios: Sequence[float] | None = None
) -> dict[str, Any] | None:
    """TOFU's metrics when ``settings.tofu_metrics`` asks for them (by default: on the tofu
    benchmark) and the benchmark carries their evaluation sets (QA with perturbed answers):
    forget truth ratio, forget quality (KS-test p-value against the retrain model's forget truth
    ratios, when given) and model utility; ``forget_truth_ratios`` are kept for that comparison."""
    if not (settings.tofu_metrics if settings.tofu_metrics is not None else benchmark.name == "tofu"):
        return None
    sets = tofu_eval_sets(benchmark)
    if "forget" not in sets:
        return None
    limits = [limit for limit in (settings.max_examples, settings.tofu_eval_size) if limit is not None]
    limit = min(limits, default=None)
    evaluated = {
        name: tofu_eval_set(
            model,
            tokenizer,
            records if limit is None else records[:limit],
            forget=name == "forget",
            normalise_prob=name in ("real_authors", "world_facts"),
            template=settings.template,
            stop_strings=settings.stop_strings,
            max_new_tokens=settings.tofu_max_new_tokens,
            batch_size=settings.batch_size,
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
