"""Memory per GPU of an unlearning run, from the model's config alone (``robustunlearn plan``).

The model is built on torch's ``meta`` device (shapes, no storage), so parameter counts are
exact and no weight is read. For one objective and each optimizer, the bytes per GPU of:

* weights: every parameter in ``dtype``; LoRA adapters in float32 (peft keeps them so);
* gradients and optimizer state: the trainable parameters (all of them, the objective's subset
  such as RMU's ``down_proj`` weights, or LoRA's adapters) times the optimizer's declared
  :class:`~robustunlearn.optim.spec.OptimizerMemory`; zeroth-order grades hold no gradients;
* reference: the start values of the trained weights, which the engine swaps in for a reference
  pass (``live``: a copy of all weights under full fine-tuning, of RMU's few), nothing when
  its per-example outputs are computed once and cached (``cached``: a few floats per forget
  example) or under LoRA (the adapter switched off is the reference);
* activations: what one step's forward passes keep for backward (:func:`activation_bytes`).

``total`` is the step's peak, the largest of three moments: the start of backward (every pass's
activations and the loss's transient gradients), the start of the last pass's backward when there
are several (the other passes' gradients are then complete: autograd finishes the newest pass
first), and the update (gradients, the optimizer's temporaries; activations freed). So it can be
below the sum of the columns. Parallelism: ``ddp`` replicates everything on every GPU (the
engine's data parallelism; the global batch is split over the GPUs); ``fsdp`` shards weights,
gradients, state and the reference over the GPUs and gathers the modules outside the blocks and
two blocks (the current and the prefetched one) at a time, whose gradients are also held whole
until reduced. Mixed precision (``mixed_precision`` bf16, fsdp on several GPUs, float32 weights):
the shards, their gradients, the optimizer state and a live reference stay float32, while the
gathered modules, their gradients and the activations are bfloat16, and the block being reduced
gets a float32 copy of its gradients (FSDP2's reduce dtype). Not counted: the CUDA context and
allocator fragmentation (leave a margin of a few GB), communication buffers beyond the engine's
all-reduce bucket.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.table import Table
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from robustunlearn.core.distributed import BUCKET_ELEMENTS
from robustunlearn.core.errors import UserError, first_line
from robustunlearn.core.models import TinyModelConfig, check_hub_model
from robustunlearn.core.modules import LLAMA_LINEAR_NAMES, decoder_blocks
from robustunlearn.objectives import OBJECTIVES, build_objective
from robustunlearn.optim import OPTIMIZERS, OptimizerMemory

EMBEDDED_MODEL = "embedded"  # --model's name for the embedded tiny Llama (core.models.TinyModelConfig)
PARALLEL_MODES = ("ddp", "fsdp")
REFERENCES = ("live", "cached")
ATTENTION = ("sdpa", "eager")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
MIXED_PRECISION = ("bf16",)
LORA_BYTES = 4  # adapters stay float32 on a bfloat16 base (peft's autocast_adapter_dtype)
FP32 = 4
_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(text: str) -> int:
    """Bytes in ``"80GB"``, ``"80 GiB"``, ``"141"`` (GB = 10⁹ bytes, GiB = 2³⁰; a bare number is GB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit is not None and unit not in _UNITS:
        unit = {"g": "gb", "m": "mb", "t": "tb", "k": "kb"}.get(unit)
    if match is None or unit is None or float(match.group(1)) <= 0:
        raise UserError(f"--gpu-memory {text!r} is not a memory size; give e.g. 80GB, 40GiB or 141")
    return int(float(match.group(1)) * _UNITS[unit])


def load_config(name_or_path: str) -> PretrainedConfig:
    """The config of ``name_or_path``: ``embedded`` (the embedded tiny Llama), a model directory, a
    ``config.json`` file or a hub name (fetched, or read from the Hugging Face cache; offline and
    not cached, a one-line ``UserError`` at once)."""
    if name_or_path == EMBEDDED_MODEL:
        return TinyModelConfig().llama_config()
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"model directory {path} has no config.json")
    if path.exists():  # transformers reads a directory's config.json or the JSON file itself
        return _config_from(path, lambda: AutoConfig.from_pretrained(str(path)))
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise UserError(f"model path {name_or_path} does not exist")
    check_hub_model(name_or_path)
    return _config_from(name_or_path, lambda: AutoConfig.from_pretrained(name_or_path))


def _config_from(source: Any, read) -> PretrainedConfig:
    try:
        return read()
    except Exception as error:  # a bad file fails in json, transformers or the hub client, each its own way
        raise UserError(f"cannot read the config of {str(source)!r}: {first_line(error)}") from None


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal LM of ``config`` on the meta device: every parameter's shape, no storage."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise UserError(f"cannot build a causal LM from this config: {first_line(error)}") from None


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from one model under one objective and LoRA rank."""

    parameters: int  # distinct parameters (tied embeddings once)
    trainable: int  # what the optimizer updates
    largest_trainable: int  # elements of the largest trainable tensor
    block: int  # parameters of the largest transformer block
    outside_blocks: int  # embeddings, final norm, output head
    trainable_block: int  # trainable parameters of the largest block
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab: int
    graph_layers: int  # blocks a pass keeps activations of for backward: from the first trained to the last run
    logits: bool  # whether the loss reads the output distribution
    forward_passes: int
    reference_needed: bool
    reference_cacheable: bool  # the objective reads only per-example log-likelihoods (the engine's cache)


def model_shape(config: PretrainedConfig, objective: str, lora_rank: int | None) -> ModelShape:
    """``config``'s model as ``objective`` trains it (its parameters, or LoRA adapters of ``lora_rank``)."""
    model = meta_model(config)
    built = build_objective(objective, model=model)
    chosen = built.trainable_parameters(model)
    trainable_ids = {id(p) for p in (chosen if chosen is not None else model.parameters())}
    blocks = decoder_blocks(model)
    if lora_rank is None:
        sizes = [p.numel() for p in model.parameters() if id(p) in trainable_ids]
        per_block = [sum(p.numel() for p in b.parameters() if id(p) in trainable_ids) for b in blocks]
    else:
        sizes = _lora_sizes(model, trainable_ids, lora_rank)
        per_block = [sum(_lora_sizes(b, trainable_ids, lora_rank)) for b in blocks]
    if not sizes:
        raise UserError(f"objective {objective} with LoRA targets {', '.join(LLAMA_LINEAR_NAMES)} trains nothing")
    # a pass keeps activations from the first trained weight on (the embeddings, or a block) to
    # the last block it runs (RMU stops at its layer)
    trained_blocks = [i for i, n in enumerate(per_block) if n]
    embeddings_train = any(id(p) in trainable_ids for p in model.get_input_embeddings().parameters())
    first_trained = 0 if embeddings_train or not trained_blocks else trained_blocks[0]
    forward_layers = getattr(built, "layer", len(blocks) - 1) + 1 if built.loss_on == "activations" else len(blocks)
    parameters = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    heads = config.num_attention_heads
    return ModelShape(
        parameters=parameters,
        trainable=sum(sizes),
        largest_trainable=max(sizes),
        block=block,
        outside_blocks=parameters - sum(p.numel() for p in blocks.parameters()),
        trainable_block=max(per_block),
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        heads=heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        graph_layers=max(forward_layers - first_trained, 0),
        logits=built.loss_on == "outputs",
        forward_passes=built.forward_passes,
        reference_needed=built.needs_reference,
        reference_cacheable=built.sequence_reference,
    )


def _lora_sizes(module: nn.Module, trainable_ids: set[int], rank: int) -> list[int]:
    """Elements of the LoRA adapters (A: rank x in, B: out x rank) on the default target linears
    whose weight the objective trains."""
    sizes = []
    for name, linear in module.named_modules():
        if isinstance(linear, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_LINEAR_NAMES:
            if id(linear.weight) in trainable_ids:
                sizes += [rank * linear.in_features, linear.out_features * rank]
    return sizes


@dataclass(frozen=True)
class PlanSettings:
    """One run's settings as far as memory goes."""

    objective: str = "npo"
    optimizers: tuple[str, ...] = ()  # empty: every registered optimizer
    gpus: int = 1
    parallel: str = "ddp"
    gpu_memory: int = 80 * 10**9
    dtype: str = "float32"
    batch_size: int = 8  # global, over all GPUs, forget examples (and as many retain ones) per step
    max_length: int = 256
    lora_rank: int | None = None
    reference: str | None = None  # None: cached where the objective allows it, else live
    attention: str = "sdpa"
    mixed_precision: str | None = None  # bf16: FSDP2 gathers and computes in bfloat16 (module docstring)

    def __post_init__(self) -> None:
        checks = {
            "objective": (self.objective, OBJECTIVES),
            "parallel mode": (self.parallel, PARALLEL_MODES),
            "dtype": (self.dtype, DTYPE_BYTES),
            "attention": (self.attention, ATTENTION),
            "reference": (self.reference, (None, *REFERENCES)),
            "mixed precision": (self.mixed_precision, (None, *MIXED_PRECISION)),
            **{"optimizer": (name, OPTIMIZERS) for name in self.optimizers if name not in OPTIMIZERS},
        }
        for what, (value, accepted) in checks.items():
            if value not in accepted:
                names = ", ".join(str(a) for a in accepted if a is not None)
                raise UserError(f"unknown {what} {value!r}; accepted: {names}")
        for what, value in (("gpus", self.gpus), ("batch size", self.batch_size), ("max length", self.max_length)):
            if value < 1:
                raise UserError(f"{what} must be a positive integer, got {value}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise UserError(f"lora rank must be a positive integer, got {self.lora_rank}")
        if self.mixed_precision is not None and (self.parallel != "fsdp" or self.dtype != "float32"):
            raise UserError(
                "mixed precision bf16 gathers float32 FSDP shards in bfloat16: it needs --parallel fsdp and "
                f"--dtype float32, got {self.parallel} and {self.dtype}"
            )
        if self.batch_size % self.gpus:
            raise UserError(
                f"batch size {self.batch_size} (the global batch) must be a multiple of the {self.gpus} GPUs"
            )


@dataclass(frozen=True)
class GradePlan:
    """Bytes per GPU of one optimizer's run."""

    optimizer: str
    grade: str
    weights: int
    gradients: int
    state: int
    reference: int
    activations: int
    total: int
    fits: bool


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    parameters: int
    trainable: int
    reference: str  # live, cached, adapter-off (LoRA) or none
    settings: PlanSettings
    rows: list[GradePlan] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def reference_kind(shape: ModelShape, settings: PlanSettings, objective: str) -> str:
    """How the run holds its reference: ``live`` (a frozen copy), ``cached``, ``adapter-off``
    (LoRA: no copy) or ``none``; a choice the objective cannot take is a ``UserError``."""
    if not shape.reference_needed:
        if settings.reference is not None:
            raise UserError(f"objective {objective} uses no reference model; leave --reference out")
        return "none"
    if settings.reference == "cached" and not shape.reference_cacheable:
        accepted = ", ".join(name for name, cls in OBJECTIVES.items() if cls().sequence_reference)
        raise UserError(f"objective {objective}'s reference outputs cannot be cached; accepted for: {accepted}")
    chosen = settings.reference or ("cached" if shape.reference_cacheable else "live")
    return "adapter-off" if chosen == "live" and settings.lora_rank is not None else chosen


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, attention: str, max_length: int) -> int:
    """Bytes one forward pass of ``tokens`` tokens keeps for backward, counted from the tensors
    autograd saves in a Hugging Face Llama block (RMSNorm in float32, rotary q/k, SDPA, SwiGLU);
    other decoder blocks are estimated as Llama blocks of their sizes. Per token and block:

    * each of the 2 RMSNorms: its float32 input (4h), normalized and scaled outputs (2·e·h);
    * attention: q, k, v (k and v repeated to all heads when grouped: padded batches carry a mask,
      with which transformers repeats them) and the output ``o_proj`` reads, 4·e·n·d; with
      ``sdpa`` (a memory-efficient kernel) its log-sum-exp, 4·n; with ``eager`` the float32
      softmax, 4·n·s (plus a copy in e when e < 4);
    * the SwiGLU MLP: gate, its SiLU, up and their product, 4·e·i;

    with e the dtype's bytes, n heads of d dimensions, s = ``max_length``. After the blocks, the
    final norm and the float32 log-softmax over the vocabulary (4·V) that the loss keeps. (Korthikanti
    et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", count GPT blocks
    the same way: 34·s·b·h bytes per block in 16-bit with flash attention.)"""
    h, e, heads_width = shape.hidden, dtype_bytes, shape.heads * shape.head_dim
    norm = FP32 * h + 2 * e * h
    if attention == "sdpa":
        attn = 4 * e * heads_width + FP32 * shape.heads
    else:
        attn = 4 * e * heads_width + shape.heads * max_length * (FP32 + (e if e < FP32 else 0))
    block = 2 * norm + attn + 4 * e * shape.intermediate
    head = norm + FP32 * shape.vocab if shape.logits else 0
    return tokens * (shape.graph_layers * block + head)


def forward_only_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """Peak bytes of a forward pass without autograd (a zeroth-order loss): the larger of one
    block's MLP stage (residual, norm output, SiLU, up, product: e·(2h + 3i) per token) and the
    loss stage, on top of the hidden states. The loss holds two float32 tensors of V per token:
    the logits (upcast) and their log-softmax. (Every token counts as scored: the logits of
    unscored ones are not computed, :mod:`robustunlearn.core.scoring`, so a QA batch needs less.)"""
    e = dtype_bytes
    mlp = e * (2 * shape.hidden + 3 * shape.intermediate)
    loss = 2 * FP32 * shape.vocab if shape.logits else 0
    return tokens * (e * shape.hidden + max(mlp, loss))


def _loss_gradient_bytes(shape: ModelShape, tokens: int) -> int:
    """The loss's gradients at the start of a pass's backward: the float32 log-softmax's incoming
    gradient and its result, both tokens x V."""
    return 2 * FP32 * shape.vocab * tokens if shape.logits else 0


@dataclass(frozen=True)
class _Sizes:
    """One GPU's bytes per element and counts for a plan: the run's dtype ``e``, the trainable
    weights' bytes ``t`` (LoRA: float32), the shards (fsdp: the GPUs), the tokens of one pass, and
    the bytes ``c`` of what is computed on: gathered weights, their gradients, activations (``e``;
    bfloat16 under mixed precision, which shards only when there are several GPUs)."""

    e: int
    t: int
    shards: int
    tokens: int
    c: int

    @classmethod
    def of(cls, settings: PlanSettings) -> _Sizes:
        e = DTYPE_BYTES[settings.dtype]
        shards = settings.gpus if settings.parallel == "fsdp" else 1
        mixed = settings.mixed_precision is not None and shards > 1
        return cls(
            e=e,
            t=e if settings.lora_rank is None else LORA_BYTES,
            shards=shards,
            tokens=settings.batch_size // settings.gpus * settings.max_length,
            c=DTYPE_BYTES["bfloat16"] if mixed else e,
        )

    @property
    def mixed(self) -> bool:
        return self.c != self.e


def _gradient_step(
    shape: ModelShape, settings: PlanSettings, memory: OptimizerMemory, sizes: _Sizes, gradients: float, live: bool
) -> tuple[float, float]:
    """A gradient step's activations and its peak above weights, state and reference: the larger
    of the closure (the start of backward: every pass's activations and the loss's transient
    gradients; with several passes also the start of the last one's backward, the others'
    gradients complete, as autograd finishes the newest pass first) and the update (gradients,
    the optimizer's temporaries; the next step's live reference pass also sees the gradients)."""
    passes = shape.forward_passes
    per_pass = memory.backward_graphs * activation_bytes(
        shape, sizes.tokens, sizes.c, settings.attention, settings.max_length
    )
    transient = _loss_gradient_bytes(shape, sizes.tokens)
    activations = passes * per_pass + transient
    last_pass = (passes - 1) * per_pass + (transient if passes > 1 else 0) + gradients
    trainable = shape.trainable * sizes.t / sizes.shards
    closure = memory.closure_copies * trainable + max(activations, last_pass)
    largest = shape.largest_trainable * sizes.t
    # ddp averages the gradients through one flat bucket at a time (core.distributed)
    ddp = settings.parallel == "ddp" and settings.gpus > 1
    bucket = min(max(BUCKET_ELEMENTS * sizes.t, largest), trainable) if ddp else 0
    temporaries = memory.update_copies * trainable + max(memory.tensor_copies * largest, bucket)
    reference_pass = forward_only_bytes(shape, sizes.tokens, sizes.c) if live else 0
    return activations, max(closure, gradients + max(temporaries, reference_pass))


def plan_grade(shape: ModelShape, settings: PlanSettings, name: str, reference: str) -> GradePlan:
    """One optimizer's bytes per GPU (module docstring)."""
    memory: OptimizerMemory = OPTIMIZERS[name].memory
    sizes = _Sizes.of(settings)
    weights = shape.parameters * sizes.e / sizes.shards
    gradients = shape.trainable * sizes.t / sizes.shards if memory.gradients else 0
    if sizes.shards > 1:  # gathered: the modules outside the blocks and two blocks; two blocks' gradients
        weights += (shape.outside_blocks + 2 * shape.block) * sizes.c
        gathered = 2 * shape.trainable_block * (sizes.c if sizes.mixed else sizes.t)
        reduced = shape.trainable_block * FP32 if sizes.mixed else 0  # the float32 copy FSDP reduces
        gradients += gathered + reduced if memory.gradients else 0
    state = memory.state * shape.trainable * sizes.t / sizes.shards
    ref = shape.trainable * sizes.e / sizes.shards if reference == "live" else 0
    if memory.gradients:
        activations, peak = _gradient_step(shape, settings, memory, sizes, gradients, reference == "live")
    else:
        activations = forward_only_bytes(shape, sizes.tokens, sizes.c)
        peak = max(activations, memory.tensor_copies * shape.largest_trainable * sizes.t)
    total = weights + state + ref + peak
    return GradePlan(
        optimizer=name,
        grade=OPTIMIZERS[name].grade,
        weights=round(weights),
        gradients=round(gradients),
        state=round(state),
        reference=round(ref),
        activations=round(activations),
        total=round(total),
        fits=total <= settings.gpu_memory,
    )


def plan_memory(config: PretrainedConfig, settings: PlanSettings, name: str = "model") -> MemoryPlan:
    """The memory per GPU of every optimizer of ``settings`` (all registered ones by default)."""
    shape = model_shape(config, settings.objective, settings.lora_rank)
    reference = reference_kind(shape, settings, settings.objective)
    names = settings.optimizers or tuple(OPTIMIZERS)
    rows = [plan_grade(shape, settings, n, reference) for n in names]
    return MemoryPlan(name, shape.parameters, shape.trainable, reference, settings, rows)


def human_count(count: int) -> str:
    """``6.74B``, ``2.23M``, ``4.2k``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def human_bytes(count: float) -> str:
    """``13.5 GB``, ``412 MB``, ``96 kB`` (powers of 10, as GPU sizes are sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}" if count < 100 * size else f"{count / size:.0f} {unit}"
    return f"{math.ceil(count)} B"


def _setup_name(settings: PlanSettings) -> str:
    if settings.gpus == 1:
        return "1 GPU"
    mixed = f" {settings.mixed_precision}" if settings.mixed_precision else ""
    return f"{settings.gpus} GPUs {settings.parallel}{mixed}"


def plan_table(plan: MemoryPlan) -> Table:
    """One setup's plan: a row per optimizer, its bytes per GPU and whether it fits."""
    s = plan.settings
    lora = f", LoRA rank {s.lora_rank}" if s.lora_rank is not None else ""
    title = (
        f"{plan.model}: {human_count(plan.parameters)} parameters ({human_count(plan.trainable)} trained{lora}), "
        f"{s.dtype}, {s.objective} (reference: {plan.reference}), batch {s.batch_size} x {s.max_length} tokens, "
        f"{_setup_name(s)}, per GPU"
    )
    table = Table(title=title, box=box.SIMPLE, caption=TABLE_CAPTION)
    columns = ("optimizer", "grade", "weights", "gradients", "state", "reference", "activations", "total", "fits")
    for column in columns:
        table.add_column(column, no_wrap=True, justify="left" if column in ("optimizer", "grade") else "right")
    for row in plan.rows:
        sizes = [human_bytes(getattr(row, k)) for k in columns[2:8]]
        table.add_row(row.optimizer, row.grade, *sizes, _fits(row))
    return table


def fits_table(plans: list[MemoryPlan]) -> Table:
    """Several setups side by side: each optimizer's total per GPU and whether it fits."""
    memory = human_bytes(plans[0].settings.gpu_memory)
    table = Table(title=f"total per GPU; fits in {memory}?", box=box.SIMPLE)
    table.add_column("optimizer", no_wrap=True)
    for plan in plans:
        table.add_column(_setup_name(plan.settings), no_wrap=True, justify="right")
    for index, row in enumerate(plans[0].rows):
        cells = [plan.rows[index] for plan in plans]  # every plan has the same optimizers, in order
        table.add_row(row.optimizer, *(f"{human_bytes(c.total)} {_fits(c)}" for c in cells))
    return table


def _fits(row: GradePlan) -> str:
    return "yes" if row.fits else "no"


TABLE_CAPTION = (
    "total: the step's peak, below the columns' sum where gradients fill in as activations are freed "
    "(docs/engine.md, 'Planning memory'); not counted: CUDA context, fragmentation"
)
