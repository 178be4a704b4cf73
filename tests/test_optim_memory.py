"""Each registered optimizer's declared memory (OptimizerSpec.memory) against what it really holds
after steps on a tiny model: the state tensors it keeps, and whether it fills gradients."""

from __future__ import annotations

import pytest
import torch

from robustunlearn.bench.optimizers import lm_closure
from robustunlearn.optim import OPTIMIZERS, build_optimizer


def _state_elements(state) -> int:
    """Elements of the parameter-sized tensors in a state dict (scalar step counters left out)."""
    if isinstance(state, torch.Tensor):
        return state.numel() if state.numel() > 1 else 0
    if isinstance(state, dict):
        return sum(_state_elements(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_elements(v) for v in state)
    return 0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_declared_state_is_the_state_kept(name, tiny_llama):
    model = tiny_llama(0, vocab_size=48)
    input_ids = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(0))
    # hybrid: every=1 takes an FO step, then a ZO step, so both parts hold their state
    options = {"every": 1} if name == "hybrid" else {}
    optimizer = build_optimizer(name, model, total_steps=2, **options)
    closure = lm_closure(model, input_ids)
    for _ in range(2):
        optimizer.step(closure)
    memory = OPTIMIZERS[name].memory
    parameters = sum(p.numel() for p in model.parameters())
    assert _state_elements(optimizer.state_dict()) == memory.state * parameters
    filled = any(p.grad is not None for p in model.parameters())
    assert filled == memory.gradients, f"{name} declares gradients={memory.gradients}"
