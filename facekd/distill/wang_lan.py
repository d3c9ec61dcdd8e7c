"""Distillation losses of Wang & Lan, "Model Distillation with Knowledge Transfer in Face
Classification, Alignment and Verification" (2017).

- Alignment (Sec. 3.3.1, Eq. 6): the student's top hidden layer regresses the teacher's,
  λ‖H_S − H_T‖²; the paper "omit[s] ... the number of samples N in all of our loss functions"
  (Sec. 3.1), so :func:`hidden_l2_loss` is the squared L2 distance per sample, summed over the
  features and averaged over the batch.
- Verification (Sec. 3.3.2, Eq. 9): the triplet loss [‖H^a − H^p‖² − ‖H^a − H^n‖² + α]_+ on the
  student's hidden layer, "trained with the online hard negative mining as in Facenet" (Sec. 4.4),
  plus λ1 H(P_S, y) + λ2 H(P_S^τ, P_T^τ). The paper gives neither α nor the mining details, so
  :func:`batch_hard_triplet_loss` follows FaceNet (Schroff et al., CVPR 2015): ℓ2-normalised
  embeddings (Sec. 3), margin α = 0.2 (Sec. 3.3), all anchor-positive pairs of the batch with a
  semi-hard negative each (Sec. 3.2).
- Soft predictions: H(P_S^τ, P_T^τ) with P^τ = softmax(a/τ) (Eq. 1–2) is Hinton et al.'s soft
  target loss. It equals Hinton KD's KL(P_T^τ ‖ P_S^τ) plus the teacher's entropy, a constant
  for the student, so it has the same gradient; the paper adds no τ² and tunes λ by
  cross-validation. There is no separate function here: use :func:`facekd.distill.logit.kd_loss`.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

MINING_RULES = ("semihard", "hardest")


def hidden_l2_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """mean_b ‖H_S,b − H_T,b‖² over features of shape [B, ...] (Wang & Lan Eq. 6 without λ).

    The teacher is detached. Half-precision inputs are compared in float32.
    """
    if student_feature.shape != teacher_feature.shape or student_feature.dim() < 2:
        raise ValueError(
            f"student and teacher hidden layers must be [B, ...] of the same shape, got "
            f"{list(student_feature.shape)} and {list(teacher_feature.shape)}"
        )
    if student_feature.numel() == 0:
        raise ValueError(f"hidden_l2_loss needs non-empty features, got {list(student_feature.shape)}")
    dtype = torch.promote_types(student_feature.dtype, torch.float32)
    difference = student_feature.to(dtype) - teacher_feature.detach().to(dtype)
    return difference.flatten(1).square().sum(dim=1).mean()


def _negative_indices(squared_distances: Tensor, negative: Tensor, mining: str) -> Tensor:
    """Index n [B, B] of the negative mined for each (anchor a, positive p), without gradient.

    ``hardest``: the negative closest to the anchor. ``semihard``: FaceNet Sec. 3.2 Eq. 4, the
    closest negative farther from the anchor than p, ‖a − p‖² < ‖a − n‖²; where p has none, the
    farthest negative, as in TensorFlow's ``triplet_semihard_loss`` (its hinge is then the smallest).
    """
    inf = torch.finfo(squared_distances.dtype).max
    closest = squared_distances.masked_fill(~negative, inf).argmin(dim=1)  # [a]
    if mining == "hardest":
        return closest[:, None].expand_as(squared_distances)
    anchor_negative = squared_distances[:, None, :]  # [a, 1, n]
    anchor_positive = squared_distances[:, :, None]  # [a, p, 1]
    semihard = negative[:, None, :] & (anchor_negative > anchor_positive)  # [a, p, n]
    closest_semihard = anchor_negative.masked_fill(~semihard, inf).argmin(dim=2)  # [a, p]
    farthest = squared_distances.masked_fill(~negative, -inf).argmax(dim=1)  # [a]
    return torch.where(semihard.any(dim=2), closest_semihard, farthest[:, None])


def batch_hard_triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.2,  # FaceNet Sec. 3.3 "The margin α is set to 0.2"; Wang & Lan give no value
    mining: Literal["semihard", "hardest"] = "semihard",  # FaceNet Sec. 3.2, cited by Wang & Lan Sec. 4.4
) -> Tensor:
    """Triplet loss with online negative mining in the batch (Wang & Lan Eq. 9, first term).

    Embeddings [B, D] are ℓ2-normalised; for every anchor-positive pair (a, p), a ≠ p with the
    same label, one negative n is mined in the batch (see ``mining``) and the loss is the mean of
    [‖a − p‖² − ‖a − n‖² + margin]_+ over those pairs. A batch without any anchor-positive pair
    that has a negative gives 0 (no host synchronisation to detect it): sample batches with
    several images per identity. Mining costs a [B, B, B] mask for ``semihard``.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be a non-empty [B, D] matrix, got {list(embeddings.shape)}")
    if labels.shape != (embeddings.shape[0],) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be an integer tensor of shape [{embeddings.shape[0]}], got {labels.dtype} of shape "
            f"{list(labels.shape)}"
        )
    if not (math.isfinite(margin) and margin >= 0.0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if mining not in MINING_RULES:
        raise ValueError(f"mining must be one of {MINING_RULES}, got {mining!r}")
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    unit = F.normalize(embeddings.to(dtype), dim=1)
    # ‖u − v‖² = 2 − 2⟨u, v⟩ for unit vectors; clamped at 0 against rounding
    squared_distances = (2.0 - 2.0 * unit @ unit.T).clamp_min(0.0)

    same_label = labels[:, None] == labels[None, :]
    negative = ~same_label
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    valid_pairs = same_label & ~eye & negative.any(dim=1, keepdim=True)  # [a, p]
    with torch.no_grad():
        negative_index = _negative_indices(squared_distances.detach(), negative, mining)
    anchor_negative = squared_distances.gather(1, negative_index)  # [a, p] = ‖a − n(a, p)‖²
    hinge = F.relu(squared_distances - anchor_negative + margin)
    return (hinge * valid_pairs).sum() / valid_pairs.sum().clamp_min(1)
