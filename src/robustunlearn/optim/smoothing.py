"""First-order smoothing baselines: take the gradient at a perturbed θ, step from θ with a base optimizer.

* :class:`RandomizedSmoothing` (``fo-rs``): the gradient of the Gaussian-smoothed loss
  ``E_u L(θ + σu)``, the first-order counterpart of the smoothing that zeroth-order estimates
  perform implicitly (Lang et al., 2026, §4).
* :class:`SAM` (``sam``): sharpness-aware minimization (Foret et al., 2021), the gradient at the
  worst-case nearby point, as used for relearning-robust unlearning by Fan et al. (2025).

Both run on FSDP2-sharded weights (DTensors) unchanged: their closures run a backward, after
which FSDP reshards, so the next forward gathers the moved shards; ``fo-rs`` only on GPU meshes
(:meth:`RandomizedSmoothing.enable_fsdp`).

Both default to Adam as the base optimizer, so they differ from this package's first-order
reference (``adam``) only in where the gradient is taken; ``base=torch.optim.SGD`` (option
``base: sgd``) is the textbook form. The base optimizer shares the wrapper's ``param_groups``
and ``state``, so its moments are saved and restored by the wrapper's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import Optimizer, ParamsT

from robustunlearn.optim.base import OptimizerHooks
from robustunlearn.optim.spec import OptimizerMemory, OptimizerSpec

BASES: dict[str, type[Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class _PerturbedGradient(OptimizerHooks, Optimizer):
    """A base optimizer stepping from θ with a gradient that the subclass takes elsewhere (at
    :attr:`last_closure_at`)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        base: type[Optimizer],
        base_options: dict[str, Any],
        defaults: dict[str, Any],
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr!r}; accepted: lr >= 0")
        super().__init__(params, {"lr": lr, **defaults})
        # The base optimizer adds its own defaults (betas, momentum, ...) to our groups.
        self.base_optimizer = base(self.param_groups, lr=lr, **base_options)
        self._share_with_base()

    def _share_with_base(self) -> None:
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Loading replaced our groups and state with new objects; the base must see those.
        self._share_with_base()

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]


class RandomizedSmoothing(_PerturbedGradient):
    """First-order randomized smoothing (``fo-rs``)::

        g̃ = (1/q)·Σᵢ ∇L(θ + σ·uᵢ),   uᵢ ~ N(0, I) (global torch RNG),   q = ``samples``
        then the base optimizer (default Adam) steps from θ with g̃

    ``g̃`` is an unbiased estimate of ``∇ E_u L(θ + σu)``, the gradient of the loss smoothed by a
    Gaussian of width σ (``sigma``, per group). ``step`` returns the mean of the q perturbed
    losses, an estimate of that smoothed loss; afterwards ``p.grad`` holds ``g̃``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        sigma: float = 1e-3,
        samples: int = 1,
        base: type[Optimizer] = torch.optim.Adam,
        **base_options: Any,
    ) -> None:
        if not sigma >= 0.0:
            raise ValueError(f"invalid sigma {sigma!r}; accepted: sigma >= 0")
        if samples < 1:
            raise ValueError(f"invalid samples {samples!r}; accepted: an integer >= 1")
        super().__init__(params, lr, base, base_options, {"sigma": sigma})
        self.samples = samples  # closure calls per step, global rather than per group

    @property
    def last_closure_at(self) -> str:
        return "θ + σ·u"

    def enable_fsdp(self, model: nn.Module, mesh: DeviceMesh) -> None:
        """``randn_like`` of a sharded parameter draws each shard's part of one Gaussian on GPU
        meshes (DTensor's RNG tracker); on a CPU mesh every rank would draw from its own generator,
        seeded alike, the same noise on every shard."""
        if any(isinstance(p, DTensor) and p.device_mesh.device_type == "cpu" for p in self._params()):
            raise ValueError(
                "fo-rs cannot run sharded on CPU: DTensor would draw the same Gaussian noise on every "
                "shard; use a GPU mesh, or sam"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("RandomizedSmoothing needs a closure to take gradients at perturbed weights")
        origins = {p: p.clone() for p in self._params()}
        sums: dict[Tensor, Tensor] = {}
        losses = []
        for _ in range(self.samples):
            for group in self.param_groups:
                for p in group["params"]:
                    p.copy_(origins[p]).add_(torch.randn_like(p), alpha=group["sigma"])
            with torch.enable_grad():
                losses.append(closure())
            for p in origins:
                if p.grad is not None:
                    if p in sums:
                        sums[p].add_(p.grad)
                    else:
                        sums[p] = p.grad.clone()
        for p, origin in origins.items():
            p.copy_(origin)
            p.grad = sums[p].div_(self.samples) if p in sums else None
        self.base_optimizer.step()
        return torch.stack(losses).mean()


class SAM(_PerturbedGradient):
    """Sharpness-aware minimization (Foret et al., 2021, Algorithm 1)::

        g = ∇L(θ),   ε̂ = ρ·g / ‖g‖₂   (‖·‖₂ over all parameters)
        the base optimizer (default Adam) steps from θ with ∇L(θ + ε̂)

    Two closure calls per step; ``step`` returns the loss at θ, and afterwards ``p.grad`` holds
    ``∇L(θ + ε̂)``. ``rho`` is per group, the norm global.
    """

    def enable_fsdp(self, model: nn.Module, mesh: DeviceMesh) -> None:
        """Nothing to do: ‖g‖₂ of DTensor gradients reduces over every rank's shard, and the rest is
        elementwise."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        rho: float = 0.05,
        base: type[Optimizer] = torch.optim.Adam,
        **base_options: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"invalid rho {rho!r}; accepted: rho >= 0")
        super().__init__(params, lr, base, base_options, {"rho": rho})

    @property
    def last_closure_at(self) -> str:
        return "θ + ρ·g/‖g‖"

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM needs a closure to take the gradient at the ascended weights")
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad for p in self._params() if p.grad is not None]
        if not grads:
            raise RuntimeError("SAM's closure left no gradient on any parameter")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        origins = {}
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)  # 1e-12: a zero gradient leaves θ where it is
            for p in group["params"]:
                if p.grad is not None:
                    origins[p] = p.clone()
                    p.add_(p.grad * scale)
        with torch.enable_grad():
            closure()
        for p, origin in origins.items():
            p.copy_(origin)
        self.base_optimizer.step()
        return loss


def _build(cls: type[_PerturbedGradient]) -> Callable:
    def build(model: torch.nn.Module, params: list, lr: float, options: dict[str, Any]) -> Optimizer:
        options = dict(options)
        base = options.pop("base", "adam")
        if base not in BASES:
            raise ValueError(f"unknown base optimizer {base!r}; accepted: {', '.join(BASES)}")
        return cls(params, lr=lr, base=BASES[base], **options)

    return build


SPECS: dict[str, OptimizerSpec] = {
    "fo-rs": OptimizerSpec(
        "fo-rs",
        "smoothing",
        1e-4,
        "first-order randomized smoothing: gradient at θ + σu, u Gaussian (options sigma 1e-3, "
        "samples 1), then a base step from θ (option base: adam|sgd, default adam)",
        _build(RandomizedSmoothing),
        # Adam's m and v; θ saved through the closure; then θ and the summed gradients beside the
        # closure's, and θ beside the base Adam's foreach temporaries
        memory=OptimizerMemory(state=2, closure_copies=1, update_copies=2, tensor_copies=1),
    ),
    "sam": OptimizerSpec(
        "sam",
        "smoothing",
        1e-4,
        "sharpness-aware minimization: gradient at θ + ρ·g/‖g‖ (option rho 0.05), then a base "
        "step from θ (option base: adam|sgd, default adam)",
        _build(SAM),
        # Adam's m and v; θ saved through the second closure and the base step (foreach temporaries)
        memory=OptimizerMemory(state=2, closure_copies=1, update_copies=2, tensor_copies=1),
    ),
}
