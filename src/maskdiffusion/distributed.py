"""Data-parallel evaluation over processes, on torch.distributed.

Every process evaluates its own shard and keeps its own counts; they meet only a few
times per run (check-in, k-means fit, final sums), so the exchanges are small CPU objects.
The default process group uses the backend a job expects (``nccl`` on GPUs, ``gloo`` on
CPUs); those CPU-side exchanges go through a ``gloo`` group either way, because NCCL moves
only GPU tensors.

Processes come from ``torchrun`` / ``accelerate launch`` (which set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or from :func:`spawn`
(``--num-processes N``: N local workers meeting through a rendezvous file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in a launched job."""

    rank: int
    world_size: int
    local_rank: int


def launched_by_env() -> LaunchInfo | None:
    """The job set up by ``torchrun`` / ``accelerate launch``, or None for a single process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(
            "RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun or accelerate launch)"
        ) from None
    return LaunchInfo(rank, world, local) if world > 1 else None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(
    backend: str, *, rank: int | None = None, world_size: int | None = None, init_method: str = "env://"
) -> None:
    """Join the job's process group (no-op when this process is in one already)."""
    if dist.is_initialized():
        return
    if rank is None:
        dist.init_process_group(backend, init_method=init_method)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Comm:
    """This process's rank and world, and the few exchanges an evaluation needs.

    With ``world_size == 1`` every exchange is the identity, so the same code runs alone.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size} is not a valid position")
        self.rank = rank
        self.world_size = world_size
        self._group = None
        if world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    f"an evaluation shard {rank} of {world_size} needs torch.distributed to be initialised first: "
                    "launch with torchrun / accelerate launch, or use --num-processes"
                )
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise ValueError(
                    f"rank {rank} of {world_size} does not match the process group "
                    f"(rank {dist.get_rank()} of {dist.get_world_size()})"
                )
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    @classmethod
    def current(cls, rank: int | None = None, world_size: int | None = None) -> Comm:
        """Rank and world from the arguments, else from the initialised process group, else 0 of 1."""
        if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(rank or 0, world_size or 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._group)

    def sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of every process's ``array`` (int64 stays exact)."""
        if self.world_size == 1:
            return np.array(array, copy=True)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._group)
        return tensor.numpy()

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` in rank order on rank 0; None elsewhere."""
        if self.world_size == 1:
            return [value]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0, group=self._group)
        return out

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` in rank order, on every process."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self._group)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every process."""
        if self.world_size == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]


def spawn(worker: Callable[..., None], num_processes: int, args: tuple) -> None:
    """Run ``worker(local_rank, *args)`` in ``num_processes`` fresh local processes and wait.

    A failing worker raises here (``torch.multiprocessing.ProcessRaisedException``).
    """
    import torch.multiprocessing as mp

    mp.spawn(worker, args=args, nprocs=num_processes, join=True)
