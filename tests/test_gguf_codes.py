"""The same-bucket diagnostic against a GGUF file's own Q4_1 codes: encoding as llama.cpp's Q4_1
(checked by hand and against the gguf package's quantizer), finding the layers read from a Q4_1
file, and the share of their codes a changed model keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustunlearn.attacks.quant.core import quantizable_linears
from robustunlearn.attacks.quant.diagnostics import q4_1_encode, q4_1_reference_codes, q4_1_same_code_fraction


def test_q4_1_encoding_by_hand():
    # One block of 32: min -1, max 2, so the step is 3/15 = 0.2; w = -1 + 0.2 k + offsets.
    values = torch.tensor([-1.0, 2.0, -0.85, -0.69, 0.55, 1.1] + [0.0] * 26, dtype=torch.float64)
    codes, dequantized = q4_1_encode(values[None, :])
    # (w - min) / step + 1/2, truncated: -1 -> 0, 2 -> 15, -0.85 -> trunc(1.25) = 1, -0.69 -> trunc(2.05) = 2,
    # 0.55 -> trunc(8.25) = 8, 1.1 -> trunc(11.0 + 1/2) = 11, 0 -> trunc(5.5) = 5.
    assert codes[0, :7].tolist() == [0, 15, 1, 2, 8, 11, 5]
    step, low = torch.tensor(0.2).half().double(), torch.tensor(-1.0).half().double()
    assert torch.equal(dequantized[0, :7], step * codes[0, :7].double() + low)


def test_q4_1_encoding_matches_the_gguf_package():
    gguf = pytest.importorskip("gguf", reason="the reference Q4_1 quantizer is the gguf package's")
    weight = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    packed = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q4_1)
    blocks = packed.reshape(-1, 20)  # per block: float16 step, float16 min, 16 bytes of two 4-bit codes each
    nibbles = blocks[:, 4:]
    file_codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).reshape(weight.shape)
    file_weights = torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_1).copy())

    codes, _ = q4_1_encode(weight)
    assert np.array_equal(codes.numpy(), file_codes)  # the encoder is the file format's
    recoded, redequantized = q4_1_encode(file_weights)
    assert np.array_equal(recoded.numpy(), file_codes)  # the dequantized file encodes back to its codes
    assert torch.equal(redequantized, file_weights)


def _on_q4_1_grid(model):
    with torch.no_grad():
        for _, linear in quantizable_linears(model):
            linear.weight.copy_(q4_1_encode(linear.weight)[1])
    return model


def test_reference_codes_are_those_of_the_layers_on_the_grid(tiny_llama):
    model = _on_q4_1_grid(tiny_llama(seed=1))
    names = [name for name, _ in quantizable_linears(model)]
    with torch.no_grad():  # one layer off the grid, as one stored in another type would be
        dict(quantizable_linears(model))[names[0]].weight.add_(1e-3)
    codes = q4_1_reference_codes(model)
    assert sorted(codes) == sorted(names[1:])
    assert q4_1_same_code_fraction(model, codes) == 1.0


def test_same_code_fraction_counts_the_codes_a_change_moved(tiny_llama):
    model = _on_q4_1_grid(tiny_llama(seed=2))
    codes = q4_1_reference_codes(model)
    name, linear = quantizable_linears(model)[0]
    with torch.no_grad():
        block = linear.weight[0, :32]
        step = (block.max() - block.min()) / 15
        inner = [k for k in range(32) if block[k] not in (block.max(), block.min())][:3]
        linear.weight[0, inner] += step  # three codes up by one, the block's range unchanged
    total = sum(c.numel() for c in codes.values())
    assert q4_1_same_code_fraction(model, codes) == pytest.approx(1 - 3 / total, abs=1e-12)
