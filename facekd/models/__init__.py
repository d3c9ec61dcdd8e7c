"""Face-recognition backbones: IResNet teachers and students, MobileFaceNet.

Every backbone maps ``[B, 3, image_size, image_size]`` images to ``[B, embedding_dim]``
embeddings and exposes ``stem``, ``stages`` (four), ``head``, ``forward_features`` and
``embed_from_stage`` for stage-wise distillation (see :class:`StagedBackbone`).
"""
from __future__ import annotations

from facekd.models.condface import RoutedIResNet, routing_temperature, set_routing_temperature
from facekd.models.iresnet import IBasicBlock, IResNet, StagedBackbone
from facekd.models.mobilefacenet import Bottleneck, MobileFaceNet

# CondFace's routed IResNet-18s (thesis Sec. 5.4): "DC" is dynamic convolution with n = 4 experts, "AS4"
# dynamic group convolution with m = 4 groups of n = 4 experts and doubled-then-squeezed output channels.
ROUTED_BACKBONES: dict[str, dict[str, int]] = {
    "dc_iresnet18": {"depth": 18, "groups": 1, "experts": 4, "expansion": 1},
    "dgconv_iresnet18": {"depth": 18, "groups": 4, "experts": 4, "expansion": 2},
}

BACKBONES: tuple[str, ...] = (
    "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "mobilefacenet_arcface_torch",
    *ROUTED_BACKBONES,
)

FANFACE_BACKBONES: tuple[str, ...] = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200")
"""The backbones ``model.fan`` integrates a frozen FAN into (FAN-Face, thesis ch. 3; see :mod:`facekd.models.fanface`)."""

__all__ = [
    "BACKBONES",
    "Bottleneck",
    "FANFACE_BACKBONES",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "ROUTED_BACKBONES",
    "RoutedIResNet",
    "StagedBackbone",
    "build_backbone",
    "routing_temperature",
    "set_routing_temperature",
]


def build_backbone(
    name: str,
    *,
    embedding_dim: int = 512,
    width: float = 1.0,
    image_size: int = 112,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> StagedBackbone:
    """Build a backbone by name: one of :data:`BACKBONES`.

    ``mobilefacenet_arcface_torch`` is insightface arcface_torch's MobileFaceNet (``mbf``), whose widths and
    groups differ from Chen et al.'s (see :mod:`facekd.models.mobilefacenet`). ``width`` scales every layer's channels (0.5, 0.25, 0.125 give Wang & Lan's /2, /4, /8
    students); ``image_size`` is the side of the square input (112 for aligned faces). ``dc_iresnet18`` and
    ``dgconv_iresnet18`` are CondFace's routed IResNet-18s (see :mod:`facekd.models.condface`).
    """
    if name in ("mobilefacenet", "mobilefacenet_arcface_torch"):
        return MobileFaceNet(
            embedding_dim=embedding_dim,
            width=width,
            image_size=image_size,
            dropout=dropout,
            zero_init_residual=zero_init_residual,
            layout="chen" if name == "mobilefacenet" else "arcface_torch",
        )
    if name in ROUTED_BACKBONES:
        return RoutedIResNet(
            **ROUTED_BACKBONES[name],
            embedding_dim=embedding_dim,
            width=width,
            image_size=image_size,
            dropout=dropout,
            zero_init_residual=zero_init_residual,
        )
    if name in BACKBONES:
        return IResNet(
            int(name.removeprefix("iresnet")),
            embedding_dim=embedding_dim,
            width=width,
            image_size=image_size,
            dropout=dropout,
            zero_init_residual=zero_init_residual,
        )
    raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
