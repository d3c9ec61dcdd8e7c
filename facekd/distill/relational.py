"""Relational Knowledge Distillation (Park et al., "Relational Knowledge Distillation", CVPR 2019).

RKD transfers the structure of a batch of embeddings rather than the embeddings themselves, so
student and teacher may have different widths ``[B, D_S]`` and ``[B, D_T]``.

Distance-wise potential (RKD Sec. 3.2, "distance-wise distillation loss"): pairwise Euclidean
distances normalised by their mean over the pairs of the batch,

    ψ_D(t_i, t_j) = ‖t_i − t_j‖ / μ,   μ = mean_{i≠j} ‖t_i − t_j‖.

Angle-wise potential (RKD Sec. 3.2, "angle-wise distillation loss"): the cosine of the angle at
vertex t_j of the triplet (t_i, t_j, t_k),

    ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩,   e_ij = (t_i − t_j) / ‖t_i − t_j‖.

Both are compared with the Huber loss of δ = 1 (smooth L1). The paper sums over
all pairs X² and triplets X³; like the authors' code and mdistiller ``rkd_loss`` we take means
over all B² pairs and B³ triplets, degenerate ones (i = j, or j = k, where the cosine is 0 for
student and teacher alike) included, which is the scale the default weights were tuned for:

    L_RKD = w_distance · mean_{B²} huber(ψ_D^S − ψ_D^T) + w_angle · mean_{B³} huber(ψ_A^S − ψ_A^T)

Squared distances come from the Gram matrix and are clamped at 1e-12 before the square root
(mdistiller ``_pdist``), so coincident embeddings give a finite gradient. The angle term holds
[B, B, D] differences and a [B, B, B] cosine tensor: 3 × 512² × 512 floats ≈ 1.6 GB in float32
for B = D = 512 with the backward pass, so keep RKD batches moderate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PDIST_EPS = 1e-12  # clamp of squared distances before the square root, mdistiller CFG.RKD.PDIST.EPSILON


def _normalised_distances(embeddings: Tensor) -> Tensor:
    """ψ_D for all pairs [B, B], zero on the diagonal."""
    batch_size = embeddings.shape[0]
    squared_norms = embeddings.square().sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2.0 * embeddings @ embeddings.T).clamp_min(PDIST_EPS)
    off_diagonal = 1.0 - torch.eye(batch_size, dtype=embeddings.dtype, device=embeddings.device)
    distances = squared.sqrt() * off_diagonal
    mean_distance = distances.sum() / (batch_size * (batch_size - 1))
    return distances / mean_distance


def _angle_cosines(embeddings: Tensor) -> Tensor:
    """ψ_A [B, B, B], entry [j, i, k] the cosine of the angle at t_j between t_i and t_k."""
    # differences[j, i] = t_i − t_j; F.normalize maps the zero differences (i = j) to zero vectors
    directions = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], dim=2)
    return directions @ directions.transpose(1, 2)


def rkd_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    *,
    w_distance: float = 25.0,  # mdistiller CFG.RKD.DISTANCE_WEIGHT; thesis 000 Sec. 4.4.2 "β1 = 25"
    w_angle: float = 50.0,  # mdistiller CFG.RKD.ANGLE_WEIGHT; thesis 000 Sec. 4.4.2 "β2 = 50"
) -> Tensor:
    """RKD-DA loss w_distance · L_RKD-D + w_angle · L_RKD-A of embeddings [B, D_S] and [B, D_T].

    The teacher is detached. Half-precision inputs are computed in float32; the loss is a 0-d
    tensor. At least two samples are needed for a pairwise distance.
    """
    if student_embeddings.dim() != 2 or teacher_embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must be [B, D] matrices, got student {list(student_embeddings.shape)} and "
            f"teacher {list(teacher_embeddings.shape)}"
        )
    if student_embeddings.shape[0] != teacher_embeddings.shape[0]:
        raise ValueError(
            f"student and teacher embeddings must hold the same samples, got student "
            f"{list(student_embeddings.shape)} and teacher {list(teacher_embeddings.shape)}"
        )
    if student_embeddings.shape[0] < 2 or min(student_embeddings.shape[1], teacher_embeddings.shape[1]) < 1:
        raise ValueError(
            f"RKD needs at least two samples and one feature, got student {list(student_embeddings.shape)} and "
            f"teacher {list(teacher_embeddings.shape)}"
        )
    for name, value in (("w_distance", w_distance), ("w_angle", w_angle)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    dtype = torch.promote_types(student_embeddings.dtype, torch.float32)
    student = student_embeddings.to(dtype)
    with torch.no_grad():
        teacher = teacher_embeddings.to(dtype)
        teacher_distances = _normalised_distances(teacher)
        teacher_angles = _angle_cosines(teacher)

    # RKD Sec. 3.2: Huber loss (δ = 1) of the potentials
    distance_loss = F.smooth_l1_loss(_normalised_distances(student), teacher_distances, beta=1.0)
    angle_loss = F.smooth_l1_loss(_angle_cosines(student), teacher_angles, beta=1.0)
    return w_distance * distance_loss + w_angle * angle_loss
