"""Data-parallel unlearning: 2 gloo processes on the CPU give what 1 process gives on the same
global batch, for first-order, zeroth-order and hybrid optimizers, with LoRA, and across a resume."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import robustunlearn.core.distributed as distributed_module
import robustunlearn.train.engine as engine_module
from helpers import WORLD_SIZE, assert_weights_close, free_port, join_ranks, rank_environment, snapshot, tiny_llama
from robustunlearn.core.distributed import DataParallel
from robustunlearn.data.base import QA, Benchmark, Passage
from robustunlearn.train.engine import unlearn
from robustunlearn.train.settings import UnlearnSettings

DEADLINE_S = 150


class CharTokenizer:
    """One token per character, so texts of equal length have equal token counts: every rank's
    token-averaged loss then weighs its shard as the global batch does, and 2 processes must
    match 1 up to rounding."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ord(c) % 61 for c in text]


def make_benchmark() -> Benchmark:
    rng = random.Random(0)

    def word(n: int) -> str:
        return "".join(rng.choice("abcdefghijklmnop") for _ in range(n))

    forget = [QA(question=word(10), answer=word(6)) for _ in range(8)]
    retain = [Passage(text=word(20)) for _ in range(8)]
    return Benchmark("equal-lengths", "1", {"forget_qa": forget, "retain_text": retain})


def _rms_norm_in_float64(norm, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return norm.weight * hidden_states * torch.rsqrt(variance + norm.variance_epsilon)


def make_model():
    """The tiny Llama in float64 throughout. Llama's RMSNorm computes in float32 whatever the model's
    dtype, so a rank's half-batch loss differs from the whole batch's in the 8th digit; a ZO step divides
    such loss differences by eps (1e-6 apart in the weights after 4 steps), which would hide a real error
    in the data-parallel arithmetic under the tolerance it needs."""
    model = tiny_llama(0, dtype=torch.float64)
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_in_float64, module)
    return model


def config(optimizer: str, objective: str = "npo", **options) -> UnlearnSettings:
    return UnlearnSettings(
        objective=objective,
        optimizer=optimizer,
        lr=1e-2,
        steps=4,
        batch_size=4,
        forget_splits=("forget_qa",),
        retain_splits=("retain_text",),
        **options,
    )


CASES = {
    "adamw": config("adamw"),  # npo's reference cache: each rank builds half, and receives all
    "adamw-live": config("adamw", reference="live"),
    "idk-dpo": config("adamw", "idk-dpo"),  # refusals sharded along with their questions
    "zo-sgd": config("zo-sgd"),
    "hybrid": config("hybrid", optimizer_options={"every": 1}),
    "zo-sgd-lora": config("zo-sgd", lora={"rank": 2}),
}
RESUMED = config("hybrid", optimizer_options={"every": 1}, eval_every=1, checkpoint_every=1)


def run(case: UnlearnSettings, directory: Path | None = None, **options):
    return unlearn(make_model(), CharTokenizer(), make_benchmark(), case, directory, progress=False, **options)


def step_of(model, step: int) -> dict[str, int]:
    return {"step": step}


def record_batches(seen: list[list[str]]) -> None:
    """Make the engine note the records of every batch it collates (forget, retain, refusals)."""
    collate = engine_module.collate_records

    def noting(tokenizer, records, *options):
        seen.append([r.question if isinstance(r, QA) else r.text for r in records])
        return collate(tokenizer, records, *options)

    engine_module.collate_records = noting


def _worker(rank: int, port: int, out: Path) -> None:
    rank_environment(rank, port)
    torch.set_num_threads(1)
    distributed_module.BUCKET_ELEMENTS = 1000  # many buckets, and tensors larger than one
    seen: list[list[str]] = []
    record_batches(seen)
    try:
        for name, case in CASES.items():
            seen.clear()
            result = run(case)
            torch.save(
                {"weights": snapshot(result.model), "history": result.history, "batches": list(seen)},
                out / f"{name}.rank{rank}.pt",
            )
        # stopped after step 2 (as if killed), then resumed to the end
        run(RESUMED, out / "resumed", evaluate=step_of, should_stop=lambda m: "halt" if m["step"] == 2 else None)
        result = run(RESUMED, out / "resumed", evaluate=step_of, resume=True)
        torch.save(
            {"weights": snapshot(result.model), "resumed_from": result.resumed_from}, out / f"resumed.rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    join_ranks(_worker, (free_port(), out), DEADLINE_S, poll_s=5)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_processes_match_one_on_the_same_global_batch(two_processes, name):
    single = run(CASES[name])
    ranks = [torch.load(two_processes / f"{name}.rank{r}.pt") for r in range(WORLD_SIZE)]
    for r in range(1, WORLD_SIZE):  # the ranks stay identical, bit for bit
        for key, tensor in ranks[0]["weights"].items():
            assert torch.equal(tensor, ranks[r]["weights"][key]), key
    assert_moved(ranks[0]["weights"])
    assert_weights_close(ranks[0]["weights"], snapshot(single.model), atol=1e-9)
    logged = [h["loss"] for h in ranks[0]["history"]]  # the losses averaged over ranks
    assert logged == pytest.approx([h["loss"] for h in single.history], rel=1e-9)


def assert_moved(trained: dict[str, torch.Tensor]) -> None:
    adapters = [t for k, t in trained.items() if "lora_B" in k]  # peft starts them at zero
    if adapters:
        assert any(t.abs().max() > 0 for t in adapters)
    else:
        assert any(not torch.equal(t, trained[k]) for k, t in snapshot(make_model()).items())


def test_each_rank_takes_its_contiguous_shard_of_the_global_batch(two_processes, monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setattr(engine_module, "collate_records", engine_module.collate_records)
    record_batches(seen)
    run(CASES["idk-dpo"])
    ranks = [torch.load(two_processes / f"idk-dpo.rank{r}.pt")["batches"] for r in range(WORLD_SIZE)]
    # forget, retain, refusals and the refused questions with their true answers
    assert len(seen) == len(ranks[0]) == len(ranks[1]) == 4 * CASES["idk-dpo"].steps
    for whole, first, second in zip(seen, *ranks):
        assert len(first) == len(second) == len(whole) // 2 and first + second == whole


def test_resume_of_a_two_process_run(two_processes, tmp_path):
    whole = run(RESUMED, tmp_path, evaluate=step_of)
    resumed = torch.load(two_processes / "resumed.rank0.pt")
    assert resumed["resumed_from"] == 2
    assert_weights_close(resumed["weights"], snapshot(whole.model), atol=1e-9)
    directory = two_processes / "resumed"
    # rank 0 alone writes: one log line per step, one checkpoint
    logged = [json.loads(line)["step"] for line in (directory / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == ["latest.json", "step-4"]


def test_one_process_refuses_a_two_process_checkpoint(two_processes):
    with pytest.raises(ValueError, match="2 process"):
        run(RESUMED, two_processes / "resumed", evaluate=step_of, resume=True)


def test_single_process_data_parallel_is_the_identity():
    single = DataParallel()
    items = list(range(6))
    assert single.shard(items) == items and single.shard_start(6) == 0
    tensor = torch.tensor([1.0, 2.0])
    assert single.mean_(tensor) is tensor and tensor.tolist() == [1.0, 2.0]
    assert single.broadcast_object({"a": 1}) == {"a": 1} and single.gather_objects(3) == [3]


def test_shards_are_contiguous_and_must_be_even():
    assert [DataParallel(r, 3).shard(list("abcdef")) for r in range(3)] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert DataParallel(2, 3).shard_start(6) == 4
    with pytest.raises(ValueError, match="does not split evenly over 4"):
        DataParallel(0, 4).shard([1, 2, 3])


def test_gradient_buckets_respect_size_and_dtype(monkeypatch):
    monkeypatch.setattr(distributed_module, "BUCKET_ELEMENTS", 10)
    grads = [torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(20), torch.zeros(2, dtype=torch.float64)]
    sizes = [[g.numel() for g in bucket] for bucket in distributed_module._buckets(grads)]
    assert sizes == [[4, 4], [4], [20], [2]]


def test_sharded_accelerate_launches_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP"):
        distributed_module.data_parallel()
