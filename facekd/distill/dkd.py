"""Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

With p = softmax(z / T) over C classes and target class t, DKD splits the KD loss into

- TCKD, the KL divergence of the binary distributions b = [p_t, 1 − p_t] (target vs. all
  non-target classes):  TCKD = KL(b^T ‖ b^S)                                       (DKD Eq. 2–3)
- NCKD, the KL divergence of the distributions p̂ over the non-target classes alone,
  p̂_j = exp(z_j/T) / Σ_{k≠t} exp(z_k/T) for j ≠ t:  NCKD = KL(p̂^T ‖ p̂^S)           (DKD Eq. 2–3)

so that KD = TCKD + (1 − p_t^T) · NCKD (DKD Eq. 4), and reweights them independently:

    DKD = T² · mean_b (α · TCKD_b + β · NCKD_b)                                    (DKD Eq. 7)

The T² factor and the batch mean follow the authors' code (mdistiller ``dkd_loss``). As there,
the target class is removed from the non-target distributions by subtracting 1000 from its
scaled logit z_t / T before the softmax; its remaining weight exp(−1000 + …) underflows to 0 in
float32 and float64 as long as the scaled logits span less than ~250 (ArcFace logits s·cos θ
with s = 64 span at most 128 before the division by T). The non-target mass of TCKD is taken
from the same masked log-sum-exp, log(1 − p_t) = logsumexp(z_{≠t}/T) − logsumexp(z/T), which
stays finite when p_t rounds to 1 (mdistiller takes the log of a sum of probabilities).

mdistiller also ramps the DKD weight linearly over the first 20 epochs (``CFG.DKD.WARMUP``);
that schedule belongs to the trainer.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Scaled-logit offset that removes the target class from the non-target softmax (mdistiller dkd_loss).
TARGET_MASK_OFFSET = 1000.0


def _check_inputs(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, beta: float, temperature: float
) -> None:
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be [B, C] of the same shape, got "
            f"{list(student_logits.shape)} and {list(teacher_logits.shape)}"
        )
    batch_size, num_classes = student_logits.shape
    if batch_size < 1 or num_classes < 2:
        raise ValueError(
            f"DKD needs at least one sample and two classes (a target and a non-target), got B = {batch_size}, "
            f"C = {num_classes}"
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}")
    if labels.shape != (batch_size,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"labels must be an integer tensor of shape [{batch_size}], got {labels.dtype} of shape "
            f"{list(labels.shape)}"
        )
    # reading the labels back would stall a GPU stream, so the range check runs on the CPU only
    if not labels.is_cuda and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got min {int(labels.min())} and max {int(labels.max())}"
        )
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,  # mdistiller CFG.DKD.ALPHA
    beta: float = 8.0,  # mdistiller CFG.DKD.BETA
    temperature: float = 4.0,  # mdistiller CFG.DKD.T
) -> Tensor:
    """DKD loss T² · mean(α · TCKD + β · NCKD) of logits ``[B, C]`` with target ``labels`` [B].

    The teacher is detached. Half-precision logits are computed in float32; the loss is a 0-d
    tensor in that precision.
    """
    _check_inputs(student_logits, teacher_logits, labels, alpha, beta, temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    target_mask = torch.zeros_like(student_logits, dtype=torch.bool)
    target_mask.scatter_(1, labels.long().unsqueeze(1), True)
    offset = TARGET_MASK_OFFSET * target_mask.to(dtype)

    def log_distributions(logits: Tensor) -> tuple[Tensor, Tensor]:
        """log b [B, 2] (target, non-target) and log p̂ [B, C] (target entry ≈ −1000)."""
        scaled = logits.to(dtype) / temperature
        masked = scaled - offset
        log_total = torch.logsumexp(scaled, dim=1, keepdim=True)
        log_nontarget_total = torch.logsumexp(masked, dim=1, keepdim=True)
        log_target = scaled.gather(1, labels.long().unsqueeze(1)) - log_total
        log_binary = torch.cat([log_target, log_nontarget_total - log_total], dim=1)
        return log_binary, masked - log_nontarget_total

    student_binary, student_nontarget = log_distributions(student_logits)
    teacher_binary, teacher_nontarget = log_distributions(teacher_logits.detach())

    # DKD Eq. 3: KL(b^T ‖ b^S) and KL(p̂^T ‖ p̂^S), one value per sample
    tckd = (teacher_binary.exp() * (teacher_binary - student_binary)).sum(dim=1)
    nckd = (teacher_nontarget.exp() * (teacher_nontarget - student_nontarget)).sum(dim=1)
    return temperature**2 * (alpha * tckd + beta * nckd).mean()
