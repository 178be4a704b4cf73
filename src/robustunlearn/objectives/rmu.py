"""Representation misdirection for unlearning (``rmu``).

Source: Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With
Unlearning", and its reference code (``rmu/unlearn.py``, ``rmu/utils.py``): activations are
read at the output of decoder layer ``layer_id=7``; the trained parameters are index 6 of
``model.model.layers[i].parameters()`` for i in ``layer_ids=[5, 6, 7]``, which for Llama/Mistral
blocks (q, k, v, o, gate, up, down, norms) is ``mlp.down_proj.weight``; zephyr-7b uses
``steering_coeff=6.5``, ``alpha=1200``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch, UnlearnBatch
from robustunlearn.core.modules import decoder_blocks, run_until
from robustunlearn.objectives.common import check_positive, require

WMDP_LAYER = 7
WMDP_STEERING_COEFF = 6.5
WMDP_ALPHA = 1200.0
WMDP_HIDDEN_SIZE = 4096  # zephyr-7b, the model the WMDP constants were tuned on


def layer_activations(model: nn.Module, batch: TokenBatch, layer: int) -> torch.Tensor:
    """Output hidden state of decoder layer ``layer`` at the scored positions of ``batch``
    (labels != IGNORE_INDEX: the answer of a QA pair, every real token of a passage):
    ``[scored tokens, hidden]``, at least float32. The forward pass stops after that layer."""
    output = run_until(
        decoder_blocks(model)[layer],
        lambda: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False),
    )
    output = output[0] if isinstance(output, tuple) else output
    hidden = output[batch.labels != IGNORE_INDEX]
    return hidden.to(torch.promote_types(hidden.dtype, torch.float32))


def random_direction(hidden_size: int, seed: int) -> torch.Tensor:
    """u: uniform [0, 1) entries from a generator seeded with ``seed``, scaled to unit norm
    (float64, on the CPU; the same u for every dtype and device)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=generator, dtype=torch.float64)
    return u / u.norm()


@dataclass(kw_only=True)
class RMU:
    """``rmu``: L = mean ‖h_ℓ(forget) − c·u‖² + α · mean ‖h_ℓ(retain) − h_ℓ^ref(retain)‖².

    h_ℓ is the output hidden state of decoder layer ℓ (0-based index into ``model.layers``) at
    the scored tokens; both means are over scored tokens and hidden units (``F.mse_loss``);
    u is :func:`random_direction` (seeded), c the steering coefficient, h^ref the frozen
    reference model's activations. Only ``mlp.down_proj`` of ``update_layers`` is trained
    (default ℓ−2, ℓ−1, ℓ, as in the WMDP reference).

    Hyperparameters (defaults = the WMDP reference for 7B models): ``layer`` = ℓ = 7,
    ``update_layers`` = (ℓ−2, ℓ−1, ℓ), ``steering_coeff`` = c = 6.5, ``alpha`` = α = 1200,
    ``seed`` = 0. :meth:`defaults_for` scales ℓ and c to another model (see docs/objectives.md).

    The reference is read live (``sequence_reference`` is false), not from a cache: h_ℓ^ref is
    needed on every retain batch, and a cache would hold every retain example the stream can draw,
    [scored tokens, hidden] each. Measured on the embedded tiny model (synthetic retain set, 1017
    records, 9206 scored tokens, d = 256): 9.0 MiB of float32 activations against 8.5 MiB of
    weights, and 128 partial forwards to build against 60 in a 60-step run. At 7B (d = 4096) the
    150-step WMDP recipe alone draws 600 retain passages of up to 512 tokens, 4.4 GB in float32,
    and the retain corpora it draws from hold over 60,000 documents. The engine instead keeps the
    start values of the trained weights only, the three ``down_proj`` matrices (352 MB in bfloat16
    at 7B, against 14.5 GB for a copy of the model), and swaps them in for the reference's forward.
    """

    name: ClassVar[str] = "rmu"
    batch_parts: ClassVar[frozenset[str]] = frozenset({"forget", "retain"})
    forward_passes: ClassVar[int] = 2  # forget, retain (each truncated at the steered layer)
    loss_on: ClassVar[str] = "activations"
    sequence_reference: ClassVar[bool] = False  # its reference is activations on retain batches
    layer: int = WMDP_LAYER
    update_layers: tuple[int, ...] | None = None
    steering_coeff: float = WMDP_STEERING_COEFF
    alpha: float = WMDP_ALPHA
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.update_layers is None:
            self.update_layers = tuple(range(max(0, self.layer - 2), self.layer + 1))
        self.update_layers = tuple(self.update_layers)
        if not self.update_layers or not all(0 <= i <= self.layer for i in self.update_layers):
            # a block after ℓ cannot change h_ℓ: its gradient would be zero
            raise ValueError(
                f"update_layers must be a non-empty set of layers in [0, layer={self.layer}], got {self.update_layers}"
            )
        check_positive("steering_coeff", self.steering_coeff)
        check_positive("alpha", self.alpha, allow_zero=True)

    @classmethod
    def defaults_for(cls, model: nn.Module) -> dict[str, float | int]:
        """Scaled defaults for ``model``: ℓ = min(7, L // 2) for L decoder layers (7 for the 32
        layers of a 7B model, the middle block of a small one) and c = 6.5 · sqrt(d / 4096) for
        hidden size d (activation norms grow like sqrt(d) at a fixed per-unit scale, so the
        per-unit target c/sqrt(d) stays the WMDP one). α is kept: both terms are per-unit means."""
        config = model.config
        return {
            "layer": min(WMDP_LAYER, config.num_hidden_layers // 2),
            "steering_coeff": WMDP_STEERING_COEFF * math.sqrt(config.hidden_size / WMDP_HIDDEN_SIZE),
        }

    @property
    def needs_reference(self) -> bool:
        return self.alpha != 0

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The trainable parameters of ``mlp.down_proj`` in ``update_layers``: its weight (and
        bias) for a plain model; under a LoRA adapter, the adapter's weights on down_proj."""
        layers = decoder_blocks(model)
        if max(self.layer, *self.update_layers) >= len(layers):
            raise ValueError(
                f"RMU layer {self.layer} / update_layers {self.update_layers} out of range for "
                f"a model with {len(layers)} decoder layers"
            )
        params = []
        for i in self.update_layers:
            down_proj = getattr(getattr(layers[i], "mlp", None), "down_proj", None)
            if down_proj is None:
                raise ValueError(f"decoder layer {i} has no mlp.down_proj; RMU needs a Llama-style MLP")
            params += [p for p in down_proj.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"no trainable parameter in mlp.down_proj of layers {self.update_layers}")
        return params

    def reference_outputs(self, reference_model: nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        if not self.needs_reference:
            return {}
        retain = require(batch, "retain", self.name)
        return {"retain_activations": layer_activations(reference_model, retain, self.layer)}

    def loss(
        self, model: nn.Module, batch: UnlearnBatch, reference: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        hidden = layer_activations(model, batch.forget, self.layer)
        control = self.steering_coeff * random_direction(hidden.shape[-1], self.seed)
        forget = F.mse_loss(hidden, control.to(hidden).expand_as(hidden))
        logs = {"forget_mse": forget.detach()}
        if self.alpha == 0:
            retain = forget.new_zeros(())
        else:
            retain_hidden = layer_activations(model, require(batch, "retain", self.name), self.layer)
            retain_mse = F.mse_loss(retain_hidden, reference["retain_activations"])
            logs["retain_mse"] = retain_mse.detach()
            retain = self.alpha * retain_mse
        return {"loss": forget + retain, "forget": forget, "retain": retain, **logs}
