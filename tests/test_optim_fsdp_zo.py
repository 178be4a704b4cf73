"""Zeroth-order optimizers and the hybrid on FSDP2-sharded weights: 2 gloo processes, each holding
its row shard of every parameter (``fully_shard`` per decoder block and on the model) and its half of
the batch, against one process with the whole model and batch. The optimizers are driven directly
(``enable_fsdp``), not through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import WORLD_SIZE, free_port, join_ranks, rank_environment
from robustunlearn.optim import build_optimizer, hooks, make_closure

DEADLINE_S = 120
# Small chunks, so that shards start inside a chunk and tensors span several (the default, 2**20,
# would put every tensor of the tiny model in one chunk).
CHUNK = 200
VOCAB = 61  # rows split 31 + 30
GLOBAL_BATCH = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
STEPS = 4
ZO_SGD = {"lr": 1e-2, "momentum": 0.9, "seed": 3, "chunk": CHUNK}
HYBRID = {"lr": 1e-2, "every": 1, "zo_lr": 1e-3, "zo_options": {"seed": 3, "chunk": CHUNK}}


class TinyLM(nn.Module):
    """A next-token model in float64 throughout (a Hugging Face Llama is not: its norms compute in
    float32, which makes function values float32-accurate): embedding, residual tanh blocks, head.
    ``start`` has one row, so the second rank holds none of it."""

    def __init__(self, width: int = 24, hidden: int = 40, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.start = nn.Parameter(torch.randn(1, width) / 4)
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width)) for _ in range(blocks)
        )
        self.head = nn.Linear(width, VOCAB)
        self.double()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The logits of every position, flat (a sharded module must not return a view)."""
        x = self.embed(input_ids.flatten()) + self.start
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def next_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids).view(*input_ids.shape, VOCAB)[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())


def closure_over(model: torch.nn.Module, input_ids: torch.Tensor):
    """Every token is scored and the ranks' halves hold as many tokens, so the mean over ranks of
    their token-averaged losses is the loss of the global batch."""
    return make_closure(model, lambda term: next_token_loss(model, input_ids))


def build(name: str, model: torch.nn.Module, options: dict) -> torch.optim.Optimizer:
    options = dict(options)
    return build_optimizer(name, model, options.pop("lr"), total_steps=STEPS, **options)


def train(model: torch.nn.Module, optimizer, input_ids: torch.Tensor, mean=float) -> list[float]:
    """``STEPS`` steps, each followed by a function value at the new weights, as a training loop
    logs one (``mean``: averaged over ranks), after which it reshards the model: FSDP keeps the
    root's gathered weights after a forward without backward, and a closure's ``model.zero_grad``
    would then clear their gradients, not the shards' that the optimizer reads."""
    closure = closure_over(model, input_ids)
    after = []
    for _ in range(STEPS):
        optimizer.step(closure)
        with torch.no_grad():
            after.append(mean(closure(backward=False)))
        reshard(model)
    return after


def reshard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class RandomDraws(TorchDispatchMode):
    """Records how many random values each random op draws (an int64 word carries 64 signs)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket in (torch.ops.aten.normal_, torch.ops.aten.uniform_, torch.ops.aten.random_):
            self.values.append(args[0].numel() * (64 if args[0].dtype == torch.int64 else 1))
        return func(*args, **(kwargs or {}))


# ---- the two ranks ---------------------------------------------------------------------------------


def _sharded_model(mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = TinyLM()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor() for name, p in model.named_parameters()}


def _mean(loss: torch.Tensor) -> float:
    dist.all_reduce(total := loss.detach().clone())
    return float(total) / WORLD_SIZE


def _projected_gradients(mesh, rank: int, own: torch.Tensor) -> dict:
    """One two-sided step along q = 2 Gaussian directions, lr 0: the projected gradients, the
    weights they were taken at and the directions assembled from the ranks' shards."""
    from torch.distributed.tensor import DTensor, Shard

    model = _sharded_model(mesh)
    optimizer = build_optimizer("zo-sgd", model, 0.0, directions="gaussian", q=2, eps=1e-6, seed=5, chunk=CHUNK)
    hooks(optimizer).enable_fsdp(model, mesh)
    weights = _full(model)
    with torch.no_grad():  # leaves the root's weights gathered: the step must reshard them first
        model(own)
    optimizer.step(closure_over(model, own))
    directions = []
    for k in range(2):
        shards = [
            DTensor.from_local(optimizer.direction(i, k), mesh, [Shard(0)], shape=p.shape, stride=p.stride())
            for i, p in enumerate(model.parameters())
        ]
        directions.append([z.full_tensor() for z in shards])
    return {"weights": weights, "projected": optimizer.projected_grads, "directions": directions}


def _zo_sgd(mesh, rank: int, own: torch.Tensor) -> dict:
    model = _sharded_model(mesh)
    optimizer = build("zo-sgd", model, ZO_SGD)
    try:
        optimizer.step(closure_over(model, own))
    except ValueError as error:
        refusal = str(error)
    hooks(optimizer).enable_fsdp(model, mesh)
    # per step, per tensor: three direction draws and one rounding draw, each of the shard's
    # elements plus at most the two chunks it starts and ends in (never more than the whole tensor)
    bound = STEPS * sum(4 * min(p.numel(), p.to_local().numel() + 2 * CHUNK) for p in model.parameters())
    with RandomDraws() as draws:
        after = train(model, optimizer, own, _mean)
    return {"weights": _full(model), "after": after, "draws": draws.values, "bound": bound, "refusal": refusal}


def _hybrid(mesh, rank: int, own: torch.Tensor) -> dict:
    model = _sharded_model(mesh)
    optimizer = build("hybrid", model, HYBRID)
    hooks(optimizer).enable_fsdp(model, mesh)
    after = train(model, optimizer, own, _mean)
    return {"weights": _full(model), "after": after}


def _smoothing(mesh, rank: int, own: torch.Tensor) -> dict:
    model = _sharded_model(mesh)
    try:
        hooks(build_optimizer("fo-rs", model, 1e-2)).enable_fsdp(model, mesh)
    except ValueError as error:
        refusal = str(error)
    optimizer = build("sam", model, {"lr": 1e-2})
    hooks(optimizer).enable_fsdp(model, mesh)
    after = train(model, optimizer, own, _mean)
    return {"weights": _full(model), "after": after, "refusal": refusal}


def _worker(rank: int, port: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    rank_environment(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        own = GLOBAL_BATCH.chunk(WORLD_SIZE)[rank]
        results = {run.__name__: run(mesh, rank, own) for run in (_projected_gradients, _zo_sgd, _hybrid, _smoothing)}
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp-ranks")
    join_ranks(_worker, (free_port(), out), DEADLINE_S)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]


# ---- the tests -----------------------------------------------------------------------------------


def test_projected_gradient_is_the_directional_derivative_along_the_assembled_direction(ranks):
    result = ranks[0]["_projected_gradients"]
    model = TinyLM()
    model.load_state_dict(result["weights"])
    next_token_loss(model, GLOBAL_BATCH).backward()
    for k, z in enumerate(result["directions"]):
        derivative = sum(float(p.grad.flatten() @ d.flatten()) for p, d in zip(model.parameters(), z))
        # two-sided: exact up to O(eps²·|z|²) ~ 1e-9 and rounding ~ 1e-10; a misplaced shard of z: O(1)
        assert result["projected"][k] == pytest.approx(derivative, rel=1e-7)
    assert ranks[1]["_projected_gradients"]["projected"] == result["projected"]  # one mean for all ranks


def test_the_assembled_direction_is_the_one_process_direction(ranks):
    model = TinyLM()
    optimizer = build_optimizer("zo-sgd", model, 0.0, directions="gaussian", q=2, eps=1e-6, seed=5, chunk=CHUNK)
    optimizer.step(closure_over(model, GLOBAL_BATCH))
    for k, assembled in enumerate(ranks[0]["_projected_gradients"]["directions"]):
        for i, z in enumerate(assembled):
            assert torch.equal(z, optimizer.direction(i, k))


def assert_matches_one_process(result: dict, name: str, options: dict) -> None:
    model = TinyLM()
    after = train(model, build(name, model, options), GLOBAL_BATCH)
    # The ranks average loss differences of their halves where one process differences the whole
    # batch's loss: equal up to float64 rounding, ~1e-13 in a projected gradient, ~1e-15 per update
    # (measured: 3e-14 and 1e-13 in the weights after 4 steps; a misplaced shard of z: ~1e-2).
    assert result["after"] == pytest.approx(after, rel=1e-12)
    for key, tensor in model.named_parameters():
        torch.testing.assert_close(result["weights"][key], tensor.detach(), rtol=0, atol=1e-11, msg=key)
    moved = TinyLM().state_dict()
    assert all(not torch.equal(result["weights"][n], moved[n]) for n in result["weights"])


def test_zo_sgd_on_two_shards_matches_one_process(ranks):
    assert_matches_one_process(ranks[0]["_zo_sgd"], "zo-sgd", ZO_SGD)


def test_hybrid_on_two_shards_matches_one_process(ranks):
    # Adam on the DTensors (gradients reduce-scattered by FSDP) alternating with R-AdaZO on the shards
    assert_matches_one_process(ranks[0]["_hybrid"], "hybrid", HYBRID)


def test_sam_on_two_shards_matches_one_process(ranks):
    # its perturbation θ + ρ·g/‖g‖ is DTensor arithmetic, the norm reduced over the shards by DTensor
    assert_matches_one_process(ranks[0]["_smoothing"], "sam", {"lr": 1e-2})


def test_fo_rs_refuses_to_draw_the_same_noise_on_every_cpu_shard(ranks):
    assert "cannot run sharded on CPU" in ranks[0]["_smoothing"]["refusal"]


def test_no_rank_draws_a_whole_direction(ranks):
    whole = STEPS * 4 * sum(p.numel() for p in TinyLM().parameters())  # what one process draws
    for rank in ranks:
        draws, bound = rank["_zo_sgd"]["draws"], rank["_zo_sgd"]["bound"]
        assert max(draws) <= CHUNK + 63  # one chunk at a time (signs come 64 to a word)
        assert sum(draws) <= bound + 63 * len(draws) and bound < whole


def test_sharded_parameters_need_enable_fsdp(ranks):
    assert "enable_fsdp(model, mesh)" in ranks[0]["_zo_sgd"]["refusal"]
    model = TinyLM()
    optimizer = build_optimizer("zo-sgd", model, 1e-3)
    with pytest.raises(ValueError, match="sharded along its first dimension"):
        hooks(optimizer).enable_fsdp(model, None)


@pytest.mark.parametrize("directions", ["rademacher", "gaussian", "sphere"])
def test_a_tensor_within_one_chunk_draws_the_unchunked_direction(directions):
    weights = []
    for chunk in (None, 2048, 100):  # every tensor of TinyLM fits in 2048 elements; not in 100
        model = TinyLM()
        optimizer = build_optimizer("zo-sgd", model, 1e-2, directions=directions, seed=4, chunk=chunk)
        optimizer.step(closure_over(model, GLOBAL_BATCH))
        weights.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not any(torch.equal(a, c) for a, c in zip(weights[0], weights[2]) if a.numel() > 100)
