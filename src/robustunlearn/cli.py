"""The ``robustunlearn`` command line: parses, validates, calls the library.

User errors (unknown names, missing paths, bad configs, unwritable outputs, a directory another
process is using) print one line ``error: ...`` and exit with code 2, without a traceback, and
leave behind no directory the command created; a run whose loss became NaN or infinite prints one
line naming the step and exits with code 3. ``--dry-run`` stops after the checks: it prints the
validated settings as JSON and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from robustunlearn.attacks import describe_attacks
from robustunlearn.bench.common import BENCH_MODELS
from robustunlearn.bench.compare import DEFAULT_TOLERANCE, compare_runs, comparison_table, load_run, verdict_lines
from robustunlearn.bench.generation import bench_generation
from robustunlearn.bench.memory import bench_memory
from robustunlearn.bench.objectives import BENCH_OBJECTIVES, bench_objectives, check_bench_optimizers
from robustunlearn.bench.objectives import DEFAULT_OPTIMIZERS as OBJECTIVE_BENCH_OPTIMIZERS
from robustunlearn.bench.optimizers import bench_optimizers
from robustunlearn.bench.timing import TimingSettings
from robustunlearn.config import (
    CLAIMS_RECIPE,
    RunSettings,
    StudySettings,
    base_recipe_name,
    check_training_options,
    load_settings,
    packaged_recipe,
)
from robustunlearn.core.distributed import is_main_process, leave_process_group
from robustunlearn.core.errors import UserError
from robustunlearn.core.io import atomic_write_json, missing_directories, remove_empty
from robustunlearn.core.lock import directory_lock
from robustunlearn.core.models import check_model_reference
from robustunlearn.objectives import OBJECTIVES
from robustunlearn.optim import OPTIMIZERS
from robustunlearn.study.evaluation import evaluate_from_settings, evaluation_table
from robustunlearn.study.grid import check_launch
from robustunlearn.study.loading import prepare_from_settings, prepare_summary_table
from robustunlearn.study.pipeline import results_table, run_pipeline, unlearn_only
from robustunlearn.train.checkpoint import run_state
from robustunlearn.train.engine import NonFiniteLossError
from robustunlearn.train.plan import (
    EMBEDDED_MODEL,
    PlanSettings,
    fits_table,
    load_config,
    parse_memory,
    plan_memory,
    plan_table,
)
from robustunlearn.train.prepare import default_cache_dir

app = typer.Typer(
    help="Robust LLM unlearning: optimizer grades, unlearning objectives, quantization and relearning attacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold literal [default: ...] and [gguf] brackets, not rich markup
    add_completion=False,
)
console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", help="YAML recipe; flags override its values.")
CacheOption = typer.Option(
    None, "--cache-dir", help="Where prepared models are cached [default: ~/.cache/robustunlearn]."
)
SeedOption = typer.Option(None, "--seed", help="Seed for data generation, training and unlearning [default: 0].")
BenchmarkOption = typer.Option(None, "--benchmark", help="Benchmark: synthetic, tofu, muse, wmdp [default: synthetic].")
DataDirOption = typer.Option(None, "--data-dir", help="Local directory of a real benchmark's files (else: the hub).")
ForgetSplitOption = typer.Option(None, "--forget-split", help="TOFU's forget split: forget01, forget05, forget10.")
BaseModelOption = typer.Option(
    None,
    "--base-model",
    help="Fine-tune this model (dir, .gguf file or hub name) into target and retrain instead of the tiny one.",
)
DryRunOption = typer.Option(
    False,
    "--dry-run",
    help="Check the inputs, print the validated settings as JSON and stop: nothing runs or is written.",
)


def _benchmark_options(data_dir: Optional[Path], forget_split: Optional[str]) -> Optional[dict[str, Any]]:
    options = {}
    if data_dir is not None:
        if not data_dir.is_dir():
            raise UserError(f"data directory {data_dir} does not exist")
        options["data_dir"] = str(data_dir)
    if forget_split is not None:
        options["forget_split"] = forget_split
    return options or None


def _settings(config: Optional[Path], **flat: Any):
    """Turn flags into nested overrides of the recipe (``unlearn__steps`` -> ``unlearn.steps``)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition("__")
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[key] = value
    return load_settings(config, nested)


def _check_writable(path: Path, what: str = "output directory") -> None:
    """``UserError`` unless ``path`` is a writable directory or can be created as one; creates nothing."""
    existing = next(parent for parent in (path.absolute(), *path.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {path} is not writable: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable: permission denied on {existing}")


def _check_cache_dir(cache_dir: Optional[Path], settings: RunSettings) -> None:
    """The prepare cache is written when the run starts from the prepared target (no ``--model``)."""
    if settings.model_path is None:
        _check_writable(cache_dir or default_cache_dir(), "cache directory")


def _writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"output directory {path} is not writable: {error.strerror or error}") from None
    return path


@contextlib.contextmanager
def _output_dir(path: Path, *, lock: bool = True) -> Iterator[Path]:
    """Create ``path`` and hold its lock (another process using it is an error) for the ``with``
    block; after a user error, remove the directories this command created if they are empty."""
    created = missing_directories(path)
    try:
        _writable_dir(path)
        with directory_lock(path) if lock else contextlib.nullcontext():
            yield path
    except UserError:
        remove_empty(created)
        raise


def _check_models(*references: Optional[str]) -> None:
    """The models a command loads (``model_path``, ``base_model``: from a flag or the recipe) exist
    (a path) or can be fetched (a hub name)."""
    for reference in references:
        if reference is not None:
            check_model_reference(reference)


def _print_settings(settings: RunSettings) -> None:
    """What ``--dry-run`` prints: the settings a run would use, after every check passed (on stdout),
    and the shipped recipe they start from, if any (on stderr)."""
    base = base_recipe_name(settings.benchmark, settings.model_path, settings.base_model)
    if base is not None:
        console.print(f"base recipe: {packaged_recipe(base)}", highlight=False, soft_wrap=True)
    typer.echo(settings.model_dump_json(indent=2))


@app.command()
def prepare(
    config: Optional[Path] = ConfigOption,
    cache_dir: Optional[Path] = CacheOption,
    seed: Optional[int] = SeedOption,
    benchmark: Optional[str] = BenchmarkOption,
    data_dir: Optional[Path] = DataDirOption,
    forget_split: Optional[str] = ForgetSplitOption,
    base_model: Optional[str] = BaseModelOption,
    force: bool = typer.Option(False, "--force", help="Rebuild even if a complete cache entry exists."),
    dry_run: bool = DryRunOption,
) -> None:
    """Load or generate the benchmark and train the target (forget + retain) and retrain (retain only) models
    (cached)."""
    settings = _settings(
        config,
        seed=seed,
        benchmark=benchmark,
        base_model=base_model,
        benchmark_options=_benchmark_options(data_dir, forget_split),
    )
    _check_models(settings.base_model)
    _check_writable(cache_dir or default_cache_dir(), "cache directory")
    if dry_run:
        _print_settings(settings)
        return
    prepared = prepare_from_settings(settings, cache_dir, console=console, force=force)
    Console().print(prepare_summary_table(prepared))
    console.print(f"cached in {prepared.directory}")


def _names(value: Optional[str]) -> Optional[tuple[str, ...]]:
    """``"a,b"`` -> ``("a", "b")``; None stays None (the recipe or default applies)."""
    return None if value is None else tuple(part.strip() for part in value.split(",") if part.strip())


def _seeds(value: Optional[str]) -> Optional[tuple[int, ...]]:
    names = _names(value)
    if names is None:
        return None
    try:
        return tuple(int(name) for name in names)
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {value!r}") from None


ObjectivesOption = typer.Option(
    None, "--objectives", "--objective", help="Objective(s), comma-separated [default: npo]."
)
OptimizersOption = typer.Option(
    None,
    "--optimizers",
    "--optimizer",
    help="Optimizer(s), comma-separated [default: adam,signadam,zo-adazo,hybrid,sophia-g].",
)
SeedsOption = typer.Option(
    None, "--seeds", help="Seeds of the grid, comma-separated [default: 0,1; with --seed N alone: N]."
)
AttacksOption = typer.Option(
    None,
    "--attacks",
    help=f"Attack ladders, comma-separated [default: {','.join(StudySettings().attacks)}]. "
    f"Attacks: {describe_attacks()}.",
)
StepsOption = typer.Option(
    None, "--steps", help=f"Each cell's cap on unlearning steps [default: {StudySettings().max_steps}]."
)
BudgetOption = typer.Option(
    None,
    "--budget",
    help="Each cell's compute budget in forward-pass equivalents (forwards + 2 x backwards) "
    f"[default: {StudySettings().compute_budget:g}].",
)
ClaimsOption = typer.Option(
    False,
    "--claims",
    help=f"The claims preset (recipes/{CLAIMS_RECIPE}: more seeds, the full ladders); not with --config.",
)
LrOption = typer.Option(None, "--lr", help="Learning rate for every optimizer [default: each optimizer's tuned lr].")
ModelOption = typer.Option(
    None,
    "--model",
    help="Hugging Face model dir, .gguf file or hub name to unlearn instead of the embedded tiny target.",
)
JobsOption = typer.Option(
    None,
    "--jobs",
    min=1,
    help="Worker processes the cells run in [default: one per CPU core, at most one per cell, the cores "
    "shared out as torch threads]; 1: one cell after the other, in this process.",
)
ParallelOption = typer.Option(
    None,
    "--parallel",
    help="How several processes (torchrun) split the unlearning: ddp (each holds the whole model) or fsdp "
    "(FSDP2 shards weights, gradients and optimizer state) [default: ddp].",
)
SweepOption = typer.Option(
    False, "--lr-sweep", help="Choose each optimizer's lr by a small sweep at matched forgetting."
)


def _study(
    output_dir: Path,
    *,
    config: Optional[Path],
    cache_dir: Optional[Path],
    dry_run: bool,
    lr_sweep: bool = False,
    seed: Optional[int] = None,
    seeds: Optional[str] = None,
    benchmark: Optional[str] = None,
    data_dir: Optional[Path] = None,
    forget_split: Optional[str] = None,
    model: Optional[str] = None,
    base_model: Optional[str] = None,
    objectives: Optional[str] = None,
    optimizers: Optional[str] = None,
    attacks: Optional[str] = None,
    steps: Optional[int] = None,
    budget: Optional[float] = None,
    lr: Optional[float] = None,
    claims: bool = False,
    jobs: Optional[int] = None,
    parallel: Optional[str] = None,
) -> None:
    """What ``run`` and ``study`` share: validate everything, then run the grid and print its table.
    Launched in several processes (torchrun), rank 0 alone holds the directory's lock and prints."""
    if claims and config is not None:
        raise UserError("give --claims or --config, not both (--claims is the recipe recipes/claims.yaml)")
    settings = _settings(
        packaged_recipe(CLAIMS_RECIPE) if claims else config,
        benchmark=benchmark,
        seed=seed,
        model_path=model,
        unlearn__lr=lr,
        base_model=base_model,
        benchmark_options=_benchmark_options(data_dir, forget_split),
        study__objectives=_names(objectives),
        study__optimizers=_names(optimizers),
        study__seeds=_seeds(seeds) or ((seed,) if seed is not None else None),
        study__attacks=_names(attacks),
        study__max_steps=steps,
        study__compute_budget=budget,
        study__jobs=jobs,
        parallel__mode=parallel,
    )
    check_launch(settings.study, lr_sweep)
    check_training_options(settings, settings.study.objectives, settings.study.optimizers)
    _check_models(settings.model_path, settings.base_model)
    _check_writable(output_dir)
    _check_cache_dir(cache_dir, settings)
    if dry_run:
        _print_settings(settings)
        return
    with _output_dir(output_dir, lock=is_main_process()):  # the other ranks of a launch share rank 0's directory
        results = run_pipeline(settings, output_dir, cache_dir, console=console, lr_sweep=lr_sweep)
    if is_main_process():
        # Eight columns of numbers need ~110 characters; pipes and CI logs default to 80 and would truncate.
        Console(width=max(Console().width, 120)).print(results_table(results))
        console.print(f"results, report and plots in {output_dir}")
    leave_process_group()


@app.command()
def run(
    config: Optional[Path] = ConfigOption,
    benchmark: Optional[str] = BenchmarkOption,
    objectives: Optional[str] = ObjectivesOption,
    optimizers: Optional[str] = OptimizersOption,
    lr: Optional[float] = LrOption,
    steps: Optional[int] = StepsOption,
    budget: Optional[float] = BudgetOption,
    attacks: Optional[str] = AttacksOption,
    claims: bool = ClaimsOption,
    jobs: Optional[int] = JobsOption,
    parallel: Optional[str] = ParallelOption,
    model: Optional[str] = ModelOption,
    output_dir: Path = typer.Option(Path("runs/latest"), "--output-dir", help="Where results and the report go."),
    cache_dir: Optional[Path] = CacheOption,
    seed: Optional[int] = SeedOption,
    dry_run: bool = DryRunOption,
) -> None:
    """The main job: prepare, then the grade study (unlearn each optimizer to matched forgetting
    within a matched compute budget, attack it and the retrain control along ladders of quantization,
    weight noise and relearning); prints a table, writes results.json, results.jsonl,
    report.md/html and plots."""
    _study(**locals())  # every option of run is a parameter of _study


@app.command()
def study(
    output_dir: Path = typer.Option(
        ..., "--output-dir", help="Study directory (rerun to resume: finished cells are skipped)."
    ),
    config: Optional[Path] = ConfigOption,
    benchmark: Optional[str] = BenchmarkOption,
    objectives: Optional[str] = ObjectivesOption,
    optimizers: Optional[str] = OptimizersOption,
    seeds: Optional[str] = SeedsOption,
    attacks: Optional[str] = AttacksOption,
    steps: Optional[int] = StepsOption,
    budget: Optional[float] = BudgetOption,
    lr: Optional[float] = LrOption,
    lr_sweep: bool = SweepOption,
    claims: bool = ClaimsOption,
    jobs: Optional[int] = JobsOption,
    parallel: Optional[str] = ParallelOption,
    model: Optional[str] = ModelOption,
    data_dir: Optional[Path] = DataDirOption,
    forget_split: Optional[str] = ForgetSplitOption,
    base_model: Optional[str] = BaseModelOption,
    cache_dir: Optional[Path] = CacheOption,
    seed: Optional[int] = SeedOption,
    dry_run: bool = DryRunOption,
) -> None:
    """A grid of optimizers x objectives x seeds with the attack suite.

    Several processes (torchrun --nproc_per_node N -m robustunlearn.cli study ...) run each cell
    together, data parallel, with --parallel fsdp on sharded weights; rank 0 writes the files."""
    _study(**locals())  # every option of study is a parameter of _study


@app.command("unlearn")
def unlearn_command(
    config: Optional[Path] = ConfigOption,
    benchmark: Optional[str] = BenchmarkOption,
    objective: Optional[str] = typer.Option(None, "--objective", help="Unlearning objective [default: npo]."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="Optimizer grade [default: adamw]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate [default: the optimizer's]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Unlearning steps [default: 60]."),
    epochs: Optional[int] = typer.Option(
        None,
        "--epochs",
        help="Passes over the forget set; replaces --steps: ceil(epochs x forget records / batch size).",
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Forget (and retain) examples per step, over all processes [default: 8]."
    ),
    lr_schedule: Optional[str] = typer.Option(
        None, "--lr-schedule", help="constant, linear or cosine [default: constant]."
    ),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps [default: 0]."),
    checkpoint_every: Optional[int] = typer.Option(
        None, "--checkpoint-every", help="Steps between checkpoints (0: only at the end) [default: 0]."
    ),
    eval_every: Optional[int] = typer.Option(
        None, "--eval-every", help="Steps between evaluations, logged in log.jsonl (0: never) [default: 0]."
    ),
    keep_best: Optional[str] = typer.Option(
        None,
        "--keep-best",
        metavar="METRIC",
        help="Save in final/ the weights of the evaluation with the best METRIC (e.g. forget_qa_rouge); "
        "needs --eval-every.",
    ),
    keep_best_mode: Optional[str] = typer.Option(
        None, "--keep-best-mode", help="min or max: which value of --keep-best is best [default: min]."
    ),
    lora_rank: Optional[int] = typer.Option(
        None, "--lora-rank", help="Train LoRA adapters of this rank instead of all weights."
    ),
    lora_alpha: Optional[float] = typer.Option(
        None, "--lora-alpha", help="LoRA scale alpha (with --lora-rank) [default: 16]."
    ),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        help="Load the model in float32, bfloat16, float16 or auto (its saved dtype) [default: float32].",
    ),
    parallel: Optional[str] = ParallelOption,
    model: Optional[str] = typer.Option(None, "--model", help="Model to unlearn [default: the embedded tiny target]."),
    data_dir: Optional[Path] = DataDirOption,
    forget_split: Optional[str] = ForgetSplitOption,
    output_dir: Path = typer.Option(..., "--output-dir", help="Run directory: log.jsonl, checkpoints/, final/."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last checkpoint in --output-dir (an error if there is none)."
    ),
    resume_if_exists: bool = typer.Option(
        False, "--resume-if-exists", help="Continue from the last checkpoint if there is one, else start afresh."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh even if --output-dir holds a run (its files are replaced)."
    ),
    cache_dir: Optional[Path] = CacheOption,
    seed: Optional[int] = SeedOption,
    dry_run: bool = DryRunOption,
) -> None:
    """Unlearn only: leaves the final model in OUTPUT_DIR/final/ (model.safetensors, config, tokenizer, manifest).
    Several processes (torchrun --nproc_per_node N -m robustunlearn.cli unlearn ...) run it data parallel,
    with --parallel fsdp on sharded weights."""
    if steps is not None and epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    if resume + resume_if_exists + overwrite > 1:
        raise UserError("give one of --resume, --resume-if-exists and --overwrite")
    settings = _settings(
        config,
        benchmark=benchmark,
        seed=seed,
        model_path=model,
        dtype=dtype,
        benchmark_options=_benchmark_options(data_dir, forget_split),
        unlearn__objective=objective,
        unlearn__optimizer=optimizer,
        unlearn__lr=lr,
        unlearn__steps=steps,
        unlearn__epochs=epochs,
        unlearn__batch_size=batch_size,
        unlearn__lr_schedule=lr_schedule,
        unlearn__warmup_steps=warmup_steps,
        unlearn__checkpoint_every=checkpoint_every,
        unlearn__eval_every=eval_every,
        unlearn__keep_best=keep_best,
        unlearn__keep_best_mode=keep_best_mode,
        unlearn__lora={"rank": lora_rank, "alpha": lora_alpha},
        parallel__mode=parallel,
    )
    if lora_alpha is not None and "rank" not in settings.unlearn.lora:
        raise UserError("--lora-alpha needs --lora-rank (or unlearn.lora.rank in the --config recipe)")
    check_training_options(settings, [settings.unlearn.objective], [settings.unlearn.optimizer])
    _check_models(settings.model_path, settings.base_model)
    _check_writable(output_dir)
    _check_cache_dir(cache_dir, settings)
    rules = {"resume": resume, "resume_if_exists": resume_if_exists, "overwrite": overwrite}
    _resumes(output_dir, **rules)  # before the directory is created: --resume needs it to exist
    if dry_run:
        _print_settings(settings)
        return
    with _output_dir(output_dir, lock=is_main_process()):  # the other ranks of a launch share rank 0's directory
        resumes = _resumes(output_dir, **rules)  # again under the lock: another run may have changed the directory
        final_dir = unlearn_only(settings, output_dir, cache_dir, resume=resumes, overwrite=overwrite, console=console)
    if is_main_process():
        console.print(f"final model in {final_dir}")
    leave_process_group()


def _resumes(output_dir: Path, *, resume: bool, resume_if_exists: bool, overwrite: bool) -> bool:
    """Whether ``unlearn`` resumes the run in ``output_dir``: with ``--resume`` (there must be a
    checkpoint) or ``--resume-if-exists`` (if there is one). A run there that is not resumed is
    replaced only with ``--overwrite``."""
    if overwrite:
        return False
    state = run_state(output_dir)
    if (resume or resume_if_exists) and state.checkpoint_step is not None:
        return True
    if resume:
        missing = "does not exist" if not output_dir.exists() else "holds no checkpoint"
        raise UserError(
            f"--resume: {output_dir} {missing} to resume from; --resume-if-exists starts afresh when there is none"
        )
    if state.finished:
        raise UserError(f"{output_dir} holds a finished run; pass --overwrite to replace it")
    if state.checkpoint_step is not None:
        raise UserError(
            f"{output_dir} holds an unfinished run (checkpoint of step {state.checkpoint_step}): "
            "pass --resume to continue it or --overwrite to start afresh"
        )
    return False


@app.command("eval")
def eval_command(
    config: Optional[Path] = ConfigOption,
    benchmark: Optional[str] = BenchmarkOption,
    data_dir: Optional[Path] = DataDirOption,
    forget_split: Optional[str] = ForgetSplitOption,
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="Model to evaluate: Hugging Face dir, .gguf file or hub name [default: the embedded prepared target].",
    ),
    lm_eval: Optional[str] = typer.Option(
        None, "--lm-eval", help="lm-eval-harness tasks, comma-separated (e.g. wmdp_bio,mmlu); needs the lm-eval extra."
    ),
    lm_eval_include: Optional[Path] = typer.Option(
        None,
        "--lm-eval-include",
        help="Directory of extra lm-eval task YAMLs (its include_path), e.g. tasks over local files.",
    ),
    metrics: bool = typer.Option(
        True, "--metrics/--no-metrics", help="Our forget and retain metrics on the benchmark."
    ),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the results to this JSON file."),
    cache_dir: Optional[Path] = CacheOption,
    seed: Optional[int] = SeedOption,
    dry_run: bool = DryRunOption,
) -> None:
    """Evaluate a model: our forget and retain metrics on the benchmark, lm-eval-harness tasks with --lm-eval."""
    tasks = _names(lm_eval) or ()
    if lm_eval_include is not None and not tasks:
        raise UserError("--lm-eval-include needs --lm-eval TASKS")
    if not metrics and not tasks:
        raise UserError("--no-metrics leaves nothing to evaluate: add --lm-eval TASKS")
    settings = _settings(
        config,
        benchmark=benchmark,
        seed=seed,
        model_path=model,
        benchmark_options=_benchmark_options(data_dir, forget_split),
    )
    _check_models(settings.model_path, settings.base_model)
    if output is not None:
        if output.is_dir():
            raise UserError(f"--output {output} is a directory; give a file name")
        _check_writable(output.parent)
    _check_cache_dir(cache_dir, settings)
    if dry_run:
        _print_settings(settings)
        return
    report = evaluate_from_settings(
        settings, cache_dir, console=console, metrics=metrics, lm_eval_tasks=tasks, lm_eval_include=lm_eval_include
    )
    Console(width=max(Console().width, 100)).print(evaluation_table(report))
    if output is not None:
        atomic_write_json(output, report)
        console.print(f"results in {output}")


def _setups(gpus: str, parallel: str) -> list[tuple[int, str]]:
    """``(GPUs, mode)`` of each setup ``plan`` shows: every count with every mode, a single GPU once."""
    try:
        counts = tuple(int(part) for part in _names(gpus) or ())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise UserError(f"--gpus must be comma-separated positive integers, got {gpus!r}")
    modes = _names(parallel) or ("ddp",)
    return [(count, mode) for count in counts for mode in (modes if count > 1 else modes[:1])]


@app.command("plan")
def plan_command(
    model: str = typer.Option(
        EMBEDDED_MODEL,
        "--model",
        help=f"Model directory, config.json file or hub name (only its config is read); {EMBEDDED_MODEL}: the "
        "embedded tiny Llama.",
    ),
    optimizers: Optional[str] = typer.Option(
        None, "--optimizer", "--optimizers", help="Optimizer(s), comma-separated [default: every registered one]."
    ),
    objective: str = typer.Option("npo", "--objective", help="Unlearning objective."),
    gpus: str = typer.Option("1", "--gpus", help="GPUs, comma-separated for several setups, e.g. 1,4,8."),
    parallel: str = typer.Option("ddp", "--parallel", help="ddp (replicated) and/or fsdp (sharded), comma-separated."),
    gpu_memory: str = typer.Option("80GB", "--gpu-memory", help="Memory of one GPU: 80GB, 40GiB, 141 (GB)."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Train LoRA adapters of this rank."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 weights."),
    batch_size: int = typer.Option(8, "--batch-size", help="Forget (and retain) examples per step, over all GPUs."),
    max_length: int = typer.Option(256, "--max-length", help="Tokens per sequence."),
    reference: Optional[str] = typer.Option(
        None,
        "--reference",
        help="live (a frozen copy) or cached (outputs computed once: npo, idk-dpo) "
        "[default: cached where the objective allows it, else live].",
    ),
    attention: str = typer.Option("sdpa", "--attention", help="sdpa or eager attention kernel."),
    mixed_precision: Optional[str] = typer.Option(
        None,
        "--mixed-precision",
        help="bf16: the fsdp setups gather float32 shards and compute in bfloat16 (parallel.mixed_precision).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON instead of tables."),
) -> None:
    """Memory per GPU of an unlearning run for each optimizer: weights, gradients, optimizer state,
    reference, activations at the batch and length, the step's peak, and whether it fits. Reads
    the model's config only: no weights load."""
    setups = _setups(gpus, parallel)
    if mixed_precision is not None and all(mode != "fsdp" for _, mode in setups):
        raise UserError("--mixed-precision applies to sharded setups: add --parallel fsdp")
    settings = [
        PlanSettings(
            objective=objective,
            optimizers=_checked_names(optimizers, OPTIMIZERS, "optimizer") or (),
            gpus=count,
            parallel=mode,
            gpu_memory=parse_memory(gpu_memory),
            dtype=dtype,
            batch_size=batch_size,
            max_length=max_length,
            lora_rank=lora_rank,
            reference=reference,
            attention=attention,
            mixed_precision=mixed_precision if mode == "fsdp" else None,
        )
        for count, mode in setups
    ]
    config = load_config(model)
    path = Path(model)
    name = model if model == EMBEDDED_MODEL else (path.parent if path.name == "config.json" else path).name
    plans = [plan_memory(config, one, name) for one in settings]
    if as_json:
        typer.echo(json.dumps([plan.to_json() for plan in plans], indent=2))
        return
    out = Console(width=max(Console().width, 140))
    for plan in plans:
        out.print(plan_table(plan))
    if len(plans) > 1:
        out.print(fits_table(plans))


bench_app = typer.Typer(
    help="Speed and memory benchmarks (ratios measured in one run). Each row times a baseline and its "
    "candidates in turn until the median ratio holds still. --quick: optimizers sgd, adam, adamw, zo-sgd "
    "on the 1M model; objectives on the 1M model at 8x128.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


OutputJsonOption = typer.Option(
    None, "--output", "--json", help="Also write the run as JSON: environment, timing settings, rows, targets."
)
QuickOption = typer.Option(False, "--quick", help="The quick preset (a few minutes): see `robustunlearn bench --help`.")
ThreadsOption = typer.Option(
    None, "--threads", min=1, help="torch CPU threads for every row [default: torch's current count, reported]."
)
TimeBudgetOption = typer.Option(
    None,
    "--time-budget",
    min=0.0,
    help="Seconds of timed calls per row after which it stops before its median's 95% interval is within ±2% "
    "[default: 30; --quick: 10].",
)


def _bench_console() -> Console:
    """Standard output, at least 120 columns wide: the tables do not fit in fewer."""
    return Console(width=max(Console().width, 120))


def _timing(time_budget: Optional[float]) -> Optional[TimingSettings]:
    """The timing settings ``--time-budget`` asks for (None: the benchmark's default or quick preset)."""
    return None if time_budget is None else TimingSettings(budget_s=time_budget)


def _checked_names(value: Optional[str], registry: Any, what: str) -> Optional[tuple[str, ...]]:
    names = _names(value)
    for name in names or ():
        if name not in registry:
            raise UserError(f"unknown {what} {name!r}; accepted: {', '.join(sorted(registry))}")
    return names


@bench_app.command("optimizers")
def bench_optimizers_command(
    output: Optional[Path] = OutputJsonOption,
    optimizers: Optional[str] = typer.Option(
        None, "--optimizers", help="Comma-separated subset [default: all; --quick: sgd,adam,adamw,zo-sgd]."
    ),
    sizes: Optional[str] = typer.Option(
        None, "--sizes", help="Model sizes, comma-separated: 0.1M, 1M, 5M [default: 1M,5M; --quick: 1M]."
    ),
    quick: bool = QuickOption,
    threads: Optional[int] = ThreadsOption,
    time_budget: Optional[float] = TimeBudgetOption,
) -> None:
    """Step time / forward time (median and IQR of interleaved pairs), peak memory / inference peak,
    optimizer state / parameters, per optimizer; then the optimizer targets, pass or fail."""
    chosen = _checked_names(optimizers, OPTIMIZERS, "optimizer")
    if output is not None:
        _writable_dir(output.parent)
    bench_optimizers(
        sizes=_checked_names(sizes, BENCH_MODELS, "size"),
        optimizers=chosen,
        json_path=output,
        console=_bench_console(),
        timing=_timing(time_budget),
        threads=threads,
        quick=quick,
    )


@bench_app.command("objectives")
def bench_objectives_command(
    output: Optional[Path] = OutputJsonOption,
    objectives: Optional[str] = typer.Option(
        None, "--objectives", help=f"Comma-separated [default: {','.join(BENCH_OBJECTIVES)}]."
    ),
    optimizers: Optional[str] = typer.Option(
        None, "--optimizers", help=f"Comma-separated [default: {','.join(OBJECTIVE_BENCH_OPTIMIZERS)}]."
    ),
    sizes: Optional[str] = typer.Option(
        None, "--sizes", help="Model sizes, comma-separated: 0.1M, 1M, 5M [default: 1M,5M; --quick: 1M]."
    ),
    quick: bool = QuickOption,
    threads: Optional[int] = ThreadsOption,
    time_budget: Optional[float] = TimeBudgetOption,
) -> None:
    """Per objective and optimizer: an unlearning step over a plain forward+backward and over a plain
    step of the same optimizer, and the reference model's share of the step; then the objective targets."""
    chosen_objectives = _checked_names(objectives, OBJECTIVES, "objective") or BENCH_OBJECTIVES
    chosen_optimizers = _checked_names(optimizers, OPTIMIZERS, "optimizer") or OBJECTIVE_BENCH_OPTIMIZERS
    try:
        check_bench_optimizers(chosen_optimizers)
    except ValueError as error:
        raise UserError(str(error)) from None
    if output is not None:
        _writable_dir(output.parent)
    bench_objectives(
        sizes=_checked_names(sizes, BENCH_MODELS, "size"),
        objectives=chosen_objectives,
        optimizers=chosen_optimizers,
        json_path=output,
        console=_bench_console(),
        timing=_timing(time_budget),
        threads=threads,
        quick=quick,
    )


@bench_app.command("memory")
def bench_memory_command(
    sizes: Optional[str] = typer.Option(
        None, "--sizes", help="Model sizes, comma-separated: 0.1M, 1M, 5M [default: 1M,5M]."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per forward pass [default: 8]."),
    max_length: int = typer.Option(128, "--max-length", min=2, help="Tokens per sequence [default: 128]."),
) -> None:
    """robustunlearn plan's estimate against the measured peak memory of real unlearning steps on
    tiny models on the CPU (a fresh process per row): adam, signadam, sophia-g, zo-sgd with npo and
    its live reference, adam with graddiff; PASS when all are within 15%."""
    bench_memory(
        sizes=_checked_names(sizes, BENCH_MODELS, "size"),
        shapes=[(batch_size, max_length)],
        console=_bench_console(),
    )


@bench_app.command("compare")
def bench_compare_command(
    first: Path = typer.Argument(..., help="A run written by a benchmark's --output."),
    second: Path = typer.Argument(..., help="Another run of the same benchmark."),
    tolerance: float = typer.Option(
        DEFAULT_TOLERANCE, "--tolerance", min=0.0, help="Largest relative difference that agrees [default: 0.05]."
    ),
) -> None:
    """Every timed ratio of two runs side by side, largest relative difference first; PASS when
    each differs by at most --tolerance and the runs measured the same rows, else FAIL and exit code 1."""
    try:
        comparison = compare_runs(load_run(first), load_run(second), tolerance)
    except ValueError as error:
        raise UserError(str(error)) from None
    out = _bench_console()
    out.print(comparison_table(comparison))
    for line in verdict_lines(comparison):
        out.print(line, highlight=False, soft_wrap=True)
    if not comparison.agree:
        raise typer.Exit(1)


@bench_app.command("generation")
def bench_generation_command(
    prompts: int = typer.Option(64, "--prompts", min=1, help="Number of prompts."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Batch size of the batched run."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Tokens generated per prompt."),
) -> None:
    """Batched left-padded greedy generation vs one prompt at a time, and the preallocated KV cache vs
    transformers' dynamic one (speed-ups, identical outputs)."""
    bench_generation(n_prompts=prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)


def _print_error(message: str) -> None:
    """``error: message`` on one line: a line break (in a name the user gave) is shown as ``\\n``;
    escaped, as a message like "pip install 'robustunlearn[gguf]'" is not rich markup."""
    one_line = message.replace("\n", "\\n")
    console.print(f"[red]error:[/red] {escape(one_line)}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point: one-line errors with exit code 2 for user mistakes and 3 for a
    diverged run."""
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(code) comes back as its return value
    except UserError as error:
        _print_error(str(error))
        sys.exit(2)
    except NonFiniteLossError as error:
        _print_error(f"the run diverged: {error} (its last checkpoint is kept)")
        sys.exit(3)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except TyperException as error:  # typer's usage errors (bad flag, bad value, no arguments)
        if type(error).__name__ == "NoArgsIsHelpError":
            sys.exit(0)
        _print_error(error.format_message() if hasattr(error, "format_message") else str(error))
        sys.exit(getattr(error, "exit_code", 2))
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
