"""The unlearning run's settings: one model, read by config validation (as the recipe's
``unlearn`` section), the CLI and the engine, so every default and check is written once."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from robustunlearn.core.modules import lora_options
from robustunlearn.core.settings import Strict, check_name
from robustunlearn.data.prompts import PROMPT_TEMPLATES, PromptTemplate
from robustunlearn.metrics.suite import METRICS
from robustunlearn.objectives import OBJECTIVES
from robustunlearn.optim import OPTIMIZERS

SCHEDULES = ("constant", "linear", "cosine")


class ParallelSettings(Strict):
    """How a run launched in several processes splits the work (one process ignores it).

    ``mode``: ``ddp``, every rank holds the whole model and gradients are all-reduced; ``fsdp``,
    FSDP2 shards every weight, gradient and optimizer state over the ranks (docs/engine.md).
    ``mixed_precision`` (fsdp only): ``bf16`` gathers the weights in bfloat16 for the forward and
    backward passes and reduces gradients in float32, while the sharded weights the optimizer
    steps on (zeroth-order steps included) stay float32 masters; ``none`` computes in the
    weights' own dtype."""

    mode: Literal["ddp", "fsdp"] = "ddp"
    mixed_precision: Literal["none", "bf16"] = "none"

    @model_validator(mode="after")
    def _mixed_precision_needs_fsdp(self) -> ParallelSettings:
        if self.mixed_precision != "none" and self.mode != "fsdp":
            raise ValueError("parallel.mixed_precision needs parallel.mode fsdp")
        return self


class UnlearnSettings(Strict):
    """One objective x one optimizer on a benchmark's forget and retain splits."""

    objective: str = "npo"
    objective_options: dict[str, Any] = Field(default_factory=dict)
    optimizer: str = "adamw"
    lr: float | None = Field(None, gt=0)  # None: the optimizer's registered default
    optimizer_options: dict[str, Any] = Field(default_factory=dict)
    steps: int = Field(60, ge=1)
    epochs: int | None = Field(None, ge=1)  # passes over the forget set; when given, it sets the step budget
    # A budget in forward-pass equivalents (forward + backward_cost · backward passes of the model,
    # the reference model's included): the run stops after the step that spends it, so each grade
    # takes as many steps as the budget buys; steps/epochs stay the upper bound. None: no budget.
    compute_budget: float | None = Field(None, gt=0)
    # What one backward pass costs in forward passes. A fixed convention (a backward is about two
    # forwards in FLOPs), not a timing: a measured cost would make the stopping step depend on the
    # machine's load, and the same seed must give the same numbers. The bench measures the real ratio.
    backward_cost: float = Field(2.0, gt=0)
    batch_size: int = Field(8, ge=1)  # forget examples per step (over all processes); the retain batch has as many
    lr_schedule: str = "constant"
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0  # a run's settings set it from the top-level seed
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints; 0 = only at the end
    eval_every: int = Field(0, ge=0)  # steps between calls of the evaluation callback; 0 = never
    forget_splits: tuple[str, ...] = ("forget_qa", "forget_text")
    retain_splits: tuple[str, ...] = ("retain_qa", "retain_text")
    max_length: int = Field(256, ge=2)
    # The format QA pairs are trained in: "plain" (Question: ... Answer: ..., what prepare trains in), or
    # the one a model we did not train is queried in (eval.prompt_template), e.g. an instruct model's
    # "chat-template": unlearning in another format than the model answers in barely reaches its answers.
    prompt_template: str = "plain"
    lora: dict[str, Any] | None = None  # LoRA adapters: fields of core.modules.LoraOptions
    # The frozen reference model of npo and idk-dpo (retain_loss nll): "cached", its log-probabilities
    # of every forget example computed once before the first step (no model copy, a forward fewer
    # per step), or "live", a frozen copy run every step. Objectives that need more of the reference
    # (a KL retain term, rmu) run it live either way. docs/engine.md, "Reference cache".
    reference: Literal["cached", "live"] = "cached"
    keep_best: str | None = None  # a metric of the evaluation: keep the weights of its best value
    keep_best_mode: Literal["min", "max"] = "min"  # which value of keep_best is best
    parallel: ParallelSettings = ParallelSettings()  # a recipe sets it at its top level (RunSettings.parallel)

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
        lora_options(value)
        return value

    @field_validator("prompt_template")
    @classmethod
    def _prompt_template(cls, value: str) -> str:
        return check_name("prompt template", value, PROMPT_TEMPLATES)

    @property
    def template(self) -> PromptTemplate:
        return PROMPT_TEMPLATES[self.prompt_template]

    @field_validator("objective")
    @classmethod
    def _objective(cls, value: str) -> str:
        return check_name("objective", value, OBJECTIVES)

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        return check_name("optimizer", value, OPTIMIZERS)

    @field_validator("lr_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        return check_name("lr_schedule", value, SCHEDULES)

    @field_validator("keep_best")
    @classmethod
    def _keep_best(cls, value: str | None) -> str | None:
        return None if value is None else check_name("keep_best metric", value, METRICS)

    def total_steps(self, forget_records: int) -> int:
        """The step budget: ``steps``, or with ``epochs`` ⌈epochs · forget_records / batch_size⌉."""
        if self.epochs is None:
            return self.steps
        return math.ceil(self.epochs * forget_records / self.batch_size)
