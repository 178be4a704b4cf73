"""What an attack is to the study: an :class:`AttackSpec` gives its name, the family its rows
belong to, the strength its name may carry (``noise-0.01``: scale 0.01), a line of help, and how
to run it on a model with what the study provides (an :class:`AttackContext`).

:mod:`robustunlearn.attacks.registry` collects the specs of the attack modules, parses names
(:func:`~robustunlearn.attacks.registry.parse_attack`, which the config validates with before any
training) and lists them for ``--help``.

To add an attack:

1. write it as a function in its module (it returns a new model and leaves its input untouched);
2. next to it, add an ``AttackSpec`` to the module's ``SPECS`` tuple, e.g.::

       def _noise(model, scale: float, context: AttackContext) -> AttackOutcome:
           return AttackOutcome(gaussian_noise_attack(model, scale, seed=context.seed), None, {"scale": scale})

       SPECS = (AttackSpec("noise-", PERTURBATION, "Gaussian weight noise", _noise, real_number("scale", 0)),)

   A name without a strength is matched exactly; with one, the name is the prefix and the rest of
   the attack name is the strength's text. What the attack needs from the study comes from the
   context; a new need is a new :class:`AttackContext` field, filled in ``study/grid.py``;
3. for a new module, add its ``SPECS`` to ``ATTACK_SPECS`` in :mod:`robustunlearn.attacks.registry`;
4. test that the registry runs the attack as calling the function directly does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch import nn

from robustunlearn.core.batching import TokenBatch
from robustunlearn.core.distributed import DataParallel
from robustunlearn.data.base import Benchmark, Record
from robustunlearn.data.collate import collate_records
from robustunlearn.data.prompts import PLAIN_TEMPLATE, PromptTemplate

QUANTIZATION = "quantization"
RELEARNING = "relearning"
PERTURBATION = "perturbation"
FAMILIES = (QUANTIZATION, RELEARNING, PERTURBATION)  # the report groups attack rows by these

GPTQ_CALIBRATION_TEXTS = 16  # retain passages (or retain QA pairs, without passages) GPTQ calibrates on


@dataclass(frozen=True)
class AttackContext:
    """What attacks need from the study.

    * ``relearn_records``: the attacker's training records, chosen by the study (forget QA pairs,
      or forget passages where a benchmark has no forget QA, as WMDP). The relearning attacks
      train on them and on nothing else; ``benign-relearn`` trains on as many retain QA pairs of
      ``benchmark`` instead. The probe scores these records (in-set) apart from the forget records
      the attacker never saw (held-out);
    * ``batch_size``, ``relearn_steps``, ``relearn_lr`` and ``relearn_eval_every``: the
      relearning options (the lr of the attacks that do not carry one in their name);
    * ``probe(model, step)``: the forget-level evaluation recorded along a relearning curve;
    * ``seed`` seeds relearning and noise;
    * ``reference_model``: the model the quantization attacks compare the attacked model's codes
      and weights with (the same-bucket diagnostics of
      :mod:`robustunlearn.attacks.quant.diagnostics`; the study passes the model before
      unlearning); None: no diagnostics;
    * ``original_codes``: the Q4_1 codes of the original model's weights, by layer name, for a
      model read from a Q4_1 GGUF file (:func:`~robustunlearn.attacks.quant.diagnostics.q4_1_reference_codes`):
      the quantization attacks then also report how many of them the unlearned and the attacked
      model keep; None: not reported;
    * ``parallel``: a sharded :class:`~robustunlearn.core.distributed.DataParallel` when every rank of
      an FSDP launch runs the attack alike: relearning then trains on sharded weights (its probe runs
      on every rank); None: each process attacks on its own."""

    tokenizer: Any
    benchmark: Benchmark
    seed: int
    batch_size: int
    relearn_records: tuple[Record, ...]
    relearn_steps: int
    relearn_lr: float
    relearn_eval_every: int
    probe: Callable[[nn.Module, int], dict[str, Any]] | None = None
    reference_model: nn.Module | None = None
    original_codes: dict[str, torch.Tensor] | None = None
    template: PromptTemplate = PLAIN_TEMPLATE  # the format QA pairs are trained in (unlearn.prompt_template)
    parallel: DataParallel | None = None

    @cached_property
    def calibration(self) -> list[TokenBatch]:
        """GPTQ's calibration data: the first GPTQ_CALIBRATION_TEXTS retain passages, or retain QA
        pairs where the benchmark has no passages (TOFU), as one padded batch with its attention
        mask, so pad tokens stay out of the Hessians. Built on first use."""
        records = self.benchmark.get("retain_text") or self.benchmark.require("retain_qa")
        return [collate_records(self.tokenizer, records[:GPTQ_CALIBRATION_TEXTS], template=self.template)]


class AttackOutcome(NamedTuple):
    """The attacked model, the attack's curve (relearning's, one dict per probe) or None, and the
    attack's exact configuration as the result rows record it (quantizers: bits, grouping, scheme,
    backend, which modules stay in full precision; relearning: data, steps, lr, optimizer).

    ``config["strength"]``, where present, orders the rungs of one attack's ladder weakest first:
    the lr of a relearning attack, the scale of noise, 16 - bits of a quantizer."""

    model: nn.Module
    curve: list[dict[str, Any]] | None
    config: dict[str, Any]


@dataclass(frozen=True)
class Strength:
    """The typed parameter an attack name carries after its prefix."""

    label: str  # the form shows it as <label>: "noise-<scale>"
    rule: str  # the values it accepts, in words: "scale >= 0"
    parse: Callable[[str], Any]  # the text -> the value; ValueError outside ``rule``


def real_number(label: str, low: float, high: float | None = None) -> Strength:
    """A strength written as a number in [low, high) ([low, ∞) without ``high``)."""

    def parse(text: str) -> float:
        value = float(text)
        if not low <= value < (math.inf if high is None else high):  # also rejects nan and inf
            raise ValueError(f"{label} {text} is out of range")
        return value

    rule = f"{label} >= {low:g}" if high is None else f"{low:g} <= {label} < {high:g}"
    return Strength(label, rule, parse)


def positive_number(label: str) -> Strength:
    """A strength written as a finite number > 0 (a learning rate)."""

    def parse(text: str) -> float:
        value = float(text)
        if not 0 < value < math.inf:  # also rejects nan
            raise ValueError(f"{label} {text} is not a positive number")
        return value

    return Strength(label, f"{label} > 0", parse)


@dataclass(frozen=True)
class AttackSpec:
    """One attack, or a family of them with a strength (``noise-<scale>``).

    ``run(model, strength, context)`` returns an :class:`AttackOutcome` and leaves ``model``
    untouched; ``strength`` is the parsed :class:`Strength` value, or None for a spec without one."""

    name: str  # the attack's name; with a strength, the prefix before it ("noise-")
    family: str  # one of FAMILIES
    description: str  # a few words for --help
    run: Callable[[nn.Module, Any, AttackContext], AttackOutcome]
    strength: Strength | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"attack {self.name!r}: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")

    @property
    def form(self) -> str:
        """How its names are written: ``relearn``, ``noise-<scale>``."""
        return self.name if self.strength is None else f"{self.name}<{self.strength.label}>"

    @property
    def usage(self) -> str:
        """The form with the strength's rule: ``noise-<scale> (scale >= 0)``."""
        return self.form if self.strength is None else f"{self.form} ({self.strength.rule})"

    def matches(self, name: str) -> bool:
        """Whether ``name`` is written in this spec's form (its strength may still be invalid)."""
        return name == self.name if self.strength is None else name.startswith(self.name)


@dataclass(frozen=True)
class ParsedAttack:
    """An attack name resolved to its spec and its strength's value (None without one)."""

    name: str
    spec: AttackSpec
    strength: Any

    @property
    def family(self) -> str:
        return self.spec.family

    def run(self, model: nn.Module, context: AttackContext) -> AttackOutcome:
        return self.spec.run(model, self.strength, context)
