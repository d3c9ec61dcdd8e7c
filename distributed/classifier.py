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

__all__ = ["ShardedClassifier", "classifier_memory", "shard_range"]

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
        if not self.sharded and class_index is None:
            return margin_softmax_ce(embeddings, self.weight, labels, margin_grad=self.margin_grad,
                                     check_values=False, **self.margin)
        return margin_softmax_ce_sharded(embeddings, self.weight, labels, class_offset=self.class_offset,
                                         num_classes=self.num_classes,
                                         all_reduce=self.world.reducer if self.sharded else None,
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


def classifier_memory(
    num_classes: int,
    world_size: int,
    embedding_dim: int,
    *,
    rank: int = 0,
    weight_dtype: torch.dtype = torch.float32,
    teacher_dtype: torch.dtype | None = torch.bfloat16,
    momentum: bool = True,
    batch_size: int | None = None,
    sample_rate: float = 1.0,
) -> dict[str, int]:
    """Bytes rank ``rank`` of ``world_size`` holds for a C-class classifier sharded as :func:`shard_range` does.

    Counted, each a key of the result (bytes unless named a count):

    * ``classes`` (count): C_r, this rank's classes; ``class_offset`` (count) the first of them.
    * ``centres``: the student's centres, C_r · D in ``weight_dtype`` (:class:`ShardedClassifier`'s ``weight``).
    * ``gradient``: their ``.grad``, the same size. It is dense also under sampling: the rows a step did not
      sample hold zeros (the margin loss writes exact zeros there), they are not absent.
    * ``momentum``: SGD's momentum buffer, the same size again (0 with ``momentum=False``).
    * ``teacher``: a frozen teacher's shard of the same classes, C_r · D in ``teacher_dtype`` (0 for None).
      It has no gradient and no optimiser state.
    * ``state``: the sum of the four above — what lives across steps (the gradient from backward until the
      next step's ``zero_grad(set_to_none=True)``), i.e. the floor of this rank's peak.

    With ``batch_size`` (per rank, B; the global batch is W · B) also, per step:

    * ``sampled_classes`` (count): K = max(int(sample_rate · C_r), 1), the rows
      :meth:`ShardedClassifier.sample_classes` draws when no label of the batch falls in this shard. Labels
      that do fall here raise it to at most min(C_r, W · B); C_r for ``sample_rate`` 1.
    * ``class_index``: the sampler's int64 index [K] and the fp32 priorities [C_r] it draws K of (0 for
      ``sample_rate`` 1).
    * ``gathered_embeddings``: the global batch's student embeddings, W · B · D in ``weight_dtype``, and with
      a teacher its embeddings in ``teacher_dtype``: every rank holds all of them (all_gather_rows).
    * ``kd_logits_unfused``: with a teacher, the student's and the teacher's fp32 logits [W · B, C_r] that
      the plain-torch grouped-KD path (CPU) materialises over all of this rank's classes; the fused Triton
      kernels hold none of them. The margin loss holds no K-wide logits on either path (tiles / chunks).

    Not counted: the backbone and everything data-parallel, the autograd graph's saved per-row statistics
    (O(W · B)), temporaries of the plain-torch paths besides the KD logits (normalised copies of centre
    chunks, the teacher shard cast to fp32, the softmax and selection work of the KD reference: a few
    [W · B, C_r] matrices more), the allocator's caching and fragmentation, and the CUDA / torch runtime.
    A measured peak is therefore above ``state``; how far above depends on the path (see
    ``facekd bench partial-fc``).
    """
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (per rank) or None, got {batch_size}")
    start, end = shard_range(num_classes, world_size, rank)
    shard_elements = (end - start) * embedding_dim
    weight_bytes = weight_dtype.itemsize
    teacher_bytes = 0 if teacher_dtype is None else teacher_dtype.itemsize
    memory = {
        "classes": end - start,
        "class_offset": start,
        "centres": shard_elements * weight_bytes,
        "gradient": shard_elements * weight_bytes,
        "momentum": shard_elements * weight_bytes if momentum else 0,
        "teacher": shard_elements * teacher_bytes,
    }
    memory["state"] = memory["centres"] + memory["gradient"] + memory["momentum"] + memory["teacher"]
    if batch_size is None:
        return memory
    global_batch = world_size * batch_size
    sampled = end - start if sample_rate >= 1.0 else max(int(sample_rate * (end - start)), 1)
    memory["sampled_classes"] = sampled
    memory["class_index"] = 0 if sample_rate >= 1.0 else sampled * 8 + (end - start) * 4
    memory["gathered_embeddings"] = global_batch * embedding_dim * (weight_bytes + teacher_bytes)
    memory["kd_logits_unfused"] = 2 * global_batch * (end - start) * 4 if teacher_dtype is not None else 0
    return memory
