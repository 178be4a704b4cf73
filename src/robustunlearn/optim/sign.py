"""Compressed first-order optimizers: the step follows a quantized direction, at the extreme its sign.

Lang et al. ("Downgrade to Upgrade", ICLR 2026) write an intra-order downgrade of a first-order
optimizer with direction ``m_t`` as ``θ ← θ − lr·Q(m_t; N)``, ``Q`` an N-bit quantizer with
``Q(m; 1) = sign(m)``; the coarser direction lands unlearning in flatter, harder-to-undo basins.

* :class:`SignSGD`, :class:`Signum`, :class:`SignAdam` and :class:`Lion` step by ``lr·sign(·)``.
* :class:`QAdam` steps by the N-bit quantized Adam direction :func:`quantize` ``(d; N)``.
* :class:`OneBitAdam` runs Adam, then freezes ``v`` and compresses the momentum to a scaled sign.

Weight decay is decoupled everywhere, ``θ ← θ·(1 − lr·λ)`` (Loshchilov & Hutter, 2019): inside
a sign it would be drowned out by, or drown out, the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from robustunlearn.optim.base import check_beta, check_betas
from robustunlearn.optim.spec import OptimizerMemory, OptimizerSpec

QUANTIZATION_BITS = (1, 2, 4, 8)


def _check_lr(lr: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate {lr!r}; accepted: lr >= 0")


def _evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _decay(p: Tensor, group: dict) -> None:
    if group["weight_decay"]:
        p.mul_(1.0 - group["lr"] * group["weight_decay"])


def _adam_state(state: dict, p: Tensor, *, error: bool) -> dict:
    """Adam's per-parameter state (zeroed on first use, with an error-feedback buffer if asked),
    its step count advanced for the step being taken."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        if error:
            state["error"] = torch.zeros_like(p)
    state["step"] += 1
    return state


def quantize(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The paper's ``Q(x; N)``: a symmetric N-bit quantizer with one scale per tensor.

    With ``K = 2^(N−1)`` and ``step = max|x| / K``, each coordinate keeps its sign and rounds its
    magnitude to the nearest of ``step·{1, …, K}``::

        Q(x; N) = step · codes,   codes = sign(x) · clamp(round(|x| / step), 1, K)

    so the codes are the ``2^N`` integers ``±1, …, ±K`` (one sign bit, ``N − 1`` magnitude bits),
    the largest coordinate is kept exactly, and no error exceeds ``step``, which halves with each
    extra bit. ``N = 1`` gives ``Q(x; 1) = max|x|·sign(x)``. A coordinate that is exactly 0 (no
    gradient signal yet, such as an embedding row no batch has used) gets code 0 and stays put, as
    under ``sign``.

    Returns ``(codes, step)``: integer-valued codes in ``x``'s dtype and the 0-dim step.
    """
    if bits not in QUANTIZATION_BITS:
        raise ValueError(f"invalid bits {bits!r}; accepted: {', '.join(map(str, QUANTIZATION_BITS))}")
    levels = 2 ** (bits - 1)
    step = x.abs().max() / levels
    magnitude = (x.abs() / step.clamp_min(torch.finfo(x.dtype).tiny)).round_().clamp_(1, levels)
    return x.sign() * magnitude, step


class SignSGD(Optimizer):
    """signSGD (Bernstein et al., 2018): ``θ ← θ − lr·sign(g)``."""

    def __init__(self, params: ParamsT, lr: float = 1e-4, weight_decay: float = 0.0) -> None:
        _check_lr(lr)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                _decay(p, group)
                p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


class Signum(Optimizer):
    """Signum, signSGD with momentum (Bernstein et al., 2018)::

    m ← β·m + (1 − β)·g
    θ ← θ − lr·sign(m)
    """

    def __init__(self, params: ParamsT, lr: float = 1e-4, beta: float = 0.9, weight_decay: float = 0.0) -> None:
        _check_lr(lr)
        check_beta("beta", beta)
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                momentum = state["momentum"]
                momentum.lerp_(p.grad, 1.0 - group["beta"])
                _decay(p, group)
                p.add_(momentum.sign(), alpha=-group["lr"])
        return loss


class SignAdam(Signum):
    """signAdam: Adam's step with its direction replaced by its sign, ``θ ← θ − lr·sign(m̂/(√v̂ + ε))``.

    Since ``√v̂ + ε > 0`` and the bias corrections ``1 − β₁ᵗ``, ``1 − β₂ᵗ`` are positive,
    ``sign(m̂/(√v̂ + ε)) = sign(m̂) = sign(m)``: the second moment, ε and both bias corrections drop
    out, and signAdam *is* Signum with ``beta = β₁``, the EMA ``m ← β₁·m + (1 − β₁)·g`` (default
    0.9). The paper also calls this 1-bit Adam; the error-feedback algorithm of that name is
    :class:`OneBitAdam`.
    """


class Lion(Optimizer):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms")::

        c ← β₁·m + (1 − β₁)·g
        θ ← θ·(1 − lr·λ) − lr·sign(c)
        m ← β₂·m + (1 − β₂)·g

    Its steps are as large as signSGD's in every coordinate, so the authors advise an lr 3–10×
    below AdamW's.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-5,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        _check_lr(lr)
        check_betas(betas)
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                momentum = state["momentum"]
                _decay(p, group)
                p.add_(momentum.lerp(p.grad, 1.0 - beta1).sign_(), alpha=-group["lr"])
                momentum.lerp_(p.grad, 1.0 - beta2)
        return loss


class QAdam(Optimizer):
    """Adam with its direction quantized to N bits, the paper's ``Q(m; N)`` (see :func:`quantize`)::

        m ← β₁·m + (1 − β₁)·g,   v ← β₂·v + (1 − β₂)·g²
        d = m̂ / (√v̂ + ε)                  (Adam's direction, bias-corrected m̂, v̂)
        θ ← θ − lr·Q(d; N)                 (one scale per parameter tensor)

    ``N = 1`` is ``Q(d; 1) = max|d|·sign(d) = max|d|·sign(m)``: signAdam's step scaled per tensor
    by ``max|d|``. With ``error_feedback`` (Seide et al., 2014; Karimireddy et al., 2019) what
    quantization dropped is carried to the next step::

        c = d + e,   θ ← θ − lr·Q(c; N),   e ← c − Q(c; N)

    so the applied steps add up to the unquantized ones minus the current residual ``e``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        bits: int = 4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        error_feedback: bool = False,
    ) -> None:
        _check_lr(lr)
        check_betas(betas)
        if bits not in QUANTIZATION_BITS:
            raise ValueError(f"invalid bits {bits!r}; accepted: {', '.join(map(str, QUANTIZATION_BITS))}")
        defaults = dict(
            lr=lr, bits=bits, betas=betas, eps=eps, weight_decay=weight_decay, error_feedback=error_feedback
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = _adam_state(self.state[p], p, error=group["error_feedback"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                m_hat = m / (1.0 - beta1 ** state["step"])
                v_hat = v / (1.0 - beta2 ** state["step"])
                direction = m_hat.div_(v_hat.sqrt_().add_(group["eps"]))
                if group["error_feedback"]:
                    direction.add_(state["error"])
                codes, step = quantize(direction, group["bits"])
                quantized = codes.mul_(step)
                if group["error_feedback"]:
                    torch.sub(direction, quantized, out=state["error"])
                _decay(p, group)
                p.add_(quantized, alpha=-group["lr"])
        return loss


class OneBitAdam(Optimizer):
    """1-bit Adam (Tang et al., 2021), on one device: Adam, then a frozen ``v`` and a compressed momentum.

    Warm-up, steps ``t ≤ warmup_steps``: exactly Adam (bias-corrected). After warm-up ``v`` is
    frozen at ``v_w`` (``w = warmup_steps``) and the momentum is replaced by its error-compensated
    scaled sign::

        c = β₁·m + (1 − β₁)·g + e
        m ← C(c) = (‖c‖₂/√d)·sign(c),     e ← c − C(c)     (one scale per tensor of d entries)
        θ ← θ − lr · (m / (1 − β₁ᵗ)) / (√(v_w / (1 − β₂ʷ)) + ε)

    The scale ``‖c‖₂/√d`` keeps ``‖C(c)‖₂ = ‖c‖₂`` (the choice of DeepSpeed's implementation).
    In the paper the compression saves communication between workers; here it is the point: the
    step direction is one bit per coordinate plus one scale per tensor.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
    ) -> None:
        _check_lr(lr)
        check_betas(betas)
        if warmup_steps < 1:
            raise ValueError(f"invalid warmup_steps {warmup_steps!r}; accepted: an integer >= 1")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            warmup = group["warmup_steps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = _adam_state(self.state[p], p, error=True)
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1.0 - beta1)
                if t <= warmup:
                    v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                else:
                    compensated = m.add_(state["error"])
                    scale = torch.linalg.vector_norm(compensated) / math.sqrt(p.numel())
                    compressed = compensated.sign().mul_(scale)
                    torch.sub(compensated, compressed, out=state["error"])
                    m.copy_(compressed)
                denominator = (v / (1.0 - beta2 ** min(t, warmup))).sqrt_().add_(group["eps"])
                _decay(p, group)
                p.addcdiv_(m, denominator, value=-group["lr"] / (1.0 - beta1**t))
        return loss


def _build(cls: type[Optimizer], **fixed: object) -> Callable:
    return lambda model, params, lr, options: cls(params, lr=lr, **fixed, **options)


_GRADE = "compressed-first-order"
# Each update holds one tensor-sized temporary (the sign); QAdam's holds m̂, v̂ and the quantizer's
# magnitudes, signs and codes; 1-bit Adam's the compressed sign and the denominator.
_NO_STATE = OptimizerMemory(state=0, tensor_copies=1)
_MOMENTUM = OptimizerMemory(state=1, tensor_copies=1)

SPECS: dict[str, OptimizerSpec] = {
    "signsgd": OptimizerSpec("signsgd", _GRADE, 1e-4, "signSGD: θ -= lr·sign(g)", _build(SignSGD), memory=_NO_STATE),
    "signum": OptimizerSpec(
        "signum",
        _GRADE,
        1e-4,
        "Signum: θ -= lr·sign(m), m an EMA of g (beta 0.9)",
        _build(Signum),
        memory=_MOMENTUM,
    ),
    "signadam": OptimizerSpec(
        "signadam",
        _GRADE,
        1e-4,
        "signAdam: θ -= lr·sign(m̂/(√v̂+ε)) = lr·sign(m), i.e. Signum with beta = β₁ = 0.9",
        _build(SignAdam),
        memory=_MOMENTUM,
    ),
    "lion": OptimizerSpec(
        "lion",
        _GRADE,
        3e-5,
        "Lion: sign of an interpolated momentum (betas 0.9, 0.99)",
        _build(Lion),
        memory=_MOMENTUM,
    ),
    **{
        f"qadam-{bits}": OptimizerSpec(
            f"qadam-{bits}",
            _GRADE,
            1e-4,
            f"Adam with its direction quantized to {bits} bit(s), one scale per tensor (option error_feedback)",
            _build(QAdam, bits=bits),
            memory=OptimizerMemory(state=2, tensor_copies=5),
        )
        for bits in QUANTIZATION_BITS
    },
    "onebit-adam": OptimizerSpec(
        "onebit-adam",
        _GRADE,
        1e-4,
        "1-bit Adam: Adam warm-up (warmup_steps 20), then frozen v and an error-feedback scaled-sign momentum",
        _build(OneBitAdam),
        memory=OptimizerMemory(state=3, tensor_copies=2),
    ),
}
