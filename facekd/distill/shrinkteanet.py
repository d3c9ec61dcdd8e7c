"""ShrinkTeaNet angular distillation (Duong et al., "ShrinkTeaNet: Million-scale Lightweight
Face Recognition via Shrinking Teacher-Student Networks", 2019).

Angular distillation loss (Eq. 4), with the teacher's transformation the identity:

    L_n = ‖ 1 − F_T/‖F_T‖ * H(F_S)/‖H(F_S)‖ ‖²₂

We read ``*`` as the inner product of the two unit vectors, so the norm is that of a scalar and
L_n = (1 − cos(F_T, H(F_S)))² per sample: the loss only sees the feature directions ("as long as
F_n^s and F_n^t have similar direction, these features can freely distribute on different
hyperspheres", Sec. 3.1). Read element-wise instead, Σ_d (1 − t̂_d ŝ_d)² would not be minimised
by equal directions. Eq. 7 averages the per-sample losses over the samples.

Intermediate distillation (Sec. 3.2, Eq. 6): the student's stage-i features, mapped to the
teacher's width by H_i (1×1 conv + BN, Sec. 3.3), run through the teacher's remaining stages
T_{i+1} ∘ … ∘ T_n, and the embedding they give is compared by Eq. 4 with the teacher's own
embedding [T_{i+1} ∘ … ∘ T_n](F_i^t), which is the teacher embedding F_n^t. The teacher is frozen;
the gradient flows through its stages into H_i and the student.

Stage weights: λ_n = 1 for the final (embedding) loss and λ_i = λ_{i+1} / 2 for the stages before
it (Sec. 4, "Model Configurations"). The paper's n = 4 ResNet blocks end in the embedding; our
backbones keep the head (BN → FC → BN, or MobileFaceNet's GDConv) apart from the fourth stage, so
all four stage outputs are intermediate features and the embedding is the last link of the
chain: λ = 1 for the embedding and 1/2, 1/4, 1/8, 1/16 for stages 3, 2, 1, 0 (0-based).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facekd.distill.fitnet import FitNetAdapter
from facekd.models.iresnet import NUM_STAGES, StagedBackbone


def angular_loss(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """Batch mean of (1 − cos(F_T, F_S))² (ShrinkTeaNet Eq. 4, averaged as in Eq. 7).

    Both inputs are ``[B, D]``; the teacher is detached. Half-precision inputs are compared in
    float32. Norms are clamped at 1e-12 (``F.normalize``), so a zero vector has cos = 0.
    """
    if student_embeddings.dim() != 2 or student_embeddings.shape != teacher_embeddings.shape:
        raise ValueError(
            f"student and teacher embeddings must both be [B, D] of the same shape, got "
            f"{list(student_embeddings.shape)} and {list(teacher_embeddings.shape)}"
        )
    if student_embeddings.shape[0] == 0:
        raise ValueError("angular_loss needs at least one sample, got B = 0")
    dtype = torch.promote_types(student_embeddings.dtype, torch.float32)
    student_unit = F.normalize(student_embeddings.to(dtype), dim=1)
    teacher_unit = F.normalize(teacher_embeddings.detach().to(dtype), dim=1)
    cosine = (student_unit * teacher_unit).sum(dim=1)
    return (1.0 - cosine).square().mean()


class IntermediateAngularDistiller(nn.Module):
    """ShrinkTeaNet's distillation loss over the embedding and all four stages (Eq. 4, 6, 7).

    ``forward(student_stages, teacher_embedding, student_embedding)`` returns

        λ_emb · L(F_T, F_S) + Σ_i λ_i · L(F_T, teacher.embed_from_stage(i, H_i(F_i^s)))

    with L the :func:`angular_loss`, λ_emb = ``embedding_weight`` (1, ShrinkTeaNet Sec. 4) and
    λ_i = λ_emb / 2^(4 − i) for stage i = 0 … 3. ``H_i`` is a :class:`FitNetAdapter` from the
    student's stage-i width to the teacher's, resizing to the teacher's stage-i size if needed.

    The constructor freezes the teacher in place (``requires_grad_(False)`` and ``eval()``): its
    parameters get no gradient and its BN layers keep their running statistics while student
    features pass through them. The teacher is held by reference, not registered as a submodule,
    so this module's ``parameters()``, ``state_dict()``, ``train()`` and ``to()`` cover the
    adapters only; the trainer moves the teacher itself. ``forward`` refuses a teacher that has
    been put back in training mode.
    """

    teacher: StagedBackbone

    def __init__(self, student: StagedBackbone, teacher: StagedBackbone, *, embedding_weight: float = 1.0) -> None:
        super().__init__()
        if student.embedding_dim != teacher.embedding_dim:
            raise ValueError(
                "the embedding loss compares student and teacher embeddings directly, so their sizes must "
                f"match: student embedding_dim {student.embedding_dim}, teacher {teacher.embedding_dim}"
            )
        if not embedding_weight > 0.0:
            raise ValueError(f"embedding_weight must be > 0, got {embedding_weight}")
        self.adapters = nn.ModuleList(
            FitNetAdapter(student_channels, teacher_channels, teacher_size=teacher_size)
            for student_channels, teacher_channels, teacher_size in zip(
                student.feature_channels, teacher.feature_channels, teacher.feature_sizes
            )
        )
        self.embedding_weight = embedding_weight
        # λ_i = λ_{i+1} / 2 back from the embedding (ShrinkTeaNet Sec. 4)
        self.stage_weights = [embedding_weight / 2 ** (NUM_STAGES - i) for i in range(NUM_STAGES)]
        self.student_channels = list(student.feature_channels)
        # Bypasses nn.Module.__setattr__ so the teacher stays out of parameters() and state_dict().
        self.__dict__["teacher"] = teacher.requires_grad_(False).eval()

    def forward(self, student_stages: list[Tensor], teacher_embedding: Tensor, student_embedding: Tensor) -> Tensor:
        if self.teacher.training:
            raise ValueError(
                "the teacher must stay in eval mode: in training mode its BN layers would use and update "
                "batch statistics of the adapted student features"
            )
        if len(student_stages) != NUM_STAGES:
            raise ValueError(f"expected the student's {NUM_STAGES} stage outputs, got {len(student_stages)}")
        teacher_embedding = teacher_embedding.detach()
        loss = self.embedding_weight * angular_loss(student_embedding, teacher_embedding)
        for stage_index, (adapter, weight, student_feature) in enumerate(
            zip(self.adapters, self.stage_weights, student_stages)
        ):
            if student_feature.dim() != 4 or student_feature.shape[1] != self.student_channels[stage_index]:
                raise ValueError(
                    f"student stage {stage_index} features must be [B, {self.student_channels[stage_index]}, H, W], "
                    f"got {list(student_feature.shape)}"
                )
            # ShrinkTeaNet Eq. 6: the teacher's remaining stages embed the adapted student features
            embedding = self.teacher.embed_from_stage(stage_index, adapter(student_feature))
            loss = loss + weight * angular_loss(embedding, teacher_embedding)
        return loss
