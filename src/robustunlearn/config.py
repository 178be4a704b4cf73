"""Typed run configuration: defaults < YAML recipe (``--config``) < command-line flags.

Every problem in a recipe or a flag becomes one :class:`~robustunlearn.errors.UserError` naming
the field and, for names, the accepted values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from robustunlearn.errors import UserError
from robustunlearn.models import TinyModelConfig
from robustunlearn.prepare import TrainConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(kind: str, value: str, accepted) -> str:
    if value not in accepted:
        raise ValueError(f"unknown {kind} {value!r}; accepted: {', '.join(sorted(accepted))}")
    return value


DEFAULT_ATTRIBUTES = ("birth_year", "birth_city", "mother_name", "father_name", "university", "profession", "employer", "pet_name")


class DataSettings(Strict):
    """The embedded synthetic benchmark's generator settings. The defaults are sized so that the
    tiny target memorises every fact in a few minutes on two CPU cores."""

    num_people: int = Field(150, ge=3)
    forget_fraction: float = Field(0.10, gt=0, lt=1)
    holdout_fraction: float = Field(0.15, gt=0, lt=1)
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    num_utility_passages: int = Field(60, ge=0)
    num_utility_qa: int = Field(20, ge=0)


class ModelSettings(Strict):
    """The embedded tiny Llama (used when ``model_path`` is not given); defaults: TinyModelConfig."""

    vocab_size: int = Field(TinyModelConfig.vocab_size, ge=300)
    hidden_size: int = Field(TinyModelConfig.hidden_size, ge=8)
    intermediate_size: int = Field(TinyModelConfig.intermediate_size, ge=8)
    num_hidden_layers: int = Field(TinyModelConfig.num_hidden_layers, ge=1)
    num_attention_heads: int = Field(TinyModelConfig.num_attention_heads, ge=1)


class TrainSettings(Strict):
    """Training the tiny target and retrain models from scratch; defaults: TrainConfig."""

    lr: float = Field(TrainConfig.lr, gt=0)
    max_epochs: int = Field(TrainConfig.max_epochs, ge=1)
    batch_tokens: int = Field(TrainConfig.batch_tokens, ge=32)
    target_accuracy: float = Field(TrainConfig.target_accuracy, gt=0, le=1)
    check_every_epochs: int = Field(TrainConfig.check_every_epochs, ge=1)


class UnlearnSettings(Strict):
    """The engine's options (:class:`robustunlearn.engine.UnlearnConfig` has their meaning)."""

    objective: str = "npo"
    optimizer: str = "adamw"
    lr: float | None = Field(None, gt=0)
    steps: int = Field(60, ge=1)
    epochs: int | None = Field(None, ge=1)  # passes over the forget set; replaces steps
    batch_size: int = Field(8, ge=1)  # the global batch: split over the processes of a multi-process run
    lr_schedule: str = "constant"
    warmup_steps: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    eval_every: int = Field(0, ge=0)
    forget_splits: tuple[str, ...] = ("forget_qa", "forget_text")
    retain_splits: tuple[str, ...] = ("retain_qa", "retain_text")
    max_length: int = Field(256, ge=2)
    objective_options: dict[str, Any] = Field(default_factory=dict)
    optimizer_options: dict[str, Any] = Field(default_factory=dict)
    lora: dict[str, Any] | None = None  # rank, alpha, dropout, target_modules
    keep_best: str | None = None  # metric whose best value's weights are kept (needs eval_every)
    keep_best_mode: Literal["min", "max"] = "min"

    @model_validator(mode="after")
    def _budget_and_best(self) -> UnlearnSettings:
        if {"steps", "epochs"} <= self.model_fields_set and self.epochs is not None:
            raise ValueError("set unlearn.steps or unlearn.epochs, not both")
        if self.keep_best is not None and self.eval_every < 1:
            raise ValueError("keep_best needs eval_every >= 1 (steps between evaluations)")
        return self

    @field_validator("lora")
    @classmethod
    def _lora(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from robustunlearn.engine import lora_options

        lora_options(value)
        return value

    @field_validator("objective")
    @classmethod
    def _objective(cls, value: str) -> str:
        from robustunlearn.objectives import OBJECTIVES

        return _check_name("objective", value, OBJECTIVES)

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        from robustunlearn.optim import OPTIMIZERS

        return _check_name("optimizer", value, OPTIMIZERS)

    @field_validator("lr_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        from robustunlearn.engine import SCHEDULES

        return _check_name("lr_schedule", value, SCHEDULES)

    @field_validator("keep_best")
    @classmethod
    def _keep_best(cls, value: str | None) -> str | None:
        from robustunlearn.pipeline import METRIC_COLUMNS  # what the run's evaluation returns

        return None if value is None else _check_name("keep_best metric", value, METRIC_COLUMNS)


class EvalSettings(Strict):
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(8, ge=1)  # QA answers are short
    verbmem_max_new_tokens: int = Field(48, ge=1)
    max_examples: int | None = Field(None, ge=1)  # cap per split, for quick looks
    # TOFU's truth ratio, forget quality and model utility. None: on the tofu benchmark only; the
    # synthetic benchmark has the perturbed answers they need, but they add ~1k scored QA per model.
    tofu_metrics: bool | None = None


class StudySettings(Strict):
    """The grade study's grid, matched-forgetting rule and attack suite."""

    objectives: tuple[str, ...] = ("npo",)
    optimizers: tuple[str, ...] = ("adam", "signadam", "zo-adazo", "hybrid", "sophia-g")
    seeds: tuple[int, ...] = (0,)
    attacks: tuple[str, ...] = ("rtn-int4", "relearn")
    max_steps: int = Field(150, ge=1)  # each cell's step budget
    check_every: int = Field(10, ge=1)  # steps between checks of the forget level
    level_metric: str = "forget_qa_rouge"
    level_tolerance: float = Field(0.05, ge=0)  # reached when metric <= retrain's + tolerance
    relearn_samples: int = Field(16, ge=1)  # forget QA pairs the relearning attack fine-tunes on
    relearn_steps: int = Field(20, ge=1)
    relearn_lr: float = Field(1e-4, gt=0)
    relearn_eval_every: int = Field(5, ge=1)
    sweep_factors: tuple[float, ...] = (0.3, 1.0, 3.0)  # --lr-sweep tries base lr x each
    # Loss landscape per cell: sharpness of the forget loss, and linear mode connectivity from the first
    # optimizer's model to each other one's (same objective and seed). Keeps each cell's weights on disk.
    landscape: bool = True
    lmc_points: int = Field(6, ge=2)  # points on each interpolation path, endpoints included

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        from robustunlearn.objectives import OBJECTIVES

        return _non_empty("objectives", tuple(_check_name("objective", v, OBJECTIVES) for v in values))

    @field_validator("optimizers")
    @classmethod
    def _optimizers(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        from robustunlearn.optim import OPTIMIZERS

        return _non_empty("optimizers", tuple(_check_name("optimizer", v, OPTIMIZERS) for v in values))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        return _non_empty("seeds", values)

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        from robustunlearn.attacks import QUANTIZATION_METHODS

        fixed = {"relearn", "relearn-lora", "benign-relearn"}
        for value in values:
            prefix, _, number = value.partition("-")
            if value in fixed or value in QUANTIZATION_METHODS:
                continue
            if prefix in ("noise", "prune") and number.replace(".", "", 1).isdigit():
                continue
            accepted = sorted(fixed) + ["noise-<scale>", "prune-<sparsity>"] + list(QUANTIZATION_METHODS)
            raise ValueError(f"unknown attack {value!r}; accepted: {', '.join(accepted)}")
        return values

    @field_validator("level_metric")
    @classmethod
    def _level_metric(cls, value: str) -> str:
        from robustunlearn.pipeline import METRIC_COLUMNS

        forget_metrics = [k for k in METRIC_COLUMNS if k.startswith("forget_")]
        return _check_name("level metric", value, forget_metrics)


def _non_empty(name: str, values: tuple) -> tuple:
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


class RunSettings(Strict):
    benchmark: str = "synthetic"
    seed: int = 0
    # A local Hugging Face model directory or hub name to unlearn instead of the embedded tiny
    # target; there is then no retrain reference.
    model_path: str | None = None
    trust_remote_code: bool = False
    # Options of a real benchmark's loader, e.g. {data_dir: ../shared/data/tofu, forget_split: forget01}.
    benchmark_options: dict[str, Any] = Field(default_factory=dict)
    # A model `prepare` fine-tunes into the target and retrain models instead of training the tiny one.
    base_model: str | None = None
    # The dtype the model to unlearn (model_path or the prepared target) and base_model load in;
    # "auto": the checkpoint's. Zeroth-order steps are exact in float32 only (docs/engine.md).
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    quantization: str = "rtn-int4"
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    unlearn: UnlearnSettings = UnlearnSettings()
    eval: EvalSettings = EvalSettings()
    study: StudySettings = StudySettings()

    @field_validator("benchmark")
    @classmethod
    def _benchmark(cls, value: str) -> str:
        from robustunlearn.data import BENCHMARKS

        return _check_name("benchmark", value, BENCHMARKS)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    return f"{where}: {message}"


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunSettings:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (nested dicts; None values skipped)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of settings, not {type(loaded).__name__}")
        data = loaded or {}
    overrides = _drop_none(overrides or {})
    data = _deep_merge(data, overrides)
    flags = overrides.get("unlearn", {})
    for given, replaced in (("steps", "epochs"), ("epochs", "steps")):
        if given in flags and replaced not in flags:  # a budget flag replaces the recipe's other budget
            data["unlearn"].pop(replaced, None)
    try:
        return RunSettings.model_validate(data)
    except ValidationError as error:
        source = f"config file {path}: " if path is not None else ""
        raise UserError(source + _first_error(error)) from None


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    cleaned = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                cleaned[key] = value
        elif value is not None:
            cleaned[key] = value
    return cleaned
