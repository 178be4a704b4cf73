"""The relearning attack under FSDP2: 2 gloo processes, each holding half of every weight and its
rows of every batch, relearn to the weights one process reaches on the whole batches, with the
same curve; the scored tokens fall unevenly across the ranks (a rank's rows score 11 tokens where
the other's score 2, and a 3-row batch splits 2 + 1), which a plain average of the ranks' mean
losses would get wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import WORLD_SIZE, assert_weights_close, free_port, join_ranks, rank_environment, snapshot
from robustunlearn.attacks.relearn import _rank_rows, relearn_attack
from robustunlearn.core.batching import IGNORE_INDEX, TokenBatch
from robustunlearn.core.distributed import DataParallel, data_parallel
from robustunlearn.core.modules import LoraOptions
from test_distributed import make_model

DEADLINE_S = 120
STEPS = 4


def batch(rows: int, scored: list[int], length: int = 8, seed: int = 0) -> TokenBatch:
    """``rows`` random sequences whose last ``scored[i]`` labels are scored."""
    ids = torch.randint(3, 60, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, count in enumerate(scored):
        labels[row, length - count :] = ids[row, length - count :]
    return TokenBatch(ids, torch.ones_like(ids), labels)


BATCHES = [batch(4, [7, 6, 2, 1], seed=1), batch(3, [3, 5, 4], seed=2)]
PROBE_IDS = torch.arange(3, 19).reshape(2, 8)


def probe(model, step: int) -> dict[str, float]:
    """A forward pass (under FSDP on every rank, which gather the weights together)."""
    return {"probe_loss": float(model(input_ids=PROBE_IDS, labels=PROBE_IDS).loss)}


def relearn(parallel: DataParallel | None):
    return relearn_attack(
        make_model(), None, BATCHES, steps=STEPS, lr=1e-2, eval_fn=probe, eval_every=2, parallel=parallel
    )


def _worker(rank: int, port: int, out: Path) -> None:
    rank_environment(rank, port)
    torch.set_num_threads(1)
    try:
        parallel = data_parallel().with_sharding()
        attacked, curve = relearn(parallel)
        torch.save({"weights": snapshot(attacked), "curve": curve}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("relearn-fsdp")
    join_ranks(_worker, (free_port(), out), DEADLINE_S)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def test_two_sharded_processes_relearn_to_the_one_process_weights_and_curve(ranks):
    one, curve = relearn(None)
    start = snapshot(make_model())
    assert any(not torch.equal(one_tensor, start[name]) for name, one_tensor in snapshot(one).items())
    for rank in ranks:  # every rank gets the whole relearned model back
        assert_weights_close(rank["weights"], snapshot(one), atol=1e-10)
        assert [entry["step"] for entry in rank["curve"]] == [0, 2, 4]
        for got, expected in zip(rank["curve"], curve, strict=True):
            assert got == pytest.approx(expected, rel=1e-10)


def test_sharded_relearning_refuses_lora_and_batches_smaller_than_the_world():
    sharded = DataParallel(rank=0, world_size=2, mesh=object())
    with pytest.raises(ValueError, match="LoRA"):
        relearn_attack(make_model(), None, BATCHES, steps=1, lora=LoraOptions(), parallel=sharded)
    with pytest.raises(ValueError, match="cannot give each of 2 processes a row"):
        _rank_rows(batch(1, [3]), sharded)
    mine, scale = _rank_rows(BATCHES[1], DataParallel(rank=1, world_size=2))
    assert len(mine) == 1 and scale == 2 / 12  # rows 0-1 to rank 0, row 2 to rank 1; 12 scored tokens
