"""Classifier heads: class centres trained with the combined margin-softmax loss.

The loss is :func:`facekd.kernels.margin_softmax_ce` (ArcFace/CosFace/combined margin), which takes
the fused Triton kernel or the plain-torch reference through ``FACEKD_KERNEL_BACKEND``. The head
is a :class:`facekd.distributed.classifier.ShardedClassifier`: all [C, D] centres in one process, its
class shard [C_r, D] on each rank of a distributed run.

Logits a loss reads are formed in fp32 (float64 stays float64) whatever autocast encloses the call:
at s = 64 bf16 logits above 32 are rounded to steps of 0.25, before a softmax over tens of thousands
of classes. The fused kernels accumulate in fp32 by construction; the plain-torch paths get the same
through :func:`facekd.kernels.backend.full_precision`, here for the heads' logits and in the distiller
for its logit terms.
"""
from __future__ import annotations

import torch
from torch import nn

from facekd.config import HeadConfig
from facekd.distributed.classifier import ShardedClassifier
from facekd.distributed.world import World
from facekd.kernels.backend import full_precision, reference_dtype
from facekd.kernels.margin_ce import cosine_logits, margin_logits

__all__ = ["MarginHead", "logit_dtype"]


def logit_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype logits from ``tensor`` are computed in: float32, or float64 for float64 inputs."""
    return reference_dtype(tensor.dtype)


class MarginHead(ShardedClassifier):
    """Class centres ``weight`` [C_r, D] with the margin ``s·(cos(m1·θ + m2) − m3)`` on the target class.

    One process holds all C classes; under a distributed ``world`` each rank holds its shard (see
    :class:`facekd.distributed.classifier.ShardedClassifier`). ``num_classes`` is C either way.
    """

    def __init__(self, num_classes: int, embedding_dim: int, config: HeadConfig, *, world: World | None = None,
                 seed: int = 0) -> None:
        super().__init__(num_classes, embedding_dim, s=config.s, m1=config.m1, m2=config.m2, m3=config.m3,
                         margin_grad=config.margin_grad, world=world, sample_rate=config.sample_rate, seed=seed)
        self.config = config

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Margin-free logits ``s·cos θ`` [B, C_r] of this shard's classes (what the logit-based distillation
        methods compare), in fp32 at least, also under autocast."""
        dtype = logit_dtype(self.weight)
        with full_precision(embeddings.device):
            return cosine_logits(embeddings.to(dtype), self.weight.to(dtype), s=self.config.s)

    def margin_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The logits the margin loss sees [B, C_r], the margin on each row's ``labels`` column where this
        shard holds it (the GKD authors' code distils these); fp32 at least, also under autocast."""
        c = self.config
        dtype = logit_dtype(self.weight)
        with full_precision(embeddings.device):
            return margin_logits(embeddings.to(dtype), self.weight.to(dtype), labels, s=c.s, m1=c.m1, m2=c.m2,
                                 m3=c.m3, class_offset=self.class_offset if self.sharded else None)
