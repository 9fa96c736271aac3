"""Sharded checkpoints with torch.distributed.checkpoint (DCP) for DP training (docs/design.md §9).

One DCP checkpoint (a directory, or any DCP ``checkpoint_id``) holds:

- the model and the wrapped optimizer, from ``torch.distributed.checkpoint.state_dict``'s
  ``get_state_dict``: FSDP2's DTensor shards are written by the rank that owns them and can be
  loaded on another sharding; DDP and plain modules are written once;
- the privacy engine's ``state_dict()`` (accountant ledger, sampler position, thresholds, sigma),
  the same on every rank;
- each rank's noise generator state, under a key of its own (FSDP2 ranks draw from per-rank
  streams; DDP ranks from one replicated stream), so a resumed run draws the noise the
  uninterrupted run would have drawn, and the world size it was saved with.

A resumed run therefore gets the same batches, the same noise and the same epsilon. Two things are
not saved on purpose:

- a secure-mode noise generator (ChaCha20): its key IS the noise. A resumed secure run draws fresh
  noise from the new key ``make_private`` created (still one draw per coordinate and step, so the
  guarantee is the same; only bit-exactness with the uninterrupted run is lost). The sampler's
  state is in the engine state, and in secure mode it holds the sampler's key: keep such a
  checkpoint as secret as the data.
- a noise generator that is None (torch's global RNG, a plain data-parallel module without
  ``noise_generator``): global RNG state is the application's to checkpoint.

Per-rank noise streams cannot be remapped to another world size: resuming one that way would either
lose exactness or, worse, restart a stream from a seeded position and reuse noise already released.
Loading refuses a checkpoint saved with another world size when it holds noise streams.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["load_distributed_checkpoint", "save_distributed_checkpoint"]

_KEY = "dpfused"  # the engine's part of the checkpoint, next to "model" and "optimizer"


def save_distributed_checkpoint(*, path, engine, module: nn.Module, optimizer=None) -> None:
    """Save model, optimizer, engine state and noise streams as one DCP checkpoint (collective).

    Call on every rank, after ``make_private``, between steps (after ``optimizer.step()``).

    Args:
        path: the DCP ``checkpoint_id`` (a directory for the default file system storage).
        engine: the ``PrivacyEngine`` whose ``make_private`` returned ``module`` and ``optimizer``.
        module: the model ``make_private`` returned (FSDP2 root, DDP wrapper or plain module).
        optimizer: the ``DPOptimizer`` (or None to leave the optimizer out).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

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
    sampler position, the thresholds and the noise streams.

    Args:
        path, engine, module, optimizer: as for ``save_distributed_checkpoint``.

    Raises:
        ValueError: the checkpoint holds per-rank noise streams of another world size; an
            optimizer is passed but the checkpoint has none.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _check_engine(engine, "load_distributed_checkpoint")
    rank, world = _rank_and_world()
    header = {_KEY: {"world_size": 0, "noise_ranks": b""}}
    dcp.load(header, checkpoint_id=path)
    saved_world, noise_ranks = header[_KEY]["world_size"], _loads(header[_KEY]["noise_ranks"])
    if noise_ranks and saved_world != world:
        raise ValueError(
            f"load_distributed_checkpoint: {path} was saved by {saved_world} ranks with per-rank "
            f"noise streams, and this run has {world}; a noise stream cannot move to another "
            "rank count without either losing the exact resume or replaying noise already "
            f"released. Resume with {saved_world} processes")
    model_state, optim_state = get_state_dict(module, optimizers=_inner(optimizer) or [])
    state = {"model": model_state, _KEY: {"engine": b""}}
    if optimizer is not None:
        state["optimizer"] = optim_state
    if rank in noise_ranks:
        state[_KEY][f"noise_rank{rank}"] = b""
    try:
        dcp.load(state, checkpoint_id=path)
    except RuntimeError as error:
        if optimizer is not None and "optimizer" in str(error):
            raise ValueError(f"load_distributed_checkpoint: {path} holds no optimizer state; "
                             "save it with optimizer=... or load with optimizer=None") from error
        raise
    set_state_dict(module, optimizers=_inner(optimizer) or [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))
    engine.load_state_dict(_loads(state[_KEY]["engine"]))
    if rank in noise_ranks:
        engine.optimizer.generator.set_state(_loads(state[_KEY][f"noise_rank{rank}"]))


def _engine_part(engine) -> dict:
    """The engine's state, the world size and this rank's noise stream, as DCP byte items."""
    rank, world = _rank_and_world()
    mine = _saved_noise_state(engine.optimizer.generator)
    every = [mine is not None] * world
    if world > 1:
        dist.all_gather_object(every, mine is not None)
    part = {"world_size": world, "engine": _dumps(engine.state_dict()),
            "noise_ranks": _dumps([r for r, saved in enumerate(every) if saved])}
    if mine is not None:
        part[f"noise_rank{rank}"] = _dumps(mine)
    return part


def _saved_noise_state(generator):
    """A torch.Generator's state; None for no generator or a secure one (its key is the noise)."""
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    return None


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


def _dumps(value) -> bytes:
    """Opaque bytes: DCP stores them as one item (it would flatten a nested dict into tensors that
    it loads in place, which needs templates of the same shapes)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)
