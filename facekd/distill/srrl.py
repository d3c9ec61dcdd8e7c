"""SRRL: knowledge distillation via softmax regression representation learning (J. Yang, PhD
thesis, Nottingham 2021, ch. 4 = Yang et al. ICLR 2021; official code jingyang2017/KD_SRRL).

The student's last feature map F_S passes through a connector r (1×1 conv + BN + ReLU, the
official ``transfer_conv``) to the teacher's width. With h the spatially pooled feature and W_T
the teacher's pre-trained, frozen classifier (thesis Sec. 4.2.1):

    L_FM = ‖h_T − h_S‖²                       feature matching            (thesis Eq. 4.3)
    L_SR = ‖W_T' h_T − W_T' h_S‖²             softmax regression, L2 form (thesis Eq. 4.7)
    L    = L_CE + α L_FM + β L_SR                                          (thesis Eq. 4.8)

Both squared norms are element means here, as in the official code (``statm_loss`` and
``F.mse_loss``): L_FM over B × D, L_SR over the B × C logits. The thesis sums over space for h
(Sec. 4.2.1); the code average-pools, which is what we do. α = β = 1: the thesis gives no values,
and the official ImageNet script adds both losses with weight 1 (``--weight`` default 1).

Face networks: the teacher's "classifier" on a feature map is its head (→ embedding) followed by
the class centres W [C, D] of its margin softmax, so h_T is the teacher embedding and
h_S = ``teacher.embed_from_stage(3, connector(student_stages[3]))``; with a normalised head the
logits are s·cos θ = s·n(h)·n(W)ᵀ (``normalized=True``, ``scale`` = s). The margin is left out:
SRRL compares the classifier's responses, not a training target. The teacher's stage outputs are
not rectified in IResNet or MobileFaceNet, so ``SRRLConnector(..., relu=False)`` fits them better.

At million-identity scale the logits need not be formed: for δ = f(h_T) − f(h_S) (f the identity
or ℓ2 normalisation, times s), Σ_c (W δ)_c² = δᵀ (WᵀW) δ, so with the D × D Gram matrix of the
frozen centres computed once (:func:`teacher_gram`) the loss costs O(B·D²) instead of O(B·C·D)
(:func:`srrl_sr_loss_gram`). The biases of a linear classifier cancel in W h_T + b − (W h_S + b).

Unlabeled data (thesis Sec. 4.2.2, Eq. 4.11–4.12): :func:`mixup_labeled_unlabeled` and
:func:`mixed_soft_targets`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facekd.models.iresnet import init_conv_bn


class SRRLConnector(nn.Sequential):
    """The student → teacher connector r: 1×1 conv (no bias) → BN → ReLU (KD_SRRL ``transfer_conv``).

    Maps ``[B, student_channels, H, W]`` to ``[B, teacher_channels, H, W]``. ``relu=False`` drops
    the ReLU for teachers whose last stage output can be negative (IResNet, MobileFaceNet).
    Initialisation as in the official code: conv weights N(0, 2 / fan_out), BN scale 1, shift 0.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, relu: bool = True) -> None:
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        layers: list[nn.Module] = [
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(teacher_channels),
        ]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)
        self.student_channels = student_channels
        init_conv_bn(self)

    def forward(self, student_feature: Tensor) -> Tensor:
        if student_feature.dim() != 4 or student_feature.shape[1] != self.student_channels:
            raise ValueError(
                f"SRRLConnector expects student features [B, {self.student_channels}, H, W], "
                f"got {list(student_feature.shape)}"
            )
        return super().forward(student_feature)


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def srrl_fm_loss(connected_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """L_FM = mean over B × C of (avgpool(r(F_S)) − avgpool(F_T))² (thesis Eq. 4.3, KD_SRRL ``statm_loss``).

    ``connected_feature`` [B, C, H, W] is the connector's output, ``teacher_feature`` [B, C, H', W']
    the teacher's last map (detached); the spatial sizes may differ since both are pooled.
    """
    four_d = connected_feature.dim() == 4 and teacher_feature.dim() == 4
    if not four_d or connected_feature.shape[:2] != teacher_feature.shape[:2]:
        raise ValueError(
            f"connected student and teacher features must be [B, C, H, W] with the same B and C, got "
            f"{list(connected_feature.shape)} and {list(teacher_feature.shape)}"
        )
    if connected_feature.numel() == 0 or teacher_feature.numel() == 0:
        raise ValueError(
            f"srrl_fm_loss needs non-empty features, got {list(connected_feature.shape)} and "
            f"{list(teacher_feature.shape)}"
        )
    dtype = _compute_dtype(connected_feature)
    student_pooled = connected_feature.to(dtype).mean(dim=(2, 3))
    teacher_pooled = teacher_feature.detach().to(dtype).mean(dim=(2, 3))
    return (student_pooled - teacher_pooled).square().mean()


def _check_features(h_student: Tensor, h_teacher: Tensor, scale: float) -> None:
    if h_student.dim() != 2 or h_student.shape != h_teacher.shape or h_student.shape[0] < 1:
        raise ValueError(
            f"student and teacher features must both be [B, D] of the same shape with B >= 1, got "
            f"{list(h_student.shape)} and {list(h_teacher.shape)}"
        )
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")


def _head_features(h: Tensor, *, normalized: bool, scale: float, dtype: torch.dtype) -> Tensor:
    """scale · n(h) for a normalised head (logits s·cos θ), scale · h otherwise."""
    h = h.to(dtype)
    return scale * (F.normalize(h, dim=1) if normalized else h)


def srrl_sr_loss(
    h_student: Tensor, h_teacher: Tensor, class_centres: Tensor, *, normalized: bool = False, scale: float = 1.0
) -> Tensor:
    """L_SR = mean over B × C of (z_S − z_T)² with z = s·h Wᵀ, or s·n(h) n(W)ᵀ when ``normalized`` (Eq. 4.7).

    ``h_student``, ``h_teacher`` [B, D]; ``class_centres`` W [C, D] (the teacher's classifier).
    ``scale`` multiplies the logits: the margin head's s (64 in ArcFace) with ``normalized=True``,
    1 for a plain linear classifier. Forms the B × C logits: for small C and as the reference of
    :func:`srrl_sr_loss_gram`.
    """
    _check_features(h_student, h_teacher, scale)
    if class_centres.dim() != 2 or class_centres.shape[1] != h_student.shape[1] or class_centres.shape[0] < 1:
        raise ValueError(
            f"class_centres must be [C, {h_student.shape[1]}] with C >= 1, got {list(class_centres.shape)}"
        )
    dtype = _compute_dtype(h_student)
    centres = class_centres.detach().to(dtype)
    if normalized:
        centres = F.normalize(centres, dim=1)
    student_logits = _head_features(h_student, normalized=normalized, scale=scale, dtype=dtype) @ centres.T
    teacher_logits = _head_features(h_teacher.detach(), normalized=normalized, scale=scale, dtype=dtype) @ centres.T
    return (student_logits - teacher_logits).square().mean()


def teacher_gram(class_centres: Tensor, *, normalized: bool = False) -> Tensor:
    """WᵀW [D, D] of the class centres W [C, D] (rows ℓ2-normalised first when ``normalized``), detached.

    Half-precision centres are accumulated in float32. Compute once: the teacher is frozen.
    """
    if class_centres.dim() != 2 or min(class_centres.shape) < 1:
        raise ValueError(f"class_centres must be a non-empty [C, D] matrix, got {list(class_centres.shape)}")
    centres = class_centres.detach().to(_compute_dtype(class_centres))
    if normalized:
        centres = F.normalize(centres, dim=1)
    return centres.T @ centres


def srrl_sr_loss_gram(
    h_student: Tensor,
    h_teacher: Tensor,
    gram: Tensor,
    num_classes: int,
    *,
    normalized: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """:func:`srrl_sr_loss` without the logits: Σ_b δ_bᵀ G δ_b / (B · C) with G = :func:`teacher_gram`.

    δ = scale · (f(h_T) − f(h_S)), f = ℓ2 normalisation when ``normalized`` (the Gram matrix must
    then be built from normalised centres) or the identity. ``num_classes`` is C, the number of
    logits the element mean runs over.
    """
    _check_features(h_student, h_teacher, scale)
    dim = h_student.shape[1]
    if gram.shape != (dim, dim):
        raise ValueError(f"gram must be [{dim}, {dim}] for {dim}-d features, got {list(gram.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    dtype = _compute_dtype(h_student)
    delta = _head_features(h_teacher.detach(), normalized=normalized, scale=scale, dtype=dtype) - _head_features(
        h_student, normalized=normalized, scale=scale, dtype=dtype
    )
    # ‖W δ‖² = δᵀ (WᵀW) δ, summed over the batch
    return ((delta @ gram.detach().to(dtype)) * delta).sum() / (delta.shape[0] * num_classes)


def srrl_loss(
    connected_feature: Tensor,
    teacher_feature: Tensor,
    h_student: Tensor,
    h_teacher: Tensor,
    gram: Tensor,
    num_classes: int,
    *,
    normalized: bool = False,
    scale: float = 1.0,
    alpha: float = 1.0,  # KD_SRRL train_imagenet_distillation.py: L_FM + L_SR, --weight 1
    beta: float = 1.0,  # same; the thesis (Eq. 4.8) leaves α, β unstated
) -> Tensor:
    """α · L_FM + β · L_SR (thesis Eq. 4.8 without L_CE), L_SR in the Gram form."""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    feature_matching = srrl_fm_loss(connected_feature, teacher_feature)
    softmax_regression = srrl_sr_loss_gram(
        h_student, h_teacher, gram, num_classes, normalized=normalized, scale=scale
    )
    return alpha * feature_matching + beta * softmax_regression


def mixup_labeled_unlabeled(
    x_l: Tensor, x_u: Tensor, alpha: float, generator: np.random.Generator
) -> tuple[Tensor, float]:
    """Mix labeled and unlabeled images: x' = λ' x_l + (1 − λ') x_u (thesis Eq. 4.11).

    λ ~ Beta(α, α) is drawn once per batch from ``generator`` (Algorithm 2 draws one
    ``numpy.random.beta(alpha, alpha)`` per step) and λ' = max(λ, 1 − λ), so the labeled image
    dominates. Samples are paired by position: the unlabeled batch is already an independent
    random draw, so Algorithm 2's extra permutation of it changes nothing in distribution.
    Returns (x', λ').
    """
    if x_l.shape != x_u.shape or x_l.dim() < 1 or x_l.shape[0] < 1:
        raise ValueError(
            f"labeled and unlabeled batches must have the same non-empty shape, got {list(x_l.shape)} and "
            f"{list(x_u.shape)}"
        )
    if not (math.isfinite(alpha) and alpha > 0.0):
        raise ValueError(f"alpha must be a finite number > 0 (Beta(alpha, alpha)), got {alpha}")
    lam = float(generator.beta(alpha, alpha))
    lam_prime = max(lam, 1.0 - lam)
    return lam_prime * x_l + (1.0 - lam_prime) * x_u, lam_prime


def mixed_soft_targets(teacher_logits_l: Tensor, teacher_logits_u: Tensor, lam: float) -> Tensor:
    """Teacher targets of the mixed images, y' = λ' z_l + (1 − λ') z_u (thesis Eq. 4.11), detached.

    We mix the teacher's logits, not its probabilities: Eq. 4.12 softens y' as y'/τ and
    Algorithm 2 mixes the networks' raw outputs before ``L_KD``. Pass y' as the teacher logits
    of :func:`facekd.distill.logit.kd_loss`, which applies τ and τ² (Eq. 4.12).
    """
    if teacher_logits_l.dim() != 2 or teacher_logits_l.shape != teacher_logits_u.shape:
        raise ValueError(
            f"teacher logits of the labeled and unlabeled batches must both be [B, C] of the same shape, got "
            f"{list(teacher_logits_l.shape)} and {list(teacher_logits_u.shape)}"
        )
    if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return (lam * teacher_logits_l + (1.0 - lam) * teacher_logits_u).detach()
