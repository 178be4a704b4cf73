"""The optimizer hooks a training loop calls (defaults for torch's optimizers, Sophia's, the ZO
grade's, the hybrids' delegation to their parts) and the closure builder every caller shares."""

from __future__ import annotations

import pytest
import torch

from helpers import next_token_loss
from robustunlearn.optim import build_optimizer
from robustunlearn.optim.base import OptimizerHooks, hooks, make_closure


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))


def made_closure(model, **options):
    """make_closure's closure over the next-token loss of ``ids()``."""
    return make_closure(model, lambda term: next_token_loss(model, ids())(), **options)


def mean_of_ranks(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_torch_optimizers_get_the_default_hooks(name, tiny_llama):
    optimizer = build_optimizer(name, tiny_llama())
    assert not isinstance(optimizer, OptimizerHooks) and type(optimizer).__module__.startswith("torch.optim")
    default = hooks(optimizer)
    assert not default.wants_batch_tokens and default.may_stop
    assert default.log_fields() == {} and default.precision_warnings() == []
    default.set_batch_tokens(5)  # asks nothing of the optimizer
    default.enable_data_parallel(mean_of_ranks)
    assert all("batch_size" not in group for group in optimizer.param_groups)


def test_our_optimizers_are_their_own_hooks(tiny_llama):
    optimizer = build_optimizer("zo-sgd", tiny_llama())
    assert hooks(optimizer) is optimizer


def test_sophia_g_takes_its_batch_size_and_logs_its_unclipped_fraction(tiny_llama):
    model = tiny_llama()
    optimizer = build_optimizer("sophia-g", model, hessian_period=1)
    assert hooks(optimizer).wants_batch_tokens
    hooks(optimizer).set_batch_tokens(37)
    assert [group["batch_size"] for group in optimizer.param_groups] == [37]
    optimizer.step(made_closure(model, sampled_label_loss=lambda term: next_token_loss(model, ids(1))()))
    fraction = optimizer.last_unclipped_fraction
    assert 0.0 <= fraction <= 1.0 and hooks(optimizer).log_fields() == {"last_unclipped_fraction": fraction}


def test_sophia_h_refuses_data_parallel_with_autograd_products_only(tiny_llama):
    with pytest.raises(ValueError, match="hvp='finite-difference'"):
        hooks(build_optimizer("sophia-h", tiny_llama())).enable_data_parallel(mean_of_ranks)
    hooks(build_optimizer("sophia-h", tiny_llama(), hvp="finite-difference")).enable_data_parallel(mean_of_ranks)


def test_zeroth_order_reduces_its_projected_gradients_unless_given_a_reduction(tiny_llama):
    optimizer = build_optimizer("zo-sgd", tiny_llama())
    hooks(optimizer).enable_data_parallel(mean_of_ranks)
    assert optimizer.reduce_projected_grad is mean_of_ranks
    own = build_optimizer("zo-sgd", tiny_llama(), reduce_projected_grad=torch.zeros_like)
    hooks(own).enable_data_parallel(mean_of_ranks)
    assert own.reduce_projected_grad is torch.zeros_like


def test_zeroth_order_warns_about_weights_below_float32(tiny_llama):
    assert hooks(build_optimizer("zo-sgd", tiny_llama())).precision_warnings() == []
    (warning,) = hooks(build_optimizer("zo-sgd", tiny_llama(dtype=torch.bfloat16))).precision_warnings()
    assert warning.startswith("perturbs and restores bfloat16 weights inexactly") and "float32" in warning


def test_hybrids_pass_the_hooks_to_their_parts(tiny_llama):
    model = tiny_llama(dtype=torch.float16)
    hybrid = build_optimizer("hybrid-objective", model, fo="sophia-g")
    assert hooks(hybrid).wants_batch_tokens
    hybrid.set_batch_tokens(11)
    assert [group["batch_size"] for group in hybrid.fo.param_groups] == [11]
    hybrid.enable_data_parallel(mean_of_ranks)
    assert hybrid.zo.reduce_projected_grad is mean_of_ranks
    (warning,) = hybrid.precision_warnings()
    assert "float16" in warning
    assert not build_optimizer("hybrid-depth", tiny_llama(), fo_blocks=1).wants_batch_tokens
    with pytest.raises(ValueError, match="hvp='finite-difference'"):
        build_optimizer("hybrid", tiny_llama(), fo="sophia-h", total_steps=4).enable_data_parallel(mean_of_ranks)


def test_the_hybrid_logs_the_phase_each_step_ran_in(tiny_llama):
    model = tiny_llama()
    hybrid = build_optimizer("hybrid", model, total_steps=6, every=2)
    assert hybrid.log_fields() == {}  # no step taken yet
    logged, planned = [], []
    for _ in range(6):
        planned.append(hybrid.current_phase)  # read before the step: the phase it will run in
        hybrid.step(made_closure(model))
        logged.append(hybrid.log_fields()["current_phase"])
    assert logged == planned == ["zo", "zo", "fo", "fo", "zo", "zo"]


def test_the_closure_counts_passes_and_runs_after_backward_once_per_backward(tiny_llama):
    model = tiny_llama()
    passes, reduced = {"forward": 0, "backward": 0}, []
    closure = made_closure(model, passes=passes, after_backward=lambda: reduced.append(model.lm_head.weight.grad))
    loss = closure()
    assert loss.grad_fn is None and reduced and reduced[0] is not None
    with torch.no_grad():
        closure(backward=False)
    assert passes == {"forward": 2, "backward": 1} and len(reduced) == 1


def test_the_closure_keeps_the_graph_only_without_backward_under_enable_grad(tiny_llama):
    model = tiny_llama()
    closure = made_closure(model)
    with torch.enable_grad():
        assert closure(backward=False).grad_fn is not None  # what sophia-h differentiates twice
    with torch.no_grad():
        assert closure(backward=False).grad_fn is None
        assert closure().grad_fn is None and model.lm_head.weight.grad is not None  # backward enables grad


def test_the_closure_refuses_unknown_terms_and_label_sampling_it_cannot_do(tiny_llama):
    model = tiny_llama()
    passes = {"forward": 0, "backward": 0}
    seen = []
    closure = make_closure(
        model, lambda term: seen.append(term) or next_token_loss(model, ids())(), terms=("forget",), passes=passes
    )
    closure(backward=False, term="forget")
    assert seen == ["forget"]
    with pytest.raises(KeyError, match="no term 'retain'; it has forget"):
        closure(term="retain")
    with pytest.raises(NotImplementedError, match="cannot sample labels"):
        closure(sample_labels=True)
    assert passes == {"forward": 1, "backward": 0}  # refused before running the model
