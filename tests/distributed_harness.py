"""Several gloo processes on the CPU for the multi-process tests: spawn, join a process group, run,
hand each rank's result back, leave the group.

    def _on_each_rank(rank, noise):        # module level: the spawned processes import it
        ...
        return {"params": ...}             # anything torch.save takes

    ranks = run_on_ranks(_on_each_rank, tmp_path, 0.5)   # [rank 0's result, rank 1's]

(``from tests.distributed_harness import run_on_ranks``.)

``rendezvous="environment"`` sets what ``torchrun`` / ``accelerate launch`` set (MASTER_ADDR,
MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE) and leaves joining the group to ``function`` (e.g.
``Accelerator()``). A test that needs the group in its own process (world size 1) uses
``process_group(tmp_path)``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def run_on_ranks(function: Callable[..., Any], folder, *args, world: int = WORLD,
                 rendezvous: str = "file") -> list:
    """``function(rank, *args)`` on ``world`` fresh processes that share one gloo group; each
    rank's return value, in rank order. A rank that raises fails the spawn (its traceback is in
    the error). ``rendezvous``: "file" (the group is joined for ``function``) or "environment"
    (the launcher's variables are set; ``function`` joins)."""
    if rendezvous not in ("file", "environment"):
        raise ValueError(f"rendezvous must be 'file' or 'environment', got {rendezvous!r}")
    folder = Path(folder)
    run = uuid.uuid4().hex  # a fresh rendezvous file and result names for every run in a folder
    port = free_port() if rendezvous == "environment" else None
    mp.spawn(_rank_main, args=(function, str(folder), run, world, port, args), nprocs=world,
             join=True)
    return [torch.load(folder / f"{run}-rank{rank}.pt", weights_only=False)
            for rank in range(world)]


def free_port() -> int:
    """A TCP port nobody listens on now, for MASTER_PORT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process_group(folder, *, rank: int = 0, world: int = 1, name: str | None = None):
    """Inside: this process is ``rank`` of a gloo group of ``world`` rendezvousing through a file
    in ``folder``; the group is destroyed on the way out, even after an exception."""
    init_file = Path(folder) / (name or f"init-{uuid.uuid4().hex}")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, function, folder: str, run: str, world: int, port: int | None,
               args: tuple) -> None:
    if port is None:
        with process_group(folder, rank=rank, world=world, name=f"{run}-init"):
            result = function(rank, *args)
            dist.barrier()  # every rank done before any leaves the group
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        try:
            result = function(rank, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    torch.save(result, os.path.join(folder, f"{run}-rank{rank}.pt"))
