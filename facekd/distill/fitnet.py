"""FitNet hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

A student feature map ``F_S`` [B, C_S, H_S, W_S] is mapped by a regressor ``r`` to the shape of
the teacher's hint map ``F_T`` [B, C_T, H_T, W_T], and the two are compared with an L2 loss:

    L_HT = ½ ‖F_T − r(F_S)‖²                                   (FitNets Eq. 3)

Here ``r`` is :class:`FitNetAdapter` (bilinear resize when the sizes differ, 1×1 conv, BN), the
regressor of mdistiller's ``ConvReg`` minus its ReLU: the stage outputs of IResNet and
MobileFaceNet are not rectified (IResNet adds the shortcut after its last BN; MobileFaceNet's
bottlenecks are linear), so a ReLU would stop the adapter from reaching their negative values.
:func:`fitnet_loss` is the element mean of the squared difference, as mdistiller computes it
(``F.mse_loss``), rather than Eq. 3's half sum: the two differ by the constant factor
``numel / 2``, which the loss weight absorbs (mdistiller ``CFG.FITNET.LOSS.FEAT_WEIGHT = 100``).

The same adapter maps each student stage to the teacher's width in ShrinkTeaNet
(:mod:`facekd.distill.shrinkteanet`), whose paper (Duong et al. 2019, Sec. 3.3) also uses
"1×1 convolution followed by batch normalization".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facekd.models.iresnet import init_conv_bn


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class FitNetAdapter(nn.Module):
    """Map a student feature map to a teacher map's shape: resize → 1×1 conv → BN.

    Input ``[B, student_channels, H, W]``, output ``[B, teacher_channels, teacher_size,
    teacher_size]``. When ``H, W`` differ from ``teacher_size`` the input is first resized with
    bilinear interpolation (``align_corners=False``); resizing before the convolution keeps the
    BN statistics those of the map that is actually compared (a 1×1 conv commutes with the
    resize, the BN does not). The convolution has no bias, since the BN shift replaces it.
    Initialisation is the backbones' (Kaiming fan-out, BN scale 1 and shift 0), which is also
    SRRL's connector initialisation.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, teacher_size: int) -> None:
        super().__init__()
        _check_positive_int("student_channels", student_channels)
        _check_positive_int("teacher_channels", teacher_channels)
        _check_positive_int("teacher_size", teacher_size)
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.teacher_size = teacher_size
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_channels)
        init_conv_bn(self)

    def forward(self, student_feature: Tensor) -> Tensor:
        if student_feature.dim() != 4 or student_feature.shape[1] != self.student_channels:
            raise ValueError(
                f"FitNetAdapter expects student features [B, {self.student_channels}, H, W], "
                f"got {list(student_feature.shape)}"
            )
        size = (self.teacher_size, self.teacher_size)
        if tuple(student_feature.shape[2:]) != size:
            student_feature = F.interpolate(student_feature, size=size, mode="bilinear", align_corners=False)
        return self.bn(self.conv(student_feature))


def fitnet_loss(adapted: Tensor, teacher_feature: Tensor) -> Tensor:
    """Hint loss mean((F_T − r(F_S))²) over all elements (FitNets Eq. 3 as an element mean).

    ``adapted`` is the adapter's output r(F_S); ``teacher_feature`` F_T must have its shape and is
    detached. Half-precision inputs are compared in float32; the loss is a 0-d tensor.
    """
    if adapted.shape != teacher_feature.shape:
        raise ValueError(
            f"adapted student features {list(adapted.shape)} and teacher features "
            f"{list(teacher_feature.shape)} must have the same shape"
        )
    if adapted.numel() == 0:
        raise ValueError(f"fitnet_loss needs at least one element, got shape {list(adapted.shape)}")
    dtype = torch.promote_types(adapted.dtype, torch.float32)
    difference = adapted.to(dtype) - teacher_feature.detach().to(dtype)
    return difference.square().mean()
