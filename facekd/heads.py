"""Classifier heads: class centres trained with the combined margin-softmax loss.

The loss is :func:`facekd.kernels.margin_softmax_ce` (ArcFace/CosFace/combined margin), which takes
the fused Triton kernel or the plain-torch reference through ``FACEKD_KERNEL_BACKEND``. The head
owns its centres as one [C, D] parameter, so that the distributed layer can later replace it by a
class shard without the training step noticing.

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
from facekd.kernels import margin_softmax_ce
from facekd.kernels.backend import full_precision, reference_dtype
from facekd.kernels.margin_ce import cosine_logits, margin_logits

__all__ = ["MarginHead", "logit_dtype"]


def logit_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype logits from ``tensor`` are computed in: float32, or float64 for float64 inputs."""
    return reference_dtype(tensor.dtype)


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
        """Margin-free logits ``s·cos θ`` [B, C] (what the logit-based distillation methods compare), in
        fp32 at least, also under autocast."""
        dtype = logit_dtype(self.weight)
        with full_precision(embeddings.device):
            return cosine_logits(embeddings.to(dtype), self.weight.to(dtype), s=self.config.s)

    def margin_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The logits the margin loss sees [B, C], the margin on each row's ``labels`` column (the GKD
        authors' code distils these); fp32 at least, also under autocast. Materialises B×C."""
        c = self.config
        dtype = logit_dtype(self.weight)
        with full_precision(embeddings.device):
            return margin_logits(embeddings.to(dtype), self.weight.to(dtype), labels, s=c.s, m1=c.m1, m2=c.m2,
                                 m3=c.m3)
