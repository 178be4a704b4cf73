"""Data parallelism for the unlearning engine: every rank holds the whole model and takes its
shard of each global batch, and all ranks apply the same update, so their weights stay equal.

* First-order steps: after each backward, every gradient is averaged across ranks by an
  all-reduce in buckets. This is DistributedDataParallel's algorithm without its wrapper, whose
  reducer rejects what the objectives do: several forward passes per backward (forget and
  retain), and RMU's forward pass that a hook stops after one layer.
* Zeroth-order steps: the ranks share the optimizer's seed, hence its random directions; each
  evaluates the loss on its shard, and only the ``q`` projected gradients (scalars) are averaged,
  through the optimizer's ``reduce_projected_grad``. No gradient tensor crosses the wire.

Sharded (``parallel: {mode: fsdp}``, :meth:`DataParallel.sharded`): the same shards of the batch,
but every parameter is split over the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``,
each decoder block, then the root, :func:`shard_model`); a block's weights are gathered for its
forward and backward only, and gradients are reduce-scattered (averaged) into each rank's shard,
so the optimizer steps on the shards (DTensors) and no rank holds a whole model.

Launch with ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N``:
:func:`data_parallel` joins the process group their environment variables describe. accelerate's
own sharded configurations (FSDP, DeepSpeed, Megatron-LM) are refused: the engine shards the model
itself (docs/engine.md).
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from robustunlearn.core.modules import decoder_blocks

T = TypeVar("T")

# accelerate launch sets these for configurations that shard the model across ranks.
SHARDED_LAUNCHES = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}
# Evaluation runs on rank 0 while the other ranks wait in a collective; torch's default timeout
# (10 minutes with NCCL) is too short for generating answers with a 7B model.
TIMEOUT = datetime.timedelta(hours=1)
BUCKET_ELEMENTS = 2**25  # gradients all-reduced per call: bounds the flat buffer (128 MiB in fp32)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among ``world_size`` data-parallel ranks. With one process every
    method is the identity or a no-op, so the single-process path computes exactly what it did
    without this class."""

    rank: int = 0
    world_size: int = 1
    mesh: DeviceMesh | None = None  # FSDP: the 1-D mesh of every rank that the parameters are sharded over

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP-sharded DTensors (several processes in mode fsdp)."""
        return self.mesh is not None

    def with_sharding(self) -> DataParallel:
        """This rank with a mesh over all ranks for FSDP (one process stays unsharded: there is
        nothing to split)."""
        if not self.enabled:
            return self
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return DataParallel(self.rank, self.world_size, init_device_mesh(device_type, (self.world_size,)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of a global batch: ranks 0..N-1 take equal parts in order."""
        if len(items) % self.world_size:
            raise ValueError(f"a batch of {len(items)} does not split evenly over {self.world_size} processes")
        size = len(items) // self.world_size
        return list(items[self.rank * size : (self.rank + 1) * size])

    def shard_start(self, total: int) -> int:
        """Index in a global batch of ``total`` items where this rank's shard starts."""
        return self.rank * (total // self.world_size)

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def mean_(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over ranks, in place (usable as ``reduce_projected_grad``)."""
        if self.enabled:
            dist.all_reduce(tensor)
            tensor.div_(self.world_size)
        return tensor

    def mean_values(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Average each float over ranks (every rank passes the same keys)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        averaged = self.mean_(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device))
        return dict(zip(keys, averaged.tolist()))

    def average_gradients(self, params: Sequence[Tensor]) -> None:
        """Average ``p.grad`` over ranks. A gradient that is None on some ranks only (a weight
        one shard did not reach) counts as zero there; one that is None everywhere stays None."""
        if not self.enabled or not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        grads = []
        for p, anywhere in zip(params, present.tolist()):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
            if anywhere:
                grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self.mean_(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values."""
        if self.enabled:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable), on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _buckets(grads: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive gradients of one dtype and device, at most :data:`BUCKET_ELEMENTS` per bucket
    (a larger gradient gets a bucket of its own)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for g in grads:
        last = buckets[-1] if buckets else None
        if last is None or (g.dtype, g.device) != (last[0].dtype, last[0].device) or size + g.numel() > BUCKET_ELEMENTS:
            buckets.append([g])
            size = g.numel()
        else:
            last.append(g)
            size += g.numel()
    return buckets


def local_device() -> torch.device:
    """The device this process should put the model on: ``cuda:LOCAL_RANK`` when there is a
    GPU (``cuda:0`` for a single process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes shared files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started: its ``WORLD_SIZE``, or
    the initialized process group's size; 1 without a launcher."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel() -> DataParallel:
    """This process's :class:`DataParallel`: the initialized process group if there is one, else
    one initialized from the launcher's environment (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), else a single process. CPU tensors go through gloo, CUDA
    tensors through NCCL."""
    for variable, scheme in SHARDED_LAUNCHES.items():
        if os.environ.get(variable, "").lower() in ("1", "true"):
            raise ValueError(
                f"accelerate launched this run with its {scheme} config, which the engine does not use; "
                "to shard the model, run FSDP2 through the engine: parallel mode fsdp (--parallel fsdp, "
                "or parallel: {mode: fsdp} in the recipe) with torchrun or accelerate launch --multi_gpu "
                "(docs/engine.md)"
            )
    if dist.is_available() and dist.is_initialized():
        return DataParallel(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DataParallel()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)
    return DataParallel(dist.get_rank(), dist.get_world_size())


def shard_model(model: nn.Module, mesh: DeviceMesh, mixed_precision: bool = False) -> None:
    """Shard ``model`` in place with FSDP2 over ``mesh``: each decoder block, then the root (the
    embeddings, final norm and head), so one block's weights are gathered at a time. With
    ``mixed_precision`` the sharded weights stay as they are (float32 masters, which the optimizer
    steps on) and are gathered in bfloat16 for the forward and backward passes, while gradients
    are reduce-scattered in float32. Parameters on the CPU move to the mesh's device."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    options = {"mesh": mesh, "mp_policy": policy or MixedPrecisionPolicy()}
    for block in decoder_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)


def reshard(model: nn.Module) -> None:
    """Free what FSDP gathered of ``model`` for forwards without backward (it keeps the root's
    weights after one): the next forward then gathers the shards as they are now, and the next
    backward's gradients land in the shards, not in the gathered copies. A model that is not
    sharded (its root is not an FSDP module: :func:`shard_model` shards the root last) is left as it is."""
    if not isinstance(model, FSDPModule):
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gathered_copy(sharded: nn.Module, like: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """A plain (unsharded) copy of ``like`` holding the FSDP-``sharded`` model's weights, on every
    rank: each gathers them all (every rank must call it). The copy stays on ``like``'s device, or
    moves to ``device``."""
    weights = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    plain = copy.deepcopy(like)
    plain.load_state_dict(weights)
    return plain if device is None else plain.to(device)


def full_state_dict(model: nn.Module, *, sharded: bool, trainable_only: bool = False) -> dict[str, Tensor]:
    """``model``'s weights (``trainable_only``: those that require grad) as whole tensors. An
    FSDP-``sharded`` model's are gathered on rank 0's CPU: every rank must call it, and ranks other
    than 0 get ``{}``. Unsharded: the model's own tensors, detached."""
    if not sharded:
        if trainable_only:
            return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    weights = get_model_state_dict(model, options=options)
    # the gathered copies of tied weights (an output head sharing the embeddings) are separate
    # tensors, which save_pretrained would write twice: keep the first name, as a plain model's state does
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    aliases -= {name for name, _ in model.named_parameters()}
    return {name: tensor for name, tensor in weights.items() if name not in aliases}


def leave_process_group() -> None:
    """Destroy the process group, if one is initialized: the last act of a launched command
    (NCCL warns about pending operations at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DataParallel",
    "data_parallel",
    "full_state_dict",
    "gathered_copy",
    "is_main_process",
    "launched_processes",
    "leave_process_group",
    "local_device",
    "shard_model",
]
