"""FAN, the face alignment network (Bulat & Tzimiropoulos, ICCV 2017), as released in face-alignment.

A stacked hourglass that regresses one heatmap per landmark at a quarter of its input resolution. FAN-Face
(thesis ch. 3) freezes one and feeds its heatmaps and hourglass features into the recognition network.
Parameter names and shapes are face-alignment's ``FAN`` (``face_alignment/models.py``), so its released
2DFAN4 state dict (4 stacks, 68 landmarks, width 256) loads into ``FAN(stacks=4)`` unchanged:

- stem: ``conv1`` (7×7, stride 2, width/4 channels, with bias) → ``bn1`` → ReLU → ``conv2`` (ConvBlock to
  width/2) → 2×2 max pool → ``conv3`` (ConvBlock) → ``conv4`` (ConvBlock to ``width``): S → S/4;
- per stack i: hourglass ``m{i}`` (depth 4), ``top_m_{i}`` (ConvBlock), ``conv_last{i}`` (1×1) → ``bn_end{i}``
  → ReLU → ``l{i}`` (1×1 to the heatmaps); between stacks ``bl{i}`` (1×1 of the features) and ``al{i}`` (1×1
  of the heatmaps) are added to the stack's input (intermediate supervision, Newell et al. 2016).

The hourglass pools with 2×2 max pooling, as the ``models.py`` released with the ``.pth.tar`` weights this loads
(face-alignment's later ``models/fan.py`` pools by averaging and its later models are TorchScript archives, not
state dicts: they are not read here). ``width`` scales the whole network (256 in the release; the stem keeps its 1/4 and 1/2 ratios), so
a small FAN can be trained on a CPU.

Coordinates: a landmark at (x, y) in heatmap pixels has pixel centres at integers (pixel (0, 0) spans
[-0.5, 0.5)²). face-alignment's ``get_preds_fromhm`` returns the same points + 0.5 (its pixel i spans
[i, i + 1)). :func:`image_to_heatmap` and :func:`heatmap_to_image` convert to and from input-image pixels of
the same convention.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facekd.errors import CheckpointError

__all__ = [
    "FAN", "FANOutput", "ConvBlock", "HourGlass", "HEATMAP_STRIDE", "fan_config", "heatmap_argmax",
    "heatmap_to_image", "image_to_heatmap", "load_fan", "render_heatmaps",
]

# The stem's stride-2 conv and max pool: heatmaps are at 1/4 of the input resolution.
HEATMAP_STRIDE = 4


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN's residual unit (Bulat & Tzimiropoulos 2017, Fig. 2 — their hierarchical, parallel, multi-scale block).

    Three pre-activated 3×3 convs (BN → ReLU → conv) in a chain of out/2, out/4 and out/4 channels whose three
    outputs are concatenated (out channels) and added to the shortcut; the shortcut is BN → ReLU → 1×1 conv
    (``downsample``) when the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"a FAN ConvBlock needs out_channels divisible by 4, got {out_channels}")
        half, quarter = out_channels // 2, out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = _conv3x3(half, quarter)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = _conv3x3(quarter, quarter)
        self.downsample: nn.Module | None = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.cat((out1, out2, out3), dim=1) + shortcut


class HourGlass(nn.Module):
    """One hourglass of ``depth`` levels, face-alignment's module names: level L (``depth`` … 1) has ``b1_L``
    (the skip branch at its input resolution), ``b2_L`` (after a 2×2 max pool), then level L-1 — or, at the
    bottom, ``b2_plus_1`` — then ``b3_L``, nearest-neighbour up-sampled and added to the skip branch.

    :meth:`forward` also returns both halves of the hourglass, highest resolution first, entry k at 1/2^k of
    the input's size (k = 0 … depth-1): ``h2l`` (high-to-low) = [the input, then ``low1`` = ``b2_L``'s output
    of levels depth … 2], ``l2h`` (low-to-high) = [the output of levels depth … 1].
    """

    def __init__(self, *, depth: int, width: int) -> None:
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(width, width))
            self.add_module(f"b2_{level}", ConvBlock(width, width))
            if level == 1:
                self.add_module("b2_plus_1", ConvBlock(width, width))
            self.add_module(f"b3_{level}", ConvBlock(width, width))

    def _level(self, level: int, x: Tensor, h2l: list[Tensor], l2h: list[Tensor]) -> Tensor:
        up = self._modules[f"b1_{level}"](x)
        low1 = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        if level > 1:
            h2l.append(low1)
            low2 = self._level(level - 1, low1, h2l, l2h)
        else:
            low2 = self._modules["b2_plus_1"](low1)
        out = up + F.interpolate(self._modules[f"b3_{level}"](low2), scale_factor=2, mode="nearest")
        l2h.append(out)
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(output, h2l, l2h) of ``x`` ``[B, width, s, s]``; every entry of h2l and l2h is ``[B, width, ., .]``."""
        h2l: list[Tensor] = [x]
        l2h: list[Tensor] = []
        out = self._level(self.depth, x, h2l, l2h)
        l2h.reverse()  # the recursion finishes the deepest level first
        return out, h2l, l2h


@dataclass
class FANOutput:
    """What :meth:`FAN.forward` returns, one entry per stack run (stack 0 first).

    ``heatmaps[i]``: ``[B, landmarks, S/4, S/4]``. ``h2l[i]`` / ``l2h[i]``: hourglass i's high-to-low and
    low-to-high features (see :class:`HourGlass`), ``depth`` maps each, highest resolution first: S/4, S/8,
    S/16, S/32 for depth 4, each ``[B, width, ., .]``.
    """

    heatmaps: list[Tensor]
    h2l: list[list[Tensor]]
    l2h: list[list[Tensor]]


class FAN(nn.Module):
    """Stacked hourglass of face-alignment's FAN (Bulat & Tzimiropoulos 2017), its parameter names and shapes:
    conv1, bn1, conv2, conv3, conv4, then per stack i: m{i} (HourGlass, depth 4, with b1_L, b2_L, b2_plus_L, b3_L),
    top_m_{i}, conv_last{i}, bn_end{i}, l{i} (heatmaps), and for i < stacks-1: bl{i}, al{i}.

    The released 2DFAN4 is ``FAN(landmarks=68, stacks=4, width=256)``; FAN-Face uses the first two stacks.
    """

    def __init__(self, *, landmarks: int = 68, stacks: int = 2, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        if landmarks < 1:
            raise ValueError(f"landmarks must be positive, got {landmarks}")
        if stacks < 1:
            raise ValueError(f"stacks must be positive, got {stacks}")
        if width < 8 or width % 8:
            raise ValueError(f"width must be a positive multiple of 8 (256 in the released FAN), got {width}")
        if depth < 1:
            raise ValueError(f"depth must be positive (4 in the released FAN), got {depth}")
        self.landmarks, self.stacks, self.width, self.depth = landmarks, stacks, width, depth
        # stem: S -> S/4 (the release's 64 -> 128 -> 128 -> 256 channels at width 256)
        self.conv1 = nn.Conv2d(3, width // 4, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(width // 4)
        self.conv2 = ConvBlock(width // 4, width // 2)
        self.conv3 = ConvBlock(width // 2, width // 2)
        self.conv4 = ConvBlock(width // 2, width)
        for i in range(stacks):
            self.add_module(f"m{i}", HourGlass(depth=depth, width=width))
            self.add_module(f"top_m_{i}", ConvBlock(width, width))
            self.add_module(f"conv_last{i}", nn.Conv2d(width, width, kernel_size=1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(width))
            self.add_module(f"l{i}", nn.Conv2d(width, landmarks, kernel_size=1))
            if i < stacks - 1:
                self.add_module(f"bl{i}", nn.Conv2d(width, width, kernel_size=1))
                self.add_module(f"al{i}", nn.Conv2d(landmarks, width, kernel_size=1))

    @property
    def input_multiple(self) -> int:
        """The input side must be a multiple of this: the stem's /4 and ``depth`` poolings of 2."""
        return HEATMAP_STRIDE * 2**self.depth

    def forward(self, x: Tensor, *, stacks: int | None = None) -> FANOutput:
        """x: [B, 3, S, S] RGB in [0, 1] (face-alignment's input: pixels / 255), S divisible by 2**(depth+2)
        (256 for the released 2DFAN4). Runs the first `stacks` hourglasses (all by default)."""
        run = self.stacks if stacks is None else stacks
        if not 1 <= run <= self.stacks:
            raise ValueError(f"stacks must be in [1, {self.stacks}] for this FAN, got {stacks}")
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or x.shape[2] % self.input_multiple:
            raise ValueError(
                f"FAN expects RGB images [B, 3, S, S] with S a multiple of {self.input_multiple}, got {list(x.shape)}"
            )
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2, stride=2)
        previous = self.conv4(self.conv3(x))
        out = FANOutput(heatmaps=[], h2l=[], l2h=[])
        for i in range(run):
            features, h2l, l2h = self._modules[f"m{i}"](previous)
            features = self._modules[f"top_m_{i}"](features)
            features = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](features)))
            heatmaps = self._modules[f"l{i}"](features)
            out.heatmaps.append(heatmaps)
            out.h2l.append(h2l)
            out.l2h.append(l2h)
            if i < run - 1:
                previous = previous + self._modules[f"bl{i}"](features) + self._modules[f"al{i}"](heatmaps)
        return out


def fan_config(state_dict: dict[str, Tensor]) -> dict[str, int]:
    """landmarks, stacks, width and depth of the FAN whose (prefix-free) state dict this is.

    Raises KeyError when ``l0.weight`` or ``m0.b1_*`` keys are missing (not a FAN state dict).
    """
    heads = state_dict["l0.weight"]
    stacks = sum(1 for key in state_dict if re.fullmatch(r"l\d+\.weight", key))
    depth = sum(1 for key in state_dict if re.fullmatch(r"m0\.b1_\d+\.bn1\.weight", key))
    if depth == 0:
        raise KeyError("m0.b1_1.bn1.weight")
    return {"landmarks": int(heads.shape[0]), "stacks": stacks, "width": int(heads.shape[1]), "depth": depth}


def _state_dict_of(value: Any) -> dict[str, Tensor] | None:
    """The FAN state dict inside what a file or checkpoint holds, or None."""
    if isinstance(value, dict) and isinstance(value.get("state_dict"), dict):
        value = value["state_dict"]  # a training checkpoint (face-alignment's training code, ours with "fan")
    elif isinstance(value, dict) and isinstance(value.get("model"), dict) and "fan" in value:
        value = value["model"]  # facekd's landmark trainer
    if not isinstance(value, dict) or not all(isinstance(v, Tensor) for v in value.values()):
        return None
    # nn.DataParallel's prefix, present in face-alignment's training checkpoints
    return {key.removeprefix("module."): tensor for key, tensor in value.items()}


def load_fan(path: str | Path, map_location: str | torch.device = "cpu") -> FAN:
    """A facekd FAN checkpoint (from the landmark trainer) or face-alignment's released FAN state dict
    (2DFAN4 .pth / .pth.tar with 'state_dict'), read with torch.load(weights_only=True); landmarks, stacks and width
    inferred from the keys. One-line error for anything else.

    ``path`` is a file, a checkpoint folder (``step_*``), a ``checkpoints/`` folder or a run's output folder
    (its newest checkpoint). The network comes back in eval mode.
    """
    from facekd.distributed.checkpoint import load_checkpoint, read_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"FAN weights {path} do not exist")
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        value = load_checkpoint(folder, map_location)
    else:
        value = read_file(path, map_location)
    state_dict = _state_dict_of(value)
    if state_dict is None:
        raise CheckpointError(
            f"{path} is neither a facekd FAN checkpoint nor face-alignment's FAN state dict (a dict of tensors)"
        )
    try:
        config = fan_config(state_dict)
    except KeyError as missing:
        raise CheckpointError(f"{path} is not a FAN state dict: it has no {missing.args[0]} key") from None
    fan = FAN(**config)
    try:
        fan.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        summary = " ".join(str(error).split())
        raise CheckpointError(f"{path} does not fit FAN({config}): {summary[:400]}") from None
    return fan.eval()


def render_heatmaps(points: Tensor, size: int, sigma: float) -> Tensor:
    """Gaussian heatmaps exp(-‖p - landmark‖² / 2σ²) (peak 1, not truncated) of ``points`` ``[B, N, 2]``
    ((x, y) in heatmap pixels, pixel centres at integers) → ``[B, N, size, size]`` in the points' dtype.

    face-alignment draws the same Gaussian, cut off at 3σ (σ = 1 at 64 px heatmaps in its training)."""
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [B, N, 2] (x, y), got {list(points.shape)}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    grid = torch.arange(size, device=points.device, dtype=points.dtype)
    dx2 = (grid.view(1, 1, 1, size) - points[..., 0, None, None]) ** 2  # [B, N, 1, size]
    dy2 = (grid.view(1, 1, size, 1) - points[..., 1, None, None]) ** 2  # [B, N, size, 1]
    return torch.exp(-(dx2 + dy2) / (2 * sigma**2))


def heatmap_argmax(heatmaps: Tensor) -> Tensor:
    """[B, N, H, W] -> [B, N, 2] (x, y), sub-pixel as face-alignment does (quarter-pixel shift toward the larger
    neighbour).

    face-alignment's ``get_preds_fromhm``: the arg-max pixel, moved by 0.25 in x and in y toward the larger of
    its two neighbours (not on the border row/column); its result is this one + 0.5 (see the module docstring).
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be [B, N, H, W], got {list(heatmaps.shape)}")
    b, n, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, n, h * w)
    index = flat.argmax(dim=-1)
    x, y = index % w, torch.div(index, w, rounding_mode="floor")
    inside = (x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)

    def value(dx: int, dy: int) -> Tensor:
        at = (y + dy).clamp(0, h - 1) * w + (x + dx).clamp(0, w - 1)
        return flat.gather(-1, at.unsqueeze(-1)).squeeze(-1)

    shift_x = torch.sign(value(1, 0) - value(-1, 0)) * 0.25
    shift_y = torch.sign(value(0, 1) - value(0, -1)) * 0.25
    points = torch.stack((x.to(heatmaps.dtype) + shift_x * inside, y.to(heatmaps.dtype) + shift_y * inside), dim=-1)
    return points


def image_to_heatmap(points: Tensor, stride: int = HEATMAP_STRIDE) -> Tensor:
    """Points in input-image pixels → heatmap pixels (both with pixel centres at integers): (p + 0.5)/stride - 0.5."""
    return (points + 0.5) / stride - 0.5


def heatmap_to_image(points: Tensor, stride: int = HEATMAP_STRIDE) -> Tensor:
    """The inverse of :func:`image_to_heatmap`."""
    return (points + 0.5) * stride - 0.5
