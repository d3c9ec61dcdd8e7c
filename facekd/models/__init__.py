"""Face-recognition backbones: IResNet teachers and students, MobileFaceNet.

Every backbone maps ``[B, 3, image_size, image_size]`` images to ``[B, embedding_dim]``
embeddings and exposes ``stem``, ``stages`` (four), ``head``, ``forward_features`` and
``embed_from_stage`` for stage-wise distillation (see :class:`StagedBackbone`).
"""
from __future__ import annotations

from facekd.models.iresnet import IBasicBlock, IResNet, StagedBackbone
from facekd.models.mobilefacenet import Bottleneck, MobileFaceNet

BACKBONES: tuple[str, ...] = (
    "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "mobilefacenet_arcface_torch",
)

__all__ = [
    "BACKBONES",
    "Bottleneck",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "StagedBackbone",
    "build_backbone",
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
    students); ``image_size`` is the side of the square input (112 for aligned faces).
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
