"""Models written in the test suite: CIFAR ResNets, residual spellings, negative cases.

CIFAR ResNets (He et al. 2016, section 4.2): three stages of widths 16/32/64,
n blocks each, depth 6n + 2 (basic) or 9n + 2 (bottleneck). Option A
shortcuts subsample and zero-pad (no parameters); option B shortcuts are 1x1
conv + BatchNorm projections. Every model here is small enough to run on CPU.

This module imports only torch: it is the one home of these building blocks,
and the benchmarks build their CIFAR ResNets from them (``tests.models``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_INPUT = (2, 3, 32, 32)


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


def residual_function(in_planes: int, planes: int, stride: int = 1) -> nn.Sequential:
    """conv3x3-bn-relu-conv3x3-bn: the residual function of a basic block."""
    return nn.Sequential(
        conv3x3(in_planes, planes, stride),
        nn.BatchNorm2d(planes),
        nn.ReLU(inplace=True),
        conv3x3(planes, planes),
        nn.BatchNorm2d(planes),
    )


def _projection(in_planes: int, planes: int, stride: int, option: str) -> nn.Module:
    if option == "A":
        return ZeroPadShortcut(planes - in_planes)
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
    )


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, ``out += shortcut``, relu."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A") -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = (
            _projection(in_planes, planes, stride, option)
            if stride != 1 or in_planes != planes
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), ``out = out + shortcut``, relu."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "B") -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            _projection(in_planes, width, stride, option)
            if stride != 1 or in_planes != width
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class PreActBlock(nn.Module):
    """Pre-activation (He et al. 2016b): bn-relu-conv-bn-relu-conv, no post-op;
    a projection reads the pre-activated input."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "B") -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.projection = (
            _projection(in_planes, planes, stride, option)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.projection(out) if self.projection is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``blocks_per_stage`` blocks in each of three stages."""

    def __init__(self, block: type[nn.Module], blocks_per_stage: int, option: str) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(block(in_planes, planes, stride if index == 0 else 1, option))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, option: str = "A") -> CifarResNet:
    """ResNet-20/32/44/56/110 (basic blocks, depth = 6n + 2)."""
    return CifarResNet(BasicBlock, (depth - 2) // 6, option)


def cifar_resnet164() -> CifarResNet:
    """ResNet-164: bottleneck blocks, 18 per stage, projection shortcuts."""
    return CifarResNet(Bottleneck, 18, "B")


def preact_resnet(depth: int = 20) -> CifarResNet:
    """Pre-activation CIFAR ResNet (basic pre-activation blocks)."""
    return CifarResNet(PreActBlock, (depth - 2) // 6, "B")


# --- residual spellings -------------------------------------------------------


def _branch(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


class _Stem(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)


class AddAssignNet(_Stem):
    """``x = x + self.blockN(x)`` at the top level: blocks ``block1``, ``block2``."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__(channels)
        self.block1 = _branch(channels)
        self.block2 = _branch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block1(x)
        x = x + self.block2(x)
        return x


class TorchAddBlock(nn.Module):
    """``torch.add(self.f(x), x)``: branch first, shortcut second."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = _branch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.f(x), x)


class MethodAddBlock(nn.Module):
    """``x.add(self.f(x))`` followed by a ReLU method (the post-op)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = _branch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add(self.f(x)).relu()


class InplaceMethodAddBlock(nn.Module):
    """``out = self.f(x); out = out.add_(x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = _branch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.f(x)
        out = out.add_(x)
        return out


class LayerScaleBlock(nn.Module):
    """``x + self.gamma * self.f(x)``: a parameter inside the branch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = _branch(channels)
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.f(x)


class Wrapper(nn.Module):
    """A container that only forwards to its child (adds a nesting level)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class SpellingsNet(_Stem):
    """Identity blocks in several spellings, nested in containers:
    ``stages.0.0`` (torch.add), ``stages.0.1.inner`` (method add + relu),
    ``stages.1.0`` (in-place method add), ``stages.1.1`` (layer scale)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__(channels)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(TorchAddBlock(channels), Wrapper(MethodAddBlock(channels))),
                nn.Sequential(InplaceMethodAddBlock(channels), LayerScaleBlock(channels)),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


class NestedResidualNet(_Stem):
    """An outer residual block whose branch holds two inner identity blocks."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__(channels)
        self.outer = nn.Sequential(TorchAddBlock(channels), TorchAddBlock(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + self.outer(x)


# --- negative cases -------------------------------------------------------------


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), nn.BatchNorm2d(out_ch), nn.ReLU()
    )


class InceptionAddNet(_Stem):
    """Two parallel nonlinear branches summed: not a residual block."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__(channels)
        self.branch1 = _conv_bn_relu(channels, channels, 1)
        self.branch3 = nn.Sequential(
            _conv_bn_relu(channels, channels), _conv_bn_relu(channels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.branch1(x) + self.branch3(x)


class SqueezeAdd(nn.Module):
    """``x + se(x)`` with se(x) of shape (B, C, 1, 1): a broadcasting add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // 2, 1),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se(x)


class BroadcastAddNet(_Stem):
    """Two consecutive broadcasting adds: look like a chain, never paired."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__(channels)
        self.se1 = SqueezeAdd(channels)
        self.se2 = SqueezeAdd(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se2(self.se1(self.stem(x)))


class TappedBlock(nn.Module):
    """A residual block that also returns an inner activation (a feature tap)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.relu(self.conv1(x))
        return x + self.conv2(hidden), hidden


class FeatureTapNet(_Stem):
    """``block1`` is tapped (its hidden activation feeds an auxiliary head);
    ``block2`` is a clean identity block."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__(channels)
        self.block1 = TappedBlock(channels)
        self.block2 = TorchAddBlock(channels)
        self.aux_head = nn.Conv2d(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, hidden = self.block1(self.stem(x))
        return self.block2(out), self.aux_head(hidden)


class ConstantAddNet(_Stem):
    """``x + 1.0`` and ``x + self.bias``: adds of a constant."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__(channels)
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) + 1.0
        return x + self.bias


class PlainNet(nn.Module):
    """No residual connections at all."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn_relu(3, 8), _conv_bn_relu(8, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class DataDependentNet(nn.Module):
    """Python control flow on tensor values: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if out.sum() > 0:
            out = out + x.mean()
        return out


class BufferCounter(nn.Module):
    """Counts its calls in a buffer written in place by ``forward`` (module state fx must keep)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return self.conv(x)
