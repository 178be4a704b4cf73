"""Attacks on an unlearned model: each returns a new model and leaves its input untouched.

``ATTACKS`` names them for the CLI:

* ``quantize``: :func:`quantize_model` (RTN, NF4/FP4, GPTQ, library backends);
* ``relearn``: :func:`relearn_attack` on forget samples (full fine-tuning or LoRA);
* ``benign-relearn``: :func:`relearn_attack` on retain or unrelated samples;
* ``noise``: :func:`gaussian_noise_attack`;
* ``prune``: :func:`magnitude_prune_attack`.
"""

from robustunlearn.attacks.noise import PRUNE_SCOPES, gaussian_noise_attack, magnitude_prune_attack
from robustunlearn.attacks.quant.core import (
    FP4_CODE_BOOK,
    NF4_CODE_BOOK,
    QUANTIZATION_METHODS,
    QuantizationMethod,
    QuantizedTensor,
    code_agreement,
    parse_method,
    quantizable_linears,
    quantize_code_book,
    quantize_model,
    rtn_groupwise,
    rtn_symmetric,
    tensor_quantizer,
)
from robustunlearn.attacks.quant.gptq import calibration_inputs, gptq_quantize_model, gptq_quantize_weight
from robustunlearn.attacks.relearn import LoraOptions, relearn_attack

ATTACKS = ("quantize", "relearn", "benign-relearn", "noise", "prune")

__all__ = [
    "ATTACKS",
    "FP4_CODE_BOOK",
    "LoraOptions",
    "NF4_CODE_BOOK",
    "PRUNE_SCOPES",
    "QUANTIZATION_METHODS",
    "QuantizationMethod",
    "QuantizedTensor",
    "calibration_inputs",
    "code_agreement",
    "gaussian_noise_attack",
    "gptq_quantize_model",
    "gptq_quantize_weight",
    "magnitude_prune_attack",
    "parse_method",
    "quantizable_linears",
    "quantize_code_book",
    "quantize_model",
    "relearn_attack",
    "rtn_groupwise",
    "rtn_symmetric",
    "tensor_quantizer",
]
