"""CIFAR ResNet building blocks (He et al. 2016, section 4.2), shared by the
benchmarks and the test suite.

Three stages of widths 16/32/64 with ``n`` basic blocks each (depth 6n + 2);
option-A shortcuts subsample and zero-pad the new channels (no parameters).
Only torch is imported here, so the tests can use these pieces without the
benchmark machinery of :mod:`benchmarks._common`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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


class BasicBlock(nn.Module):
    """``relu(F(x) + shortcut(x))`` with F = :func:`residual_function`."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.branch = residual_function(in_planes, planes, stride)
        self.shortcut = (
            ZeroPadShortcut(planes - in_planes)
            if stride != 1 or in_planes != planes
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


CIFAR_WIDTHS = ((16, 1), (32, 2), (64, 2))


class CifarResNet(nn.Module):
    """CIFAR ResNet, three stages of ``n`` basic blocks (widths 16/32/64).

    Attribute names follow torchvision's ResNet (``conv1``, ``bn1``, ``relu``,
    ``layer1``..., ``avgpool``, ``fc``) so that the same wrappers apply to both.
    ``stage_factory(in_planes, planes, stride, n)`` builds one stage; the
    default is ``n`` :class:`BasicBlock` (the original ResNet).
    """

    def __init__(
        self,
        n: int,
        stage_factory: Callable[[int, int, int, int], nn.Module] | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        factory = stage_factory or plain_stage
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for index, (planes, stride) in enumerate(CIFAR_WIDTHS, start=1):
            setattr(self, f"layer{index}", factory(in_planes, planes, stride, n))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def plain_stage(in_planes: int, planes: int, stride: int, n: int) -> nn.Sequential:
    blocks = [BasicBlock(in_planes, planes, stride)]
    blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
    return nn.Sequential(*blocks)
