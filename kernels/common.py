"""Helpers shared by the kernel files of ``facekd.kernels``.

Class sharding across ranks. A loss over classes split by rank combines per-row statistics with an
``all_reduce(tensor, op)`` callback: op "sum" or "max", in place, across the ranks that hold the
classes (e.g. a wrapper of ``torch.distributed.all_reduce`` on the classifier's group). Every rank
gets the same loss; its backward gives the exact gradient of the rank's own shard and the rank's
share of the gradient of inputs every rank holds (the all-gathered embeddings), which the caller
sums over ranks. Backward never communicates.
"""
from __future__ import annotations

from typing import Callable

import torch

AllReduce = Callable[[torch.Tensor, str], None]


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks, with the identity as backward: the rank's shard of the sum gets the whole
    gradient of the (replicated) loss, which is its exact gradient under the convention above."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
        total = tensor.clone()
        all_reduce(total, "sum")
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    """``tensor`` summed over ranks (a new tensor; itself without ``all_reduce``), differentiable."""
    if all_reduce is None:
        return tensor
    return _AllReduceSum.apply(tensor, all_reduce)


def all_reduce_max(tensor: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    """Elementwise max over ranks of a detached copy of ``tensor`` (maxima only shift exponentials
    here; they carry no gradient)."""
    result = tensor.detach().clone()
    if all_reduce is not None:
        all_reduce(result, "max")
    return result
