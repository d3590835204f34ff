"""The benchmarked CIFAR ResNet (He et al. 2016, section 4.2).

Three stages of widths 16/32/64 with ``n`` basic blocks each (depth 6n + 2);
option-A shortcuts subsample and zero-pad the new channels (no parameters).
The building blocks (``conv3x3``, ``ZeroPadShortcut``, ``residual_function``)
have their one home in the test suite's models (``tests/models.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import ZeroPadShortcut, conv3x3, residual_function


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
    default is ``n`` :class:`BasicBlock` (the original ResNet). ``widths``
    and ``in_channels`` make narrower variants (the fidelity benchmark's
    8/16/32 on 1-channel digits); the defaults are the paper's.
    """

    def __init__(
        self,
        n: int,
        stage_factory: Callable[[int, int, int, int], nn.Module] | None = None,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        factory = stage_factory or plain_stage
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        strides = [stride for _, stride in CIFAR_WIDTHS]
        for index, (planes, stride) in enumerate(zip(widths, strides, strict=True), start=1):
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
