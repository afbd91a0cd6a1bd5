"""Data-parallel evaluation over processes, on torch.distributed.

Every process evaluates its own shard and keeps its own counts; they meet only a few
times per run (check-in, k-means fit, final sums), so the exchanges are small CPU objects.
The default process group uses the backend a job expects (``nccl`` on GPUs, ``gloo`` on
CPUs); those CPU-side exchanges go through a ``gloo`` group either way, because NCCL moves
only GPU tensors.

Processes come from ``torchrun`` / ``accelerate launch`` (which set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; :func:`run_launched` joins
their group) or from :func:`run_spawned` (``--num-processes N``: N local workers meeting
through a rendezvous file). Both run one job function on every rank; what it does (an
evaluation shard) is the caller's business. Spawned workers
leave Ctrl-C to the parent, which stops them, and they end with the parent even when it is
killed outright (:func:`die_with_parent`), so no orphan keeps a GPU busy.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_INTERVAL = 1.0  # seconds between parent checks where prctl is missing


def _parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """End this process when process ``parent`` (its parent) ends, however it ends.

    Linux: the kernel sends SIGKILL (``prctl(PR_SET_PDEATHSIG)``). Elsewhere a daemon thread
    checks every second whether the process was re-parented (POSIX); where that cannot be
    seen (Windows) it does nothing. A parent already gone before this call is caught too.
    The worker's state on disk is checkpointed atomically, so being killed loses nothing.
    """
    if not _parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def spawn(worker: Callable[..., None], num_processes: int, args: tuple) -> None:
    """Run ``worker(local_rank, *args)`` in ``num_processes`` fresh local processes and wait.

    The workers start with SIGINT ignored: Ctrl-C (sent by a terminal to every process of the
    group) is handled here alone, by stopping them (SIGTERM; their checkpoints are atomic) and
    raising ``KeyboardInterrupt`` once they are gone. A failing worker raises here
    (``torch.multiprocessing.ProcessRaisedException`` / ``ProcessExitedException``).
    """
    import torch.multiprocessing as mp

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        context = mp.start_processes(worker, args=args, nprocs=num_processes, join=False, start_method="spawn")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    try:
        while not context.join():
            pass
    except KeyboardInterrupt:
        for process in context.processes:
            process.terminate()
        for process in context.processes:
            process.join()
        raise


# -- launching a job: one function run on every rank ------------------------------------

USAGE_EXIT = 2  # a worker's exit status when the user's input was at fault (reported once, by rank 0)


class WorkersFailed(RuntimeError):
    """A spawned worker ended with an error; ``usage``: the input was at fault and rank 0 said why."""

    def __init__(self, message: str, *, usage: bool):
        super().__init__(message)
        self.usage = usage


def device_for(requested: str, local_rank: int, world_size: int) -> str:
    """The device of worker ``local_rank``: its own GPU when the job runs on GPUs."""
    from .loading import pick_device

    device = pick_device(requested)
    if device.type != "cuda" or world_size == 1:
        return str(device)
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"{world_size} processes on this machine but only {count} GPU(s): use --num-processes {count}")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def check_gpus(requested: str, num_processes: int) -> None:
    """``num_processes`` workers on GPUs need one GPU each; say so before starting any."""
    from .loading import pick_device

    if pick_device(requested).type == "cuda" and torch.cuda.device_count() < num_processes:
        raise ValueError(
            f"--num-processes {num_processes} needs one GPU per process but {torch.cuda.device_count()} "
            f"GPU(s) are visible: use --num-processes {torch.cuda.device_count()} (or --device cpu)"
        )


def run_launched(job: Callable[[str, Comm], Any], requested: str, launch: LaunchInfo) -> Any:
    """Run ``job(device, comm)`` as this rank of a torchrun / accelerate job, in its process group."""
    device = device_for(requested, launch.local_rank, launch.world_size)
    init_process_group(backend_for(torch.device(device)))
    try:
        return job(device, Comm(launch.rank, launch.world_size))
    finally:
        shutdown()


def run_spawned(job: Callable[[str], Any], requested: str, num_processes: int) -> None:
    """Run ``job(device)`` in ``num_processes`` local workers, one process group, and wait for them.

    ``job`` must pickle (a module-level function, or a ``functools.partial`` of one). CPU workers
    share the cores: each gets ``threads // N`` torch threads. Raises :class:`WorkersFailed`.
    """
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    threads = max(1, torch.get_num_threads() // num_processes)
    with tempfile.TemporaryDirectory(prefix="maskdiffusion-rendezvous-") as folder:
        try:
            init = str(Path(folder) / "init")
            spawn(_worker, num_processes, (job, requested, num_processes, init, threads, os.getpid()))
        except ProcessExitedException as error:
            raise WorkersFailed(
                f"a worker exited with status {error.exit_code}", usage=error.exit_code == USAGE_EXIT
            ) from None
        except ProcessRaisedException as error:
            raise WorkersFailed(f"a worker failed:\n{error}", usage=False) from None


def _worker(
    local_rank: int, job: Callable[[str], Any], requested: str, world_size: int, init_file: str, threads: int,
    parent: int,
) -> None:  # fmt: skip
    """One spawned worker; input errors exit with ``USAGE_EXIT`` (reported by rank 0 only), a missing
    model with 1. It ends with its parent process, even one killed outright."""
    from .loading import ModelNotFoundError

    die_with_parent(parent)
    torch.set_num_threads(threads)
    try:
        device = device_for(requested, local_rank, world_size)
        init_process_group(
            backend_for(torch.device(device)), rank=local_rank, world_size=world_size, init_method=f"file://{init_file}"
        )
        job(device)
    except (ValueError, ModelNotFoundError) as error:  # bad data set, run dir, settings; no model
        if local_rank == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1 if isinstance(error, ModelNotFoundError) else USAGE_EXIT)
    finally:
        shutdown()
