"""Dynamically routed IResNets of CondFace (thesis ch. 5): DC-IResNet and DGConv-IResNet.

A dynamic group convolution (thesis Eq. 5.3) splits its input channels into m groups and gives
each group n expert kernels; a per-sample routing vector α^k ∈ Δ^n per group mixes them,
W^k = Σ_e α^k_e · W^k_e, and the m group outputs are concatenated. m = 1 is dynamic convolution
(Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020, thesis Eq. 5.2;
"DyConv" below). The routing is the thesis' "voted weight generator" f: AVG → FC → BN → ReLU → FC
→ softmax (Sec. 5.2.1), a softmax over the n experts of each group with DyConv's temperature.

The thesis' two routed networks (Sec. 5.4, "DC" and "AS4"):

- ``dc_iresnet18``: every 3×3 convolution of IR-18's last three stages is a dynamic convolution with
  n = 4 experts; the two convolutions of a residual unit share one routing vector, "6 group routing
  weights in total after sharing the routing weight in a block" (24 routing dimensions);
- ``dgconv_iresnet18``: the same positions with m = 4 groups of n = 4 experts, each convolution
  producing twice its output channels, squeezed back by a 1×1 convolution (96 routing dimensions).

After a forward, :meth:`RoutedIResNet.routing_vector` is the concatenated routing β = [α_1 … α_K]
(thesis Sec. 5.2.2) that the clustering loss reads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facekd.kernels import dyn_group_conv2d
from facekd.models.iresnet import IBasicBlock, IResNet, shortcut

# DyConv Sec. 3.2, "temperature annealing": τ falls linearly from 30 to 1 over the first 10 epochs.
TEMPERATURE_START = 30.0
TEMPERATURE_END = 1.0
TEMPERATURE_EPOCHS = 10

# DyConv Sec. 3.2: "the first fully connected layer reduces the dimension by 4".
ROUTING_REDUCTION = 4


def routing_temperature(
    step: int,
    steps_per_epoch: int,
    *,
    start: float = TEMPERATURE_START,
    end: float = TEMPERATURE_END,
    epochs: float = TEMPERATURE_EPOCHS,
) -> float:
    """Softmax temperature of the routing at optimiser ``step`` (0-based): ``start`` at step 0, linear to
    ``end`` at ``epochs`` epochs of ``steps_per_epoch`` steps, ``end`` from there on (DyConv Sec. 3.2)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    progress = min(step / (epochs * steps_per_epoch), 1.0)
    return start + (end - start) * progress


class Routing(nn.Module):
    """The routing weights α [B, m, n] of a dynamic (group) convolution from its input [B, C, H, W].

    Thesis Sec. 5.2.1: global average pool → FC → BN → ReLU → FC → softmax, the softmax over the n
    experts of each of the m groups, of the logits divided by the temperature (a buffer the trainer
    anneals with :func:`routing_temperature`; stored with the weights, so a checkpoint evaluates at the
    temperature it was trained at). Computed in fp32 whatever the autocast dtype.
    """

    def __init__(self, in_channels: int, groups: int, experts: int) -> None:
        super().__init__()
        hidden = max(in_channels // ROUTING_REDUCTION, 1)
        self.groups = groups
        self.experts = experts
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)  # its BN supplies the shift
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, groups * experts)
        self.register_buffer("temperature", torch.tensor(TEMPERATURE_START))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            pooled = x.float().mean(dim=(2, 3))
            logits = self.fc2(F.relu(self.bn(self.fc1(pooled))))
            logits = logits.view(-1, self.groups, self.experts)
            return torch.softmax(logits / self.temperature, dim=-1)


class DynamicGroupConv2d(nn.Module):
    """A k×k dynamic group convolution (thesis Eq. 5.3) of routing weights given by the caller.

    Holds ``experts`` [m, n, expansion·Cout/m, Cin/m, k, k] and calls :func:`facekd.kernels.dyn_group_conv2d`.
    With ``expansion`` > 1 the convolution produces expansion·Cout channels and a static 1×1 convolution
    squeezes them back to Cout (thesis AS4, expansion 2), which also mixes the otherwise separate groups.

    Initialisation: neither the thesis nor DyConv states one. Each expert is drawn as facekd's IResNet
    draws the static convolution it replaces (Kaiming normal, fan-out over all output channels, as
    ``init_conv_bn`` does for an ``nn.Conv2d``), so a one-hot routing gives a conventionally initialised conv.
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, experts: int, stride: int = 1,
                 kernel_size: int = 3, expansion: int = 1) -> None:
        super().__init__()
        if groups < 1 or experts < 1 or expansion < 1:
            raise ValueError(f"groups, experts and expansion must be >= 1, got {groups}, {experts}, {expansion}")
        conv_channels = expansion * out_channels
        if in_channels % groups or conv_channels % groups:
            raise ValueError(
                f"input channels ({in_channels}) and convolution output channels ({conv_channels}) must divide "
                f"into {groups} groups"
            )
        self.groups, self.experts, self.stride, self.padding = groups, experts, stride, kernel_size // 2
        shape = (groups, experts, conv_channels // groups, in_channels // groups, kernel_size, kernel_size)
        std = math.sqrt(2.0 / (conv_channels * kernel_size * kernel_size))  # kaiming_normal_, fan_out, relu
        self.experts_weight = nn.Parameter(torch.randn(shape) * std)
        self.squeeze: nn.Module | None = None
        if expansion > 1:
            self.squeeze = nn.Conv2d(conv_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor, routing: Tensor) -> Tensor:
        """``x`` [B, Cin, H, W], ``routing`` [B, m, n] → [B, Cout, Ho, Wo] in x's dtype."""
        out = dyn_group_conv2d(x, self.experts_weight.to(x.dtype), routing.to(x.dtype), stride=self.stride,
                               padding=self.padding)
        return out if self.squeeze is None else self.squeeze(out)


class RoutedBasicBlock(nn.Module):
    """IBasicBlock with both 3×3 convolutions dynamic and one routing vector for the block.

    BN → dconv3x3 → BN → PReLU → dconv3x3(stride) → BN, plus the static shortcut. The routing is computed
    from the first convolution's input and reused by the second (the thesis' DC variant, Sec. 5.4);
    ``last_routing`` [B, m, n] keeps the latest forward's routing, in the autograd graph.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, groups: int, experts: int,
                 expansion: int) -> None:
        super().__init__()
        conv = dict(groups=groups, experts=experts, expansion=expansion)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.routing = Routing(in_channels, groups, experts)
        self.conv1 = DynamicGroupConv2d(in_channels, out_channels, **conv)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = DynamicGroupConv2d(out_channels, out_channels, stride=stride, **conv)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = shortcut(in_channels, out_channels, stride)
        self.last_routing: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.bn1(x)
        routing = self.routing(x)
        self.last_routing = routing
        out = self.conv2(self.prelu(self.bn2(self.conv1(x, routing))), routing)
        return self.bn3(out) + shortcut


class RoutedIResNet(IResNet):
    """IResNet whose units in ``dynamic_stages`` are :class:`RoutedBasicBlock` (the others IBasicBlock).

    Args (beyond :class:`IResNet`'s):
        groups: m, channel groups per dynamic convolution (1: dynamic convolution).
        experts: n, experts per group.
        expansion: output-channel multiplier of each dynamic convolution before its 1×1 squeeze (1: none).
        dynamic_stages: indices of the routed stages; (1, 2, 3) are the last three (thesis Sec. 5.4, from DyConv).
    """

    def __init__(self, depth: int, *, groups: int, experts: int, expansion: int = 1,
                 dynamic_stages: tuple[int, ...] = (1, 2, 3), **iresnet_args) -> None:
        def unit(in_channels: int, out_channels: int, stride: int, stage_index: int) -> nn.Module:
            if stage_index in dynamic_stages:
                return RoutedBasicBlock(in_channels, out_channels, stride, groups=groups, experts=experts,
                                        expansion=expansion)
            return IBasicBlock(in_channels, out_channels, stride)

        super().__init__(depth, unit=unit, **iresnet_args)
        self.groups, self.experts, self.expansion = groups, experts, expansion
        self.routed_blocks = [m for m in self.modules() if isinstance(m, RoutedBasicBlock)]

    @property
    def routing_dim(self) -> int:
        """Length of β: Σ over routed blocks of m·n."""
        return len(self.routed_blocks) * self.groups * self.experts

    def routing_vector(self) -> Tensor:
        """β = [α_1 … α_K] [B, routing_dim] of the latest forward (thesis Sec. 5.2.2), fp32, differentiable."""
        if any(block.last_routing is None for block in self.routed_blocks):
            raise RuntimeError(f"{type(self).__name__}.routing_vector() needs a forward pass first")
        return torch.cat([block.last_routing.flatten(1) for block in self.routed_blocks], dim=1)


def set_routing_temperature(module: nn.Module, temperature: float) -> None:
    """Set the softmax temperature of every :class:`Routing` in ``module`` (no-op for static networks)."""
    for m in module.modules():
        if isinstance(m, Routing):
            m.temperature.fill_(temperature)
