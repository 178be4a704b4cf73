"""Zeroth-order optimizers: gradient estimates from loss values only (no backward, no ``.grad``).

Every step draws ``q`` random directions ``z`` with ``E[z zᵀ] = I`` and measures the loss along
each, MeZO-style (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"):
the weights move in place to ``θ + eps·z``, ``θ − eps·z`` and back, and ``z`` is regenerated from
a seed at each move instead of being stored. The projected gradients and the estimate are

    two-sided:  p_k = (L(θ + eps·z_k) − L(θ − eps·z_k)) / (2·eps)      (≈ ∇L·z_k)
    one-sided:  p_k = (L(θ + eps·z_k) − L(θ)) / eps
    ĝ = (1/q) · Σ_k p_k · z_k                                          (E ĝ → ∇L as eps → 0)

Directions (``directions=``): ``"rademacher"`` (z_i = ±1: the cheapest to draw, and the lowest
variance), ``"gaussian"`` (z ~ N(0, I), as in MeZO), ``"sphere"`` (z uniform on the sphere of
radius √d, d = number of optimized weights: ĝ is then ``d·(∇L·u)·u`` for a unit ``u``, the
estimator of the paper and of R-AdaZO, whose smoothing radius μ is ``eps·√d`` here). ``eps`` is
the perturbation per coordinate in all three cases, so learning rates carry over between them.

Exact round trip. ``θ + a − 2a + a`` is not ``θ`` in floating point, and no scheme can restore
arbitrary weights without a copy: near 0 the floats are denser than near ``a``, so ``θ ↦ θ + a``
cannot be inverted there. Fixed-point arithmetic is exact, so float32/float64 tensors are kept
on a grid ``h = 2**(e − digits)`` (``digits`` = 24 or 53; ``2**(e−1)`` is the first power of two
above ``max|θ| + max|eps·z|``, leaving a spare bit). Perturbations are rounded to multiples of
``h``, and sums of multiples of ``h`` up to ``2**e`` in magnitude are exact, so perturb and
restore commit no rounding error at all. Weights off the grid (at the first step, after a write
by another optimizer, or when a tensor's range crosses a power of two) are first rounded onto it:
a change of at most ``h/2``, one ulp of the tensor's largest entry. Rademacher moves need no
per-element rounding: ``eps`` is rounded once to a multiple of every tensor's grid, and ±1 times
a grid value is a grid value. float16/bfloat16 have too few digits for a per-tensor grid and use
plain arithmetic (their round trip drifts by a few ulps per step, as MeZO's does).

Unbiased updates. The update ``Δ`` is put on the grid by stochastic rounding,

    Δ̃ = h·⌊Δ/h + U⌋,   U ~ Uniform[0, 1) per coordinate,   so   E[Δ̃] = Δ   and   |Δ̃ − Δ| < h,

which keeps the expected weight change equal to the update at any lr, however small against
``h``. Rounding to the nearest grid point would drop every update below ``h/2`` and distort the
others (an update of ``0.6·h`` would move a weight by ``h``, +67%). The alternatives are worse:
adding ``Δ`` in float32 and snapping onto the grid at the next step is rounding to nearest again,
and carrying the rounding residual to the next step (error feedback) is unbiased too but holds a
float32 buffer as large as the weights, the memory a zeroth-order optimizer exists to save. The
rounding noise, of variance below ``h²/4`` per coordinate (``h`` ≈ 1e-8 for weights of size 0.1),
is negligible next to the estimate's own. ``U`` comes from a generator seeded with a hash of
``(seed, t, i)`` (parameter ``i`` at step ``t``, a stream apart from the directions'), so it
needs no state: a resumed run rounds exactly as an uninterrupted one.

Cost. A two-sided step draws each direction three times (``+eps``, ``−2·eps``, then one draw for
restore and update) instead of MeZO's four; ``fuse=False`` restores in a pass of its own (same
result, bit for bit, one more draw). One-sided steps draw twice but also evaluate ``L(θ)``. The
update draws one uniform per weight for its rounding (a temporary the size of the tensor).

Randomness never touches the default generator: direction ``k`` of parameter ``i`` at step ``t``
comes from a dedicated ``torch.Generator`` seeded with a hash of ``(seed, t, k, i)``, so ranks
that share ``seed`` draw the same directions and need to all-reduce only the ``q`` projected
gradients (``reduce_projected_grad``). ``seed`` and ``t`` are in the ``state_dict``.

Sharded weights (FSDP2, :meth:`ZerothOrderOptimizer.enable_fsdp`). Under
``fully_shard`` every parameter is a DTensor split along its first dimension, and each rank moves
only its own shard, in place: no rank ever holds a whole ``z`` or a copy of the weights, so memory
stays at inference level. ``z`` is then drawn in chunks of ``chunk`` elements of the flattened
parameter (:data:`SHARD_CHUNK` unless given), chunk ``c`` from a generator seeded with
``(seed, t, k, i, c)``; a rank draws the chunks its shard overlaps and keeps its part, so ``z`` is
the same however the rows are split (one process included) and a rank draws at most its shard plus
two chunks. Chunk 0 has the whole-tensor seed, so a tensor of at most ``chunk`` elements draws the
very ``z`` of an unsharded run. The ranks all-reduce the ``q`` projected gradients (means of their
loss differences, each rank evaluating its shard of the batch), each tensor's ``max|θ|`` for its grid,
and for sphere directions ``|n_k|²``: scalars only. Before each forward the optimizer reshards the
model, since FSDP keeps the root module's gathered weights after a forward without backward, and
the next forward would not see the moved shards.

Where the loss is taken. The closure is called under ``torch.no_grad()`` without backward, which
the closure protocol evaluates with dropout off (:mod:`robustunlearn.optim.base`): every call
sees the same function of θ. ``step`` returns the loss at θ (see :meth:`ZerothOrderOptimizer.step`),
but the step's last closure call is at ``θ − eps·z_q`` (two-sided) or ``θ + eps·z_q``
(one-sided), which :attr:`~ZerothOrderOptimizer.last_closure_at` says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from robustunlearn.optim.base import Closure, OptimizerHooks, check_betas
from robustunlearn.optim.spec import OptimizerMemory, OptimizerSpec

DIRECTIONS = ("rademacher", "gaussian", "sphere")
_DIGITS = {torch.float32: 24, torch.float64: 53}  # significand bits of the exactly handled dtypes
# |z| bound used to size the grid for Gaussian directions: torch's Box-Muller draws stay below
# ~8.6 even from 53-bit uniforms, and the grid's spare bit absorbs anything up to twice this.
_GAUSSIAN_BOUND = 9.0
_MASK64 = (1 << 64) - 1
_ROUNDING = -1  # the "direction" index of the stochastic-rounding stream (directions are 0..q-1)
# Elements per independently seeded chunk of a sharded draw: 4 MB of float32, large enough that
# reseeding costs nothing next to the draw (module docstring), small next to a 7B layer's shard.
SHARD_CHUNK = 2**20


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, step: int, direction: int, index: int, chunk: int = 0) -> int:
    """The generator seed of direction ``direction`` of parameter ``index`` at step ``step``, for
    its chunk ``chunk`` in a chunked draw (chunk 0 has the seed of the whole-tensor stream)."""
    x = _splitmix64(seed & _MASK64)
    for value in (step, direction, index):
        x = _splitmix64(x ^ (value & _MASK64))
    return x if chunk == 0 else _splitmix64(x ^ chunk)


def _local(tensor: Tensor) -> Tensor:
    """The elements of ``tensor`` this rank holds and writes: a DTensor's local shard, else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class _Slot(NamedTuple):
    """One parameter as this rank holds it."""

    group: dict[str, Any]
    param: Tensor  # the parameter (a DTensor under FSDP): the key of its state
    local: Tensor  # the elements this rank moves (the parameter itself when unsharded)
    offset: int  # flat index, within the parameter, of local's first element
    index: int  # position in param_groups' order: picks the parameter's random streams


class ZerothOrderOptimizer(OptimizerHooks, torch.optim.Optimizer):
    """Base class: the seeded perturb / evaluate / restore loop. Subclasses turn the estimate
    ``ĝ`` into an update (``_delta``).

    Per-group options: ``lr``, ``weight_decay`` (decoupled, ``θ ← θ − lr·wd·θ``, applied only to
    tensors with two or more dimensions, so biases and norm gains are not decayed). The rest is
    global: ``eps`` (perturbation per coordinate), ``q`` (directions per step, averaged),
    ``two_sided``, ``directions`` (see :data:`DIRECTIONS`), ``seed`` (``None``: drawn once from
    torch's default generator), ``term`` (passed to the closure, e.g. ``"forget"``),
    ``reduce_projected_grad`` (maps the tensor of the ``q`` projected gradients to the values to
    use, e.g. an all-reduce mean across data-parallel ranks), ``fuse`` (restore and update in one
    pass), ``chunk`` (draw every tensor's ``z`` in independently seeded chunks of this many
    elements, as sharded runs do; ``None``: one stream per tensor, or :data:`SHARD_CHUNK` once
    sharded). The closure is called as ``closure(backward=False, term=term)`` under ``no_grad``, so
    with dropout off (the closure protocol's function values).

    After a step, ``projected_grads`` holds its ``q`` projected gradients and
    :meth:`direction` regenerates its directions; ``steps_taken`` counts steps (and seeds them).

    In several processes (:meth:`enable_data_parallel`) the ranks share ``seed``, so they draw the
    same directions, and average their projected gradients through ``reduce_projected_grad``;
    with FSDP (:meth:`enable_fsdp`) each rank moves its shards only (module docstring).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        eps: float = 1e-3,
        q: int = 1,
        two_sided: bool = True,
        directions: str = "rademacher",
        seed: int | None = None,
        term: str | None = None,
        reduce_projected_grad: Callable[[Tensor], Tensor] | None = None,
        fuse: bool = True,
        chunk: int | None = None,
    ) -> None:
        if not defaults["lr"] >= 0.0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        if not defaults["weight_decay"] >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {defaults['weight_decay']}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not (isinstance(q, int) and q >= 1):
            raise ValueError(f"q must be a positive integer, got {q!r}")
        if directions not in DIRECTIONS:
            raise ValueError(f"unknown directions {directions!r}; accepted: {', '.join(DIRECTIONS)}")
        if chunk is not None and not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
        super().__init__(params, defaults)
        self.eps = eps
        self.q = q
        self.two_sided = two_sided
        self.directions = directions
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        self.term = term
        self.reduce_projected_grad = reduce_projected_grad
        self.fuse = fuse
        self.chunk = chunk
        self.steps_taken = 0
        self.projected_grads: list[float] = []  # of the last step, after reduce_projected_grad
        self._norms: list[float] = []  # sphere: |n_k| of the last step's raw Gaussian draws
        self._dim = sum(p.numel() for group in self.param_groups for p in group["params"])
        self._generators: dict[torch.device, torch.Generator] = {}
        self._sign_tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # p -> (h, version of p's local elements) after our last write: while it holds, p is on grid h
        self._on_grid: dict[Tensor, tuple[float, int]] = {}
        # FSDP (enable_fsdp): each shard's flat offset, the ranks' group, the modules to reshard
        self._offsets: dict[Tensor, int] = {}
        self._shard_group: dist.ProcessGroup | None = None
        self._fsdp_modules: list[FSDPModule] = []

    # -- subclass hooks ------------------------------------------------------------------------

    def _weight(self, projected_grad: float) -> float:
        """How a direction's projected gradient weighs its ``z`` in ``ĝ`` (ZO-sign: its sign)."""
        return projected_grad

    def _delta(self, p: Tensor, group: dict[str, Any], estimate: Tensor) -> Tensor:
        """The update of ``p``'s local elements (added to them) from their slice of ``ĝ``; may
        overwrite ``estimate``. State tensors are made like ``p`` (sharded as it is) and updated
        through :func:`_local`."""
        return estimate.mul_(-group["lr"])

    # -- public ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure) -> Tensor:  # type: ignore[override]
        """One ZO step. Returns ``L(θ)`` (one-sided) or ``(L(θ + eps·z_1) + L(θ − eps·z_1))/2``,
        which is ``L(θ) + O(eps²)`` (two-sided), both at the weights θ before the update (under
        data parallelism, this rank's loss)."""
        if closure is None:
            raise ValueError("zeroth-order optimizers need a closure that returns the loss")
        slots = self._slots()
        self._reshard()  # a forward outside this step may have left gathered weights behind
        grids = self._prepare_grids(slots)
        scale = self._common_eps(grids)
        # the last move leaves θ − eps·z (two-sided) or θ + eps·z (one-sided): the restoring factor
        restore = 1.0 if self.two_sided else -1.0

        def loss_at() -> Tensor:
            loss = closure(backward=False, term=self.term).detach()
            self._reshard()  # the next forward must gather the shards as the next move leaves them
            return loss

        base = None if self.two_sided else loss_at()
        projected, self._norms = [], []
        loss = base
        for k in range(self.q):
            norm = self._move(slots, grids, k, 1.0, scale)
            plus = loss_at()
            if self.two_sided:
                self._move(slots, grids, k, -2.0, scale)
                minus = loss_at()
                difference = (float(plus) - float(minus)) / 2
                loss = (plus + minus) / 2 if loss is None else loss
            else:
                difference = float(plus) - float(base)
            step_length = scale
            if self.directions == "sphere":  # θ moved by eps·n = eps·(|n|/√d)·z
                self._norms.append(norm)
                step_length = scale * norm / math.sqrt(self._dim)
            projected.append(difference / step_length)
            if k < self.q - 1 or not self.fuse:
                self._move(slots, grids, k, restore, scale)
        self.projected_grads = self._reduce(projected, slots[0].local.device)
        self._update(slots, grids, scale, restore if self.fuse else 0.0)
        self.steps_taken += 1
        return loss

    def direction(self, index: int, k: int = 0) -> Tensor:
        """Direction ``z_k`` that the last step used for parameter ``index`` (in the order of
        ``param_groups``), regenerated from its seed; under FSDP, this rank's shard of it."""
        if not self.projected_grads:
            raise RuntimeError("this optimizer has not taken a step yet")
        if not 0 <= k < self.q:
            raise ValueError(f"direction k={k} out of range; this optimizer draws q={self.q}")
        z = self._noise(self._slots()[index], k, self.steps_taken - 1)
        if self.directions == "sphere":
            z.mul_(math.sqrt(self._dim) / self._norms[k])
        return z

    @property
    def last_closure_at(self) -> str:
        k = "z" if self.q == 1 else "z_q"
        return f"θ − eps·{k}" if self.two_sided else f"θ + eps·{k}"

    def enable_data_parallel(self, mean: Callable[[Tensor], Tensor]) -> None:
        if self.reduce_projected_grad is None:
            self.reduce_projected_grad = mean

    def enable_fsdp(self, model: nn.Module, mesh: DeviceMesh) -> None:
        """Move each rank's shards only, with ``z`` drawn in chunks (module docstring); average the
        projected gradients over the mesh unless :meth:`enable_data_parallel` chose how."""
        mesh = None
        for group in self.param_groups:
            for p in group["params"]:
                if not (isinstance(p, DTensor) and p.device_mesh.ndim == 1 and p.placements == (Shard(0),)):
                    raise ValueError(
                        "zeroth-order optimizers run under FSDP only with every optimized parameter sharded "
                        f"along its first dimension on a 1-D mesh (fully_shard); got a {type(p).__name__} "
                        f"of shape {tuple(p.shape)}" + (f" placed {p.placements}" if isinstance(p, DTensor) else "")
                    )
                mesh = mesh or p.device_mesh
                if p.device_mesh != mesh:
                    raise ValueError("zeroth-order optimizers under FSDP need all parameters on one device mesh")
                rows, start = Shard.local_shard_size_and_offset(p.shape[0], mesh.size(), mesh.get_local_rank())
                if rows != p.to_local().shape[0]:
                    raise ValueError(f"a shard of {rows} rows was expected, {p.to_local().shape[0]} found")
                self._offsets[p] = start * math.prod(p.shape[1:])
        self._shard_group = mesh.get_group()
        self._fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if self.chunk is None:
            self.chunk = SHARD_CHUNK
        if self.reduce_projected_grad is None:
            self.reduce_projected_grad = self._mean_over_shards

    def precision_warnings(self) -> list[str]:
        # the perturb-and-restore round trip is exact in float32 and float64 only (module docstring)
        low = {
            str(p.dtype).removeprefix("torch.")
            for group in self.param_groups
            for p in group["params"]
            if p.dtype.is_floating_point and torch.finfo(p.dtype).bits < 32
        }
        if not low:
            return []
        return [
            f"perturbs and restores {', '.join(sorted(low))} weights inexactly (they drift a few ulps per step); "
            "load the model in float32 (dtype: float32) for exact steps"
        ]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zeroth_order"] = {"seed": self.seed, "steps_taken": self.steps_taken}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("zeroth_order")
        super().load_state_dict(state_dict)
        self.seed, self.steps_taken = counters["seed"], counters["steps_taken"]

    # -- internals -------------------------------------------------------------------------------

    def _slots(self) -> list[_Slot]:
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        if self._shard_group is None and any(isinstance(p, DTensor) for _, p in params):
            raise ValueError("sharded (DTensor) parameters need enable_fsdp(model, mesh) before the first step")
        return [_Slot(g, p, _local(p), self._offsets.get(p, 0), i) for i, (g, p) in enumerate(params)]

    def _reshard(self) -> None:
        for module in self._fsdp_modules:
            module.reshard()

    def _all_reduce(self, tensor: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
        """``tensor`` reduced in place over the ranks that hold shards (itself when unsharded)."""
        if self._shard_group is not None:
            dist.all_reduce(tensor, op=op, group=self._shard_group)
        return tensor

    def _mean_over_shards(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM).div_(dist.get_world_size(self._shard_group))

    def _reduce(self, projected: list[float], device: torch.device) -> list[float]:
        if self.reduce_projected_grad is None:
            return projected
        reduced = self.reduce_projected_grad(torch.tensor(projected, dtype=torch.float64, device=device))
        return [float(v) for v in reduced.tolist()]

    def _generator(self, device: torch.device, step: int, k: int, index: int, chunk: int = 0) -> torch.Generator:
        """This device's generator, seeded for chunk ``chunk`` of stream ``k`` of parameter ``index``
        at ``step``."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(stream_seed(self.seed, step, k, index, chunk))

    def _draw(self, slot: _Slot, k: int, step: int, fill: Callable[[Tensor, torch.Generator], None]) -> Tensor:
        """Stream ``k`` of ``slot``'s parameter at ``step``, shaped like its local elements:
        ``fill(out, generator)`` fills a flat tensor, the whole of it or, in chunked mode, each
        chunk the local elements overlap (of which they keep their part)."""
        local = slot.local
        values = torch.empty(local.numel(), dtype=local.dtype, device=local.device)
        if self.chunk is None:
            fill(values, self._generator(local.device, step, k, slot.index))
            return values.view(local.shape)
        start, end, total = slot.offset, slot.offset + local.numel(), slot.param.numel()
        for chunk in range(start // self.chunk, -(-end // self.chunk)):
            low, high = chunk * self.chunk, min((chunk + 1) * self.chunk, total)
            generator = self._generator(local.device, step, k, slot.index, chunk)
            if start <= low and high <= end:  # a chunk wholly local: drawn in place
                fill(values[low - start : high - start], generator)
                continue
            drawn = torch.empty(high - low, dtype=local.dtype, device=local.device)
            fill(drawn, generator)
            kept_low, kept_high = max(low, start), min(high, end)
            values[kept_low - start : kept_high - start] = drawn[kept_low - low : kept_high - low]
        return values.view(local.shape)

    def _noise(self, slot: _Slot, k: int, step: int | None = None) -> Tensor:
        """Fresh draw of the raw direction (±1 or N(0, 1), shaped like ``slot.local``)."""
        step = self.steps_taken if step is None else step
        if self.directions != "rademacher":
            return self._draw(slot, k, step, lambda out, generator: out.normal_(generator=generator))
        table = self._sign_table(slot.local)
        return self._draw(slot, k, step, lambda out, generator: self._fill_signs(out, table, generator))

    @staticmethod
    def _fill_signs(out: Tensor, table: Tensor, generator: torch.Generator) -> None:
        """Fair ±1 signs into the flat ``out``: 64 per random word, read byte by byte through ``table``."""
        words = torch.empty((out.numel() + 63) // 64, dtype=torch.int64, device=out.device)
        words.random_(-(2**63), None, generator=generator)  # full 64-bit range: every bit fair
        codes = words.view(torch.uint8).int()
        if out.numel() % 64 == 0:
            torch.index_select(table, 0, codes, out=out.view(-1, 8))
        else:
            out.copy_(table.index_select(0, codes).view(-1)[: out.numel()])

    def _sign_table(self, p: Tensor) -> Tensor:
        key = (p.device, p.dtype)
        if key not in self._sign_tables:
            bits = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=p.device)
            byte = torch.arange(256, device=p.device).to(torch.uint8)[:, None]
            self._sign_tables[key] = torch.where(byte & bits != 0, 1.0, -1.0).to(p.dtype)
        return self._sign_tables[key]

    @staticmethod
    def _max_abs(local: Tensor, device: torch.device) -> Tensor:
        """``max|local|`` in float64 (0 for no elements: a rank may hold none of a small tensor's rows)."""
        if not local.numel():
            return torch.zeros((), dtype=torch.float64, device=device)
        lowest, highest = torch.aminmax(local)
        return torch.maximum(highest, -lowest).to(device, torch.float64)

    def _spans(self, slots: list[_Slot], exact: list[bool]) -> list[float]:
        """``max|θ|`` of each exactly handled tensor over all its shards, fetched with one
        synchronisation; NaN becomes inf, which the max over ranks keeps."""
        device = slots[0].local.device
        maxima = [self._max_abs(s.local, device) for s, e in zip(slots, exact) if e]
        if not maxima:
            return []
        return self._all_reduce(torch.stack(maxima).nan_to_num_(nan=math.inf), dist.ReduceOp.MAX).tolist()

    def _prepare_grids(self, slots: list[_Slot]) -> list[float | None]:
        """Each parameter's grid step ``h`` for this step (``None``: plain arithmetic), from its
        ``max|θ|`` over all shards; weights that are off their grid are rounded onto it."""
        exact = [s.local.dtype in _DIGITS and s.param.numel() > 0 for s in slots]
        spans = iter(self._spans(slots, exact))
        reach = self.eps * (1.0 if self.directions == "rademacher" else _GAUSSIAN_BOUND)
        grids: list[float | None] = []
        for s, e in zip(slots, exact):
            if not e:
                grids.append(None)
                continue
            span = next(spans)
            if not math.isfinite(span):
                raise ValueError(f"a parameter of shape {tuple(s.param.shape)} holds non-finite values")
            # span + reach < 2**(exponent - 1): one spare bit below the limit 2**exponent
            exponent = math.frexp(span + reach)[1] + 1
            h = math.ldexp(1.0, exponent - _DIGITS[s.local.dtype])
            cached = self._on_grid.get(s.param)
            if cached is None or cached[1] != s.local._version or cached[0] < h:
                s.local.div_(h).round_().mul_(h)  # exact: h is a power of two
            grids.append(h)
        return grids

    def _common_eps(self, grids: list[float | None]) -> float:
        """``eps``, for Rademacher directions rounded to a multiple of every tensor's grid."""
        if self.directions != "rademacher":
            return self.eps
        coarsest = max((h for h in grids if h is not None), default=None)
        scale = self.eps if coarsest is None else round(self.eps / coarsest) * coarsest
        if scale == 0.0:
            raise ValueError(f"eps={self.eps} is below the resolution {coarsest} of the largest weights; raise eps")
        return scale

    def _move(self, slots: list[_Slot], grids: list[float | None], k: int, coefficient: float, scale: float) -> float:
        """``θ += coefficient·eps·z_k`` for every parameter; returns |n_k| for sphere directions
        (whose moves use the raw Gaussian draw ``n_k``, of norm ≈ √d, summed over shards), else 0."""
        norms = []
        for slot, grid in zip(slots, grids):
            noise = self._noise(slot, k)
            if self.directions == "sphere" and coefficient == 1.0:
                norms.append(torch.linalg.vector_norm(noise, dtype=torch.float64))
            self._add_perturbation(slot.local, noise, coefficient, scale, grid)
        squares = sum(n.item() ** 2 for n in norms)
        if norms and self._shard_group is not None:
            total = torch.tensor(squares, dtype=torch.float64, device=slots[0].local.device)
            squares = self._all_reduce(total, dist.ReduceOp.SUM).item()
        return math.sqrt(squares)

    def _add_perturbation(self, p: Tensor, noise: Tensor, coefficient: float, scale: float, h: float | None) -> None:
        """``p += coefficient·round_h(scale·noise)``; leaves ``noise`` intact."""
        if self.directions == "rademacher" or h is None:
            p.add_(noise, alpha=coefficient * scale)
        else:
            p.add_(torch.round(noise * (scale / h)), alpha=coefficient * h)

    def _update(self, slots: list[_Slot], grids: list[float | None], scale: float, restore: float) -> None:
        """Last pass: add ``restore·eps·z_q`` (undoing the last perturbation), then the update,
        stochastically rounded onto the grid."""
        if self.directions == "sphere":
            lengths = [math.sqrt(self._dim) / norm for norm in self._norms]
        else:
            lengths = [1.0] * self.q
        weights = [self._weight(p) * c / self.q for p, c in zip(self.projected_grads, lengths)]
        last = self.q - 1
        for slot, h in zip(slots, grids):
            estimate = None
            for k, w in enumerate(weights):
                noise = self._noise(slot, k)
                if k == last and restore:
                    self._add_perturbation(slot.local, noise, restore, scale, h)
                estimate = noise.mul_(w) if estimate is None else estimate.add_(noise, alpha=w)
            delta = self._delta(slot.param, slot.group, estimate)
            if slot.param.ndim >= 2 and slot.group["weight_decay"]:
                delta.add_(slot.local, alpha=-slot.group["lr"] * slot.group["weight_decay"])
            if h is not None:
                self._round_stochastically(delta, h, slot)
            slot.local.add_(delta)
            if h is not None:
                self._on_grid[slot.param] = (h, slot.local._version)

    def _round_stochastically(self, delta: Tensor, h: float, slot: _Slot) -> None:
        """``delta ← h·⌊delta/h + U⌋`` in place, U ~ Uniform[0, 1) from the parameter's rounding
        stream of this step: unbiased, ``E[result] = delta``."""
        uniform = self._draw(
            slot, _ROUNDING, self.steps_taken, lambda out, generator: out.uniform_(generator=generator)
        )
        delta.div_(h).add_(uniform).floor_().mul_(h)


class ZOSGD(ZerothOrderOptimizer):
    """ZO-SGD (MeZO): ``b ← μ·b + ĝ`` (without momentum ``b = ĝ``), ``θ ← θ − lr·b``."""

    def __init__(
        self,
        params,
        lr: float = 3e-4,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, **options)

    def _delta(self, p: Tensor, group: dict[str, Any], estimate: Tensor) -> Tensor:
        if group["momentum"] == 0.0:
            return estimate.mul_(-group["lr"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)  # sharded as p is
            buffer = _local(state["momentum_buffer"]).copy_(estimate)
        else:
            buffer = _local(state["momentum_buffer"]).mul_(group["momentum"]).add_(estimate)
        return buffer.mul(-group["lr"])


class ZOAdam(ZerothOrderOptimizer):
    """ZO-Adam: Adam's moments on the estimate (as ZO-AdaMM, Chen et al. 2019, without its max):

    m ← β1·m + (1−β1)·ĝ,   v ← β2·v + (1−β2)·ĝ²,
    θ ← θ − lr·(m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + adam_eps).
    """

    def __init__(
        self,
        params,
        lr: float = 3e-4,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        directions: str = "gaussian",
        **options: Any,
    ) -> None:
        check_betas(betas)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "adam_eps": adam_eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults, directions=directions, **options)

    def _delta(self, p: Tensor, group: dict[str, Any], estimate: Tensor) -> Tensor:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        m.lerp_(estimate, 1 - beta1)
        v.mul_(beta2).addcmul_(estimate, estimate, value=1 - beta2)
        denominator = (v / (1 - beta2 ** state["step"])).sqrt_().add_(group["adam_eps"])
        return torch.div(m, denominator, out=estimate).mul_(-group["lr"] / (1 - beta1 ** state["step"]))


class ZOAdaZO(ZerothOrderOptimizer):
    """R-AdaZO (Shu, Zhang, He & Dai, "Refining Adaptive Zeroth-Order Optimization at Ease",
    ICML 2025, arXiv:2502.01014, Algorithm 1): the second moment is driven by the *first*
    moment, whose averaging already removed much of the estimate's variance:

        m ← β1·m + (1−β1)·ĝ,   v ← β2·v + (1−β2)·m²,   θ ← θ − lr·m / sqrt(v + ζ),

    with no bias correction (so the first steps move by up to ``lr/sqrt(1−β2)`` per coordinate),
    and ĝ the one-sided estimate on the unit sphere (``d·(L(θ+μu) − L(θ))/μ·u``) by default.
    The paper puts ζ inside the square root (public implementations add ε = 1e-8 outside it
    instead; ``zeta=1e-16`` inside gives the same floor).
    """

    def __init__(
        self,
        params,
        lr: float = 3e-5,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        zeta: float = 1e-16,
        weight_decay: float = 0.0,
        directions: str = "sphere",
        two_sided: bool = False,
        **options: Any,
    ) -> None:
        check_betas(betas)
        if not zeta > 0.0:
            raise ValueError(f"zeta must be > 0, got {zeta}")
        defaults = {"lr": lr, "betas": tuple(betas), "zeta": zeta, "weight_decay": weight_decay}
        super().__init__(params, defaults, directions=directions, two_sided=two_sided, **options)

    def _delta(self, p: Tensor, group: dict[str, Any], estimate: Tensor) -> Tensor:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        m.lerp_(estimate, 1 - beta1)
        v.mul_(beta2).addcmul_(m, m, value=1 - beta2)
        denominator = torch.add(v, group["zeta"], out=estimate).sqrt_()
        return torch.div(m, denominator, out=estimate).mul_(-group["lr"])


class ZOSign(ZerothOrderOptimizer):
    """ZO-signSGD in two forms. ``elementwise=False`` (ZO-Bench's ZO-SGD-Sign, Zhang et al. 2024,
    "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning"): the sign of each
    projected gradient scales its direction, ``θ ← θ − lr·(1/q)·Σ sign(p_k)·z_k``.
    ``elementwise=True`` (Liu et al. 2019, "signSGD via Zeroth-Order Oracle"): the sign of the
    estimate, ``θ ← θ − lr·sign(ĝ)``. With Rademacher directions and q = 1 they coincide.
    """

    def __init__(
        self,
        params,
        lr: float = 5e-4,
        *,
        elementwise: bool = False,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> None:
        self.elementwise = elementwise
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, **options)

    def _weight(self, projected_grad: float) -> float:
        if self.elementwise:
            return projected_grad
        return float((projected_grad > 0) - (projected_grad < 0))

    def _delta(self, p: Tensor, group: dict[str, Any], estimate: Tensor) -> Tensor:
        if self.elementwise:
            estimate.sign_()
        return estimate.mul_(-group["lr"])


def _memory(state: int, directions: str) -> OptimizerMemory:
    """No gradients, ``state`` moments; a parameter's update holds its direction and its rounding
    noise, and a Gaussian or sphere move also ``noise·(eps/h)`` and its rounding (3 copies at most)."""
    return OptimizerMemory(state=state, backward_graphs=0, tensor_copies=2 if directions == "rademacher" else 3)


def _spec(
    name: str, cls: type, lr: float, description: str, memory: OptimizerMemory, **default_options: Any
) -> OptimizerSpec:
    def build(model: nn.Module, params: list[nn.Parameter], lr: float, options: dict[str, Any]):
        return cls(params, lr=lr, **options)

    return OptimizerSpec(name, "zeroth-order", lr, description, build, default_options, memory=memory)


SPECS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "zo-sgd",
            ZOSGD,
            3e-4,
            "ZO-SGD (MeZO): two-point estimate along Rademacher directions, fused in-place passes",
            _memory(0, "rademacher"),
        ),
        _spec(
            "zo-adam",
            ZOAdam,
            3e-4,
            "ZO-Adam: Adam moments on a two-point Gaussian ZO estimate",
            _memory(2, "gaussian"),
        ),
        _spec(
            "zo-adazo",
            ZOAdaZO,
            3e-5,
            "R-AdaZO: adaptive ZO, second moment from the first moment, unit-sphere directions",
            _memory(2, "sphere"),
        ),
        _spec(
            "zo-sign",
            ZOSign,
            5e-4,
            "ZO-signSGD (ZO-Bench): sign of each projected gradient times its direction",
            _memory(0, "rademacher"),
        ),
        _spec(
            "zo-sign-elementwise",
            ZOSign,
            5e-4,
            "ZO-signSGD, elementwise sign of the ZO estimate (Gaussian directions)",
            _memory(0, "gaussian"),
            elementwise=True,
            directions="gaussian",
        ),
    )
}

__all__ = [
    "DIRECTIONS",
    "SPECS",
    "ZOSGD",
    "ZOAdaZO",
    "ZOAdam",
    "ZOSign",
    "ZerothOrderOptimizer",
    "stream_seed",
]
