"""FAN-Face (thesis ch. 3): a frozen face alignment network's heatmaps and features integrated into an IResNet.

The face recognition network (FRN, an :class:`~facekd.models.iresnet.IResNet`) is trained from scratch while a
pre-trained FAN (:class:`~facekd.models.fan.FAN`, a stacked hourglass) stays fixed; every image goes through
both. What the FRN receives from the FAN (thesis Sec. 3.2.2-3.2.4, the variants of Sec. 3.5):

- heatmaps (Sec. 3.2.2, Eq. 3.1): ``h2`` stacks the second hourglass' N landmark heatmaps, resampled to the
  FRN's input size, with the image: the FRN's first conv takes 3 + N channels. ``h2plus`` also stacks them
  (resized) with the FRN features before each of the four resolution drops (AS1: "the features produced by
  the last layer of FRN before each resolution drop, features from 4 different places in total"). The four
  drops of an IResNet are the strided first units of its four stages, so the stem output (112 px) and the
  outputs of stages 0-2 (56, 28, 14 px) are concatenated with the heatmaps, and the first unit of every stage
  takes C + N input channels (its BN, its first 3×3 conv and its 1×1 shortcut conv all see them). The final
  7×7 map is not one of these places (no drop follows it), which also leaves the 25088×512 FC unchanged.
  ``heatmap_points="inner"`` stacks only the 51 inner points of a 68-point FAN, as the thesis (Sec. 3.2.1).
- features (Sec. 3.2.3): the FAN's high-to-low (h2l) or low-to-high (l2h) path of hourglass 1 or 2 at
  S/4, S/8, S/16, S/32 (64, 32, 16, 8 for S = 256) is bilinearly interpolated to the FRN stage outputs
  (56, 28, 14, 7 for 112 px faces) and combined through an integration layer: ``1-1`` at the end of each
  integrated stage, ``1-many`` after every residual unit of it, each unit with its own layer.
- which stages: the thesis integrates "at the end of each stage before down-sampling" (Sec. 3.2.3), which
  read literally is stages 0-2 (stage 3 ends in the FC, no down-sampling follows) — and only that reading
  fits Table 3.2: (H2, 1-1, BL) adds 0.4M parameters to ResNet-34, while a BL on the 512-channel stage alone
  holds 256·512 + 2·512·512 = 0.66M (see tests/models/test_fanface.py). ``stages`` chooses; (0, 1, 2) is
  the default.

The integration layers (Sec. 3.2.4, Fig. 3.6), f(x, y) for a FAN feature x [B, C_l, H, W] and an FRN
feature y [B, C_k, H, W]:

- BL: BN(x) → 1×1 conv to C_k → AdaIN to y's statistics → concatenated with y → 1×1 conv (2C_k → C_k) → BN;
- SL: BN(x) → 1×1 conv → AdaIN, added as it is (no concatenation, no second conv);
- AL: BL with its second 1×1 conv replaced by a 1×1-3×3-1×1 bottleneck (2C_k → C_k → C_k → C_k, BN + PReLU
  after the first two convs as in IResNet's units). The thesis does not give the bottleneck width; C_k is the
  width whose parameter count matches Table 3.2 (AL − BL: +0.7M there, +0.86M here at stages 0-2; C_k/2
  would give +0.15M).

and the FRN feature becomes ỹ = PReLU(y + γ·f(x, y)) (Eq. 3.2). The PReLU comes after the addition: Fig. 3.6
says the combined feature "can be added with the input FRN feature. The very last layer is a non-linearity
in the form of PReLU", and the issue reads it the same way; SL and AL keep it (they vary only f). γ: Eq. 3.2
writes a γ for every scheme, but only 1-M is said to learn it ("Also, we use learnable parameters γ_k to
control the contribution of each mixing layer"), so 1-1 is read as γ = 1 — f ends in a BN whose scale is
learnt anyway — and 1-M learns one scalar γ_k per layer, starting at 1 (at initialisation every 1-M layer
contributes as a 1-1 layer does; training decides where the FAN's features matter). The thesis gives no
initial value.

The FAN is frozen like a distillation teacher: its parameters have ``requires_grad`` False (so the trainer's
optimiser, clipping and weight decay never touch them: SGD skips parameters without a gradient, DeepSpeed
gets only the trained ones), it stays in eval mode whatever ``train()`` is called with (its BN statistics
never move), and it runs under ``no_grad`` — in bf16 autocast on a GPU. Its weights are part of the FAN-Face
state dict (``fan.*``), so a checkpoint is self-contained. It is fed the FRN's own input, converted back to
what FAN was trained on: RGB in [0, 1] (pixels / 255, inverting ``model.normalize``) up-sampled bilinearly
from the FRN's size to ``input_size`` (Sec. 3.4: 112 → 256).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facekd.models.fan import FAN
from facekd.models.iresnet import IBasicBlock, IResNet, StagedBackbone, conv3x3, init_conv_bn

__all__ = [
    "ADAIN_EPS", "FANFace", "FEATURE_SOURCES", "HEATMAP_MODES", "FEATURE_MODES", "INTEGRATION_LAYERS",
    "IntegrationLayer", "adain", "fan_input",
]

ADAIN_EPS = 1e-5
"""ε under AdaIN's square roots, σ = sqrt(var + ε) (Huang & Belongie 2017's released code uses 1e-5)."""

HEATMAP_MODES = ("none", "h2", "h2plus")
FEATURE_MODES = ("none", "1-1", "1-many")
FEATURE_SOURCES = ("h2l-1", "h2l-2", "l2h-1", "l2h-2")
INTEGRATION_LAYERS = ("bl", "sl", "al")
HEATMAP_STACK = 1  # H2: the second hourglass' heatmaps (thesis AS1; the first "gave slightly worse result")
HEATMAP_POINTS = ("all", "inner")
INNER_POINTS = slice(17, 68)  # iBUG-68 without the 17 jaw points 0-16: the thesis' "51 internal landmarks"


def adain(x: Tensor, y: Tensor, eps: float = ADAIN_EPS) -> Tensor:
    """Adaptive instance normalisation (Huang & Belongie, ICCV 2017, Eq. 8): σ(y)·(x − μ(x))/σ(x) + μ(y).

    μ and σ are per sample and channel over the spatial positions, σ = sqrt(biased variance + ε): with ε → 0 the
    output has exactly y's per-channel mean and (population) std. ``x`` and ``y`` are [B, C, H, W] of the same
    B and C (the spatial sizes may differ). Computed in at least float32 whatever the autocast dtype; returned in
    ``y``'s dtype. Gradients flow into both x and y's statistics.
    """
    if x.dim() != 4 or y.dim() != 4 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"adain needs [B, C, H, W] tensors of equal B and C, got {list(x.shape)} and {list(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x, y32 = x.to(dtype), y.to(dtype)
        x_var, x_mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        y_var, y_mean = torch.var_mean(y32, dim=(2, 3), keepdim=True, correction=0)
        out = (x - x_mean) * torch.rsqrt(x_var + eps) * torch.sqrt(y_var + eps) + y_mean
    return out.to(y.dtype)


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    # a BN or AdaIN follows every one of these, so a bias would be removed again
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class IntegrationLayer(nn.Module):
    """ỹ = PReLU(y + γ·f(x, y)) for a FAN feature x [B, fan_channels, H, W] and an FRN feature y
    [B, frn_channels, H, W] (thesis Eq. 3.2, Sec. 3.2.4, Fig. 3.6); ``kind`` picks f (see the module docstring).

    ``learn_gamma``: γ is a learnable scalar starting at 1 (1-M's γ_k); otherwise γ = 1 (1-1).
    """

    def __init__(self, fan_channels: int, frn_channels: int, kind: Literal["bl", "sl", "al"], *,
                 learn_gamma: bool = False) -> None:
        super().__init__()
        if kind not in INTEGRATION_LAYERS:
            raise ValueError(f"integration layer must be one of {INTEGRATION_LAYERS}, got {kind!r}")
        c = frn_channels
        self.kind = kind
        # (a) BN adjusts the FAN feature's scale, a 1×1 conv aligns it with the FRN feature's channels
        self.fan_bn = nn.BatchNorm2d(fan_channels)
        self.align = _conv1x1(fan_channels, c)
        # (c) after AdaIN and concatenation: back to C_k channels (BL: one 1×1 conv; AL: a bottleneck), then BN
        self.mix: nn.Sequential | None = None
        if kind == "bl":
            self.mix = nn.Sequential(_conv1x1(2 * c, c), nn.BatchNorm2d(c))
        elif kind == "al":
            self.mix = nn.Sequential(
                _conv1x1(2 * c, c), nn.BatchNorm2d(c), nn.PReLU(c),
                conv3x3(c, c), nn.BatchNorm2d(c), nn.PReLU(c),
                _conv1x1(c, c), nn.BatchNorm2d(c),
            )
        self.prelu = nn.PReLU(c)
        # shape [1], not a 0-d scalar: DeepSpeed's flattened parameter buffers cannot view a 0-d tensor
        self.gamma: nn.Parameter | None = nn.Parameter(torch.ones(1)) if learn_gamma else None
        init_conv_bn(self)

    def integrate(self, x: Tensor, y: Tensor) -> Tensor:
        """f(x, y) [B, C_k, H, W]."""
        aligned = adain(self.align(self.fan_bn(x)), y)  # (b) the FAN feature takes the FRN feature's statistics
        if self.mix is None:
            return aligned
        return self.mix(torch.cat((aligned, y), dim=1))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise ValueError(f"FAN feature {list(x.shape)} and FRN feature {list(y.shape)} must share batch and size")
        f = self.integrate(x, y)
        if self.gamma is not None:
            f = self.gamma.to(f.dtype) * f
        return self.prelu(y + f)


def fan_input(images: Tensor, normalize: str, size: int) -> Tensor:
    """FAN's input for FRN input ``images`` [B, 3, s, s] normalised as ``normalize`` (see
    :func:`facekd.data.loader.to_float`): the RGB pixels / 255, in [0, 1], bilinearly resized to ``size``."""
    # to_float: mxnet (x − 127.5)/128, arcface_torch (x − 127.5)/127.5 of the uint8 pixels x
    scale = {"mxnet": 128.0, "arcface_torch": 127.5}[normalize]
    pixels = (images.float() * scale + 127.5) / 255.0
    if pixels.shape[-1] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)


def _resize(x: Tensor, size: int, *, antialias: bool = False) -> Tensor:
    """Bilinear resampling to size × size (float32); ``antialias`` when shrinking heatmaps (64 → 14 would
    otherwise sample a σ ≈ 1 px Gaussian at a stride of 4.6 and miss its peak)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.float()
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=antialias and size < x.shape[-1])


@dataclass
class _FANInputs:
    """What one forward takes from the FAN: heatmaps [B, N, S/4, S/4] (None without heatmap integration) and,
    per FRN stage, the FAN feature resized to that stage's output (None where the stage is not integrated)."""

    heatmaps: Tensor | None
    features: list[Tensor | None]


class FANFace(StagedBackbone):
    """An IResNet FRN with a frozen FAN integrated into it (see the module docstring).

    Args:
        depth: the IResNet's depth (18, 34, 50, 100, 200).
        fan: the FAN (its weights are loaded by the caller; it is frozen here).
        heatmaps: ``none``, ``h2`` or ``h2plus``.
        features: ``none``, ``1-1`` or ``1-many``.
        source: ``h2l-1``, ``h2l-2``, ``l2h-1`` or ``l2h-2``: path and hourglass of the integrated features.
        layer: ``bl``, ``sl`` or ``al``.
        heatmap_points: ``all`` the FAN's heatmaps, or ``inner``: the 51 inner ones of a 68-point FAN (points 17-67,
            thesis Sec. 3.2.1: "we used the 51 internal landmarks, ignoring the ones on the face boundary which are
            noisy due to tight cropping").
        stages: FRN stages (0-3) whose features are integrated (``features`` not ``none``).
        input_size: the FAN's input side (256 in the thesis; a multiple of ``fan.input_multiple``).
        normalize: how the FRN's input was normalised (``model.normalize``), inverted to feed the FAN.
        embedding_dim, width, image_size, dropout, zero_init_residual: as for :class:`IResNet`.

    ``stem``, ``stages`` and ``head`` are the IResNet's (with 3 + N stem input channels for heatmaps, C + N input
    channels in the first unit of every stage for ``h2plus``); ``integrations[i]`` holds stage i's integration
    layers (none, one, or one per residual unit). Stage outputs (for FitNet, ShrinkTeaNet, SRRL) are the
    integrated features ỹ. :meth:`embed_from_stage` continues with the FAN outputs of the latest forward in eval
    mode (a teacher's forward on the same images always precedes it in distillation).
    """

    def __init__(
        self,
        depth: int,
        *,
        fan: FAN,
        heatmaps: Literal["none", "h2", "h2plus"] = "h2",
        features: Literal["none", "1-1", "1-many"] = "1-1",
        source: Literal["h2l-1", "h2l-2", "l2h-1", "l2h-2"] = "h2l-2",
        layer: Literal["bl", "sl", "al"] = "bl",
        heatmap_points: Literal["all", "inner"] = "all",
        stages: tuple[int, ...] | list[int] = (0, 1, 2),
        input_size: int = 256,
        normalize: str = "mxnet",
        embedding_dim: int = 512,
        width: float = 1.0,
        image_size: int = 112,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        for name, value, choices in (("heatmaps", heatmaps, HEATMAP_MODES), ("features", features, FEATURE_MODES),
                                     ("source", source, FEATURE_SOURCES), ("layer", layer, INTEGRATION_LAYERS),
                                     ("heatmap_points", heatmap_points, HEATMAP_POINTS),
                                     ("normalize", normalize, ("mxnet", "arcface_torch"))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if heatmaps == "none" and features == "none":
            raise ValueError("heatmaps and features are both 'none': nothing of the FAN would reach the FRN")
        stages = tuple(stages)
        if features != "none" and (not stages or any(s not in range(4) for s in stages) or len(set(stages)) != len(stages)):
            raise ValueError(f"stages must be distinct FRN stages in 0-3, got {list(stages)}")
        path, stack = source.split("-")
        stack_index = int(stack) - 1
        needed_stacks = max(HEATMAP_STACK + 1 if heatmaps != "none" else 1, stack_index + 1 if features != "none" else 1)
        if needed_stacks > fan.stacks:
            raise ValueError(f"heatmaps {heatmaps!r} and source {source!r} need {needed_stacks} hourglasses; the FAN "
                             f"has {fan.stacks}")
        if features != "none" and max(stages) >= fan.depth:
            raise ValueError(f"stage {max(stages)} needs the FAN's feature at 1/{4 * 2 ** max(stages)} of its input; "
                             f"an hourglass of depth {fan.depth} has {fan.depth} levels")
        if input_size < fan.input_multiple or input_size % fan.input_multiple:
            raise ValueError(f"input_size must be a multiple of {fan.input_multiple} for this FAN (depth {fan.depth}), "
                             f"got {input_size}")
        if heatmap_points == "inner" and fan.landmarks != 68:
            raise ValueError(f"heatmap_points 'inner' keeps points 17-67 of the 68-point (iBUG) layout; this FAN has "
                             f"{fan.landmarks} landmarks")
        points = INNER_POINTS if heatmap_points == "inner" else slice(0, fan.landmarks)
        num_heatmaps = points.stop - points.start
        extra = num_heatmaps if heatmaps == "h2plus" else 0

        def unit(in_channels: int, out_channels: int, stride: int, stage_index: int) -> nn.Module:
            # H2+: the heatmaps enter every resolution drop, i.e. the strided first unit of each stage
            return IBasicBlock(in_channels + (extra if stride == 2 else 0), out_channels, stride)

        # build the FRN; with heatmaps its first conv takes 3 + N channels (Eq. 3.1)
        frn = IResNet(depth, embedding_dim=embedding_dim, width=width, image_size=image_size, dropout=dropout,
                      zero_init_residual=zero_init_residual, unit=unit)
        if heatmaps != "none":
            frn.stem[0] = conv3x3(3 + num_heatmaps, frn.feature_channels[0])
            init_conv_bn(frn.stem[0])
        super().__init__(stem=frn.stem, stages=list(frn.stages), head=frn.head, image_size=image_size,
                         embedding_dim=embedding_dim, feature_channels=frn.feature_channels,
                         feature_sizes=frn.feature_sizes, feature_strides=frn.feature_strides)
        self.depth, self.width = depth, width
        self.heatmaps, self.features, self.source, self.layer = heatmaps, features, source, layer
        self.heatmap_points = points
        self.integrated_stages = stages if features != "none" else ()
        self.input_size, self.normalize = input_size, normalize
        self._path, self._stack, self._fan_stacks = path, stack_index, needed_stacks

        # build the integration layers: one per integrated stage (1-1) or one per residual unit of it (1-M)
        self.integrations = nn.ModuleList()
        for stage_index, stage in enumerate(self.stages):
            count = 0 if stage_index not in self.integrated_stages else 1 if features == "1-1" else len(stage)
            self.integrations.append(nn.ModuleList(
                IntegrationLayer(fan.width, self.feature_channels[stage_index], layer, learn_gamma=features == "1-many")
                for _ in range(count)
            ))

        # freeze the FAN: no gradients, eval mode for good (see train())
        self.fan = fan.requires_grad_(False).eval()
        self._last_fan_inputs: _FANInputs | None = None

    def train(self, mode: bool = True) -> FANFace:
        """Train or evaluate the FRN and its integration layers; the FAN stays in eval mode."""
        super().train(mode)
        self.fan.eval()
        return self

    def fan_inputs(self, images: Tensor) -> _FANInputs:
        """Run the frozen FAN on the FRN's input ``images`` and prepare what the FRN takes from it."""
        pixels = fan_input(images, self.normalize, self.input_size)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=pixels.is_cuda):
            out = self.fan(pixels.to(next(self.fan.parameters()).dtype), stacks=self._fan_stacks)
        heatmaps = out.heatmaps[HEATMAP_STACK][:, self.heatmap_points].float() if self.heatmaps != "none" else None
        maps = (out.h2l if self._path == "h2l" else out.l2h)[self._stack] if self.features != "none" else []
        features = [_resize(maps[i], size) if i in self.integrated_stages else None
                    for i, size in enumerate(self.feature_sizes)]
        return _FANInputs(heatmaps, features)

    def _with_heatmaps(self, x: Tensor, heatmaps: Tensor) -> Tensor:
        return torch.cat((x, _resize(heatmaps, x.shape[-1], antialias=True).to(x.dtype)), dim=1)

    def _run_stages(self, x: Tensor, first: int, fan: _FANInputs) -> list[Tensor]:
        """Stages ``first`` … 3 from ``x`` (the input of stage ``first``) with the FAN's heatmaps and features."""
        outputs = []
        for stage_index in range(first, len(self.stages)):
            if self.heatmaps == "h2plus":
                x = self._with_heatmaps(x, fan.heatmaps)
            stage, layers, feature = self.stages[stage_index], self.integrations[stage_index], fan.features[stage_index]
            if self.features == "1-many" and len(layers):
                for unit, layer in zip(stage, layers):
                    x = layer(feature.to(x.dtype), unit(x))
            else:
                x = stage(x)
                if len(layers):
                    x = layers[0](feature.to(x.dtype), x)
            outputs.append(x)
        return outputs

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """Outputs of the four (integrated) stages, ``[B, feature_channels[i], feature_sizes[i], feature_sizes[i]]``."""
        self._check_images(images)
        fan = self.fan_inputs(images)
        self._last_fan_inputs = None if self.training else fan
        x = images if self.heatmaps == "none" else self._with_heatmaps(images, fan.heatmaps)
        return self._run_stages(self.stem(x), 0, fan)

    def embed_from_stage(self, stage_index: int, feature_map: Tensor) -> Tensor:
        """Stages ``stage_index + 1`` … 3 and the head on a stage-``stage_index`` map, with the FAN outputs of the
        latest eval-mode forward (ShrinkTeaNet's and SRRL's path through a teacher, see :class:`StagedBackbone`)."""
        if not 0 <= stage_index < len(self.stages):
            raise ValueError(f"stage_index must be in [0, {len(self.stages)}), got {stage_index}")
        size = self.feature_sizes[stage_index]
        expected = (self.feature_channels[stage_index], size, size)
        if feature_map.dim() != 4 or tuple(feature_map.shape[1:]) != expected:
            raise ValueError(f"stage {stage_index} features of FANFace have shape [B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}], got {list(feature_map.shape)}")
        if stage_index == len(self.stages) - 1:
            return self.head(feature_map)
        fan = self._last_fan_inputs
        if fan is None or any(t is not None and t.shape[0] != feature_map.shape[0]
                              for t in [fan.heatmaps, *fan.features]):
            raise RuntimeError("FANFace.embed_from_stage needs the FAN outputs of an eval-mode forward of the same "
                               "images first")
        return self.head(self._run_stages(feature_map, stage_index + 1, fan)[-1])
