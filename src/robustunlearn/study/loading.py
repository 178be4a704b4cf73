"""What a run starts from: the prepared target and retrain models of the embedded or a real
benchmark (cached by :mod:`robustunlearn.train.prepare`), or the user's own model."""

from __future__ import annotations

import torch
from rich.table import Table

from robustunlearn.config import RunSettings
from robustunlearn.core.models import DTYPES, TinyModelConfig, load_model, native_bf16_cpu
from robustunlearn.data.synthetic import SyntheticConfig
from robustunlearn.train.prepare import PrepareConfig, Prepared, TrainConfig, prepare


def prepare_config(settings: RunSettings) -> PrepareConfig:
    """What ``settings`` prepare; ``train.bf16_autocast: auto`` resolved on this machine (the cache
    key holds the arithmetic the models were trained in)."""
    train = settings.train.model_dump()
    if train["bf16_autocast"] == "auto":
        train["bf16_autocast"] = native_bf16_cpu()
    return PrepareConfig(
        data=SyntheticConfig(seed=settings.seed, **settings.data.model_dump()),
        model=TinyModelConfig(**settings.model.model_dump()),
        train=TrainConfig(seed=settings.seed, **train),
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
            name,
            f"{stats['parameters']:,}",
            str(stats["epochs"]),
            f"{stats['seconds']:.0f}",
            # a benchmark without a split (TOFU has no holdout) shows "-"
            *(f"{accuracy[role]:.1%}" if role in accuracy else "-" for role in ("forget", "retain", "holdout")),
        )
    table.caption = "QA: share of questions whose answer greedy decoding reproduces"
    return table


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
