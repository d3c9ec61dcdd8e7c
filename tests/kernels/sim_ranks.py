"""Ranks simulated by threads of one process, for the ``all_reduce`` callbacks of facekd.kernels.

``run_ranks(world, body)`` runs ``body(rank, all_reduce)`` on ``world`` threads and returns their
results by rank. ``all_reduce(tensor, op)`` ("sum" or "max", in place) meets the other ranks at a
barrier and reduces their tensors in rank order, so every rank gets the same bits, as a real
collective does. One rank computes at a time (a baton passed at each all-reduce): neither torch
autograd nor the Triton interpreter has to be thread-safe.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

_TIMEOUT_S = 300


class SimulatedGroup:
    """The state the ranks of one :func:`run_ranks` share."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=_TIMEOUT_S)
        self.baton = threading.Lock()
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world  # all-reduces each rank has made

    def all_reduce(self, rank: int) -> Callable[[torch.Tensor, str], None]:
        def all_reduce(tensor: torch.Tensor, op: str) -> None:
            if op not in ("sum", "max"):
                raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
            self.calls[rank] += 1
            self.slots[rank] = tensor.detach().clone()
            self.baton.release()
            try:
                self.barrier.wait()
                shapes = {tuple(slot.shape) for slot in self.slots}
                if len(shapes) != 1:
                    raise ValueError(f"ranks all-reduced tensors of different shapes: {shapes}")
                result = self.slots[0].clone()
                for slot in self.slots[1:]:
                    result = result + slot if op == "sum" else torch.maximum(result, slot)
                self.barrier.wait()  # nobody overwrites a slot before every rank has read them
            finally:
                self.baton.acquire()
            with torch.no_grad():
                tensor.copy_(result)
        return all_reduce


def run_ranks(world: int, body: Callable[[int, Callable[[torch.Tensor, str], None]], object],
              group: SimulatedGroup | None = None) -> list:
    """``[body(rank, all_reduce) for rank in range(world)]``, the ranks running together.

    An exception on any rank breaks the barrier for the others and is raised here.
    """
    group = SimulatedGroup(world) if group is None else group
    results: list = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        group.baton.acquire()
        try:
            results[rank] = body(rank, group.all_reduce(rank))
        except BaseException as error:  # noqa: BLE001  (handed to the caller below)
            errors.append(error)
            group.barrier.abort()
        finally:
            group.baton.release()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_TIMEOUT_S)
    if errors:
        # the first failure is the cause; the others are ranks left at a broken barrier
        causes = [error for error in errors if not isinstance(error, threading.BrokenBarrierError)]
        raise (causes or errors)[0]
    return results


def class_bounds(num_classes: int, world: int) -> list[tuple[int, int]]:
    """Contiguous class ranges of ``world`` ranks, the first ones a class larger when C does not
    divide (as torch.tensor_split)."""
    sizes = [len(part) for part in torch.arange(num_classes).tensor_split(world)]
    starts = [sum(sizes[:rank]) for rank in range(world)]
    return [(start, start + size) for start, size in zip(starts, sizes)]
