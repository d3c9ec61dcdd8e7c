"""Partial FC: class centres sharded by class over the ranks (``facekd.distributed.classifier``).

Rank r of W holds the centres of the contiguous classes [class_offset, class_offset + C_r) of C, the first
C mod W ranks one more than the others (:func:`shard_range`). No rank ever holds all C centres, nor a
B × C logit matrix: each step the embeddings and labels of the global batch are gathered to every rank
(:mod:`facekd.distributed.collectives`), each rank computes per-row statistics of its own classes with the
fused kernels, and the ranks combine them by all-reduce (DESIGN.md, "Where the cost is", point 2).

Sampling (insightface partial FC v2): with ``sample_rate`` < 1 each rank uses, per step, every class of its
shard that is a label of the global batch plus uniformly drawn others, int(sample_rate · C_r) in all (or
just the positives when they are more). The draw is a function of (seed, step, rank), so a resumed run
draws the same classes. Unused centres get a zero gradient, and the optimiser's momentum and weight decay
still move them, as in insightface.

The module is model-parallel: it must stay out of the data-parallel engine (whose start-up broadcast would
copy rank 0's shard everywhere and whose all-reduce would mix different classes' gradients).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from facekd.distributed.world import World
from facekd.kernels import margin_softmax_ce
from facekd.kernels.margin_ce import margin_softmax_ce_sharded

__all__ = ["ShardedClassifier", "shard_range"]

# centres of a sharded classifier are drawn in blocks of this many classes, each from its own seed, so the
# initial C × D matrix is the same whatever the world size (and no rank draws rows it does not hold)
INIT_BLOCK = 1 << 16


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the classes rank ``rank`` holds: contiguous, the first C mod W ranks one more."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be sharded over {world_size} ranks (each needs one)")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] >> 1)


class ShardedClassifier(nn.Module):
    """This rank's class centres ``weight`` [C_r, D] of a [C, D] margin-softmax classifier.

    Its logit for class j is s·cos θ_j, and s·(cos(m1·θ_y + m2) − m3) for the target y (ArcFace / CosFace /
    combined margin). With one rank (``world`` None or of size 1) it holds every class and computes exactly
    what :func:`facekd.kernels.margin_softmax_ce` does.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        s: float,
        m1: float,
        m2: float,
        m3: float,
        margin_grad: str = "exact",
        world: World | None = None,
        sample_rate: float = 1.0,
        seed: int = 0,
        init_std: float = 0.01,  # insightface arcface_torch: N(0, 0.01²)
    ) -> None:
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(
                f"a classifier needs num_classes >= 1 and embedding_dim >= 1, got {num_classes}, {embedding_dim}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.margin = dict(s=s, m1=m1, m2=m2, m3=m3)
        self.margin_grad = margin_grad
        self.num_classes = num_classes
        self.world = world
        self.sample_rate = sample_rate
        self.seed = seed
        rank, world_size = (world.rank, world.world_size) if world is not None else (0, 1)
        self.class_offset, end = shard_range(num_classes, world_size, rank)
        weight = torch.empty(end - self.class_offset, embedding_dim)
        if world_size == 1:
            weight.normal_(0.0, init_std)  # from the global generator, as the single-process trainer always did
        else:
            self._init_blocks(weight, init_std)
        self.weight = nn.Parameter(weight)

    def _init_blocks(self, weight: torch.Tensor, std: float) -> None:
        """Rows [class_offset, class_offset + C_r) of the C × D matrix drawn block by block (see INIT_BLOCK)."""
        end = self.class_offset + weight.shape[0]
        for block in range(self.class_offset // INIT_BLOCK, (end - 1) // INIT_BLOCK + 1):
            first = block * INIT_BLOCK
            rows = min(INIT_BLOCK, self.num_classes - first)
            generator = torch.Generator().manual_seed(_seed(self.seed, block))
            values = torch.empty(rows, weight.shape[1]).normal_(0.0, std, generator=generator)
            lo, hi = max(first, self.class_offset), min(first + rows, end)
            weight[lo - self.class_offset:hi - self.class_offset] = values[lo - first:hi - first]

    @property
    def sharded(self) -> bool:
        return self.world is not None and self.world.world_size > 1

    @property
    def num_local(self) -> int:
        return self.weight.shape[0]

    def sample_classes(self, labels: torch.Tensor, step: int) -> torch.Tensor | None:
        """The rows of this shard used at ``step`` (sorted int64), or None for all of them (sample_rate 1).

        ``labels`` are the global batch's; every one of them that this shard holds is included.
        """
        if self.sample_rate >= 1.0:
            return None
        local = labels - self.class_offset
        positives = torch.unique(local[(local >= 0) & (local < self.num_local)])
        rank = self.world.rank if self.world is not None else 0
        generator = torch.Generator(device=self.weight.device).manual_seed(_seed(self.seed, step, rank))
        priority = torch.rand(self.num_local, generator=generator, device=self.weight.device)
        priority[positives] = 2.0  # positives first
        count = max(int(self.sample_rate * self.num_local), positives.numel(), 1)
        return torch.topk(priority, count).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, class_index: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Mean margin-softmax cross-entropy over all C classes (or the sampled ones) of the global batch's
        ``embeddings`` [B, D] with global ``labels`` [B]; the same value on every rank.

        Labels come from the loader, which already checked them, so the kernels' value checks (a host
        synchronisation) are skipped.
        """
        embeddings = embeddings.to(self.weight.dtype)
        if not self.sharded:
            return margin_softmax_ce(embeddings, self.weight, labels, class_index=class_index,
                                     margin_grad=self.margin_grad, check_values=False, **self.margin)
        return margin_softmax_ce_sharded(embeddings, self.weight, labels, class_offset=self.class_offset,
                                         num_classes=self.num_classes, all_reduce=self.world.reducer,
                                         class_index=class_index, margin_grad=self.margin_grad, check_values=False,
                                         **self.margin)

    def shard_state(self) -> dict:
        """What a checkpoint keeps of this shard: its rows and where they sit among the C classes."""
        return {"weight": self.weight.detach(), "class_offset": self.class_offset, "num_classes": self.num_classes}

    def load_rows(self, rows: torch.Tensor) -> None:
        """Set this shard's centres from ``rows`` [C_r, D] (rows class_offset … of the whole matrix)."""
        if rows.shape != self.weight.shape:
            raise ValueError(f"rows must be {tuple(self.weight.shape)} for classes [{self.class_offset}, "
                             f"{self.class_offset + self.num_local}), got {tuple(rows.shape)}")
        with torch.no_grad():
            self.weight.copy_(rows)
