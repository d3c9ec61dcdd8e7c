"""Where this process stands among the ranks of a job (``facekd.distributed.world``).

A :class:`World` is built once at the start of a run: :meth:`World.single` for one process, or
:meth:`World.from_env` under any launcher that sets the usual ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun, DeepSpeed's launcher, Ray Train, Slurm scripts). It
owns the process group (NCCL on GPUs, gloo on CPU) and hands out the all-reduce callback the kernels
take, so nothing below it calls ``torch.distributed`` directly.

Every rank is a data-parallel rank of the backbone and holds one class shard of each classifier: one
group serves both (the classifier group is the whole world).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from facekd.errors import ConfigError

__all__ = ["World", "launched_by_a_launcher"]

logger = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor, str], None]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
# a rank that dies mid-collective must not leave the others waiting forever (gloo's default is 30 min)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def launched_by_a_launcher() -> bool:
    """Whether the environment describes a multi-process job (``WORLD_SIZE`` and ``RANK`` are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass(frozen=True)
class World:
    """This process's rank, the job's world size, and the device and process group it trains on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    group: Any = None  # the process group of every rank; None for one process without torch.distributed

    @classmethod
    def single(cls, device: torch.device) -> World:
        """One process on ``device``: no process group; collectives are the identity."""
        return cls(0, 1, 0, 1, device)

    @classmethod
    def from_env(cls, device: str = "auto") -> World:
        """Join the job the environment describes; ``device`` as ``train.device`` (``auto``: this rank's GPU
        when there are GPUs, else the CPU). Starts the process group unless the launcher (Ray Train) already
        did."""
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing and not dist.is_initialized():
            raise ConfigError(f"a distributed run needs {', '.join(missing)} in the environment (torchrun sets them)")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
            raise ConfigError(f"RANK {rank} / WORLD_SIZE {world_size} / LOCAL_RANK {local_rank} are inconsistent")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            if not torch.cuda.is_available():
                raise ConfigError("train.device is 'cuda' but torch sees no CUDA device")
            torch.cuda.set_device(local_rank)
            placed = torch.device("cuda", local_rank)
        else:
            placed = torch.device("cpu")
            # ranks sharing a machine share its cores: without this each takes them all and they thrash
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                    timeout=COLLECTIVE_TIMEOUT)
        return cls(rank, world_size, local_rank, local_world_size, placed, dist.group.WORLD)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes TensorBoard, shows progress and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        """In-place all-reduce (``op`` "sum" or "max") over every rank: the callback the kernels take."""
        if self.group is not None and self.world_size > 1:
            dist.all_reduce(tensor, op=_OPS[op], group=self.group)

    @property
    def reducer(self) -> AllReduce | None:
        """:meth:`all_reduce` where there are ranks to reduce over, None for one rank (the kernels' local path)."""
        return self.all_reduce if self.world_size > 1 else None

    def barrier(self) -> None:
        if self.group is not None and self.world_size > 1:
            dist.barrier(group=self.group)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.group is None or self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if self.group is None or self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def close(self) -> None:
        """Leave the job: wait until every rank is done with its collectives, let go of the work objects the
        engine still references, then destroy the process groups. gloo's worker threads must not outlive the
        group: a rank that exits while they hold work aborts ("terminate called without an active exception")."""
        if self.group is not None and dist.is_initialized():
            import gc

            dist.barrier(group=self.group)
            gc.collect()
            dist.destroy_process_group()
