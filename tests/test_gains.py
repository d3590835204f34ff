"""Scaled and gated, partial-channel and nested residuals (issue 14).

Hand-written blocks in the shapes real code uses (timm's NF-net block with its
alpha / beta gains and skip-init ``mul_``, skip-init gains, GRN inside a
ConvNeXt-V2 MLP, ReXNet's partial-channel shortcut, Res2Net's hierarchical adds,
a global residual around a chain), then the timm models at a small size.

Every conversion goes through the adversarial suite's checks
(``adversarial.checks.run_subject``): float64 gradients vs ``reference_mode()``
and vs central differences, coupling inverses, gradient support, the original
unchanged, and the exact original function where nothing converts.
"""

from __future__ import annotations

import pytest
import torch
from adversarial.checks import Subject, run_subject
from timm.layers import SEModule
from timm.models.nfnet import NormFreeBlock
from torch import nn

import revcompile
from revcompile.conversion_report import KeptReason

C = 8
X = torch.randn(2, C, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _checked(build, x: torch.Tensor = X, **options) -> revcompile.ConversionReport:
    """Convert ``build()`` with ``options``; every adversarial check passes; the report."""
    subject = Subject("gains", lambda: build().double(), (x,), options=options)
    outcome = run_subject(subject)
    assert outcome.status == "converted", outcome.message
    assert not outcome.defects, "\n".join(map(str, outcome.defects))
    return revcompile.report(revcompile.convert(build().double(), x, **options))


def _fates(report: revcompile.ConversionReport) -> list[tuple[str, str | None]]:
    return [(b.fate, b.code) for b in report.blocks]


def _chain(block, n: int = 4):
    return lambda: nn.Sequential(*(block() for _ in range(n)))


# ----------------------------------------------------------------- scaled and gated


class NFBlock(nn.Module):
    """timm's NormFreeBlock, written out: ``shortcut + alpha * f(act(x) * beta)``, the
    skip-init gain applied in place (``out.mul_(gain)``)."""

    def __init__(self, alpha: float = 0.2, beta: float = 1.3, gain: float = 0.0) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.act1, self.act2 = nn.GELU(), nn.GELU()
        self.conv1 = nn.Conv2d(C, 2 * C, 1)
        self.conv2 = nn.Conv2d(2 * C, C, 3, padding=1)
        self.skipinit_gain = nn.Parameter(torch.tensor(gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = x
        out = self.conv2(self.act2(self.conv1(out)))
        out.mul_(self.skipinit_gain)
        return out * self.alpha + shortcut


class SkipInit(nn.Module):
    """``x + self.gain * f(x)``: a scalar Parameter gain (SkipInit / ReZero), possibly 0."""

    def __init__(self, gain: float = 0.0) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.Tanh(), nn.Conv2d(C, C, 1))
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * self.f(x)


class ScaledShortcut(nn.Module):
    """``x * c + f(x)``: the shortcut scaled by a constant or a parameter (DeepNet-style)."""

    def __init__(self, parameter: bool) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.Tanh(), nn.Conv2d(C, C, 1))
        self.c = nn.Parameter(torch.tensor(0.7)) if parameter else 0.7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.c + self.f(x)


def _timm_nf_block(**kwargs) -> nn.Module:
    return NormFreeBlock(C, C, alpha=0.2, beta=1.1, bottle_ratio=1.0, act_layer=nn.SiLU, **kwargs)


@pytest.mark.parametrize("gain", [0.0, 0.6])
@pytest.mark.parametrize("split", ["halve", "auto"])
def test_nf_style_gains_convert_with_the_scales_in_the_branch(gain: float, split: str) -> None:
    report = _checked(_chain(lambda: NFBlock(gain=gain)), split=split)
    assert _fates(report) == [("F", None), ("G", None)] * 2


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"skipinit": True}, {"attn_layer": SEModule}],
    ids=["plain", "skipinit", "se"],
)
def test_timm_normfree_blocks_are_traced_through_and_convert(kwargs: dict) -> None:
    """timm lists NormFreeBlock as not traceable because fx drops its ``out.mul_``;
    revcompile keeps in-place statements, so the block is traced and converts."""
    report = _checked(_chain(lambda: _timm_nf_block(**kwargs)), split="auto")
    assert _fates(report) == [("F", None), ("G", None)] * 2


@pytest.mark.parametrize("gain", [0.0, 0.6])
def test_skip_init_gain_converts(gain: float) -> None:
    report = _checked(_chain(lambda: SkipInit(gain)))
    assert _fates(report) == [("F", None), ("G", None)] * 2


@pytest.mark.parametrize("parameter", [False, True], ids=["constant", "parameter"])
def test_scaled_shortcut_is_kept_with_its_reason(parameter: bool) -> None:
    """An additive coupling cannot scale its trunk: ``x * c + f(x)`` stays as it is
    (the adversarial checks include the exact original function)."""
    report = _checked(_chain(lambda: ScaledShortcut(parameter)))
    assert _fates(report) == [("kept", KeptReason.SCALED_SHORTCUT.value)] * 4
    assert all("scales its shortcut" in (b.detail or "") for b in report.blocks)


# ----------------------------------------------------------------- partial channels


class ReXNetBlock(nn.Module):
    """timm's ReXNet block (``LinearBottleneck``): expand, depthwise, project to a wider
    output; the shortcut is added to its first ``C`` channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        mid = 2 * in_channels
        self.conv_exp = nn.Sequential(nn.Conv2d(in_channels, mid, 1), nn.SiLU())
        self.conv_dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.act_dw = nn.ReLU6()
        self.conv_pwl = nn.Sequential(nn.Conv2d(mid, out_channels, 1), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_pwl(self.act_dw(self.conv_dw(self.conv_exp(x))))
        return torch.cat([x[:, 0 : self.in_channels] + shortcut, x[:, self.in_channels :]], dim=1)


def test_partial_channel_residuals_are_kept_with_their_reason() -> None:
    """The model comes back computing the original function (no stage), and the
    report says why each block is kept."""
    report = _checked(lambda: nn.Sequential(ReXNetBlock(C, C + 4), ReXNetBlock(C + 4, C + 6)))
    assert _fates(report) == [("kept", KeptReason.PARTIAL_CHANNELS.value)] * 2
    assert "bypass the add" in report.blocks[0].detail
