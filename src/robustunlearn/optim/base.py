"""The closure protocol every optimizer grade in this package speaks, the one closure builder
every caller uses, and the hooks a training loop may call on an optimizer.

An optimizer's ``step(closure)`` receives a callable with this signature::

    closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None) -> Tensor

* ``backward=True`` (the default, so torch's own optimizers work unchanged): the closure zeroes
  the gradients it is about to compute (``model.zero_grad(set_to_none=True)``, torch's
  convention), computes the loss with autograd, calls ``loss.backward()`` and returns the loss
  detached. First-order and second-order optimizers call it this way.
* ``backward=False``: the closure only evaluates the loss and returns it, in the caller's grad
  mode. Zeroth-order optimizers call it this way under ``torch.no_grad()`` at perturbed weights;
  Sophia-H calls it under ``torch.enable_grad()`` and gets the loss *with its graph*, to take
  Hessian-vector products.
* A function value (``backward=False`` under ``torch.no_grad()``) is taken with the model in
  eval mode (dropout off), its modules' train/eval flags restored afterwards, as MeZO does: a
  zeroth-order estimate ``(L(θ + eps·z) − L(θ − eps·z)) / (2·eps)`` is meaningful only if ``L``
  is one function of θ, not a fresh dropout mask per call. Every other call (with backward, or
  with a graph for Sophia-H) runs in the model's own mode, training mode in a training loop.
* ``sample_labels=True`` (with ``backward=True``): the loss is the model's negative
  log-likelihood of labels *sampled from its own predictive distribution* at the same inputs,
  so that the squared gradient is a Gauss-Newton-Bartlett Hessian estimate (Sophia-G). Closures
  that cannot do this raise ``NotImplementedError``.
* ``term``: evaluate only the named part of a composite loss (``"forget"`` or ``"retain"``);
  ``None`` is the total. Used by ``hybrid-objective`` (ZO on the forget term, FO on the retain term).
  Closures without named terms raise ``KeyError`` for any other value than ``None``.

Per-batch work that does not depend on the weights being optimized (a frozen reference
model's outputs, tokenization) is done once per step by whoever builds the closure, not once
per call: a ZO step calls its closure two or more times on the same batch.

:func:`make_closure` builds such a closure from a loss function; callers supply only the loss.

Hooks (:class:`OptimizerHooks`): what a training loop may ask of an optimizer beyond torch's
interface: Sophia-G's batch size, values to log, where the last closure call was, whether the
run may stop now, how to run in several processes (data parallel, and on FSDP-sharded
parameters), and precision warnings. Our optimizers that need one inherit the class and override
it; :func:`hooks` gives every optimizer, torch's own included, an object to call them on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from robustunlearn.core.batching import TokenBatch
from robustunlearn.core.scoring import scored_logits


class Closure(Protocol):
    def __call__(
        self, backward: bool = True, *, sample_labels: bool = False, term: str | None = None
    ) -> torch.Tensor: ...


def make_closure(
    model: nn.Module,
    loss: Callable[[str | None], Tensor],
    *,
    terms: Collection[str] = (),
    sampled_label_loss: Callable[[str | None], Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
    passes: dict[str, int] | None = None,
) -> Closure:
    """The protocol's closure over ``model`` for the loss ``loss(term)`` (function values in
    eval mode, see the module docstring).

    ``terms`` names the terms ``loss`` accepts besides ``None`` (the total); any other raises
    ``KeyError``. ``sampled_label_loss(term)`` is the loss ``sample_labels=True`` asks for
    (``None``: ``NotImplementedError``). ``after_backward`` runs after each backward (data
    parallel: the gradient all-reduce). ``passes`` counts the ``"forward"`` and ``"backward"``
    passes the closure runs."""

    def closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None) -> Tensor:
        if term is not None and term not in terms:
            raise KeyError(f"the loss has no term {term!r}; it has {', '.join(sorted(terms)) or 'none'}")
        if sample_labels and sampled_label_loss is None:
            raise NotImplementedError("this loss cannot sample labels (closure(sample_labels=True))")
        if passes is not None:
            passes["forward"] += 1
            passes["backward"] += int(backward)
        if backward:
            model.zero_grad(set_to_none=True)
        # backward=False keeps the caller's grad mode: ZO calls under no_grad, sophia-h with a graph.
        grad_mode = torch.enable_grad() if backward else nullcontext()
        # a function value (no backward, no graph: a zeroth-order call) is taken with dropout off
        mode = _eval_mode(model) if not backward and not torch.is_grad_enabled() else nullcontext()
        with grad_mode, mode:
            value = sampled_label_loss(term) if sample_labels else loss(term)
            if backward:
                value.backward()
                if after_backward is not None:
                    after_backward()
        # Without backward the graph (if the caller enabled grad) is kept: sophia-h differentiates twice.
        return value.detach() if backward else value

    return closure


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every submodule's own train/eval flag back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def sampled_label_loss(model: nn.Module, batch: TokenBatch, generator: torch.Generator) -> Tensor:
    """Sophia-G's Gauss-Newton-Bartlett loss on ``batch``: at each of its B scored positions t,
    a label ŷ_t ~ softmax(f(θ, x)_{t−1}) drawn with ``generator``, and
    L̂ = (1/B)·Σ_t −log softmax(f(θ, x)_{t−1})[ŷ_t]."""
    picked = scored_logits(model, batch)[0]
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(picked.float(), -1), 1, generator=generator).squeeze(-1)
    return torch.nn.functional.cross_entropy(picked, sampled)


class OptimizerHooks:
    """What a training loop may ask of an optimizer beyond ``torch.optim.Optimizer``. Every hook
    has a default that asks nothing of the optimizer; an optimizer overrides only those it needs.
    Call them through :func:`hooks`."""

    wants_batch_tokens: bool = False  # whether to call set_batch_tokens before each step

    def set_batch_tokens(self, count: int) -> None:
        """Before a step: ``count`` is the number of labels (scored tokens, over all ranks) that
        this step's ``closure(sample_labels=True)`` averages its loss over (Sophia-G's B)."""

    def log_fields(self) -> dict[str, Any]:
        """After a step: values about the step just taken, for its log entry."""
        return {}

    @property
    def last_closure_at(self) -> str:
        """After a step: where its last closure call evaluated the loss, written as the weights θ
        the step started from plus an offset (``"θ"``: at θ; a zeroth-order step: ``"θ − eps·z"``).
        A loop that logs what that call computed labels it with this."""
        return "θ"

    @property
    def may_stop(self) -> bool:
        """Whether a run may end after the steps taken so far (an early stop waits until it may)."""
        return True

    def enable_data_parallel(self, mean: Callable[[Tensor], Tensor]) -> None:
        """Before the first step, in a run of several processes whose closures each see their
        shard of the batch and average gradients over ranks after backward: reduce over ranks
        whatever else the steps compute from the closure, with ``mean`` (an in-place all-reduce
        mean). Raises ``ValueError`` if the optimizer cannot keep the ranks identical."""

    def enable_fsdp(self, model: nn.Module, mesh: DeviceMesh) -> None:
        """Before the first step (after :meth:`enable_data_parallel`), in a run whose ``model`` is
        FSDP2-sharded over the 1-D ``mesh`` (``fully_shard``): each parameter and its ``.grad`` are
        DTensors split along their first dimension, of which this rank holds one shard, and the
        closure's backward leaves in each shard the gradient averaged over ranks. Whatever a step
        computes from a whole tensor or from all of them (a norm, a per-tensor scale, a count) must
        then combine every rank's shard, through DTensor reductions or a collective over
        ``mesh.get_group()``; anything drawn at random must be the shard of one tensor drawn alike
        for all ranks; and an optimizer that changes the weights in place between forwards without
        backward must reshard ``model`` in between (FSDP keeps the root's gathered weights after such
        a forward). Raises ``ValueError`` if the optimizer cannot run so: the default, until an
        optimizer says it can."""
        raise ValueError(f"{type(self).__name__} does not run on FSDP-sharded parameters; use parallel mode ddp")

    def precision_warnings(self) -> list[str]:
        """Before the first step: why the weights' dtypes make the steps inexact, each phrase
        completing a sentence that starts with the optimizer's name."""
        return []


class _PlainOptimizerHooks(OptimizerHooks):
    """The hooks of an optimizer that does not inherit :class:`OptimizerHooks`: torch's own and
    this package's sign family. Their steps are elementwise on each parameter, and the whole-tensor
    statistics of qadam (``max|d|``) and 1-bit Adam (``‖c‖₂``) are DTensor reductions, which
    combine the shards of every rank; so they run on FSDP-sharded parameters as they are."""

    def enable_fsdp(self, model: nn.Module, mesh: DeviceMesh) -> None:
        pass


_NO_HOOKS = _PlainOptimizerHooks()


def hooks(optimizer: torch.optim.Optimizer) -> OptimizerHooks:
    """``optimizer``'s hooks: the optimizer itself if it inherits :class:`OptimizerHooks`, else
    (torch's own optimizers, the sign family) the defaults, which accept FSDP."""
    return optimizer if isinstance(optimizer, OptimizerHooks) else _NO_HOOKS


def local_shard(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_beta(name: str, beta: float) -> None:
    """A moment decay rate must lie in [0, 1)."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"invalid {name} {beta!r}; accepted: 0 <= {name} < 1")


def check_betas(betas: tuple[float, float]) -> None:
    check_beta("betas[0]", betas[0])
    check_beta("betas[1]", betas[1])
