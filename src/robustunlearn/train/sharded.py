"""The sharded part of an FSDP run's checkpoint, written and read with torch.distributed.checkpoint
(DCP): each rank writes and reads only its own shards of the trainable weights and of the
optimizer's state tensors, in the checkpoint directory (``.metadata`` and ``__<rank>_0.distcp``).

DCP pickles two things a run directory from someone else could turn into code: its ``.metadata``
index, which :class:`SafeReader` unpickles with only DCP's own record classes, torch dtypes and
paths allowed; and any non-tensor value, which DCP would load with ``weights_only=False``, so none
is written: the optimizer's non-tensor state (step counts, hyperparameters) and its plain tensors
stay in the checkpoint's ``state.pt`` (read with ``weights_only``), as a skeleton of its state dict
in which each sharded tensor is a :data:`SHARD_MARK` entry naming the DCP key that holds it.
"""

from __future__ import annotations

import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from robustunlearn.core.errors import UserError

SHARD_MARK = "__sharded__"  # a skeleton leaf {SHARD_MARK: key, "shape": [...], "dtype": ..., "dim": d}
_WEIGHTS_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # the frozen weights never change
_INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "WindowsPath"): pathlib.WindowsPath,
}


class UnsafeShardIndexError(UserError, ValueError):
    """A checkpoint's ``.metadata`` names something other than DCP's index records."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_CLASSES:
            return _INDEX_CLASSES[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeShardIndexError(
            f"a sharded checkpoint's .metadata names {module}.{name}, which is not part of a DCP index; "
            "refusing to unpickle it (it could run code)"
        )


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with its ``.metadata`` unpickled by :class:`_IndexUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        with open(Path(self.path) / ".metadata", "rb") as file:
            index = _IndexUnpickler(file).load()
        if not isinstance(index, dcp_metadata.Metadata):
            raise UnsafeShardIndexError(f"{Path(self.path) / '.metadata'} is not a DCP index")
        if index.storage_meta is None:
            index.storage_meta = dcp_metadata.StorageMeta()
        index.storage_meta.load_id = self.load_id
        return index


def save_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Every rank writes its shards of the trainable weights and of the optimizer's state tensors
    to ``directory`` (a collective); returns the optimizer state's skeleton for ``state.pt``."""
    shards: dict[str, DTensor] = {}
    skeleton = _skeleton(optimizer.state_dict(), "optimizer", shards)
    dcp.save({"model": get_model_state_dict(model, options=_WEIGHTS_OPTIONS), **shards}, checkpoint_id=directory)
    return skeleton


def load_shards(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, skeleton: Any, mesh: DeviceMesh
) -> None:
    """Read this rank's shards from ``directory`` into ``model``'s trainable weights and, with the
    skeleton :func:`save_shards` returned, into ``optimizer`` (a collective)."""
    SafeReader(directory).read_metadata()  # an unsafe index fails here, not wrapped in DCP's error
    weights = get_model_state_dict(model, options=_WEIGHTS_OPTIONS)
    shards: dict[str, DTensor] = {}
    state = _filled(skeleton, mesh, shards)
    dcp.load({"model": weights, **shards}, storage_reader=SafeReader(directory))
    set_model_state_dict(model, weights, options=_WEIGHTS_OPTIONS)
    optimizer.load_state_dict(state)


def _skeleton(value: Any, key: str, shards: dict[str, DTensor]) -> Any:
    """``value`` (nested dicts) with each DTensor moved to ``shards[key]`` and replaced by a mark."""
    if isinstance(value, dict):
        return {k: _skeleton(v, f"{key}.{k}", shards) for k, v in value.items()}
    if not isinstance(value, DTensor):
        return value
    dims = [p.dim for p in value.placements if isinstance(p, Shard)]
    if len(value.placements) != 1 or len(dims) != 1:
        raise ValueError(f"optimizer state {key} is a DTensor placed {value.placements}, not sharded on one dimension")
    shards[key] = value
    return {SHARD_MARK: key, "shape": list(value.shape), "dtype": value.dtype, "dim": dims[0]}


def _filled(skeleton: Any, mesh: DeviceMesh, shards: dict[str, DTensor]) -> Any:
    """The skeleton with each mark replaced by a zero DTensor of its shape and layout, which
    ``shards`` also holds for DCP to load into."""
    if not isinstance(skeleton, dict):
        return skeleton
    if SHARD_MARK in skeleton:
        key = skeleton[SHARD_MARK]
        shards[key] = torch.distributed.tensor.zeros(
            skeleton["shape"], dtype=skeleton["dtype"], device_mesh=mesh, placements=[Shard(skeleton["dim"])]
        )
        return shards[key]
    return {k: _filled(v, mesh, shards) for k, v in skeleton.items()}
