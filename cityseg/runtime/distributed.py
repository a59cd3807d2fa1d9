"""Many processes, one run: torch.distributed as torchrun sets it up.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)
starts one process per device; `setup` joins them into a process group (NCCL on CUDA, gloo on
the CPU) plus a gloo group for small host-side messages, so that agreeing on a decision never
waits for the GPU. Without a launcher the world has one process and every helper here is a
no-op: one process is the same code path with world size 1.

Rank 0 alone talks to MLflow, writes checkpoints and prints; every decision that changes what
the ranks do next (stop, checkpoint, fail) is agreed by all of them at the same step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cityseg.errors import RankFailed

T = TypeVar("T")
TIMEOUT = timedelta(minutes=10)  # a collective that waits longer than this has lost a peer


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = "none"  # nccl | gloo | none (one process, no launcher)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()
_CONTROL: Any = None  # the gloo group for host-side agreement


def world() -> World:
    return _WORLD


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (a no-op for one process)."""
    global _WORLD, _CONTROL
    if not launched() or dist.is_initialized():
        return _WORLD
    backend = "nccl" if device.type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=TIMEOUT,
                            device_id=torch.device("cuda", local_rank)
                            if device.type == "cuda" else None)
    _CONTROL = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
                   backend=backend)
    return _WORLD


def teardown(*, clean: bool) -> None:
    """Leave the process group; after a clean end, wait for every rank first (gloo can abort
    a process that exits right after a collective)."""
    global _WORLD, _CONTROL
    if not dist.is_initialized():
        return
    if clean:
        with contextlib.suppress(Exception):
            dist.barrier(group=_CONTROL)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    _WORLD, _CONTROL = World(), None


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[World]:
    """The world for a block (`setup`), left at its end: cleanly when it ends normally, at
    once when it raises."""
    world = setup(device)
    try:
        yield world
    except BaseException:
        teardown(clean=False)
        raise
    teardown(clean=True)


def device_for(device: torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when several processes share a machine."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# ---------------------------------------------------------------- collectives


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max, min) a tensor over every rank, in place; a no-op for one process."""
    if _WORLD.distributed:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def agree(values: list[float]) -> list[float]:
    """The element-wise maximum of `values` over every rank, on the host (the control group)."""
    if not _WORLD.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_CONTROL)
    return tensor.tolist()


def gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not _WORLD.distributed:
        return [obj]
    found: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(found, obj, group=_CONTROL)
    return found


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not _WORLD.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def barrier() -> None:
    if _WORLD.distributed:
        dist.barrier(group=_CONTROL)


def raise_failures(own: str, *, doing: str) -> None:
    """Every rank's error (`own`: this rank's message, empty for none) known to all; the first
    raised on every rank as RankFailed, naming the rank and what it was `doing`."""
    for rank, message in enumerate(gather(own)):
        if message:
            raise RankFailed(f"rank {rank} failed {doing}: {message}")


def together(step: Callable[[], T], *, local_main_first: bool = False) -> T:
    """Run `step` on every rank; if it raised on any, raise on all (so none waits forever in
    a collective): the own error where this rank failed, else RankFailed naming the rank.

    local_main_first: local rank 0 goes first (it builds what the others then reuse: generated
    data, decode caches); the others start once it is done.
    """
    def attempt() -> tuple[T | None, Exception | None]:
        try:
            return step(), None
        except Exception as err:  # noqa: BLE001  (re-raised below, on every rank)
            return None, err

    first = not local_main_first or _WORLD.local_rank == 0
    if first:
        result, failure = attempt()
    if local_main_first:
        barrier()
    if not first:
        result, failure = attempt()
    failures = gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    for rank, message in enumerate(failures):
        if message is not None:
            raise RankFailed(f"rank {rank} failed: {message}")
    return result
