"""Sophia (Liu et al., 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training", Algorithm 3): momentum preconditioned by an EMA of a diagonal Hessian
estimate, with per-coordinate clipping::

    m ← β₁·m + (1 − β₁)·g
    every k steps (steps 1, k+1, 2k+1, …):  h ← β₂·h + (1 − β₂)·ĥ
    θ ← θ·(1 − lr·λ) − lr·clip(m / max(γ·h, ε), −1, 1)

``ĥ`` is Gauss-Newton-Bartlett (:class:`SophiaG`) or Hutchinson (:class:`SophiaH`). Where the
curvature is small or negative the ratio clips and the step is ``lr·sign(m)``. Lang et al. find
this grade the most fragile under quantization and relearning.

After each step ``last_unclipped_fraction`` holds the share of coordinates whose ratio stayed
inside ``(−1, 1)`` (the paper's "win rate"); the optimizers hand it to the engine's log through
:meth:`~robustunlearn.optim.base.OptimizerHooks.log_fields`. On FSDP-sharded parameters every
step is elementwise on the shards, and that share counts the coordinates of all shards (one
all-reduce per step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.optimizer import Optimizer, ParamsT

from robustunlearn.optim.base import Closure, OptimizerHooks, local_shard
from robustunlearn.optim.spec import OptimizerMemory, OptimizerSpec

HVP_METHODS = ("autograd", "finite-difference")


class _Sophia(OptimizerHooks, Optimizer):
    """The Sophia update; subclasses supply ``ĥ`` through :meth:`_hessian_diagonal`."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float],
        rho: float,
        eps: float,
        weight_decay: float,
        hessian_period: int,
        **extra: object,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr!r}; accepted: lr >= 0")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"invalid betas[{index}] {beta!r}; accepted: 0 <= beta < 1")
        if not rho > 0.0:
            raise ValueError(f"invalid rho {rho!r}; accepted: rho > 0")
        if hessian_period < 1:
            raise ValueError(f"invalid hessian_period {hessian_period!r}; accepted: an integer >= 1")
        defaults = {
            "lr": lr,
            "betas": betas,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "hessian_period": hessian_period,
            **extra,
        }
        super().__init__(params, defaults)
        self.last_unclipped_fraction: float | None = None
        self._shard_group: dist.ProcessGroup | None = None  # FSDP: the ranks whose shards make up each tensor

    def _hessian_diagonal(self, closure: Closure, groups: list[dict]) -> list[list[Tensor]]:
        """One ``ĥ`` per parameter of each group in ``groups``, estimated at the current θ."""
        raise NotImplementedError

    def log_fields(self) -> dict[str, Any]:
        return {"last_unclipped_fraction": self.last_unclipped_fraction}

    def enable_fsdp(self, model: nn.Module, mesh: DeviceMesh) -> None:
        self._shard_group = mesh.get_group()

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError(f"{type(self).__name__} needs a closure to estimate the Hessian")
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    # "step" counts optimizer steps, with or without a gradient for p, so all
                    # parameters of a group share one Hessian schedule.
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["hessian"] = torch.zeros_like(p)

        due = [
            group
            for group in self.param_groups
            if self.state[group["params"][0]]["step"] % group["hessian_period"] == 0
        ]
        # Estimated before the gradient, so p.grad holds the true gradient when step returns.
        if due:
            for group, estimates in zip(due, self._hessian_diagonal(closure, due)):
                beta2 = group["betas"][1]
                for p, estimate in zip(group["params"], estimates):
                    self.state[p]["hessian"].mul_(beta2).add_(estimate, alpha=1.0 - beta2)

        with torch.enable_grad():
            loss = closure()

        unclipped: list[Tensor] = []
        total = 0
        for group in self.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state[p]
                state["step"] += 1
                if p.grad is None:
                    continue
                state["exp_avg"].lerp_(p.grad, 1.0 - beta1)
                # eps below the dtype's smallest normal (1e-15 in float16) would underflow to 0.
                eps = max(group["eps"], torch.finfo(p.dtype).tiny)
                denominator = (group["rho"] * state["hessian"]).clamp_min_(eps)
                ratio = (state["exp_avg"] / denominator).clamp_(-1.0, 1.0)
                unclipped.append((local_shard(ratio).abs() < 1.0).sum())
                total += ratio.numel()  # a DTensor's numel is the whole tensor's
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(ratio, alpha=-group["lr"])
        self.last_unclipped_fraction = self._count(unclipped) / total if total else None
        return loss

    def _count(self, counts: list[Tensor]) -> int:
        """The sum of ``counts``, over the shards of every rank under FSDP."""
        if not counts:
            return 0
        count = torch.stack(counts).sum()
        if self._shard_group is not None:
            dist.all_reduce(count, group=self._shard_group)
        return int(count)


class SophiaG(_Sophia):
    """Sophia-G: the Gauss-Newton-Bartlett estimate (Liu et al., 2023, Algorithm 2)::

        ŷ_b ~ softmax(f(θ, x_b)),   L̂ = (1/B)·Σ_b ℓ(f(θ, x_b), ŷ_b),   ĥ = B · ∇L̂ ⊙ ∇L̂

    ``∇L̂`` comes from ``closure(sample_labels=True)`` (labels drawn from the model's own
    predictive distribution, see :mod:`robustunlearn.optim.base`), so ``ĥ`` is a non-negative
    (Gauss-Newton, Fisher) curvature of that output distribution, whatever loss ``closure()``
    returns: a scale for the clipping even where that loss curves downwards, but no estimate at
    all of a loss on anything else than the outputs (hidden activations: use :class:`SophiaH`,
    which differentiates ``closure``'s own loss; docs/engine.md has measurements).
    ``batch_size`` is B, the number of sampled labels that loss averages, i.e. scored tokens for a
    causal LM; it lives in the param groups, and a trainer whose B varies sets it before each
    step through the :meth:`set_batch_tokens` hook.
    Defaults follow the paper (β = (0.965, 0.99), γ = ``rho`` = 0.04, ε = 1e-15, k = 10)
    except weight decay, 0 here as for the other optimizers of this package.
    """

    wants_batch_tokens = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        hessian_period: int = 10,
        batch_size: int = 256,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"invalid batch_size {batch_size!r}; accepted: an integer >= 1")
        super().__init__(params, lr, betas, rho, eps, weight_decay, hessian_period, batch_size=batch_size)

    def set_batch_tokens(self, count: int) -> None:
        for group in self.param_groups:
            group["batch_size"] = count

    def _hessian_diagonal(self, closure: Closure, groups: list[dict]) -> list[list[Tensor]]:
        with torch.enable_grad():
            closure(sample_labels=True)
        return [
            [
                torch.zeros_like(p) if p.grad is None else p.grad.square().mul_(group["batch_size"])
                for p in group["params"]
            ]
            for group in groups
        ]


class SophiaH(_Sophia):
    """Sophia-H: the Hutchinson estimate ``ĥ = u ⊙ (∇²L·u)``, u Rademacher (±1, global torch RNG).

    ``hvp`` picks how the Hessian-vector product is computed:

    * ``"autograd"`` (default, exact): calls ``closure(backward=False)`` under
      ``torch.enable_grad()``, which must return the loss *with its autograd graph* (an extension
      of the closure protocol, where ``backward=False`` otherwise runs under ``no_grad``), then
      differentiates ``⟨∇L, u⟩`` again. The call runs under PyTorch's math SDPA backend, because
      the fused CPU and GPU attention kernels behind Hugging Face's default ``"sdpa"`` attention
      have no double backward; other kernels without one (e.g. flash-attention-2) still fail.
    * ``"finite-difference"``: ``∇²L·u ≈ (∇L(θ + r·u) − ∇L(θ − r·u)) / (2r)``, ``r = hvp_radius``,
      two ordinary ``closure()`` calls, so any model and closure work; the error is O(r²) plus
      rounding of order ``eps_dtype·|∇L| / r``: use float32 or wider and a deterministic closure
      (no dropout).

    Defaults otherwise as :class:`SophiaG`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        hessian_period: int = 10,
        hvp: str = "autograd",
        hvp_radius: float = 1e-3,
    ) -> None:
        if hvp not in HVP_METHODS:
            raise ValueError(f"invalid hvp {hvp!r}; accepted: {', '.join(HVP_METHODS)}")
        if not hvp_radius > 0.0:
            raise ValueError(f"invalid hvp_radius {hvp_radius!r}; accepted: hvp_radius > 0")
        super().__init__(params, lr, betas, rho, eps, weight_decay, hessian_period)
        # One Hessian-vector product serves every group, so these are not per-group options.
        self.hvp = hvp
        self.hvp_radius = hvp_radius

    def enable_fsdp(self, model: nn.Module, mesh: DeviceMesh) -> None:
        # torch's global RNG draws each rank's shard of u alike: the shards' probes would repeat
        raise ValueError("sophia-h does not run on FSDP-sharded parameters; use sophia-g, or parallel mode ddp")

    def enable_data_parallel(self, mean: Callable[[Tensor], Tensor]) -> None:
        if self.hvp == "autograd":
            # its Hessian-vector products never pass through the closure's gradient all-reduce
            raise ValueError(
                "sophia-h with hvp='autograd' cannot run in several processes; use hvp='finite-difference'"
            )

    def _hessian_diagonal(self, closure: Closure, groups: list[dict]) -> list[list[Tensor]]:
        params = [p for group in groups for p in group["params"]]
        probes = [torch.randint_like(p, 0, 2).mul_(2).sub_(1) for p in params]
        if self.hvp == "autograd":
            products = _autograd_hvp(closure, params, probes)
        else:
            products = _finite_difference_hvp(closure, params, probes, self.hvp_radius)
        estimates = iter([u * hu for u, hu in zip(probes, products)])
        return [[next(estimates) for _ in group["params"]] for group in groups]


def _autograd_hvp(closure: Closure, params: list[Tensor], probes: list[Tensor]) -> list[Tensor]:
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        loss = closure(backward=False)
        if loss.grad_fn is None:
            raise RuntimeError(
                "sophia-h with hvp='autograd' needs closure(backward=False), called under "
                "torch.enable_grad(), to return the loss with its autograd graph; this closure "
                "returned a loss without one. Use hvp='finite-difference' instead."
            )
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
        # Gradients that do not depend on θ (a loss linear in some parameter) have zero curvature.
        terms = [(g * u).sum() for g, u in zip(grads, probes) if g.requires_grad]
        if not terms:
            return [torch.zeros_like(p) for p in params]
        return list(torch.autograd.grad(sum(terms), params, allow_unused=True, materialize_grads=True))


def _finite_difference_hvp(closure: Closure, params: list[Tensor], probes: list[Tensor], radius: float) -> list[Tensor]:
    origins = [p.clone() for p in params]

    def gradient_at(offset: float) -> list[Tensor]:
        for p, origin, u in zip(params, origins, probes):
            p.copy_(origin).add_(u, alpha=offset)
        with torch.enable_grad():
            closure()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    plus = gradient_at(radius)
    minus = gradient_at(-radius)
    for p, origin in zip(params, origins):
        p.copy_(origin)
    return [gp.sub_(gm).div_(2.0 * radius) for gp, gm in zip(plus, minus)]


def _build(cls: type[Optimizer]) -> Callable:
    return lambda model, params, lr, options: cls(params, lr=lr, **options)


SPECS: dict[str, OptimizerSpec] = {
    "sophia-g": OptimizerSpec(
        "sophia-g",
        "second-order",
        1e-4,
        "Sophia-G: momentum over a clipped Gauss-Newton-Bartlett diagonal Hessian "
        "(sampled labels; options rho 0.04, hessian_period 10, batch_size = sampled labels per loss)",
        _build(SophiaG),
        # m and h; every parameter's curvature estimate at once; the update's denominator and ratio
        memory=OptimizerMemory(state=2, update_copies=1, tensor_copies=3),
    ),
    "sophia-h": OptimizerSpec(
        "sophia-h",
        "second-order",
        1e-4,
        "Sophia-H: momentum over a clipped Hutchinson diagonal Hessian "
        "(options hvp autograd|finite-difference, rho 0.04, hessian_period 10)",
        _build(SophiaH),
        # m and h; the Hessian-vector product keeps the backward's graph beside the forward's, with
        # the probes, the gradients with their graph and the products; then the estimates
        memory=OptimizerMemory(state=2, backward_graphs=2, closure_copies=3, update_copies=1, tensor_copies=3),
    ),
}
