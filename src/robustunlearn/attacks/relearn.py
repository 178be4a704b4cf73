"""Relearning attack: fine-tune an unlearned model on a few forget samples and watch the
forgotten knowledge come back (Hu et al. 2025, "Unlearning or obfuscating?"; Lang et al. 2026
use full fine-tuning with AdamW at lr 1e-5 in their lab setting).

The same function with retain or unrelated text is the *benign* relearning attack: fine-tuning
on data that does not contain the forgotten facts, to test whether ordinary training brings
them back::

    relearned, curve = relearn_attack(model, None, forget_batches, steps=50, eval_fn=forget_metrics)
    benign, curve = relearn_attack(model, None, retain_batches, steps=50, eval_fn=forget_metrics)

The registry's attacks train on the records the study chose for the attacker
(``AttackContext.relearn_records``: QA pairs, or passages scored on every token):
``relearn`` at the context's lr, ``relearn-lr<lr>`` at the lr in its name (a ladder of
strengths: ``relearn-lr1e-5``, ``relearn-lr1e-4``, ...), ``relearn-lora`` with LoRA adapters at the
context's lr, and ``benign-relearn`` on as many retain QA pairs at the context's lr. Their config:
``split`` (``forget_qa``, ``forget_text`` or ``retain_qa``), ``records``, ``subjects`` (sorted,
unique, the empty subject left out), ``batch_size``, ``steps``, ``eval_every``, ``lr``,
``strength`` (the lr), ``optimizer``, ``lora``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from robustunlearn.attacks.spec import RELEARNING, AttackContext, AttackOutcome, AttackSpec, positive_number
from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch
from robustunlearn.core.distributed import DataParallel, gathered_copy, reshard, shard_model
from robustunlearn.core.modules import LoraOptions, add_lora
from robustunlearn.data.base import Record
from robustunlearn.data.collate import collate_records
from robustunlearn.objectives.common import sequence_logprobs
from robustunlearn.optim import build_optimizer
from robustunlearn.optim.base import hooks, make_closure


def _token_batches(batches: Sequence[TokenBatch | str], tokenizer: Any) -> list[TokenBatch]:
    """``TokenBatch``es as given; each string becomes a one-row batch scored on every token."""
    if not batches:
        raise ValueError("relearn_attack needs at least one batch")
    result = []
    for item in batches:
        if isinstance(item, TokenBatch):
            result.append(item)
        elif isinstance(item, str):
            if tokenizer is None:
                raise ValueError("relearning on strings needs a tokenizer; pass one or pass TokenBatches")
            ids = tokenizer(item, return_tensors="pt")["input_ids"]
            result.append(TokenBatch(ids, torch.ones_like(ids), ids.clone()))
        else:
            raise ValueError(f"relearn batches must be TokenBatch or str, got {type(item).__name__}")
    if all(bool((batch.labels == IGNORE_INDEX).all()) for batch in result):
        raise ValueError("no batch has a scored token (all labels are IGNORE_INDEX)")
    return result


def _causal_lm_loss(
    model: nn.Module, batch: TokenBatch, scale: float, losses: list[torch.Tensor], term: str | None
) -> torch.Tensor:
    """The summed negative log-likelihood of ``batch``'s scored labels (float32 at least, float64 for
    a float64 model) times ``scale``: 1 / their count gives the causal-LM loss; a rank's rows of a
    shared batch take :func:`_rank_rows`' scale. The loss has no terms (``term`` is None). Its
    value is appended to ``losses``."""
    loss = -scale * sequence_logprobs(model, batch)[0].sum()
    losses.append(loss.detach())
    return loss


def _rank_rows(batch: TokenBatch, parallel: DataParallel) -> tuple[TokenBatch, float]:
    """This rank's contiguous rows of ``batch`` (every rank holds the whole batch) and the scale of
    their summed loss: world size / the batch's scored tokens. FSDP averages the ranks' gradients,
    so the scaled sums give the gradient of the whole batch's mean however the scored tokens fall
    across the ranks (a rank whose rows score none adds zero)."""
    if len(batch) < parallel.world_size:
        raise ValueError(
            f"a relearning batch of {len(batch)} rows cannot give each of {parallel.world_size} processes a row"
        )
    rows = torch.arange(len(batch)).tensor_split(parallel.world_size)[parallel.rank]
    mine = TokenBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows])
    return mine, parallel.world_size / max(batch.scored_tokens, 1)  # a batch scoring nothing adds 0


def relearn_attack(
    model: nn.Module,
    tokenizer: Any,
    batches: Sequence[TokenBatch | str],
    *,
    steps: int,
    lr: float = 1e-5,
    optimizer: str = "adamw",
    lora: LoraOptions | None = None,
    eval_fn: Callable[[nn.Module, int], dict[str, Any]] | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    parallel: DataParallel | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fine-tune a copy of ``model`` for ``steps`` steps on ``batches`` (cycled in order, step t
    uses batch t mod N) with the causal-LM loss on their labels, and return it with a curve.

    * ``batches``: ``TokenBatch``es, or strings tokenized with ``tokenizer`` (``None`` otherwise).
    * ``optimizer``/``lr``: any name of :data:`robustunlearn.optim.OPTIMIZERS`; the paper's lab
      setting is AdamW at 1e-5, tiny test models need a larger lr. Every weight is trained.
    * ``lora``: train LoRA adapters instead (the weights stay frozen) and merge them into the
      weights at the end, so the result is a plain model.
    * ``eval_fn(model, step) -> dict``: called in eval mode and without gradients at step 0,
      every ``eval_every`` steps (``None``: never in between) and after the last step. Under
      LoRA it sees the model with its unmerged adapters.
    * ``parallel``: a sharded :class:`~robustunlearn.core.distributed.DataParallel` (parallel mode
      fsdp, every rank calling with the same arguments): the copy is sharded with FSDP2 over its
      mesh, each rank trains on its contiguous rows of every batch (:func:`_rank_rows`: the
      gradient is the whole batch's), ``eval_fn`` runs on every rank (its forward passes gather the
      weights), and every rank gets the relearned weights back in a plain model. LoRA is refused.

    ``curve`` has one dict per evaluation: ``step``, ``train_loss`` (the mean loss of the steps
    since the previous entry; absent at step 0) and ``eval_fn``'s values. The result is
    deterministic given ``seed`` (it seeds the LoRA initialization and dropout; the global RNG
    state is restored afterwards). The input model is not modified."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be a positive number of steps or None, got {eval_every}")

    token_batches = _token_batches(batches, tokenizer)
    sharded = parallel is not None and parallel.sharded
    if sharded and lora is not None:
        raise ValueError("relearning with LoRA adapters runs in one process: LoRA keeps one copy of the weights")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    attacked = copy.deepcopy(model)
    device = next(attacked.parameters()).device
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    curve: list[dict[str, Any]] = []
    losses: list[float] = []

    def record(step: int) -> None:
        entry: dict[str, Any] = {"step": step}
        if losses:
            entry["train_loss"] = sum(losses) / len(losses)
            losses.clear()
        if eval_fn is not None:
            attacked.eval()
            with torch.no_grad():
                entry.update(eval_fn(attacked, step))
            attacked.train()
            reshard(attacked)  # FSDP keeps the root gathered after a forward without backward
        curve.append(entry)

    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        if lora is None:
            attacked.requires_grad_(True)
        else:
            peft_model = add_lora(attacked, lora)  # injects the adapters into `attacked`
        attacked.train()
        if sharded:
            shard_model(attacked, parallel.mesh)
        optim = build_optimizer(optimizer, attacked, lr)
        if sharded:
            hooks(optim).enable_fsdp(attacked, parallel.mesh)
        record(0)
        for step in range(1, steps + 1):
            batch = token_batches[(step - 1) % len(token_batches)].to(device)
            batch, scale = _rank_rows(batch, parallel) if sharded else (batch, 1 / max(batch.scored_tokens, 1))
            step_losses: list[torch.Tensor] = []  # one per closure call; the first is at the step's weights
            optim.step(make_closure(attacked, partial(_causal_lm_loss, attacked, batch, scale, step_losses)))
            # the whole batch's mean loss: the ranks' scaled sums, averaged
            losses.append(float(parallel.mean_(step_losses[0].clone())) if sharded else float(step_losses[0]))
            if step == steps or (eval_every is not None and step % eval_every == 0):
                record(step)

    if sharded:
        attacked = gathered_copy(attacked, model)
    if lora is not None:
        attacked = peft_model.merge_and_unload()
    attacked.zero_grad(set_to_none=True)
    for name, parameter in attacked.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, True))
    attacked.eval()
    return attacked, curve


def _relearn_records(context: AttackContext, benign: bool) -> tuple[str, Sequence[Record]]:
    """The split name and the records a relearning attack trains on: the context's relearning
    records, or as many retain QA pairs (benign)."""
    if not context.relearn_records:
        raise ValueError("relearning needs at least one record: the context's relearn_records is empty")
    if benign:
        return "retain_qa", context.benchmark.require("retain_qa")[: len(context.relearn_records)]
    kinds = sorted({record.kind for record in context.relearn_records})
    if len(kinds) > 1:
        raise ValueError(f"relearn_records must be of one kind, got {', '.join(kinds)}")
    return f"forget_{kinds[0]}", context.relearn_records


def _relearn(
    model: nn.Module, lr: float | None, context: AttackContext, *, benign: bool, lora: LoraOptions | None
) -> AttackOutcome:
    """Relearning at ``lr`` (None: the context's) on :func:`_relearn_records`, in batches of the
    context's batch size, probed along the way."""
    split, records = _relearn_records(context, benign)
    lr = context.relearn_lr if lr is None else lr
    batches = [
        collate_records(context.tokenizer, records[i : i + context.batch_size], template=context.template)
        for i in range(0, len(records), context.batch_size)
    ]
    attacked, curve = relearn_attack(
        model,
        context.tokenizer,
        batches,
        steps=context.relearn_steps,
        lr=lr,
        lora=lora,
        eval_fn=context.probe,
        eval_every=context.relearn_eval_every,
        seed=context.seed,
        parallel=None if lora is not None else context.parallel,  # LoRA: each rank relearns alone, alike
    )
    config = {
        "split": split,
        "records": len(records),
        "subjects": sorted({record.subject for record in records if record.subject}),
        "batch_size": context.batch_size,
        "steps": context.relearn_steps,
        "eval_every": context.relearn_eval_every,
        "lr": lr,
        "strength": lr,
        "optimizer": "adamw",
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha},
    }
    return AttackOutcome(attacked, curve, config)


SPECS = (
    AttackSpec(
        "relearn",
        RELEARNING,
        "fine-tune on the attacker's forget records",
        partial(_relearn, benign=False, lora=None),
    ),
    AttackSpec(
        "relearn-lr",
        RELEARNING,
        "the same at that learning rate",
        partial(_relearn, benign=False, lora=None),
        positive_number("lr"),
    ),
    AttackSpec(
        "relearn-lora",
        RELEARNING,
        "the same with LoRA adapters",
        partial(_relearn, benign=False, lora=LoraOptions()),
    ),
    AttackSpec(
        "benign-relearn",
        RELEARNING,
        "fine-tune on as many retain QA pairs",
        partial(_relearn, benign=True, lora=None),
    ),
)
