"""Collectives that autograd differentiates (``facekd.distributed.collectives``).

The sharded classifier sees the embeddings of the global batch and computes one loss, the same on every
rank. Two rules make its gradients right:

* :func:`all_gather_rows`: forward concatenates every rank's rows; backward sums the gradient of the
  gathered rows over the ranks (each rank holds its classes' share) and returns this rank's rows.
* :func:`all_reduce_sum`: forward sums a per-rank partial statistic; backward is the identity, because the
  loss downstream of it is computed identically on every rank, so each rank's own upstream gradient is
  already the whole one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from facekd.distributed.world import World

__all__ = ["all_gather_rows", "all_reduce_sum", "all_gather_labels"]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, world: World, grad_scale: float) -> torch.Tensor:
        ctx.world, ctx.grad_scale, ctx.count = world, grad_scale, rows.shape[0]
        parts = [torch.empty_like(rows) for _ in range(world.world_size)]
        dist.all_gather(parts, rows.contiguous(), group=world.group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = ctx.world
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=world.group)  # gloo has no reduce-scatter: reduce all, keep our rows
        mine = grad[world.rank * ctx.count:(world.rank + 1) * ctx.count]
        return mine * ctx.grad_scale if ctx.grad_scale != 1.0 else mine, None, None


def all_gather_rows(rows: torch.Tensor, world: World, *, grad_scale: float = 1.0) -> torch.Tensor:
    """[W·B, ...] from every rank's ``rows`` [B, ...] (equal B on every rank), differentiable.

    ``grad_scale`` multiplies the gradient returned to ``rows``: the data-parallel engine averages the
    backbone's gradients over the W ranks, so a loss computed once for the global batch needs W here
    (insightface's partial FC does the same).
    """
    if world.world_size == 1:
        return rows
    return _AllGatherRows.apply(rows, world, float(grad_scale))


def all_gather_labels(labels: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's labels, concatenated in rank order (no gradient)."""
    if world.world_size == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(world.world_size)]
    dist.all_gather(parts, labels.contiguous(), group=world.group)
    return torch.cat(parts)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: torch.Tensor, world: World) -> torch.Tensor:
        total = partial.clone()
        world.all_reduce(total, "sum")
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_sum(partial: torch.Tensor, world: World) -> torch.Tensor:
    """The sum over ranks of ``partial``; its gradient passes through unchanged (see the module docstring)."""
    if world.world_size == 1:
        return partial
    return _AllReduceSum.apply(partial, world)
