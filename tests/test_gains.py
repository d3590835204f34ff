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

import collections

import pytest
import torch
from adversarial.checks import Subject, run_subject
from equivalence import compare_with_reference
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


def _chain(block, n: int = 2):
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
    assert _fates(report) == [("F", None), ("G", None)]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"skipinit": True}, {"attn_layer": SEModule}],
    ids=["plain", "skipinit", "se"],
)
def test_timm_normfree_blocks_are_traced_through_and_convert(kwargs: dict) -> None:
    """timm lists NormFreeBlock as not traceable because fx drops its ``out.mul_``;
    revcompile keeps in-place statements, so the block is traced and converts."""
    report = _checked(_chain(lambda: _timm_nf_block(**kwargs)), split="auto")
    assert _fates(report) == [("F", None), ("G", None)]


@pytest.mark.parametrize("gain", [0.0, 0.6])
def test_skip_init_gain_converts(gain: float) -> None:
    report = _checked(_chain(lambda: SkipInit(gain)))
    assert _fates(report) == [("F", None), ("G", None)]


@pytest.mark.parametrize("parameter", [False, True], ids=["constant", "parameter"])
def test_scaled_shortcut_is_kept_with_its_reason(parameter: bool) -> None:
    """An additive coupling cannot scale its trunk: ``x * c + f(x)`` stays as it is
    (the adversarial checks include the exact original function)."""
    report = _checked(_chain(lambda: ScaledShortcut(parameter)))
    assert _fates(report) == [("kept", KeptReason.SCALED_SHORTCUT.value)] * 2
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


# ----------------------------------------------------------------- nested residuals


class GRN(nn.Module):
    """timm's GlobalResponseNorm (channels last): ``x + (gamma * (x * N(x)) + beta)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.ones(dim))
        self.bias = nn.Parameter(0.05 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + 1e-6)
        shape = (1, 1, 1, -1)
        return x + torch.addcmul(self.bias.view(shape), self.weight.view(shape), x * x_n)


class ConvNeXtV2Block(nn.Module):
    """timm's ConvNeXt-V2 block: depthwise conv, channels-last LayerNorm and an MLP
    with GRN between its two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm = nn.LayerNorm(C)
        self.fc1, self.act, self.grn, self.fc2 = (
            nn.Linear(C, 4 * C),
            nn.GELU(),
            GRN(4 * C),
            nn.Linear(4 * C, C),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        x = self.fc2(self.grn(self.act(self.fc1(x))))
        return x.permute(0, 3, 1, 2) + shortcut


class Res2NetBlock(nn.Module):
    """timm's Bottle2neck (identity shortcut): the hierarchical adds
    ``sp = sp + spx[i]`` of its width splits are residual adds inside the branch."""

    def __init__(self, width: int = 4, scale: int = 4) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Sequential(nn.Conv2d(C, width * scale, 1), nn.BatchNorm2d(width * scale))
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.conv3 = nn.Sequential(nn.Conv2d(width * scale, C, 1), nn.BatchNorm2d(C))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        spx = torch.split(self.relu(self.conv1(x)), self.width, 1)
        spo = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = self.relu(bn(conv(sp)))
            spo.append(sp)
        spo.append(spx[-1])
        return self.relu(self.conv3(torch.cat(spo, 1)) + shortcut)


class GlobalResidual(nn.Module):
    """EDSR's body: ``x + conv(chain(x))`` around a chain of identity blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*(SkipInit(0.5) for _ in range(4)), nn.Conv2d(C, C, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


INSIDE = ("kept", KeptReason.INSIDE_BLOCK.value)


def test_grn_inside_the_mlp_does_not_keep_the_convnext_v2_blocks() -> None:
    """GRN's residual add is part of the block's branch: the blocks convert
    (duplicated: GRN's norm does not halve), GRN is kept inside them."""
    report = _checked(_chain(ConvNeXtV2Block), split="auto")
    assert _fates(report) == [INSIDE, ("F", None), INSIDE, ("G", None)]
    assert [b.detail for b in report.blocks if b.fate == "kept"] == [
        "part of the branch of 0",
        "part of the branch of 1",
    ]


def test_res2net_hierarchical_adds_do_not_keep_the_bottleneck() -> None:
    report = _checked(_chain(Res2NetBlock), split="auto")
    assert _fates(report) == [*[INSIDE] * 2, ("F", None), *[INSIDE] * 2, ("G", None)]


def test_a_chain_inside_a_lone_residual_converts_instead() -> None:
    """The global residual has no partner: its chain of four blocks converts."""
    report = _checked(GlobalResidual)
    assert _fates(report) == [("F", None), ("G", None)] * 2 + [("kept", "nested")]


# ----------------------------------------------------------------- timm models


def _timm_report(
    name: str, split: str
) -> tuple[nn.Module, torch.Tensor, revcompile.ConversionReport]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gm = revcompile.convert(model, x, split=split)
    return gm, x, revcompile.report(gm)


def _codes(report: revcompile.ConversionReport) -> collections.Counter:
    return collections.Counter(b.code if b.fate == "kept" else "reversible" for b in report.blocks)


TIMM_MODELS = {
    # NF-nets: NormFreeBlock is traced (its alpha/beta gains and skip-init stay in the
    # branch); nf_resnet26's stages of two leave one odd block each after the downsampling
    # one: a half-coupling (the default leftover="half")
    "nf_resnet26": {"projection": 4, "reversible": 4},
    "nfnet_l0": {"projection": 4, "reversible": 8},
    "rexnet_100": {"partial_channels": 11},
    # GRN's add is part of each block's branch (was: every block kept as nested)
    "convnextv2_atto": {"reversible": 12, "inside_block": 12},
    # the hierarchical adds are part of each bottleneck's branch (was: nested)
    "res2net50_14w_8s": {"projection": 4, "reversible": 12, "inside_block": 72},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_blocks_and_float64_gradients(name: str) -> None:
    """``split="auto"``: the blocks' fates, and the converted network's float64
    training step equals its own ``reference_mode()`` step."""
    gm, x, report = _timm_report(name, "auto")
    assert _codes(report) == TIMM_MODELS[name]
    compare_with_reference(gm, x, rtol=1e-9)
