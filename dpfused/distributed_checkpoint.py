"""Sharded checkpoints with torch.distributed.checkpoint (DCP) for DP training (docs/design.md §9).

One DCP checkpoint (a directory) holds:

- the model and the wrapped optimizer, from ``torch.distributed.checkpoint.state_dict``'s
  ``get_state_dict``: FSDP2's DTensor shards are written by the rank that owns them and can be
  loaded on another sharding; DDP and plain modules are written once;
- the privacy engine's ``state_dict()`` (accountant ledger, sampler position, thresholds, sigma),
  the same on every rank, and the world size it was saved with;
- each rank's noise generator state, under a key of its own (FSDP2 ranks draw from per-rank
  streams; DDP ranks from one replicated stream), so a resumed run draws the noise the
  uninterrupted run would have drawn, never noise it already released.

dpfused's own parts are JSON text in uint8 tensors: no pickled object of dpfused's is stored.
Loading never runs code from the checkpoint (docs/design.md §7.6): DCP's ``.metadata`` file (a
pickle) is read by an unpickler that builds only DCP's own metadata classes, and the non-tensor
items DCP writes for the optimizer (learning rates, betas) are read with ``weights_only=True``.

A resumed run therefore gets the same batches, the same noise and the same epsilon. Not saved on
purpose: a secure-mode noise generator (ChaCha20): its key IS the noise. A resumed secure run draws
fresh noise from the new key ``make_private`` created (still one draw per coordinate and step, so
the guarantee is the same; only bit-exactness with the uninterrupted run is lost). The sampler's
state is in the engine state, and in secure mode it holds the sampler's key: keep such a checkpoint
as secret as the data.

Per-rank noise streams cannot be remapped to another world size: resuming one that way would either
lose exactness or, worse, restart a stream from a seeded position and reuse noise already released.
Loading refuses a checkpoint saved with another world size when it holds noise streams.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dpfused.checkpoints import load_plain

__all__ = ["load_distributed_checkpoint", "save_distributed_checkpoint"]

_KEY = "dpfused"  # the engine's part of the checkpoint, next to "model" and "optimizer"


def save_distributed_checkpoint(*, path, engine, module: nn.Module, optimizer=None) -> None:
    """Save model, optimizer, engine state and noise streams as one DCP checkpoint (collective).

    Call on every rank, after ``make_private``, between steps (after ``optimizer.step()``).

    Args:
        path: the checkpoint directory (DCP's file system storage).
        engine: the ``PrivacyEngine`` whose ``make_private`` returned ``module`` and ``optimizer``.
        module: the model ``make_private`` returned (FSDP2 root, DDP wrapper or plain module).
        optimizer: the ``DPOptimizer`` (or None to leave the optimizer out).
    """
    _check_engine(engine, "save_distributed_checkpoint")
    model_state, optim_state = get_state_dict(module, optimizers=_inner(optimizer) or [])
    state = {"model": model_state, _KEY: _engine_part(engine)}
    if optimizer is not None:
        state["optimizer"] = optim_state
    dcp.save(state, checkpoint_id=path)


def load_distributed_checkpoint(*, path, engine, module: nn.Module, optimizer=None) -> None:
    """Restore what ``save_distributed_checkpoint`` saved (collective; call on every rank).

    Call ``make_private`` first, with the same model, data and settings as the saved run: the
    loaded state then replaces the parameters, the optimizer state, the accountant's ledger, the
    sampler position, the thresholds and the noise streams. The engine's state is checked
    (``PrivacyEngine.load_state_dict``) before the model and optimizer are touched.

    Args:
        path, engine, module, optimizer: as for ``save_distributed_checkpoint``.

    Raises:
        ValueError: not a dpfused checkpoint, or one whose metadata names code to run; the
            checkpoint holds per-rank noise streams of another world size; an optimizer is passed
            but the checkpoint has none; what ``PrivacyEngine.load_state_dict`` refuses.
    """
    _check_engine(engine, "load_distributed_checkpoint")
    rank, world = _rank_and_world()
    saved = _safe_reader(path).read_metadata().state_dict_metadata
    names = ["engine"] + ([f"noise_rank{rank}"] if f"{_KEY}.noise_rank{rank}" in saved else [])
    part = {name: torch.empty(_size_of(saved, path, name), dtype=torch.uint8) for name in names}
    dcp.load({_KEY: part}, storage_reader=_safe_reader(path), planner=_SafeLoadPlanner())
    engine_state = _decode(part["engine"])
    saved_world, noise_ranks = engine_state.pop("world_size"), engine_state.pop("noise_ranks")
    if noise_ranks and saved_world != world:
        raise ValueError(
            f"load_distributed_checkpoint: {path} was saved by {saved_world} ranks with per-rank "
            f"noise streams, and this run has {world}; a noise stream cannot move to another "
            "rank count without either losing the exact resume or replaying noise already "
            f"released. Resume with {saved_world} processes")
    if optimizer is not None and not any(key.startswith("optimizer.") for key in saved):
        raise ValueError(f"load_distributed_checkpoint: {path} holds no optimizer state; "
                         "save it with optimizer=... or load with optimizer=None")
    noise = part.get(f"noise_rank{rank}")
    engine_state["noise"] = _decode(noise) if noise is not None else None
    engine.load_state_dict(engine_state)  # checked before the model and optimizer change
    model_state, optim_state = get_state_dict(module, optimizers=_inner(optimizer) or [])
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optim_state
    dcp.load(state, storage_reader=_safe_reader(path), planner=_SafeLoadPlanner())
    set_state_dict(module, optimizers=_inner(optimizer) or [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))


def _engine_part(engine) -> dict:
    """The engine's state with the world size, and this rank's noise stream: JSON in uint8
    tensors (DCP would flatten a nested dict into items it loads in place, which needs templates
    of the same shapes; one tensor per part needs only its length, read from the metadata)."""
    rank, world = _rank_and_world()
    state = engine.state_dict()
    noise = state.pop("noise")
    mine = noise["kind"] == "torch"
    every = [mine] * world
    if world > 1:
        dist.all_gather_object(every, mine)
    part = {"engine": _encode({**state, "world_size": world,
                               "noise_ranks": [r for r, saved in enumerate(every) if saved]})}
    if mine:
        part[f"noise_rank{rank}"] = _encode(noise)
    return part


def _check_engine(engine, name: str) -> None:
    if getattr(engine, "optimizer", None) is None:
        raise ValueError(f"{name}: call engine.make_private first; the checkpoint holds the "
                         "state of the engine's DP optimizer and data loader")


def _inner(optimizer):
    """The torch optimizer a DPOptimizer wraps (it owns param_groups and state)."""
    return getattr(optimizer, "original_optimizer", optimizer)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- dpfused's parts: JSON, never a pickle ---------------------------------------------------------
def _encode(value) -> torch.Tensor:
    """Plain data (``checkpoints.check_plain``) as UTF-8 JSON in a uint8 tensor; tensors and
    bytes become tagged base64 objects."""
    text = json.dumps(_to_json(value), allow_nan=True, separators=(",", ":"))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def _decode(tensor: torch.Tensor):
    return _from_json(json.loads(bytes(tensor.tolist()).decode("utf-8")))


def _to_json(value):
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return {"__tensor__": str(data.dtype).removeprefix("torch."), "shape": list(data.shape),
                "data": base64.b64encode(data.view(torch.uint8).numpy().tobytes()
                                         if data.numel() else b"").decode("ascii")}
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"engine state keys must be strings; got {list(value)!r}")
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"engine state holds a {type(value).__name__}: only plain data is saved")


def _from_json(value):
    if isinstance(value, dict) and "__tensor__" in value:
        dtype = getattr(torch, value["__tensor__"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"load_distributed_checkpoint: unknown tensor dtype "
                             f"{value['__tensor__']!r} in the engine state")
        raw = bytearray(base64.b64decode(value["data"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(value["shape"]).clone()
    if isinstance(value, dict) and "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if isinstance(value, dict):
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


# ---- reading DCP without running code ---------------------------------------------------------------
def _size_of(saved, path, name) -> torch.Size:
    entry = saved.get(f"{_KEY}.{name}")
    if not isinstance(entry, TensorStorageMetadata):
        raise ValueError(f"load_distributed_checkpoint: {path} has no dpfused engine state "
                         f"('{_KEY}.{name}'); write it with save_distributed_checkpoint")
    return entry.size


def _safe_reader(path) -> FileSystemReader:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint directory (str or os.PathLike), got "
                        f"{type(path).__name__}")
    return _SafeFileSystemReader(path)


class _SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader``, with ``.metadata`` read by ``_MetadataUnpickler``."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata_path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(metadata_path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, path=self.path).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# DCP's metadata classes and the few torch values they hold: all the .metadata pickle may build.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: any other global in the file is refused."""

    def __init__(self, stream, *, path):
        super().__init__(stream)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise ValueError(
            f"load_distributed_checkpoint: refused to load {self.path}: its .metadata names "
            f"{module}.{name}, which is not part of torch.distributed.checkpoint's metadata (a "
            "tampered checkpoint would run it on load). Nothing was loaded")


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner; a non-tensor item is first read with ``weights_only=True``, which
    refuses any pickle that names code, and only then handed to DCP's own reading."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        load_plain(value, what="load_distributed_checkpoint")
        value.seek(0)
        super().load_bytes(read_item, value)
