"""Hinton KD (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

Grouped KD, its refinement, is a kernel: :func:`facekd.kernels.grouped_kd_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss"]


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
