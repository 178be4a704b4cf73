"""FO–ZO hybrids: a first-order and a zeroth-order optimizer sharing one model.

* ``hybrid`` (Lang et al. 2026, "Downgrade to Upgrade", the FO–ZO hybrid): blocks of ``every``
  first-order steps alternate with blocks of ``every`` zeroth-order steps ("N Adam steps, then N
  ZO steps"), and the run ends on a zeroth-order block, so the final weights come out of the
  robust (ZO) regime. ``align`` lays the blocks out (see :func:`phase_at`):

  - ``"end"`` (default): backwards from the last of ``total_steps`` steps: the last block is ZO,
    the one before it FO, and so on; the first block is whatever remains, so it may be shorter
    than ``every`` and of either kind.
  - ``"start"``: forwards from the first step, a full FO block first; ``total_steps`` must then
    be a multiple of ``2·every``, so that the last block is a full ZO block.

  Whenever ``total_steps`` is a multiple of ``2·every`` the two layouts are the same, the paper's
  (a full FO block first, a full ZO block last). ``"end"`` is the default because it also takes
  any other budget (an epoch count rarely gives a multiple of ``2·every``) and still ends on a
  full ZO block, at the price of a first block that is partial and may be ZO; ``"start"``
  enforces the paper's layout, refusing a budget that would need a partial block.

  The parts' states persist across blocks: Adam's moments (and step count, so its bias
  correction) and R-AdaZO's moments resume where the previous block of the same kind left them.
  ``reset_state_each_block=True`` clears a part's state when its block starts, so every block
  starts as a fresh optimizer (the ZO part's seed and step counter, which only pick its random
  directions, go on).
* ``hybrid-objective``: every step, a ZO step on the forget term of the loss
  (``closure(backward=False, term="forget")``), then an FO step on the retain term
  (``closure(term="retain")``).
* ``hybrid-depth``: every step, a ZO step on the bottom of the network (embeddings and early
  blocks), then an FO step on the last ``fo_blocks`` blocks and everything after them (final
  norm, head); during the FO step only those weights require grad, so backward stops there.

Each part keeps its own state (moments); ``state_dict`` holds both. ``lr`` is the FO learning
rate, ``zo_lr`` the ZO one; ``param_groups`` lists the FO groups then the ZO groups (the same
dicts the parts use), so an LR scheduler scales both. The hooks of
:class:`~robustunlearn.optim.base.OptimizerHooks` reach the parts: Sophia-G's batch size, data
parallelism and sharded weights (FSDP), precision warnings and where the last closure call was;
``hybrid`` adds its own phase to the log and its stopping rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from robustunlearn.core.modules import decoder_blocks
from robustunlearn.optim.base import Closure, OptimizerHooks, hooks
from robustunlearn.optim.spec import OPTIMIZERS, OptimizerMemory, OptimizerSpec

ALIGNMENTS = ("end", "start")


def check_layout(total_steps: int, every: int, align: str) -> None:
    """``ValueError`` unless blocks of ``every`` steps aligned at ``align`` fit ``total_steps``."""
    if align not in ALIGNMENTS:
        raise ValueError(f"unknown align {align!r}; accepted: {', '.join(ALIGNMENTS)}")
    if align == "start" and total_steps % (2 * every):
        below = total_steps - total_steps % (2 * every)
        budgets = f"{below} or {below + 2 * every}" if below else f"{2 * every}"
        raise ValueError(
            f"hybrid with align='start' needs total_steps (here {total_steps}) to be a multiple of 2·every = "
            f"{2 * every}, to end on a full ZO block: use {budgets} steps, or align='end' (a partial first block)"
        )


def phase_at(step: int, total_steps: int, every: int, align: str = "end") -> str:
    """Phase (``"fo"`` or ``"zo"``) of step ``step`` (0-based) of a ``hybrid`` run of
    ``total_steps`` steps in blocks of ``every``. ``align="end"``: blocks are counted back from the
    last step, which is in a ZO block, and alternate kinds from there. ``align="start"``: counted
    from the first step, which is in an FO block (``total_steps`` a multiple of ``2·every``)."""
    check_layout(total_steps, every, align)
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside the planned run of total_steps={total_steps}")
    if align == "start":
        return "fo" if (step // every) % 2 == 0 else "zo"
    blocks_after = (total_steps - 1 - step) // every
    return "zo" if blocks_after % 2 == 0 else "fo"


def _build_part(
    name: str,
    zeroth_order: bool,
    model: nn.Module,
    params: list[nn.Parameter],
    lr: float | None,
    options: dict[str, Any],
) -> torch.optim.Optimizer:
    """Build the ZO part (a zeroth-order optimizer) or the FO part (any gradient-based one)."""
    specs = OPTIMIZERS
    accepted = sorted(
        n for n, s in specs.items() if (s.grade == "zeroth-order") == zeroth_order and s.grade != "hybrid"
    )
    if name not in accepted:
        kind = "zeroth-order" if zeroth_order else "gradient-based"
        raise ValueError(f"unknown {kind} optimizer {name!r} for a hybrid part; accepted: {', '.join(accepted)}")
    spec = specs[name]
    return spec.build(model, params, spec.default_lr if lr is None else lr, {**spec.default_options, **options})


class _TwoPart(OptimizerHooks, torch.optim.Optimizer):
    """A first-order part ``fo`` and a zeroth-order part ``zo``, presented as one optimizer."""

    def __init__(self, fo: torch.optim.Optimizer, zo: torch.optim.Optimizer) -> None:
        unique = list({id(p): p for part in (fo, zo) for g in part.param_groups for p in g["params"]}.values())
        super().__init__(unique, {})
        self.fo, self.zo = fo, zo
        self.param_groups = [*fo.param_groups, *zo.param_groups]
        self.steps_taken = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "fo"):
            raise NotImplementedError("add parameter groups to .fo or .zo, not to the hybrid")
        super().add_param_group(param_group)

    @property
    def wants_batch_tokens(self) -> bool:
        return hooks(self.fo).wants_batch_tokens or hooks(self.zo).wants_batch_tokens

    def set_batch_tokens(self, count: int) -> None:
        hooks(self.fo).set_batch_tokens(count)
        hooks(self.zo).set_batch_tokens(count)

    def enable_data_parallel(self, mean: Callable[[Tensor], Tensor]) -> None:
        hooks(self.fo).enable_data_parallel(mean)
        hooks(self.zo).enable_data_parallel(mean)

    def enable_fsdp(self, model: nn.Module, mesh: DeviceMesh) -> None:
        hooks(self.fo).enable_fsdp(model, mesh)
        hooks(self.zo).enable_fsdp(model, mesh)

    def precision_warnings(self) -> list[str]:
        return [*hooks(self.fo).precision_warnings(), *hooks(self.zo).precision_warnings()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "fo": self.fo.state_dict(),
            "zo": self.zo.state_dict(),
            "steps_taken": self.steps_taken,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fo.load_state_dict(state_dict["fo"])
        self.zo.load_state_dict(state_dict["zo"])
        self.steps_taken = state_dict["steps_taken"]


class AlternatingHybrid(_TwoPart):
    """``hybrid``: FO and ZO blocks of ``every`` steps over the same weights, ending on ZO, laid
    out by ``align``; with ``reset_state_each_block`` each block's part starts from a fresh state
    (module docstring)."""

    def __init__(
        self,
        fo: torch.optim.Optimizer,
        zo: torch.optim.Optimizer,
        *,
        total_steps: int,
        every: int = 20,
        align: str = "end",
        reset_state_each_block: bool = False,
    ) -> None:
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        check_layout(total_steps, every, align)
        super().__init__(fo, zo)
        self.total_steps, self.every, self.align = total_steps, every, align
        self.reset_state_each_block = reset_state_each_block

    def _phase(self, step: int) -> str:
        return phase_at(step, self.total_steps, self.every, self.align)

    @property
    def current_phase(self) -> str:
        """Phase of the next call to :meth:`step`; once the planned ``total_steps`` are done, the
        phase of the last step (``"zo"``), so that a caller may read it after the run."""
        return self._phase(min(self.steps_taken, self.total_steps - 1))

    @property
    def last_closure_at(self) -> str:
        return hooks(self.fo if self._phase(max(self.steps_taken - 1, 0)) == "fo" else self.zo).last_closure_at

    @property
    def may_stop(self) -> bool:
        """Whether the steps taken so far end on a finished ZO block: a run stopped early (at a
        matched forgetting level) stops only there, so it too ends in the robust regime."""
        if self.steps_taken == 0:
            return False
        last = self._phase(self.steps_taken - 1)
        return last == "zo" and (self.steps_taken == self.total_steps or self.current_phase == "fo")

    def log_fields(self) -> dict[str, Any]:
        """``current_phase``: the phase the step just taken ran in."""
        if self.steps_taken == 0:
            return {}
        return {"current_phase": self._phase(self.steps_taken - 1)}

    def step(self, closure: Closure) -> Tensor:  # type: ignore[override]
        if self.steps_taken >= self.total_steps:
            raise ValueError(f"step {self.steps_taken} is outside the planned run of total_steps={self.total_steps}")
        phase = self.current_phase
        part = self.fo if phase == "fo" else self.zo
        block_starts = self.steps_taken > 0 and self._phase(self.steps_taken - 1) != phase
        if self.reset_state_each_block and block_starts:
            part.state.clear()
        loss = part.step(closure)
        self.steps_taken += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        layout = {"total_steps": self.total_steps, "every": self.every, "align": self.align}
        return {**super().state_dict(), **layout}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.total_steps, self.every, self.align = state_dict["total_steps"], state_dict["every"], state_dict["align"]


def _only(closure: Closure, fixed_term: str) -> Closure:
    """``closure`` restricted to the loss term ``fixed_term``, whatever term its caller asks for."""

    def restricted(backward: bool = True, *, sample_labels: bool = False, term: str | None = None) -> Tensor:
        return closure(backward, sample_labels=sample_labels, term=fixed_term)

    return restricted


class ObjectiveHybrid(_TwoPart):
    """``hybrid-objective``: ZO on the forget term, then FO on the retain term, every step.
    Returns the forget-term loss of the ZO step; the last closure call is the FO part's, at θ plus
    this step's ZO update ``Δzo``."""

    @property
    def last_closure_at(self) -> str:
        return "θ + Δzo" + hooks(self.fo).last_closure_at.removeprefix("θ")

    def step(self, closure: Closure) -> Tensor:  # type: ignore[override]
        loss = self.zo.step(_only(closure, "forget"))
        self.fo.step(_only(closure, "retain"))
        self.steps_taken += 1
        return loss


class DepthHybrid(_TwoPart):
    """``hybrid-depth``: ZO on the bottom of the network, then FO on its top, every step.
    Returns the loss of the FO step, taken (as the last closure call) at θ plus this step's ZO
    update ``Δzo`` of the bottom."""

    @property
    def last_closure_at(self) -> str:
        return "θ + Δzo" + hooks(self.fo).last_closure_at.removeprefix("θ")

    def step(self, closure: Closure) -> Tensor:  # type: ignore[override]
        self.zo.step(closure)
        frozen = [p for g in self.zo.param_groups for p in g["params"] if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            loss = self.fo.step(closure)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.steps_taken += 1
        return loss


def split_by_depth(
    model: nn.Module, params: list[nn.Parameter], fo_blocks: int
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(top, bottom)`` of ``params``: ``top`` holds the last ``fo_blocks`` blocks and every
    parameter registered after the block stack (final norm, output head); ``bottom`` the rest.
    A weight shared between the bottom and the head (tied embeddings) counts where it is first
    registered: in the bottom."""
    blocks = decoder_blocks(model)
    if not (isinstance(fo_blocks, int) and 1 <= fo_blocks <= len(blocks)):
        raise ValueError(f"fo_blocks must be an integer in [1, {len(blocks)}], got {fo_blocks!r}")
    in_stack = {id(p) for p in blocks.parameters()}
    in_top_blocks = {id(p) for block in blocks[len(blocks) - fo_blocks :] for p in block.parameters()}
    top, seen_stack = set(), False
    for p in model.parameters():  # registration order; shared weights come once, at first use
        if id(p) in in_stack:
            seen_stack = True
        if id(p) in in_top_blocks or (seen_stack and id(p) not in in_stack):
            top.add(id(p))
    upper = [p for p in params if id(p) in top]
    lower = [p for p in params if id(p) not in top]
    if not upper or not lower:
        empty = "first" if not upper else "zeroth"
        raise ValueError(f"fo_blocks={fo_blocks} leaves the {empty}-order part without trainable weights")
    return upper, lower


def _options(name: str, options: dict[str, Any], own: tuple[str, ...]) -> dict[str, Any]:
    """The hybrid's options, checked: the parts' (``fo``, ``zo``, ``fo_options``, ``zo_options``,
    ``zo_lr``) and its ``own``. ``total_steps`` is accepted by all three, used by ``hybrid`` only."""
    known = ("fo", "zo", "fo_options", "zo_options", "zo_lr", "total_steps", *own)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown {name} options: {', '.join(unknown)}; accepted: {', '.join(known)}")
    return {"fo_options": {}, "zo_options": {}, "zo_lr": None, **options}


def _build_alternating(
    model: nn.Module, params: list[nn.Parameter], lr: float, options: dict[str, Any]
) -> torch.optim.Optimizer:
    o = _options("hybrid", options, ("every", "align", "reset_state_each_block"))
    if o.get("total_steps") is None:
        raise ValueError("hybrid needs total_steps (the planned number of steps) to end on a zeroth-order block")
    fo = _build_part(o["fo"], False, model, params, lr, o["fo_options"])
    zo = _build_part(o["zo"], True, model, params, o["zo_lr"], o["zo_options"])
    layout = {k: o[k] for k in ("every", "align", "reset_state_each_block") if k in o}
    return AlternatingHybrid(fo, zo, total_steps=o["total_steps"], **layout)


def _build_objective(
    model: nn.Module, params: list[nn.Parameter], lr: float, options: dict[str, Any]
) -> torch.optim.Optimizer:
    o = _options("hybrid-objective", options, ())
    fo = _build_part(o["fo"], False, model, params, lr, o["fo_options"])
    zo = _build_part(o["zo"], True, model, params, o["zo_lr"], o["zo_options"])
    return ObjectiveHybrid(fo, zo)


def _build_depth(
    model: nn.Module, params: list[nn.Parameter], lr: float, options: dict[str, Any]
) -> torch.optim.Optimizer:
    o = _options("hybrid-depth", options, ("fo_blocks",))
    top, bottom = split_by_depth(model, params, o["fo_blocks"])
    fo = _build_part(o["fo"], False, model, top, lr, o["fo_options"])
    zo = _build_part(o["zo"], True, model, bottom, o["zo_lr"], o["zo_options"])
    return DepthHybrid(fo, zo)


# The default parts, Adam and R-AdaZO: over the same weights (hybrid, hybrid-objective) both keep
# their m and v; split by depth each weight has one part's. Adam's foreach temporaries, R-AdaZO's
# sphere directions.
_SHARED = OptimizerMemory(state=4, update_copies=1, tensor_copies=3)
_SPLIT = OptimizerMemory(state=2, update_copies=1, tensor_copies=3)

SPECS: dict[str, OptimizerSpec] = {
    "hybrid": OptimizerSpec(
        "hybrid",
        "hybrid",
        1e-4,
        "FO-ZO hybrid (the paper's): blocks of `every` Adam steps and `every` R-AdaZO steps, "
        "ending on ZO; needs total_steps (options align end|start, reset_state_each_block)",
        _build_alternating,
        {"fo": "adam", "zo": "zo-adazo", "every": 20},
        memory=_SHARED,
    ),
    "hybrid-objective": OptimizerSpec(
        "hybrid-objective",
        "hybrid",
        1e-4,
        "ZO (R-AdaZO) on the forget loss, FO (Adam) on the retain loss, every step",
        _build_objective,
        {"fo": "adam", "zo": "zo-adazo"},
        memory=_SHARED,
    ),
    "hybrid-depth": OptimizerSpec(
        "hybrid-depth",
        "hybrid",
        1e-4,
        "FO (Adam) on the last `fo_blocks` blocks and the head, ZO (R-AdaZO) below, every step",
        _build_depth,
        {"fo": "adam", "zo": "zo-adazo", "fo_blocks": 2},
        memory=_SPLIT,
    ),
}

__all__ = [
    "SPECS",
    "AlternatingHybrid",
    "DepthHybrid",
    "ObjectiveHybrid",
    "phase_at",
    "split_by_depth",
]
