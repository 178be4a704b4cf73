"""``prepare``: train the embedded benchmark's tokenizer, target model and retrain reference.

* the **target** is trained on forget + retain (+ utility text): the model to unlearn;
* the **retrain** reference is trained on retain (+ utility text) only: what perfect
  unlearning would give, the gold standard the metrics compare against.

Each trains until it answers ``target_accuracy`` of its training questions correctly (teacher
forced: every answer token is the argmax, which is exactly when greedy decoding reproduces the
answer) or ``max_epochs`` run out. Results are cached under a key that hashes everything they
depend on; a cache entry is complete only once its ``sha256.json`` exists (written last) and
matches ``benchmark.json`` and ``prepared.json``, and both models' files match the SHA-256 in
their manifests; an entry that fails any check is rebuilt. One process builds an entry at a time
(a lock next to it): another that needs it waits, then reuses it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from robustunlearn import __version__
from robustunlearn.core.batching import TokenBatch
from robustunlearn.core.io import atomic_write_json, missing_directories, remove_empty
from robustunlearn.core.lock import directory_lock
from robustunlearn.core.models import (
    DTYPES,
    TinyModelConfig,
    build_tiny_model,
    count_parameters,
    file_sha256,
    load_model,
    save_model,
    train_tokenizer,
    verify_model_dir,
)
from robustunlearn.core.parallel import plan_workers, worker_pool
from robustunlearn.core.scoring import scatter_rows, scored_logits
from robustunlearn.data import load_benchmark
from robustunlearn.data.base import QA, Benchmark, Record
from robustunlearn.data.collate import encode_example, pad_examples, prompt_and_completion
from robustunlearn.data.synthetic import GENERATOR_VERSION, SyntheticConfig

PREPARE_VERSION = "1"  # bump when training changes in a way the cache key does not capture
PREPARED = "prepared.json"
BENCHMARK = "benchmark.json"
# The models prepare trains, and the roles of the benchmark each trains and is checked on.
TRAINED = {"target": ("forget", "retain"), "retrain": ("retain",)}
KEYLESS_WHEN_OFF = ("bf16_autocast", "check_questions")  # TrainConfig options added after entries existed
CHECKSUMS = "sha256.json"  # the SHA-256 of BENCHMARK and PREPARED; written last, it marks the entry complete


@dataclass(frozen=True)
class TrainConfig:
    """How the tiny models are trained from scratch (AdamW, warm-up then cosine decay)."""

    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_tokens: int = 256  # examples of similar length are grouped into batches of about this many tokens
    max_epochs: int = 30
    warmup_fraction: float = 0.03
    min_lr_fraction: float = 0.1
    target_accuracy: float = 0.95
    check_every_epochs: int = 3
    # The stopping checks score a seeded sample of this many questions of each trained role (a
    # smaller role whole); 0 scores them all. The accuracies saved with the model are always on all.
    check_questions: int = 0
    max_length: int = 256
    # Matrix products in bfloat16 under torch.autocast, in training and in the stopping checks (whose
    # float32 forward cost 3/4 of a bf16 training epoch on TOFU); weights, AdamW state and the reported
    # accuracies stay float32. About twice as fast on CPUs with AVX512-BF16 or AMX and on GPUs.
    bf16_autocast: bool = False
    seed: int = 0


@dataclass(frozen=True)
class PrepareConfig:
    """What to prepare. ``benchmark`` other than ``synthetic`` is loaded with ``benchmark_options``
    (e.g. TOFU's ``data_dir`` and ``forget_split``); ``base_model`` (a local directory or hub name)
    is fine-tuned instead of training the tiny model and a tokenizer from scratch."""

    data: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: str = "synthetic"
    benchmark_options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs, hashable
    base_model: str | None = None
    dtype: str = "float32"  # what base_model loads and is fine-tuned in (a key of models.DTYPES)

    def load_benchmark(self) -> Benchmark:
        if self.benchmark == "synthetic":
            return load_benchmark("synthetic", **asdict(self.data))
        return load_benchmark(self.benchmark, **dict(self.benchmark_options))

    def key(self) -> str:
        payload = {
            "generator_version": GENERATOR_VERSION,
            "prepare_version": PREPARE_VERSION,
            "benchmark": self.benchmark,
            "data": asdict(self.data) if self.benchmark == "synthetic" else dict(self.benchmark_options),
            "model": {"base_model": self.base_model, "dtype": self.dtype} if self.base_model else asdict(self.model),
            # bf16_autocast off and check_questions 0 are left out: entries prepared before these
            # options existed keep their key
            "train": {k: v for k, v in asdict(self.train).items() if k not in KEYLESS_WHEN_OFF or v},
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Prepared:
    """A prepared benchmark: paths to the benchmark JSON and the two saved models."""

    directory: Path
    benchmark: Benchmark
    target_dir: Path
    retrain_dir: Path
    report: dict[str, Any]


def default_cache_dir() -> Path:
    root = os.environ.get("ROBUSTUNLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "robustunlearn"
    )
    return Path(root)


def training_records(benchmark: Benchmark, roles: Sequence[str]) -> list[Record]:
    records: list[Record] = []
    for role in roles:
        records += benchmark.get(f"{role}_text") + benchmark.get(f"{role}_qa")
    return records + benchmark.get("utility_text") + benchmark.get("utility_qa")


def make_batches(tokenizer, records: Sequence[Record], batch_tokens: int, max_length: int) -> list[TokenBatch]:
    """Group examples of similar length into batches of about ``batch_tokens`` tokens (less padding)."""
    encoded = sorted(
        (encode_example(tokenizer, *prompt_and_completion(r), max_length) for r in records),
        key=lambda example: len(example[0]),
    )
    batches, current = [], []
    for example in encoded:
        if current and len(example[0]) * (len(current) + 1) > batch_tokens:
            batches.append(pad_examples(current, tokenizer.pad_token_id))
            current = []
        current.append(example)
    if current:
        batches.append(pad_examples(current, tokenizer.pad_token_id))
    return batches


@torch.no_grad()
def teacher_forced_accuracy(model, batches: Sequence[TokenBatch]) -> float:
    """Fraction of examples whose every scored token (eos excluded) is the model's argmax.

    For a QA example this is exactly "greedy decoding reproduces the answer"."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        logits, targets, scored = scored_logits(model, batch)
        hits = scatter_rows(logits.argmax(-1) == targets, scored, fill=True)
        last = scored.long().cumsum(-1).argmax(-1)  # the eos position
        hits[torch.arange(len(hits)), last] = True
        correct += hits.all(-1).sum().item()
        total += len(hits)
    model.train(was_training)
    return correct / max(total, 1)


def stopping_check_questions(benchmark: Benchmark, roles: Sequence[str], config: TrainConfig) -> list[QA]:
    """The questions the stopping checks score: every QA of each role in ``roles``, or a sample of
    ``config.check_questions`` of each larger role, drawn with ``config.seed``."""
    rng = random.Random(config.seed)
    questions: list[QA] = []
    for role in roles:
        role_questions = list(benchmark.require(f"{role}_qa"))
        if 0 < config.check_questions < len(role_questions):
            role_questions = rng.sample(role_questions, config.check_questions)
        questions += role_questions
    return questions


def train_lm(
    model,
    tokenizer,
    records: Sequence[Record],
    eval_questions: Sequence[QA],
    config: TrainConfig,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``records`` until it answers ``config.target_accuracy`` of
    ``eval_questions`` (teacher forced) or ``config.max_epochs`` run out."""
    batches = make_batches(tokenizer, records, config.batch_tokens, config.max_length)
    eval_batches = make_batches(tokenizer, eval_questions, 8 * config.batch_tokens, config.max_length)
    order_rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.max_epochs * len(batches)
    warmup = max(1, int(config.warmup_fraction * total_steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return config.min_lr_fraction + (1 - config.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    accuracy, epoch, start = 0.0, 0, time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        order = list(range(len(batches)))
        order_rng.shuffle(order)
        epoch_loss = 0.0
        for index in order:
            batch = batches[index]
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.bf16_autocast):
                logits, targets, _ = scored_logits(model, batch)
                loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item()
        checked = epoch % config.check_every_epochs == 0 or epoch == config.max_epochs
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.bf16_autocast):
            accuracy_now = teacher_forced_accuracy(model, eval_batches) if checked else None
        if on_epoch:
            on_epoch(epoch, epoch_loss / len(batches), accuracy_now)
        if accuracy_now is not None:
            accuracy = accuracy_now
            if accuracy >= config.target_accuracy:
                break
    model.eval()
    return {
        "epochs": epoch,
        "steps": epoch * len(batches),
        "seconds": round(time.perf_counter() - start, 1),
        "train_accuracy_teacher_forced": accuracy,
        "checked_questions": len(eval_questions),
    }


@dataclass
class EpochClock:
    """Times training epochs and estimates the time left were training to run all ``max_epochs``
    (it stops earlier when a check reaches the target accuracy, so the estimate is an upper bound)."""

    max_epochs: int
    clock: Callable[[], float] = time.perf_counter
    started: float = field(init=False)
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.last = self.clock()

    def lap(self, epoch: int) -> tuple[float, float]:
        """The seconds of the epoch that just ended (its accuracy check included) and the seconds
        left at the mean epoch time so far."""
        now = self.clock()
        seconds, self.last = now - self.last, now
        return seconds, (now - self.started) / epoch * (self.max_epochs - epoch)


def format_duration(seconds: float) -> str:
    """``45 s`` under a minute, ``4 min`` under an hour (rounded), ``1 h 05 min`` beyond."""
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def epoch_line(
    name: str,
    epoch: int,
    max_epochs: int,
    seconds: float,
    loss: float,
    accuracy: float | None,
    left: float,
    checked: int | None = None,
) -> str:
    """One line per training epoch: ``target: epoch 7/30 12.3 s, loss 0.412, QA accuracy 81.2% of
    440, ETA 4 min`` (the accuracy on check epochs only, over the ``checked`` questions when given:
    a check may score a sample, ``train.check_questions``; no ETA after the last epoch)."""
    line = f"{name}: epoch {epoch}/{max_epochs} {seconds:.1f} s, loss {loss:.3f}"
    if accuracy is not None:
        line += f", QA accuracy {accuracy:.1%}" + ("" if checked is None else f" of {checked}")
    return line + (f", ETA {format_duration(left)}" if epoch < max_epochs else "")


def _checksums(directory: Path) -> dict[str, str]:
    return {name: file_sha256(directory / name) for name in (BENCHMARK, PREPARED)}


def _cache_entry_complete(directory: Path) -> bool:
    try:
        recorded = json.loads((directory / CHECKSUMS).read_text(encoding="utf-8"))
        if recorded != _checksums(directory):
            return False
        verify_model_dir(directory / "target")
        verify_model_dir(directory / "retrain")
    except (ValueError, OSError):  # missing, not JSON, or not what was written
        return False
    return True


def _cached(directory: Path) -> Prepared:
    report = json.loads((directory / PREPARED).read_text(encoding="utf-8"))
    return Prepared(
        directory, Benchmark.load(directory / BENCHMARK), directory / "target", directory / "retrain", report
    )


def prepare(
    config: PrepareConfig = PrepareConfig(),
    cache_dir: str | Path | None = None,
    console=None,
    force: bool = False,
    jobs: int | None = None,
) -> Prepared:
    """Build (or load from cache) the benchmark, tokenizer, target and retrain models.

    The two models train in two worker processes when there are two cores or more (``jobs`` as in
    :func:`~robustunlearn.core.parallel.plan_workers`; 1: one after the other in this process).

    While another process builds the same entry, wait for it, then reuse what it built. A build
    that fails removes its incomplete entry and the cache folders it created."""
    console = console or Console(stderr=True)
    entries = Path(cache_dir or default_cache_dir()) / "prepared"
    directory = entries / config.key()
    created = missing_directories(entries)
    entries.mkdir(parents=True, exist_ok=True)

    def waiting(pid: int | None) -> None:
        holder = f"process {pid}" if pid else "another process"
        console.print(f"waiting for {holder}, which is preparing {directory}", highlight=False, soft_wrap=True)

    try:
        with directory_lock(directory, lock_file=entries / f"{directory.name}.lock", wait=True, on_wait=waiting):
            if not force and _cache_entry_complete(directory):
                return _cached(directory)
            if directory.exists():
                console.print(f"[yellow]rebuilding incomplete or corrupted cache entry {directory}[/yellow]")
                shutil.rmtree(directory)
            directory.mkdir()
            try:
                return _build(config, directory, console, jobs)
            except BaseException:  # an incomplete entry is never reused: remove it
                shutil.rmtree(directory, ignore_errors=True)
                raise
    except BaseException:
        remove_empty(created)
        raise


def _build(config: PrepareConfig, directory: Path, console, jobs: int | None) -> Prepared:
    benchmark = config.load_benchmark()
    benchmark.save(directory / BENCHMARK)
    tokenizer = base_model = None
    if config.base_model is None:
        all_records = training_records(benchmark, ("forget", "retain", "holdout"))
        tokenizer = train_tokenizer(
            (prompt + completion for prompt, completion in map(prompt_and_completion, all_records)),
            config.model.vocab_size,
        )
    report: dict[str, Any] = {"key": config.key(), "version": __version__, "config": asdict(config)}
    workers, threads = plan_workers(jobs, len(TRAINED))
    if workers > 1:
        # Target and retrain are independent: each in its own process, on its own cores.
        with worker_pool(workers, torch.set_num_threads, (threads,)) as pool:
            futures = {
                name: pool.submit(_train_one, config, benchmark, tokenizer, None, name, directory) for name in TRAINED
            }
            report.update({name: future.result() for name, future in futures.items()})
    else:
        if config.base_model is not None:
            # Loaded once (a GGUF file takes about a minute to read on two cores); each model fine-tunes a copy.
            base_model, tokenizer = load_model(config.base_model, dtype=DTYPES[config.dtype])
        for name in TRAINED:
            report[name] = _train_one(config, benchmark, tokenizer, base_model, name, directory, console)
    report["workers"], report["threads"] = workers, threads if workers > 1 else torch.get_num_threads()
    atomic_write_json(directory / PREPARED, report)
    atomic_write_json(directory / CHECKSUMS, _checksums(directory))
    return Prepared(directory, benchmark, directory / "target", directory / "retrain", report)


def _train_one(
    config: PrepareConfig, benchmark: Benchmark, tokenizer, base_model, name: str, directory: Path, console=None
) -> dict[str, Any]:
    """Train the ``name`` model (``target`` or ``retrain``), save it under ``directory / name`` and
    return its statistics. In a worker process (no ``console``) it prints a line per epoch and
    loads the base model itself; in this process it also draws a progress bar."""
    if config.base_model is None:
        model = build_tiny_model(config.model, tokenizer, seed=config.train.seed)
    elif base_model is None:
        model, tokenizer = load_model(config.base_model, dtype=DTYPES[config.dtype])
    else:
        model = copy.deepcopy(base_model)
    roles = TRAINED[name]
    questions = stopping_check_questions(benchmark, roles, config.train)
    with _epoch_display(name, config.train.max_epochs, len(questions), console) as on_epoch:
        stats = train_lm(model, tokenizer, training_records(benchmark, roles), questions, config.train, on_epoch)
    stats["parameters"] = count_parameters(model)
    stats["trained_on"] = list(roles) + ["utility"]
    eval_batches = {
        role: make_batches(
            tokenizer, benchmark.get(f"{role}_qa"), 8 * config.train.batch_tokens, config.train.max_length
        )
        for role in ("forget", "retain", "holdout")
        if benchmark.get(f"{role}_qa")
    }
    stats["qa_accuracy_teacher_forced"] = {
        role: teacher_forced_accuracy(model, batches) for role, batches in eval_batches.items()
    }
    save_model(model, tokenizer, directory / name, {"kind": name, "benchmark": benchmark.name, **stats})
    return stats


@contextmanager
def _epoch_display(
    name: str, max_epochs: int, checked: int, console
) -> Iterator[Callable[[int, float, float | None], None]]:
    """An ``on_epoch`` callback printing one line per epoch (with the accuracy over the ``checked``
    questions), under a progress bar when ``console`` is given (a worker process draws no bar: two
    bars from two processes would overwrite each other)."""
    epoch_clock = EpochClock(max_epochs)
    printer = console or Console(stderr=True)
    with Progress(
        TextColumn(f"training {name:<7}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}  loss {task.fields[loss]:.3f}  acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        console=printer,
        disable=console is None,
    ) as progress:
        task = progress.add_task(name, total=max_epochs, loss=float("nan"), acc="-")

        def on_epoch(epoch: int, loss: float, accuracy: float | None) -> None:
            fields = {"loss": loss} if accuracy is None else {"loss": loss, "acc": f"{accuracy:.2%}"}
            progress.update(task, completed=epoch, **fields)
            seconds, left = epoch_clock.lap(epoch)
            printer.print(
                epoch_line(name, epoch, max_epochs, seconds, loss, accuracy, left, checked),
                highlight=False,
                soft_wrap=True,
            )

        yield on_epoch


def load_prepared_model(prepared: Prepared, which: str = "target"):
    return load_model(prepared.target_dir if which == "target" else prepared.retrain_dir)
