"""MobileFaceNet (Chen et al., "MobileFaceNets", CCBR 2018, Table 1).

The student of the SRRL face experiments (J. Yang, PhD thesis 2021, Sec. 4.4 "Face
Recognition on MegaFace Dataset", Table 4.11). The thesis table is Chen et al.'s Table 1
with a 512-d instead of a 128-d embedding, which is the MobileFaceNet of insightface's
ArcFace experiments; 1.00M parameters become 1.20M ("MobileFaceNet (1.2M)", thesis
Table 4.12). The thesis caption says conv_blocks use 3×3 kernels "except the last", which
read literally would make the 128→512 expansion a 3×3 conv (1.72M parameters); Chen et al.
give it as a 1×1 conv and the 1.2M count agrees, so it is 1×1 here.

Split into the :class:`~facekd.models.iresnet.StagedBackbone` interface at the stride
boundaries, so that the four stage outputs sit at strides 2, 4, 8, 16 like IResNet's:

========  ===========================================================  ============
part      operators (Chen et al. Table 1: expansion t, channels c,      output at
          repeats n, stride s)                                          112 px
========  ===========================================================  ============
stem      conv3x3 s2, 64                                                64×56×56
stage 0   depthwise conv3x3, 64                                         64×56×56
stage 1   bottleneck (t=2, c=64, n=5, s=2)                              64×28×28
stage 2   bottleneck (4, 128, 1, 2), bottleneck (2, 128, 6, 1)          128×14×14
stage 3   bottleneck (4, 128, 1, 2), bottleneck (2, 128, 2, 1)          128×7×7
head      conv1x1 512, linear GDConv7x7, linear 1×1 → embedding, BN    embedding
========  ===========================================================  ============

``layout="arcface_torch"`` builds instead the MobileFaceNet of insightface arcface_torch
(``backbones/mobilefacenet.py``, ``get_mbf``: ``scale=2``), whose weights its model zoo ships. It is
not Chen et al.'s table: every width is doubled (stem 128, stages 128/128/256/256), the conv of
stage 0 is a grouped conv with 64 groups (2 channels each) instead of a depthwise one, the
bottlenecks expand to a hidden width given per row rather than ``t·in`` (128, 128; 256, 256;
512, 256: expansion 1 in every residual unit, 2 in the two strided units that change the width),
stage 1 opens with a stride-2 unit then 4 residual ones, and the 1×1 conv before the GDConv maps
256 → 512: 2,059,520 parameters with a 512-d embedding. Stages, strides and the
head's operators are otherwise those above, so the same module tree holds both layouts.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from facekd.models.iresnet import (
    StagedBackbone,
    check_backbone_args,
    downsampled_size,
    init_conv_bn,
    scale_channels,
)

# Chen et al. 2018, Table 1: (expansion t, output channels c, repeats n, first stride s).
MOBILEFACENET_BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
# Which stage (1–3) each bottleneck row belongs to: rows starting at stride 2 open a stage.
_BOTTLENECK_STAGE = (1, 2, 2, 3, 3)
STEM_CHANNELS = 64
HEAD_CHANNELS = 512

# insightface arcface_torch ``get_mbf`` (scale 2): (hidden channels, output channels, repeats, first stride, stage),
# from its DepthWise(in, out, groups=hidden) / Residual(c, num_block, groups=hidden) rows.
ARCFACE_TORCH_BOTTLENECKS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 1, 2, 1),
    (128, 128, 4, 1, 1),
    (256, 256, 1, 2, 2),
    (256, 256, 6, 1, 2),
    (512, 256, 1, 2, 3),
    (256, 256, 2, 1, 3),
)
ARCFACE_TORCH_STEM_CHANNELS = 128

MobileFaceNetLayout = Literal["chen", "arcface_torch"]


def _bottleneck_rows(layout: MobileFaceNetLayout, width: float, stem_channels: int) -> list[tuple[int, int, int, int, int]]:
    """(hidden, out, repeats, first stride, stage) of every bottleneck row of ``layout`` at ``width``."""
    if layout == "arcface_torch":
        return [(scale_channels(hidden, width), scale_channels(out, width), repeats, stride, stage)
                for hidden, out, repeats, stride, stage in ARCFACE_TORCH_BOTTLENECKS]
    rows, in_channels = [], stem_channels
    for (expansion, channels, repeats, stride), stage in zip(MOBILEFACENET_BOTTLENECKS, _BOTTLENECK_STAGE):
        out_channels = scale_channels(channels, width)
        rows.append((in_channels * expansion, out_channels, 1, stride, stage))
        if repeats > 1:
            rows.append((out_channels * expansion, out_channels, repeats - 1, 1, stage))
        in_channels = out_channels
    return rows


def conv_bn(
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> nn.Sequential:
    """Conv (no bias) → BN → PReLU; ``activation=False`` is Chen et al.'s "linear" conv."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=1 if kernel_size == 3 else 0,  # 3×3 keeps the size; 1×1 and GDConv need none
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.PReLU(out_channels))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """MobileNetV2's inverted residual (Sandler et al. 2018) with PReLU, as in Chen et al.

    1×1 expand to ``hidden_channels`` (``t·in`` in Chen et al.) → depthwise 3×3 (stride) → linear 1×1
    project, BN after each; the input is added back when the resolution and width are kept.
    """

    def __init__(self, in_channels: int, out_channels: int, *, hidden_channels: int, stride: int) -> None:
        super().__init__()
        hidden = hidden_channels
        self.expand = conv_bn(in_channels, hidden, kernel_size=1)
        self.depthwise = conv_bn(hidden, hidden, kernel_size=3, stride=stride, groups=hidden)
        self.project = conv_bn(hidden, out_channels, kernel_size=1, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileFaceNetHead(nn.Module):
    """conv1x1 512 → linear GDConv → dropout → linear 1×1 to the embedding → BN.

    Chen et al. Table 1, last three rows.

    The global depthwise convolution (GDConv) has a kernel as large as the final map (7×7
    for 112 px inputs), so every spatial position gets its own learnt weight instead of the
    equal weights of global average pooling. The 1×1 conv on a 1×1 map is a bias-free
    linear layer. Chen et al. have no dropout; it is here for parity with IResNet's head
    and is off by default.
    """

    def __init__(
        self, in_channels: int, channels: int, spatial_size: int, embedding_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.conv = conv_bn(in_channels, channels, kernel_size=1)
        self.gdconv = conv_bn(channels, channels, kernel_size=spatial_size, groups=channels, activation=False)
        self.dropout = nn.Dropout(p=dropout)
        self.linear = nn.Linear(channels, embedding_dim, bias=False)
        self.features = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.gdconv(self.conv(x)), 1)
        return self.features(self.linear(self.dropout(x)))


class MobileFaceNet(StagedBackbone):
    """MobileFaceNet (Chen et al. 2018, Table 1; J. Yang thesis Table 4.11).

    At width 1, 112×112 input and a 512-d embedding it has 1,200,512 parameters
    (1.2M in thesis Table 4.12); with Chen et al.'s 128-d embedding, 1,003,136 (Chen et al.
    report 0.99M).

    Args:
        embedding_dim: size of the face embedding (128 in Chen et al., 512 in the thesis
            and insightface).
        width: channel multiplier applied to every layer except the embedding.
        image_size: side of the square input crop; the GDConv kernel equals the final map
            size (7 for 112 px, 4 for 56 or 64 px).
        dropout: dropout before the embedding layer (not in Chen et al.; default off).
        zero_init_residual: zero the last BN of every residual bottleneck so that it starts
            as the identity (Goyal et al. 2017).
        layout: ``chen`` (Chen et al. Table 1, the default) or ``arcface_torch`` (insightface's
            ``get_mbf``, see the module docstring); ``width`` scales either.
    """

    def __init__(
        self,
        *,
        embedding_dim: int = 512,
        width: float = 1.0,
        image_size: int = 112,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        layout: MobileFaceNetLayout = "chen",
    ) -> None:
        check_backbone_args(embedding_dim=embedding_dim, image_size=image_size, dropout=dropout)
        if layout not in ("chen", "arcface_torch"):
            raise ValueError(f"MobileFaceNet layout must be 'chen' or 'arcface_torch', got {layout!r}")
        arcface_torch = layout == "arcface_torch"
        stem_channels = scale_channels(ARCFACE_TORCH_STEM_CHANNELS if arcface_torch else STEM_CHANNELS, width)
        # stage 0's conv: depthwise in Chen et al., groups of 2 channels in arcface_torch (64 groups at width 1)
        stage0_groups = stem_channels // 2 if arcface_torch else stem_channels

        # build stem: conv3x3 s2 (Chen et al. Table 1, row 1)
        stem = conv_bn(3, stem_channels, kernel_size=3, stride=2)
        size = downsampled_size(image_size)

        # build stages: depthwise conv3x3 (row 2), then the bottlenecks grouped at each stride 2
        stage_layers: list[list[nn.Module]] = [
            [conv_bn(stem_channels, stem_channels, kernel_size=3, groups=stage0_groups)],
            [],
            [],
            [],
        ]
        sizes = [size]
        feature_channels = [stem_channels, 0, 0, 0]
        in_channels = stem_channels
        for hidden_channels, out_channels, repeats, stride, stage in _bottleneck_rows(layout, width, stem_channels):
            for repeat in range(repeats):
                unit_stride = stride if repeat == 0 else 1
                stage_layers[stage].append(
                    Bottleneck(in_channels, out_channels, hidden_channels=hidden_channels, stride=unit_stride)
                )
                in_channels = feature_channels[stage] = out_channels
                if unit_stride == 2:
                    size = downsampled_size(size)
                    sizes.append(size)

        # build head: conv1x1 512, linear GDConv over the whole final map, embedding
        head = MobileFaceNetHead(
            in_channels, scale_channels(HEAD_CHANNELS, width), sizes[-1], embedding_dim, dropout
        )

        super().__init__(
            stem=stem,
            stages=[nn.Sequential(*layers) for layers in stage_layers],
            head=head,
            image_size=image_size,
            embedding_dim=embedding_dim,
            feature_channels=feature_channels,
            feature_sizes=sizes,
            feature_strides=[2, 4, 8, 16],
        )
        self.width = width
        self.layout = layout

        init_conv_bn(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.residual:
                    nn.init.zeros_(m.project[1].weight)
