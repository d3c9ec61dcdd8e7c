"""Classifier heads: class centres trained with the combined margin-softmax loss.

The loss is :func:`facekd.kernels.margin_softmax_ce` (ArcFace/CosFace/combined margin), which takes
the fused Triton kernel or the plain-torch reference through ``FACEKD_KERNEL_BACKEND``. The head
owns its centres as one [C, D] parameter, so that the distributed layer can later replace it by a
class shard without the training step noticing.
"""
from __future__ import annotations

import torch
from torch import nn

from facekd.config import HeadConfig
from facekd.kernels import margin_softmax_ce
from facekd.kernels.margin_ce import cosine_logits

__all__ = ["MarginHead"]

# insightface arcface_torch initialises the centres from N(0, 0.01²)
CENTRE_INIT_STD = 0.01


class MarginHead(nn.Module):
    """Class centres ``weight`` [C, D] with the margin ``s·(cos(m1·θ + m2) − m3)`` on the target class."""

    def __init__(self, num_classes: int, embedding_dim: int, config: HeadConfig) -> None:
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(
                f"a head needs num_classes >= 1 and embedding_dim >= 1, got {num_classes}, {embedding_dim}")
        self.config = config
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim).normal_(0.0, CENTRE_INIT_STD))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax cross-entropy of ``embeddings`` [B, D] with ``labels`` [B] in [0, C).

        Labels come from the loader, which already checked them against the manifest, so the kernel's
        value checks (a host synchronisation) are skipped inside the step loop.
        """
        c = self.config
        return margin_softmax_ce(
            embeddings.to(self.weight.dtype), self.weight, labels, s=c.s, m1=c.m1, m2=c.m2, m3=c.m3,
            margin_grad=c.margin_grad, check_values=False,
        )

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Margin-free logits ``s·cos θ`` [B, C] (what the logit-based distillation methods compare)."""
        return cosine_logits(embeddings.to(self.weight.dtype), self.weight, s=self.config.s)
