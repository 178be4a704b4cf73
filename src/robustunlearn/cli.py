"""The ``robustunlearn`` command line: parses, validates, calls the library.

User errors (unknown names, missing paths, bad configs, unwritable outputs) print one line
``error: ...`` and exit with code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer.exceptions import TyperException
from rich.console import Console

from robustunlearn.errors import UserError

app = typer.Typer(
    help="Robust LLM unlearning: optimizer grades, unlearning objectives, quantization and relearning attacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", help="YAML recipe; flags override its values.")
CacheOption = typer.Option(None, "--cache-dir", help="Where prepared models are cached [default: ~/.cache/robustunlearn].")
SeedOption = typer.Option(None, "--seed", help="Seed for data generation, training and unlearning [default: 0].")
BenchmarkOption = typer.Option(None, "--benchmark", help="Benchmark name [default: synthetic].")


def _settings(config: Optional[Path], **flat: Any):
    """Turn flags into nested overrides of the recipe (``unlearn__steps`` -> ``unlearn.steps``)."""
    from robustunlearn.config import load_settings

    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition("__")
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[key] = value
    return load_settings(config, nested)


def _writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, before any work starts."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"output directory {path} is not writable: {error.strerror or error}") from None
    return path


@app.command()
def prepare(
    config: Optional[Path] = ConfigOption,
    cache_dir: Optional[Path] = CacheOption,
    seed: Optional[int] = SeedOption,
    benchmark: Optional[str] = BenchmarkOption,
    force: bool = typer.Option(False, "--force", help="Rebuild even if a complete cache entry exists."),
) -> None:
    """Generate the benchmark and train the tiny target and retrain models (cached)."""
    from robustunlearn.pipeline import prepare_from_settings, prepare_summary_table

    settings = _settings(config, seed=seed, benchmark=benchmark)
    prepared = prepare_from_settings(settings, cache_dir, console=console, force=force)
    Console().print(prepare_summary_table(prepared))
    console.print(f"cached in {prepared.directory}")


@app.command()
def run(
    config: Optional[Path] = ConfigOption,
    benchmark: Optional[str] = BenchmarkOption,
    objective: Optional[str] = typer.Option(None, "--objective", help="Unlearning objective [default: npo]."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="Optimizer grade [default: adamw]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate [default: the optimizer's]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Unlearning steps [default: 60]."),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="Quantization attack [default: rtn-int4]."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Local Hugging Face model dir or hub name to unlearn instead of the embedded tiny target."
    ),
    output_dir: Path = typer.Option(Path("runs/latest"), "--output-dir", help="Where results.json and the table go."),
    cache_dir: Optional[Path] = CacheOption,
    seed: Optional[int] = SeedOption,
) -> None:
    """Prepare -> unlearn -> evaluate -> quantize -> evaluate again; print a table, write results.json."""
    from robustunlearn.models import check_model_reference
    from robustunlearn.pipeline import results_table, run_pipeline

    settings = _settings(
        config, benchmark=benchmark, seed=seed, quantization=quantization, model_path=model,
        unlearn__objective=objective, unlearn__optimizer=optimizer, unlearn__lr=lr, unlearn__steps=steps,
    )
    if model is not None:
        check_model_reference(model)
    _writable_dir(output_dir)
    results = run_pipeline(settings, output_dir, cache_dir, console=console)
    Console().print(results_table(results))
    console.print(f"results written to {output_dir / 'results.json'}")


def main() -> None:
    """Console-script entry point: one-line errors with exit code 2 for user mistakes."""
    try:
        app(standalone_mode=False)
    except UserError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except TyperException as error:  # typer's usage errors (bad flag, bad value, no arguments)
        if type(error).__name__ == "NoArgsIsHelpError":
            sys.exit(0)
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(getattr(error, "exit_code", 2))


if __name__ == "__main__":
    main()
