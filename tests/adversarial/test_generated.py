"""The adversarial property test and a table of hand-written real-world residual patterns.

Each network is converted and every check of ``checks.py`` runs on it; any defect fails the
test with the check's message and the model. Examples per property come from the hypothesis
profile (``REVCOMPILE_HYPOTHESIS_PROFILE=adversarial-long`` for the long run, or use
``run_long.py``); the op families come from ``REVCOMPILE_ADV_FAMILIES`` /
``REVCOMPILE_ADV_EXCLUDE`` (see ``generator.py``). Shrinking is off: a converted network
runs in about a second, and a failure prints its whole model.
"""

from __future__ import annotations

import checks
import generator
import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from torch import nn

NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def _assert_no_defects(outcome: checks.Outcome) -> None:
    assert outcome.status != "invalid", outcome.message
    assert not outcome.defects, "\n".join(map(str, outcome.defects))


@settings(phases=NO_SHRINK)
@given(generator.networks(max_blocks=4))
def test_generated_network(spec):
    _assert_no_defects(checks.run_subject(generator.subject(spec)))


# --------------------------------------------------------------------------- real-world table


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class ConvNeXtBlock(nn.Module):
    """timm ConvNeXt: dw 7x7, channels-last LayerNorm, MLP, layer scale, drop path."""

    def __init__(self, c: int) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.drop_path = DropPath(0.1)

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.gamma * self.fc2(F.gelu(self.fc1(h)))
        return x + self.drop_path(h.permute(0, 3, 1, 2))


class ViTBlock(nn.Module):
    """timm ViT block on tokens: pre-norm attention and MLP, layer scale, two residuals."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.ls1 = nn.Parameter(torch.full((c,), 0.3))
        self.ls2 = nn.Parameter(torch.full((c,), 0.3))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.ls1 * self.attn(h, h, h, need_weights=False)[0]
        return x + self.ls2 * self.mlp(self.norm2(x))


class ResNetDBlock(nn.Module):
    """ResNet-D: avg-pool + 1x1 conv projection; identity blocks otherwise."""

    def __init__(self, cin: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, 1, 1, bias=False), _bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, stride, 1, bias=False), _bn(c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != c:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(cin, c, 1, bias=False),
                _bn(c),
            )

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)


class WRNBlock(nn.Module):
    """Pre-activation wide-ResNet block with dropout between the convs (F.dropout style)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = _bn(c), nn.Conv2d(c, c, 3, 1, 1)
        self.bn2, self.conv2 = _bn(c), nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = F.dropout(out, p=0.3, training=self.training)
        return self.conv2(F.relu(self.bn2(out))) + x


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3, project 1x1 (linear bottleneck), ReLU6."""

    def __init__(self, c: int) -> None:
        super().__init__()
        e = 3 * c
        self.conv = nn.Sequential(
            nn.Conv2d(c, e, 1, bias=False), _bn(e), nn.ReLU6(inplace=True),
            nn.Conv2d(e, e, 3, 1, 1, groups=e, bias=False), _bn(e), nn.ReLU6(inplace=True),
            nn.Conv2d(e, c, 1, bias=False), _bn(c),
        )  # fmt: skip

    def forward(self, x):
        return x + self.conv(x)


class Res2NetBlock(nn.Module):
    """Res2Net-like: split into scales, each conv sees the previous scale's output, cat."""

    def __init__(self, c: int, scales: int = 4) -> None:
        super().__init__()
        w = c // scales
        self.scales = scales
        self.convs = nn.ModuleList(nn.Conv2d(w, w, 3, 1, 1) for _ in range(scales - 1))
        self.bns = nn.ModuleList(_bn(w) for _ in range(scales - 1))
        self.fuse, self.bn = nn.Conv2d(c, c, 1, bias=False), _bn(c)

    def forward(self, x):
        parts = torch.chunk(x, self.scales, dim=1)
        outs, prev = [parts[0]], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            inp = parts[i + 1] if prev is None else parts[i + 1] + prev
            prev = F.relu(bn(conv(inp)))
            outs.append(prev)
        return F.relu(x + self.bn(self.fuse(torch.cat(outs, dim=1))))


class Net(nn.Module):
    """stem -> blocks -> optional head, the frame around every pattern."""

    def __init__(
        self, blocks: list[nn.Module], c: int, tokens: bool = False, out: int | None = None
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(out or c, 4)

    def forward(self, x):
        h = self.stem(x)
        if self.tokens:
            h = self.blocks(h.flatten(2).transpose(1, 2)).mean(1)
        else:
            h = self.blocks(h).mean((2, 3))
        return self.head(h)


class UnusedAux(Net):
    """A model with an auxiliary head that forward does not call (common in checkpoints)."""

    def __init__(self, c: int) -> None:
        super().__init__([ResNetDBlock(c, c, 1) for _ in range(2)], c)
        self.aux = nn.Linear(c, 4)


PATTERNS = {
    "convnext": lambda: Net([ConvNeXtBlock(8) for _ in range(4)], 8),
    "vit": lambda: Net([ViTBlock(8) for _ in range(2)], 8, tokens=True),
    "resnet_d": lambda: Net([ResNetDBlock(8, 8, 1), ResNetDBlock(8, 16, 2),
                             ResNetDBlock(16, 16, 1), ResNetDBlock(16, 16, 1)], 8, out=16),
    "wrn_preact_dropout": lambda: Net([WRNBlock(8) for _ in range(4)], 8),
    "mobilenet_v2": lambda: Net([InvertedResidual(8) for _ in range(4)], 8),
    "res2net": lambda: Net([Res2NetBlock(8) for _ in range(2)], 8),
    "unused_aux_head": lambda: UnusedAux(8),
}  # fmt: skip

OPTIONS = {
    "default": {},
    "store_half": {"policy": "store", "leftover": "half"},
    "duplicate": {"split": "duplicate"},
    "auto": {"split": "auto"},
}


def _pattern_subject(name: str, options: dict) -> checks.Subject:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return PATTERNS[name]().double().train()

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return checks.Subject(f"{name} pattern, convert(**{options})", build, (x,), options=options)


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_real_world_pattern(name, options):
    _assert_no_defects(checks.run_subject(_pattern_subject(name, OPTIONS[options])))
