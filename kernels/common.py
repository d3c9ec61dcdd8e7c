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
import triton
import triton.language as tl

from facekd.kernels.backend import triton_interpreted

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


# ---------------------------------------------------------------------------------------------
# Loss reduction over the batch
# ---------------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-row loss [B] reduced as ``reduction`` says ("none" keeps it)."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# ---------------------------------------------------------------------------------------------
# Triton helpers: normalisation and tensor-core dots
# ---------------------------------------------------------------------------------------------

# F.normalize's floor on the norm: a zero row normalises to zero instead of NaN.
NORM_EPS = 1e-12
_NORM_EPS = tl.constexpr(NORM_EPS)


@triton.jit
def inverse_norm(rows):
    """1 / max(‖row‖₂, eps) of each row of a [N, BLOCK_D] tile, in fp32."""
    rows = rows.to(tl.float32)
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(rows * rows, axis=1)), _NORM_EPS)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b in fp32 (a @ b for acc None), on tensor cores at ``DOT_PRECISION``.

    "upcast" multiplies fp32 copies: a workaround (2026-11) for the Triton 3.9 interpreter, which
    multiplies bfloat16 tiles as their raw uint16 bits (its create_dot widens only fp8 operands).
    """
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    """DOT_PRECISION for inputs of ``dtype``: three TF32 passes keep fp32 accuracy for fp32 inputs
    (the cosines a selection ranks, the gradients); 16-bit inputs take their native tensor-core dot,
    which the interpreter gets wrong for bfloat16 (see :func:`dot`)."""
    if dtype == torch.float32:
        return "tf32x3"
    return "upcast" if triton_interpreted() and dtype == torch.bfloat16 else "tf32"
