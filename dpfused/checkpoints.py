"""What a dpfused checkpoint holds and how one is read back (docs/design.md §7.6).

- **Plain data only.** A checkpoint holds tensors, numbers, strings, bytes, None and lists, tuples
  and dicts of them. ``check_plain`` refuses anything else when saving, naming where it sits;
  ``load_plain`` reads with ``torch.load(weights_only=True)``, which builds tensors and containers
  and never calls code named in the file, so a tampered checkpoint cannot run code on load.
- **The noise stream.** ``noise_state`` saves the state of the generator the DP optimizer draws its
  noise from, ``restore_noise`` puts it back: a resumed run continues the stream and never draws
  noise it already released (the difference of two updates with the same noise would be a
  noise-free function of the data). A secure-mode ChaCha20 key is never saved (the key is the
  noise): a resumed secure run draws fresh noise from the fresh key ``make_private`` made. Where a
  saved stream cannot be restored (another rank's per-rank stream, another device type, a
  checkpoint written before streams were saved), ``reseed_from_os`` gives the generator a fresh
  seed from the operating system, and the caller says so.
- **The ledger.** ``check_ledger`` refuses a ledger that disagrees with the optimizer's step count
  and the sampler's position. Checkpoints are trusted input: whoever writes one can forge a
  consistent one (and can put any weights in it). The check catches a ledger that was cut, emptied
  or mixed with another run's state; it proves nothing against a forger.

Everything here is SECRET as the data: the sampler's and the noise generator's states decide which
examples were drawn and which noise was added, so whoever holds them can replay training on a
candidate data set and compare with the released model.
"""

from __future__ import annotations

import pickle
import secrets
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["NOISE_LAYOUTS", "check_ledger", "check_plain", "load_plain", "noise_state",
           "os_seeded_generator", "reseed_from_os", "restore_noise"]

# How the DP optimizer's noise stream is laid out over processes (docs/design.md §9):
# "one": one process; "replicated": data parallel over a plain module or DDP, every rank draws the
# same stream; "per_rank": FSDP2, each rank draws its own stream for its own shard.
NOISE_LAYOUTS = ("one", "replicated", "per_rank")

_PLAIN_LEAVES = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)


# ---- plain data ----------------------------------------------------------------------------------
def check_plain(value: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would not read back (or only by running code).

    Raises:
        TypeError: naming the first non-plain value's place in ``value`` (e.g. ``checkpoint_dict
            ['sched']['fn']``) and its type.
    """
    if isinstance(value, _PLAIN_LEAVES) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, _PLAIN_LEAVES):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; checkpoint keys "
                                "must be strings or numbers")
            check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds plain "
        "data only (tensors, numbers, strings, bytes, None, lists and dicts of them), because "
        "loading anything else means running code named in the file. Save its parameters instead "
        "(a number, a list, .tolist() of an array, torch.as_tensor(...))")


def load_plain(source, *, what: str) -> Any:
    """``torch.load(source, weights_only=True)``, with an error that says what was refused.

    Raises:
        ValueError: the file names code or classes to run (a tampered checkpoint, or one written
            with non-plain data by an older version): it was not loaded, and nothing ran.
    """
    try:
        return torch.load(source, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line for line in str(error).splitlines() if "GLOBAL" in line),
                      str(error).splitlines()[0] if str(error) else "")
        raise ValueError(
            f"{what}: refused to load {source!r}: it holds more than plain data (tensors, numbers, "
            f"strings, lists, dicts). {reason.strip()} dpfused reads checkpoints with "
            "weights_only=True and never runs code from one; do not load this file with "
            "weights_only=False unless you wrote it yourself. Re-save it with this version "
            "(schedulers are saved as their parameters)") from error


# ---- the noise stream ---------------------------------------------------------------------------
def os_seeded_generator(device: torch.device) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with 63 bits from the operating system: no seed the
    user set (``torch.manual_seed``) can make a later run replay its stream."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def noise_state(generator, *, layout: str, rank: int, world_size: int) -> dict[str, Any]:
    """The noise stream as plain data: torch generator states (one per device), or
    ``{"kind": "secure"}`` for a ChaCha20 generator, whose key is never saved."""
    if _is_secure(generator):
        return {"kind": "secure", "layout": layout}
    if generator is None:  # a DPOptimizer built by hand on torch's global RNG: not ours to save
        return {"kind": "global", "layout": layout}
    generators = _torch_generators(generator)
    return {"kind": "torch", "layout": layout, "rank": rank, "world_size": world_size,
            "generators": [{"device": g.device.type, "state": g.get_state()}
                           for g in generators]}


def restore_noise(generator, saved: Mapping[str, Any] | None, *, layout: str, rank: int,
                  world_size: int) -> str | None:
    """Continue the saved stream in ``generator`` (in place); or, where that is impossible,
    reseed it from the operating system. Returns None when restored, else why it was not.

    Collective under DDP when it reseeds (every rank must draw the same fresh stream); every rank
    loads the same state, so every rank takes the same branch.
    """
    reason = _unrestorable(generator, saved, layout=layout, rank=rank, world_size=world_size)
    if reason is None:
        for own, entry in zip(_torch_generators(generator), saved["generators"]):
            own.set_state(entry["state"])
        return None
    if not _is_secure(generator):  # a secure generator holds a fresh OS key already
        reseed_from_os(generator, layout=layout)
    return reason


def _unrestorable(generator, saved, *, layout, rank, world_size) -> str | None:
    if _is_secure(generator) or (saved is not None and saved.get("kind") == "secure"):
        return ("secure mode never saves its ChaCha20 key, which is the noise; the guarantee is "
                "unchanged, only the bit-for-bit equality with an uninterrupted run is lost")
    if saved is None:
        return "the checkpoint holds no noise stream (written before dpfused saved it)"
    if generator is None or saved.get("kind") != "torch":
        return ("the noise came from torch's global generator, which only the application can "
                "save and restore")
    if saved.get("layout") != layout:
        return (f"the checkpoint's noise stream was laid out {saved.get('layout')!r} over the "
                f"processes, this run's is {layout!r}")
    if layout == "per_rank" and (saved.get("rank"), saved.get("world_size")) != (rank, world_size):
        return (f"the checkpoint holds rank {saved.get('rank')} of {saved.get('world_size')}'s own "
                f"noise stream and this is rank {rank} of {world_size} (two ranks on one stream "
                "would add the same noise to different coordinates); use "
                "save_distributed_checkpoint, which keeps every rank's stream")
    ours = [g.device.type for g in _torch_generators(generator)]
    theirs = [entry.get("device") for entry in saved.get("generators", [])]
    if ours != theirs:
        return (f"the checkpoint's noise generators are on {theirs}, this run's on {ours} (a "
                "generator state does not carry over to another device type)")
    return None


def reseed_from_os(generator, *, layout: str) -> None:
    """A fresh seed from the operating system for every torch generator in ``generator`` (the
    same seed on every rank when the stream is replicated)."""
    for own in _torch_generators(generator) if generator is not None else ():
        seed = [secrets.randbits(63)]
        if layout == "replicated":
            torch.distributed.broadcast_object_list(seed, src=0)
        own.manual_seed(seed[0])


def _is_secure(generator) -> bool:
    from dpfused.secure_random import ChaCha20Generator

    return isinstance(generator, ChaCha20Generator)


def _torch_generators(generator) -> list[torch.Generator]:
    """The generator, or make_private's one per device (a model spread over devices)."""
    if isinstance(generator, Mapping):
        return [generator[device] for device in sorted(generator, key=str)]
    return [generator]


# ---- the ledger ---------------------------------------------------------------------------------
def check_ledger(*, entries, ledger_start: int, steps_taken: int, loader_state: Mapping,
                 sampling: str, batches_per_epoch: int, sample_rate: float | None,
                 batch_size: int | None) -> None:
    """The saved ledger must be the record of the saved run's steps.

    Checks: the entries since ``make_private`` number ``steps_taken``; each was drawn by this
    sampling, rate (Poisson) or batch size (at most b: a kept last partial batch is smaller) and
    epoch length; they sit at increasing places of the sampler's stream (epoch
    x batches per epoch + position), all before the sampler's saved position; the sampler's
    position agrees with the loader's step count, which exceeds the steps it drew by at most one (a
    checkpoint between drawing a batch and its step, or a step the budget refused). Entries of
    steps on batches the loader did not draw (``"unsampled"``: no guarantee, every epsilon
    infinite) count in ``steps_taken`` and at no place of the sampler's stream; each may or may
    not have used up a draw (passes on other data mixed into a drawn batch make it one), and
    with epsilon infinite an extra draw can hide nothing.

    Raises:
        ValueError: naming what disagrees.
    """
    def refuse(what: str):
        raise ValueError(
            f"load_state_dict: the saved privacy ledger disagrees with the saved run: {what}. "
            "An edited or mixed-up checkpoint would under-report epsilon; resume from the "
            "checkpoint as it was written (checkpoints are trusted input, docs/design.md §7.6)")

    if not isinstance(entries, (list, tuple)):
        refuse(f"its entries are a {type(entries).__name__}, not a list")
    if not 0 <= ledger_start <= len(entries):
        refuse(f"it starts this run's steps at entry {ledger_start} of {len(entries)}")
    ours = entries[ledger_start:]
    if len(ours) != steps_taken:
        refuse(f"the optimizer took {steps_taken} steps but the ledger records {len(ours)} "
               f"(of {len(entries)} entries, {ledger_start} from earlier make_private calls)")
    try:
        sampler, drawn = loader_state["sampler"], int(loader_state["step"])
        position = int(sampler["epoch"]) * batches_per_epoch + int(sampler["position"])
    except (KeyError, TypeError, ValueError) as error:
        refuse(f"its data loader state is malformed ({type(error).__name__}: {error})")
    if position != drawn:
        refuse(f"the sampler stands at epoch {sampler['epoch']}, batch {sampler['position']} "
               f"({batches_per_epoch} per epoch) but the loader counts {drawn} batches drawn")
    unsampled = sum(isinstance(e, Mapping) and isinstance(e.get("sampled"), Mapping)
                    and e["sampled"].get("sampling") == "unsampled" for e in ours)
    sampled_steps = steps_taken - unsampled
    if not sampled_steps <= drawn <= sampled_steps + unsampled + 1:
        refuse(f"the sampler drew {drawn} logical batches and the optimizer took {sampled_steps} "
               f"steps on them (and {unsampled} on batches it did not draw; a checkpoint may fall "
               "between one draw and its step, no more)")
    previous = -1
    for index, entry in enumerate(ours, start=ledger_start):
        try:
            sampled, iterate = entry["sampled"], entry["iterate"]
            if sampled["sampling"] == "unsampled":
                continue  # no guarantee, no place in the sampler's stream (epsilon is infinite)
            drawn_by = (sampled["sampling"], iterate["batches_per_epoch"], sampled["sample_rate"],
                        sampled["batch_size"])
            place = int(sampled["epoch"]) * batches_per_epoch + int(iterate["position_in_epoch"])
        except (KeyError, TypeError, ValueError) as error:
            refuse(f"entry {index} is malformed ({type(error).__name__}: {error})")
        if drawn_by[:3] != (sampling, batches_per_epoch, sample_rate) or (
                batch_size is not None and not 1 <= (drawn_by[3] or 0) <= batch_size):
            refuse(f"entry {index} was drawn with (sampling, batches per epoch, sample rate, batch "
                   f"size) = {drawn_by}, this run's sampler draws with "
                   f"{(sampling, batches_per_epoch, sample_rate, batch_size)}")
        if not previous < place < drawn:
            refuse(f"entry {index} sits at batch {place} of the sampler's stream, after "
                   f"{previous} and before the {drawn} drawn")
        previous = place

