"""IResNet backbones (ArcFace's "improved" ResNet) and the staged-backbone interface.

IResNet is the face-recognition ResNet of ArcFace (Deng et al., CVPR 2019: the improved
residual unit and output block "E" of its network-setting study, "LResNet100E-IR"), in
the form released in insightface ``arcface_torch``: a stride-1 3×3 stem keeps the 112×112
resolution, each of the four stages halves it in its first residual unit, and the "E"
output block (BN → dropout → FC → BN) turns the final 512×7×7 map into the embedding.

Every backbone in ``facekd.models`` is a :class:`StagedBackbone`: a ``stem``, four
``stages`` and a ``head``. ShrinkTeaNet (Duong et al. 2019, Sec. 3.2, Eq. 6, Fig. 3)
feeds a student's stage-i features, adapted to the teacher's width, through the
teacher's remaining stages; :meth:`StagedBackbone.embed_from_stage` is that path. Both
families put their four stage outputs at strides 2, 4, 8 and 16 (56, 28, 14 and 7 px for
a 112 px face), so only the channel count needs adapting between a student and a teacher
stage.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, overload

import torch
from torch import Tensor, nn

# Stage widths of IResNet (ArcFace Table 4 / insightface arcface_torch).
IRESNET_STAGE_CHANNELS: tuple[int, int, int, int] = (64, 128, 256, 512)

# Residual units per stage, insightface arcface_torch ``iresnet{18,34,50,100,200}``.
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}

NUM_STAGES = 4


def scale_channels(channels: int, width: float, *, divisor: int = 8, min_channels: int = 8) -> int:
    """Scale a channel count by a width multiplier, rounded to a multiple of ``divisor``.

    Wang & Lan (2017, Sec. 4.1) build their ResNet-50/2, /4 and /8 students by dividing
    the number of kernels of every layer by 2, 4 and 8; ``width`` = 0.5, 0.25, 0.125 gives
    those students. Multiples of 8 keep the convolutions friendly to vectorised kernels.
    """
    if not (math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive finite multiplier, got {width}")
    return max(min_channels, int(channels * width / divisor + 0.5) * divisor)


def downsampled_size(size: int) -> int:
    """Spatial size after one stride-2 convolution (3×3 with padding 1, or 1×1 without)."""
    return (size + 1) // 2


def check_backbone_args(*, embedding_dim: int, image_size: int, dropout: float) -> None:
    """Reject constructor arguments shared by every backbone where they enter."""
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    # Four stride-2 stages need at least 16 px to leave a map; faces are square crops.
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(
            f"image_size must be an int >= 16 (square face crops, 112 in ArcFace), got {image_size!r}"
        )


class StagedBackbone(nn.Module):
    """A face-embedding network split into ``stem`` → four ``stages`` → ``head``.

    Subclasses build the three parts and pass them to this constructor. Attributes:

    - ``feature_channels[i]``: channels of stage i's output;
    - ``feature_sizes[i]``: its (square) spatial size for ``image_size`` inputs;
    - ``feature_strides[i]``: its stride relative to the input image (2, 4, 8, 16 in both
      families; at sizes that do not divide evenly the map is ``ceil(image_size / stride)``).
    """

    def __init__(
        self,
        *,
        stem: nn.Module,
        stages: list[nn.Module],
        head: nn.Module,
        image_size: int,
        embedding_dim: int,
        feature_channels: list[int],
        feature_sizes: list[int],
        feature_strides: list[int],
    ) -> None:
        super().__init__()
        lengths = {len(stages), len(feature_channels), len(feature_sizes), len(feature_strides)}
        if lengths != {NUM_STAGES}:
            raise ValueError(
                f"a staged backbone has {NUM_STAGES} stages, got {len(stages)} stages, {len(feature_channels)} "
                f"channel counts, {len(feature_sizes)} sizes and {len(feature_strides)} strides"
            )
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.image_size = image_size
        self.embedding_dim = embedding_dim
        self.feature_channels = list(feature_channels)
        self.feature_sizes = list(feature_sizes)
        self.feature_strides = list(feature_strides)

    def _check_images(self, images: Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(built with image_size={self.image_size}), got {list(images.shape)}"
            )

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """Outputs of the four stages, ``[B, feature_channels[i], feature_sizes[i], feature_sizes[i]]``."""
        self._check_images(images)
        features = []
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    @overload
    def forward(self, images: Tensor, return_stages: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, images: Tensor, return_stages: Literal[True]) -> tuple[Tensor, list[Tensor]]: ...

    def forward(self, images: Tensor, return_stages: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Embeddings ``[B, embedding_dim]`` of images ``[B, 3, image_size, image_size]``.

        With ``return_stages`` the four stage outputs come back too, as ``(embedding, stages)``.
        """
        features = self.forward_features(images)
        embedding = self.head(features[-1])
        if return_stages:
            return embedding, features
        return embedding

    def embed_from_stage(self, stage_index: int, feature_map: Tensor) -> Tensor:
        """Run stages ``stage_index + 1`` … 3 and the head on a stage-``stage_index`` feature map.

        This is the teacher's half of ShrinkTeaNet's intermediate distillation (Duong et al.
        2019, Sec. 3.2, Eq. 6): a student's adapted stage features continue through the teacher.
        ``embed_from_stage(i, forward_features(x)[i])`` equals ``forward(x)``.
        """
        if not 0 <= stage_index < NUM_STAGES:
            raise ValueError(f"stage_index must be in [0, {NUM_STAGES}), got {stage_index}")
        size = self.feature_sizes[stage_index]
        expected = (self.feature_channels[stage_index], size, size)
        if feature_map.dim() != 4 or tuple(feature_map.shape[1:]) != expected:
            raise ValueError(
                f"stage {stage_index} features of {type(self).__name__} have shape "
                f"[B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(feature_map.shape)}"
            )
        x = feature_map
        for stage in self.stages[stage_index + 1 :]:
            x = stage(x)
        return self.head(x)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The shortcut of a residual unit: a strided 1×1 conv + BN when the unit changes resolution or width, else
    None (the identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class IBasicBlock(nn.Module):
    """IResNet's improved residual unit ("IR" in ArcFace's LResNet-E-IR networks).

    BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN, added to the shortcut; the shortcut
    is a strided 1×1 conv + BN when the unit changes resolution or width. There is no
    activation after the addition.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x)))))
        return self.bn3(out) + shortcut


class IResNetHead(nn.Module):
    """ArcFace's output block "E": BN2d → dropout → flatten → FC → BN1d.

    The final BN1d (insightface's ``features``) has its scale fixed to 1 and excluded from
    training, as in insightface arcface_torch; its shift is trained.
    """

    def __init__(self, channels: int, spatial_size: int, embedding_dim: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels * spatial_size * spatial_size, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(torch.flatten(self.bn(x), 1))
        return self.features(self.fc(x))


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out), BN scale 1 and shift 0.

    insightface arcface_torch draws IResNet convolutions from N(0, 0.1); with a BN after
    every convolution the forward pass does not depend on that scale, and Kaiming keeps the
    weight scale (hence the gradient scale and the effect of weight decay) sensible at every
    width. Linear layers keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


UnitFactory = Callable[[int, int, int, int], nn.Module]


def _static_unit(in_channels: int, out_channels: int, stride: int, stage_index: int) -> nn.Module:
    return IBasicBlock(in_channels, out_channels, stride)


class IResNet(StagedBackbone):
    """IResNet-18/34/50/100/200 (ArcFace, insightface arcface_torch ``backbones/iresnet.py``).

    At width 1, 112×112 input and a 512-d embedding: IResNet-18 24,025,600 parameters,
    IResNet-34 34,139,328, IResNet-50 43,590,848, IResNet-100 65,156,160 (insightface's
    43.59M and 65.16M); 12.85M of each is the 25088×512 FC.

    Args:
        depth: 18, 34, 50, 100 or 200.
        embedding_dim: size of the face embedding (512 in ArcFace).
        width: channel multiplier; 0.5 / 0.25 / 0.125 give Wang & Lan's (2017) ResNet/2, /4, /8.
        image_size: side of the square input crop; the FC input follows the final map size
            (7 for 112 px, 4 for 56 or 64 px).
        dropout: dropout before the FC (0 in arcface_torch's default configs).
        zero_init_residual: zero the last BN of every residual unit so each unit starts as
            its shortcut (Goyal et al. 2017). insightface's flag zeroes the middle BN instead.
        unit: builds each residual unit as ``unit(in_channels, out_channels, stride, stage_index)``
            (a module with IBasicBlock's ``bn3``); IBasicBlock by default. The dynamically routed
            IResNets of :mod:`facekd.models.condface` pass theirs.
    """

    def __init__(
        self,
        depth: int,
        *,
        embedding_dim: int = 512,
        width: float = 1.0,
        image_size: int = 112,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        unit: UnitFactory | None = None,
    ) -> None:
        if depth not in IRESNET_LAYERS:
            raise ValueError(f"IResNet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
        check_backbone_args(embedding_dim=embedding_dim, image_size=image_size, dropout=dropout)
        channels = [scale_channels(c, width) for c in IRESNET_STAGE_CHANNELS]

        # build stem: full-resolution 3×3 conv, no pooling (ArcFace's input setting "L")
        stem = nn.Sequential(conv3x3(3, channels[0]), nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0]))

        # build stages: the first unit of each stage halves the resolution
        stages: list[nn.Module] = []
        sizes: list[int] = []
        make_unit = unit or _static_unit
        in_channels, size = channels[0], image_size
        for stage_index, (out_channels, num_units) in enumerate(zip(channels, IRESNET_LAYERS[depth])):
            units = [make_unit(in_channels, out_channels, 2, stage_index)]
            units += [make_unit(out_channels, out_channels, 1, stage_index) for _ in range(num_units - 1)]
            stages.append(nn.Sequential(*units))
            in_channels, size = out_channels, downsampled_size(size)
            sizes.append(size)

        # build head
        head = IResNetHead(channels[-1], sizes[-1], embedding_dim, dropout)

        super().__init__(
            stem=stem,
            stages=stages,
            head=head,
            image_size=image_size,
            embedding_dim=embedding_dim,
            feature_channels=channels,
            feature_sizes=sizes,
            feature_strides=[2, 4, 8, 16],
        )
        self.depth = depth
        self.width = width

        init_conv_bn(self)
        if zero_init_residual:
            for stage in self.stages:
                for m in stage:
                    nn.init.zeros_(m.bn3.weight)
