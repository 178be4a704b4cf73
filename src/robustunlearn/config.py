"""Typed run configuration: defaults < the shipped base recipe of the benchmark and tiny model <
YAML recipe (``--config``) < command-line flags.

Each layer owns the settings of its own step (:class:`UnlearnSettings` the engine's,
:class:`EvalSettings` the evaluation's); this module composes them into :class:`RunSettings` and
adds the study's. Every problem in a recipe or a flag becomes one
:class:`~robustunlearn.core.errors.UserError` naming the field and, for names, the accepted values.

``recipes/embedded.yaml`` holds the values tuned for the embedded benchmark and tiny model; it is
the base layer whenever a run uses them (synthetic benchmark, no ``--model`` or ``--base-model``).
``recipes/tofu-tiny.yaml`` is the base layer of a TOFU run that trains the tiny model (no
``--model`` or ``--base-model``): how to train it to memorise TOFU fast, and a study that fits.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Iterable
from importlib import resources
from itertools import product
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from robustunlearn.attacks import parse_attack
from robustunlearn.core.errors import UserError
from robustunlearn.core.models import TinyModelConfig
from robustunlearn.core.settings import Strict, check_name
from robustunlearn.data import BENCHMARKS, check_benchmark_options
from robustunlearn.data.synthetic import SyntheticConfig
from robustunlearn.metrics.presets import preset_for_benchmark
from robustunlearn.metrics.suite import FORGET_METRICS, EvalSettings
from robustunlearn.objectives import OBJECTIVES, build_objective
from robustunlearn.optim import OPTIMIZERS
from robustunlearn.train.prepare import TrainConfig
from robustunlearn.train.settings import ParallelSettings, UnlearnSettings

EMBEDDED_RECIPE = "embedded.yaml"
TOFU_TINY_RECIPE = "tofu-tiny.yaml"
CLAIMS_RECIPE = "claims.yaml"  # the `--claims` preset: the study whose report docs/results/ holds
# The default attack ladders: quantization by bit width, weight noise by scale, relearning at two
# learning rates (1e-4, and the target's own training lr, 2e-3; each a curve over steps).
DEFAULT_ATTACKS = (
    "rtn-int8",
    "rtn-int4",
    "rtn-int3",
    "rtn-int2",
    "nf4",
    "gptq-int4",
    "noise-0.03",
    "noise-0.1",
    "noise-0.3",
    "relearn-lr1e-4",
    "relearn-lr2e-3",
)


class DataSettings(Strict):
    """The embedded synthetic benchmark's generator settings (defaults: SyntheticConfig)."""

    num_people: int = Field(SyntheticConfig.num_people, ge=3)
    forget_fraction: float = Field(SyntheticConfig.forget_fraction, gt=0, lt=1)
    holdout_fraction: float = Field(SyntheticConfig.holdout_fraction, gt=0, lt=1)
    attributes: tuple[str, ...] = SyntheticConfig.attributes
    num_utility_passages: int = Field(SyntheticConfig.num_utility_passages, ge=0)
    num_utility_qa: int = Field(SyntheticConfig.num_utility_qa, ge=0)


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
    check_questions: int = Field(TrainConfig.check_questions, ge=0)
    # auto: on where the CPU multiplies bfloat16 natively (core.models.native_bf16_cpu), where it
    # halves an epoch; elsewhere torch emulates bfloat16 and an epoch takes many times longer
    bf16_autocast: bool | Literal["auto"] = TrainConfig.bf16_autocast


def _check_names(kind: str, values, accepted) -> tuple[str, ...]:
    return tuple(check_name(kind, value, accepted) for value in values)


PositiveRate = Annotated[float, Field(gt=0)]


class TunedSettings(Strict):
    """Values tuned for one benchmark and model, by name; a recipe's ``unlearn`` values win over them.
    ``recipes/embedded.yaml`` fills them for the embedded benchmark. Learning rates and optimizer
    options are tuned per objective (``{npo: {adam: 5e-4}}``): each loss has its own scale."""

    learning_rates: dict[str, dict[str, PositiveRate]] = Field(default_factory=dict)  # objective -> optimizer -> lr
    sweep_bases: dict[str, PositiveRate] = Field(default_factory=dict)  # optimizer -> the lr sweep's base
    objective_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # objective -> options
    # objective -> optimizer -> options
    optimizer_options: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)

    @field_validator("sweep_bases")
    @classmethod
    def _optimizer_keys(cls, values: dict[str, Any]) -> dict[str, Any]:
        _check_names("optimizer", values, OPTIMIZERS)
        return values

    @field_validator("objective_options")
    @classmethod
    def _objective_keys(cls, values: dict[str, Any]) -> dict[str, Any]:
        _check_names("objective", values, OBJECTIVES)
        return values

    @field_validator("learning_rates", "optimizer_options", mode="before")
    @classmethod
    def _objective_then_optimizer_keys(cls, values: Any) -> Any:
        # before the types: a recipe in the per-optimizer form fails on its names, with the form to use
        if not isinstance(values, dict):
            return values
        for objective, per_optimizer in values.items():
            if objective in OPTIMIZERS:
                raise ValueError(
                    f"keyed by objective, then optimizer ({{npo: {{{objective}: ...}}}}); {objective!r} is an optimizer"
                )
            check_name("objective", objective, OBJECTIVES)
            if isinstance(per_optimizer, dict):
                _check_names("optimizer", per_optimizer, OPTIMIZERS)
        return values


def optimizer_option_names(optimizer: str) -> list[str] | None:
    """The options ``optimizer`` takes: the keyword parameters of the class its spec builds (and of
    the base classes its ``**options`` reach), less ``params``, ``lr`` and those the spec fixes.
    None when the spec's build is not such a constructor call: the hybrids, which check their own
    options when they are built."""
    closure = inspect.getclosurevars(OPTIMIZERS[optimizer].build).nonlocals
    built, fixed = closure.get("cls"), set(closure.get("fixed") or ())
    if not isinstance(built, type):
        return None
    names: list[str] = []
    for klass in built.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        not_options = {"self", "params", "defaults", "lr", *fixed, *names}
        names += [p.name for p in parameters if p.kind in keywords and p.name not in not_options]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return names


class StudySettings(Strict):
    """The grade study's grid, its splits, matched-forgetting and matched-compute rules, and the
    attack ladders (README "The study's protocol")."""

    objectives: tuple[str, ...] = ("npo",)
    optimizers: tuple[str, ...] = ("adam", "signadam", "zo-adazo", "hybrid", "sophia-g")
    seeds: tuple[int, ...] = (0, 1)
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    # Each cell's budget in forward-pass equivalents (forwards + unlearn.backward_cost x backwards);
    # max_steps only caps the step count. None: the step budget alone.
    # The default is 10x what adam needed to reach the level in the lr sweep at its chosen lr (200 steps
    # of 4 forward-pass equivalents when NPO's reference ran every step; with the reference cache, 3:
    # NPO's forward and a backward, plus the cache's one pass over the forget set); max_steps caps the
    # step count above what the budget buys (R-AdaZO at 2 per step: 4000 steps).
    compute_budget: float | None = Field(8000.0, gt=0)
    max_steps: int = Field(4000, ge=1)
    check_every: int = Field(10, ge=1)  # steps between checks of the forget level, the same for every optimizer
    level_metric: str = "forget_qa_rouge"
    # What the matched level is measured from: the retrain reference's level metric ("retrain"; without a
    # retrain model there is no level and every cell runs to its budget), or the level metric's chance
    # level ("chance": for pretrained knowledge, which no retrain model lacks, as WMDP unlearns to chance).
    level_floor: Literal["retrain", "chance"] = "retrain"
    # For a model read from a Q4_1 GGUF file (base_model, else model_path): the quantization attacks also
    # report the share of the original file's Q4_1 codes that the unlearned and the attacked model keep.
    gguf_q4_1_codes: bool = False
    # Retain subjects split, seeded by split_seed, into the unlearning loss's regulariser, the lr
    # sweep's validation set and the reported evaluation set (data/splits.py).
    retain_shares: tuple[float, float, float] = (0.5, 0.25, 0.25)
    split_seed: int = 0
    # The relearning attacker's records: relearn_subjects forget subjects (seeded by the cell's seed),
    # on relearn_attribute_share of the attributes where records have them; scored in-set and held out.
    relearn_subjects: int | None = Field(None, ge=1)  # None: half the forget subjects (at least 1)
    relearn_attribute_share: float = Field(0.5, gt=0, lt=1)
    relearn_steps: int = Field(40, ge=1)
    relearn_lr: float = Field(1e-4, gt=0)  # the lr of the plain `relearn` attack; relearn-lr<lr> names its own
    relearn_eval_every: int = Field(10, ge=1)
    sweep_factors: tuple[float, ...] = (0.3, 1.0, 3.0)  # --lr-sweep tries base lr x each
    sweep_seeds: tuple[int, ...] = (1000,)  # the lr sweep's seeds: never the reported ones
    # Optimizer options the sweep crosses with the lr factors: optimizer -> option -> values.
    # Optimizers of the grid not named here are swept over the lr alone; names outside the grid are ignored.
    sweep_options: dict[str, dict[str, tuple[bool | int | float | str, ...]]] = Field(
        default_factory=lambda: {"hybrid": {"zo_lr": (3e-5, 1e-4, 3e-4)}, "zo-adazo": {"eps": (1e-3, 1e-2)}}
    )
    # Loss landscape per cell: sharpness of the forget loss, and linear mode connectivity from the reference
    # optimizer's model to each other one's (same objective and seed). Keeps each cell's weights on disk.
    landscape: bool = True
    lmc_points: int = Field(6, ge=2)  # points on each interpolation path, endpoints included
    # Worker processes the cells run in (core/parallel.py); None: one per CPU core, at most one per cell,
    # the cores shared out as torch threads. 1: one cell after the other in the study's own process.
    jobs: int | None = Field(None, ge=1)
    # The optimizer every other one is compared with (paired differences, claims, LMC anchors);
    # None: adam when the grid has it, else the grid's first optimizer.
    reference_optimizer: str | None = None

    @model_validator(mode="after")
    def _splits_and_seeds(self) -> StudySettings:
        if any(share <= 0 for share in self.retain_shares) or abs(sum(self.retain_shares) - 1) > 1e-9:
            raise ValueError(f"retain_shares must be three positive shares summing to 1, got {self.retain_shares}")
        reused = sorted(set(self.sweep_seeds) & set(self.seeds))
        if reused:
            raise ValueError(f"sweep_seeds must not be reported seeds (tuning on them scores what was tuned): {reused}")
        for optimizer, options in self.sweep_options.items():
            check_name("sweep_options optimizer", optimizer, OPTIMIZERS)
            accepted = optimizer_option_names(optimizer)  # None: a hybrid, which checks its own when built
            wrong = [name for name in options if accepted is not None and name not in accepted]
            if wrong:
                raise ValueError(f"sweep_options.{optimizer}: unknown option(s) {wrong}; accepted: {accepted}")
        self._one_relearning_ladder_per_lr()
        return self

    def _one_relearning_ladder_per_lr(self) -> None:
        """``relearn`` trains at ``relearn_lr``: beside ``relearn-lr<the same lr>`` it would be the
        same ladder twice (the report keys ladders by attack and lr)."""
        seen: dict[float, str] = {}
        for name in self.attacks:
            attack = parse_attack(name)
            if name == "relearn" or name.startswith("relearn-lr"):
                lr = self.relearn_lr if attack.strength is None else attack.strength
                if lr in seen:
                    raise ValueError(f"attacks {seen[lr]} and {name} both relearn at lr {lr:g}: keep one")
                seen[lr] = name

    @model_validator(mode="after")
    def _reference_in_grid(self) -> StudySettings:
        if self.reference_optimizer is not None and self.reference_optimizer not in self.optimizers:
            raise ValueError(
                f"reference_optimizer {self.reference_optimizer!r} is not in the grid; "
                f"its optimizers are {', '.join(self.optimizers)}"
            )
        return self

    @property
    def reference(self) -> str:
        """The reference optimizer of this grid."""
        if self.reference_optimizer is not None:
            return self.reference_optimizer
        return "adam" if "adam" in self.optimizers else self.optimizers[0]

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _non_empty("objectives", _check_names("objective", values, OBJECTIVES))

    @field_validator("optimizers")
    @classmethod
    def _optimizers(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _non_empty("optimizers", _check_names("optimizer", values, OPTIMIZERS))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        return _non_empty("seeds", values)

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            parse_attack(value)  # a bad name or strength fails here, before any cell trains
        return values

    @field_validator("level_metric")
    @classmethod
    def _level_metric(cls, value: str) -> str:
        return check_name("level metric", value, FORGET_METRICS)


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
    tuned: TunedSettings = TunedSettings()
    # How several processes split a run: ddp (replicas) or fsdp (sharded weights); docs/engine.md.
    parallel: ParallelSettings = ParallelSettings()

    @field_validator("benchmark")
    @classmethod
    def _benchmark(cls, value: str) -> str:
        return check_name("benchmark", value, BENCHMARKS)

    @field_validator("benchmark_options")
    @classmethod
    def _benchmark_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        benchmark = info.data.get("benchmark")
        if benchmark == "synthetic" and options:
            raise ValueError(
                f"the synthetic benchmark takes none, got {', '.join(sorted(options))} (--data-dir and --forget-split "
                "are for tofu, muse and wmdp; the synthetic benchmark's settings are the data section)"
            )
        if benchmark is not None:
            try:
                check_benchmark_options(benchmark, options)
            except TypeError as error:
                raise ValueError(f"bad option for benchmark {benchmark!r}: {error}") from None
        return options

    @model_validator(mode="after")
    def _one_seed(self) -> RunSettings:
        if "seed" in self.unlearn.model_fields_set:
            raise ValueError("unlearn.seed is set by the top-level seed; set seed instead")
        if "parallel" in self.unlearn.model_fields_set:
            raise ValueError("unlearn.parallel is set by the top-level parallel section; set parallel instead")
        if self.parallel.mixed_precision == "bf16" and self.dtype != "float32":
            raise ValueError(
                f"parallel.mixed_precision bf16 keeps float32 master weights and computes in bfloat16: load the "
                f"model with dtype float32, not {self.dtype}"
            )
        if self.study.gguf_q4_1_codes and self.original_model is None:
            raise ValueError(
                "study.gguf_q4_1_codes compares with the original GGUF model: set base_model or model_path"
            )
        return self

    @property
    def original_model(self) -> str | None:
        """The pretrained model a run starts from: ``base_model`` (fine-tuned by ``prepare``), else
        ``model_path``; None for the embedded tiny model."""
        return self.base_model or self.model_path

    @property
    def embedded(self) -> bool:
        """Whether the run uses the embedded tiny target on the synthetic benchmark."""
        return uses_embedded_model(self.benchmark, self.model_path, self.base_model)


def uses_embedded_model(benchmark: str, model_path: str | None, base_model: str | None) -> bool:
    return benchmark == "synthetic" and model_path is None and base_model is None


# The lr sweep's choices: objective -> optimizer -> {"lr": float, "options": {name: value}}
SweepChoices = dict[str, dict[str, dict[str, Any]]]


def _choice(chosen: SweepChoices | None, optimizer: str, objective: str) -> dict[str, Any]:
    return (chosen or {}).get(objective, {}).get(optimizer, {})


def learning_rate(settings: RunSettings, optimizer: str, objective: str, chosen: SweepChoices | None = None) -> float:
    """The learning rate a run of ``optimizer`` on ``objective`` uses: the settings' ``unlearn.lr``
    if given, else the sweep's choice (``chosen``), else the tuned value, else the optimizer's default."""
    if settings.unlearn.lr is not None:
        return settings.unlearn.lr
    choice = _choice(chosen, optimizer, objective)
    if "lr" in choice:
        return choice["lr"]
    tuned = settings.tuned.learning_rates.get(objective, {})
    return tuned.get(optimizer, OPTIMIZERS[optimizer].default_lr)


def sweep_base(settings: RunSettings, optimizer: str, objective: str) -> float:
    """Where the lr sweep of ``optimizer`` on ``objective`` centres: ``unlearn.lr``, else the tuned
    base, else the tuned learning rate (a recipe without bases), else the optimizer's default."""
    if settings.unlearn.lr is not None:
        return settings.unlearn.lr
    if optimizer in settings.tuned.sweep_bases:
        return settings.tuned.sweep_bases[optimizer]
    return learning_rate(settings, optimizer, objective)


def objective_options(settings: RunSettings, objective: str) -> dict[str, Any]:
    """The tuned options of ``objective`` (if any), overridden by ``unlearn.objective_options``."""
    return {**settings.tuned.objective_options.get(objective, {}), **settings.unlearn.objective_options}


def optimizer_options(
    settings: RunSettings, optimizer: str, objective: str, chosen: SweepChoices | None = None
) -> dict[str, Any]:
    """The tuned options of ``optimizer`` on ``objective`` (if any), overridden by the sweep's
    choice (``chosen``), overridden by ``unlearn.optimizer_options``."""
    return {
        **settings.tuned.optimizer_options.get(objective, {}).get(optimizer, {}),
        **_choice(chosen, optimizer, objective).get("options", {}),
        **settings.unlearn.optimizer_options,
    }


def check_training_options(settings: RunSettings, objectives: Iterable[str], optimizers: Iterable[str]) -> None:
    """``UserError`` if the objective or optimizer options a run would use (tuned, then the recipe's
    ``unlearn.objective_options`` and ``unlearn.optimizer_options``) hold an unknown option, or for
    an objective a bad value, naming it and the accepted options; checked before anything runs."""
    objectives = tuple(objectives)
    for objective in objectives:
        options = objective_options(settings, objective)
        try:
            build_objective(objective, **options)
        except ValueError as error:
            raise UserError(f"unlearn.objective_options: {error}") from None
        except TypeError as error:
            raise UserError(f"unlearn.objective_options {options} for objective {objective!r}: {error}") from None
    for optimizer, objective in product(optimizers, objectives):
        accepted = optimizer_option_names(optimizer)
        unknown = sorted(set(optimizer_options(settings, optimizer, objective)) - set(accepted or ()))
        if accepted is not None and unknown:
            raise UserError(
                f"unlearn.optimizer_options: unknown option(s) {', '.join(unknown)} for optimizer {optimizer!r}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )


def unlearn_settings(settings: RunSettings, **changes: Any) -> UnlearnSettings:
    """The engine's settings of this run: the ``unlearn`` section with the run's seed and the
    tuned learning rate and options filled in, then ``changes`` (validated again)."""
    options = settings.unlearn
    optimizer = changes.get("optimizer", options.optimizer)
    objective = changes.get("objective", options.objective)
    values = {
        "seed": settings.seed,
        "parallel": settings.parallel,
        "lr": learning_rate(settings, optimizer, objective),
        "objective_options": objective_options(settings, objective),
        "optimizer_options": optimizer_options(settings, optimizer, objective),
        **changes,
    }
    # model_copy(update=...) would skip validation: an lr or option from the sweep is checked like a recipe's.
    # Only the fields the recipe set are passed on, so the others keep deriving from them (epochs or steps).
    return UnlearnSettings.model_validate({**options.model_dump(exclude_unset=True), **values})


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


class _RecipeLoader(yaml.SafeLoader):
    """YAML for recipes: a key given twice is an error, and ``1e-4`` is a float (YAML 1.1 reads it as a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None)
        reason = f": {problem}" if problem and "duplicate key" in problem else ""
        raise UserError(f"config file {path} is not valid YAML{where}{reason}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(loaded).__name__}")
    return loaded or {}


def _non_finite(data: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in ``data``, if any."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "config"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _check_shape(data: dict[str, Any]) -> None:
    """Sections are mappings and numbers are finite, before the types are checked field by field."""
    for name, field in RunSettings.model_fields.items():
        if isinstance(field.default, BaseModel) and name in data and not isinstance(data[name], dict):
            raise ValueError(f"{name}: must be a mapping of settings, not {type(data[name]).__name__}")
    bad = _non_finite(data)
    if bad is not None:
        raise ValueError(f"{bad}: must be a finite number")


def packaged_recipe(name: str) -> Path:
    """The path of a recipe shipped in ``robustunlearn/recipes`` (e.g. CLAIMS_RECIPE)."""
    return Path(str(resources.files("robustunlearn").joinpath("recipes", name)))


def _shipped_recipe(name: str) -> dict[str, Any]:
    return yaml.load(packaged_recipe(name).read_text("utf-8"), Loader=_RecipeLoader) or {}


def embedded_recipe() -> dict[str, Any]:
    """The values tuned for the embedded benchmark and tiny model (``recipes/embedded.yaml``)."""
    return _shipped_recipe(EMBEDDED_RECIPE)


def tofu_tiny_recipe() -> dict[str, Any]:
    """How the tiny model is trained on TOFU, and the study that fits it (``recipes/tofu-tiny.yaml``)."""
    return _shipped_recipe(TOFU_TINY_RECIPE)


def base_recipe_name(benchmark: str, model_path: str | None, base_model: str | None) -> str | None:
    """The shipped recipe under a run's own settings: the tiny model's, on the synthetic benchmark
    or TOFU; none for a ``--model`` or ``--base-model`` or another benchmark."""
    if model_path is not None or base_model is not None or not isinstance(benchmark, str):
        return None
    return {"synthetic": EMBEDDED_RECIPE, "tofu": TOFU_TINY_RECIPE}.get(benchmark)


def _base_recipe(name: str | None) -> dict[str, Any]:
    return {EMBEDDED_RECIPE: embedded_recipe, TOFU_TINY_RECIPE: tofu_tiny_recipe}[name]() if name else {}


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunSettings:
    """Defaults, then the shipped base recipe (:func:`base_recipe_name`: when the run trains the tiny
    model on the embedded benchmark or TOFU), then the YAML file at ``path``, then ``overrides``
    (nested dicts; None values skipped)."""
    data = _read_yaml(Path(path)) if path is not None else {}
    overrides = _drop_none(overrides or {})
    for name, value in data.items():
        if isinstance(overrides.get(name), dict) and not isinstance(value, dict):
            raise UserError(f"config file {path}: {name}: must be a mapping of settings, not {type(value).__name__}")
    data = _deep_merge(data, overrides)
    flags = overrides.get("unlearn", {})
    for given, replaced in (("steps", "epochs"), ("epochs", "steps")):
        if given in flags and replaced not in flags:  # a budget flag replaces the recipe's other budget
            data["unlearn"].pop(replaced, None)
    base = base_recipe_name(data.get("benchmark", "synthetic"), data.get("model_path"), data.get("base_model"))
    data = _deep_merge(_base_recipe(base), data)
    source = f"config file {path}: " if path is not None else ""
    try:
        _check_shape(data)
        data = _with_benchmark_preset(data)
        # Strict JSON-mode types: `steps: true` or `steps: "3"` are errors, not 1 and 3.
        return RunSettings.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as error:
        raise UserError(source + _first_error(error)) from None
    except ValueError as error:
        raise UserError(source + str(error)) from None


def _with_benchmark_preset(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` whose ``eval`` section names its benchmark's evaluation preset, unless it names one:
    the section's other fields override that preset's, field by field."""
    section = data.get("eval", {})
    if "preset" in section:
        return data
    benchmark = data.get("benchmark", "synthetic")
    preset = preset_for_benchmark(benchmark if isinstance(benchmark, str) else "synthetic")
    return {**data, "eval": {**section, "preset": preset}}


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
