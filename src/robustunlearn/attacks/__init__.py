"""Attacks on an unlearned model: each returns a new model and leaves its input untouched.

* quantization: :func:`quantize_model` (RTN, NF4/FP4, GPTQ, library backends);
* relearning: :func:`relearn_attack` on forget samples (full fine-tuning or LoRA), or on retain or
  unrelated samples (benign relearning);
* perturbation: :func:`gaussian_noise_attack`, :func:`magnitude_prune_attack`.

The study runs them by name through the registry: :func:`parse_attack` and ``ATTACK_SPECS``
(:mod:`robustunlearn.attacks.spec` says how to add an attack).
"""

from robustunlearn.attacks.noise import PRUNE_SCOPES, gaussian_noise_attack, magnitude_prune_attack
from robustunlearn.attacks.quant.core import (
    QUANTIZATION_METHODS,
    QuantizationMethod,
    QuantizedTensor,
    parse_method,
    quantizable_linears,
)
from robustunlearn.attacks.quant.gptq import calibration_inputs, gptq_quantize_model, gptq_quantize_weight
from robustunlearn.attacks.quant.quantize import code_agreement, quantize_model
from robustunlearn.attacks.quant.rtn import (
    FP4_CODE_BOOK,
    NF4_CODE_BOOK,
    quantize_code_book,
    rtn_groupwise,
    rtn_symmetric,
    tensor_quantizer,
)
from robustunlearn.attacks.registry import ATTACK_SPECS, accepted_attacks, describe_attacks, parse_attack
from robustunlearn.attacks.relearn import LoraOptions, relearn_attack
from robustunlearn.attacks.spec import (
    FAMILIES,
    AttackContext,
    AttackOutcome,
    AttackSpec,
    ParsedAttack,
    Strength,
    real_number,
)

__all__ = [
    "ATTACK_SPECS",
    "FAMILIES",
    "FP4_CODE_BOOK",
    "NF4_CODE_BOOK",
    "PRUNE_SCOPES",
    "QUANTIZATION_METHODS",
    "AttackContext",
    "AttackOutcome",
    "AttackSpec",
    "LoraOptions",
    "ParsedAttack",
    "QuantizationMethod",
    "QuantizedTensor",
    "Strength",
    "accepted_attacks",
    "calibration_inputs",
    "code_agreement",
    "describe_attacks",
    "gaussian_noise_attack",
    "gptq_quantize_model",
    "gptq_quantize_weight",
    "magnitude_prune_attack",
    "parse_attack",
    "parse_method",
    "quantizable_linears",
    "quantize_code_book",
    "quantize_model",
    "real_number",
    "relearn_attack",
    "rtn_groupwise",
    "rtn_symmetric",
    "tensor_quantizer",
]
