"""Logit-based distillation: Hinton KD and grouped KD (GKD) between the student and a frozen teacher.

Both compare each network's own margin-free logits ``s·cos θ`` (GKD paper, Sec. 4.2: the KD terms
use the classifier outputs without the margin). GKD goes through the fused kernel
:func:`facekd.kernels.grouped_kd.grouped_kd_loss_from_embeddings`, which forms neither B×C logits
matrix on the Triton path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from facekd.config import DistillConfig
from facekd.heads import MarginHead
from facekd.kernels.grouped_kd import grouped_kd_loss_from_embeddings

__all__ = ["LogitDistiller", "kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Hinton KD: KL(softmax(z_T/T) ‖ softmax(z_S/T)) · T², summed over classes, mean over the batch.

    The teacher's logits are a fixed target (detached). Computed in float32 at least.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be [B, C], got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean() * temperature**2


class LogitDistiller:
    """The distillation term of one step for method ``kd`` or ``gkd``, given both networks' heads."""

    def __init__(self, config: DistillConfig, student_head: MarginHead, teacher_head: MarginHead) -> None:
        if config.method not in ("kd", "gkd"):
            raise ValueError(f"LogitDistiller handles methods 'kd' and 'gkd', got {config.method!r}")
        if student_head.num_classes != teacher_head.num_classes:
            raise ValueError(
                f"student and teacher must classify the same identities, got {student_head.num_classes} and "
                f"{teacher_head.num_classes} classes (train the teacher on the same shards)"
            )
        self.config = config
        self.student_head = student_head
        self.teacher_head = teacher_head

    def __call__(self, student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
        c = self.config
        teacher_embeddings = teacher_embeddings.detach().to(self.teacher_head.weight.dtype)
        if c.method == "kd":
            return kd_loss(
                self.student_head.logits(student_embeddings),
                self.teacher_head.logits(teacher_embeddings),
                temperature=c.temperature,
            )
        if self.student_head.config.s != self.teacher_head.config.s:
            raise ValueError(
                f"GKD compares s·cos θ of both networks with one s; the student head has s = "
                f"{self.student_head.config.s}, the teacher's s = {self.teacher_head.config.s}"
            )
        return grouped_kd_loss_from_embeddings(
            student_embeddings.to(self.student_head.weight.dtype), self.student_head.weight,
            teacher_embeddings, self.teacher_head.weight.detach(),
            s=self.student_head.config.s, tau=c.tau, temperature=c.temperature,
            w_primary=c.w_primary, w_binary=c.w_binary, w_secondary=c.w_secondary,
        )
