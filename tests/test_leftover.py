"""``leftover="single"``: the odd last block of a chain becomes a coupling of its own.

F and G come from complementary channel slices of the one block's branch: F
reads x2 and writes the first half of the branch output, G reads y1 and writes
the second half; the layers of the inner width are copied for G (not tied to F's: tying them
cost accuracy in benchmarks/leftover.py), so the coupling has the block's
parameters plus one more copy of its inner-width layers. The default stays
the half-coupling (``leftover="half"``): same saved bytes, accuracy within
seed noise, a faster step (README "Odd leftovers").
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
import torch.nn.functional as F
from equivalence import compare_with_reference
from hypothesis import given
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.partition import partition
from revcompile.passes.plan import plan
from revcompile.passes.shape_prop import propagate_shapes
from revcompile.passes.trace import trace
from strategies import GeneratedNet, residual_nets
from torch import nn

import revcompile
from revcompile import analyze, reference_mode
from revcompile.conversion_report import KeptReason
from revcompile.memory import saved_activation_bytes
from revcompile.options import DEFAULT_LEFTOVER
from revcompile.report_builder import count_parameters
from revcompile.runtime import ReversibleSequence

X = (2, 3, 8, 8)


class OddChain(nn.Module):
    """A stem, ``n`` identity blocks (``block``), a head: one chain of ``n`` blocks."""

    def __init__(self, block: type[nn.Module], n: int = 3, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(block(channels) for _ in range(n)))
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.head(out.mean((2, 3)))


def basic(channels: int) -> nn.Module:
    return models.BasicBlock(channels, channels)


def bottleneck(channels: int) -> nn.Module:
    return models.Bottleneck(channels, channels // 4)


def preact(channels: int) -> nn.Module:
    return models.PreActBlock(channels, channels)


class AlphaBlock(nn.Module):
    """``torch.add(x, f(x), alpha=0.5)``: the coupling adds ``0.5 * f``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = models._branch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.f(x), alpha=0.5)


def resnet18_style() -> nn.Module:
    """CIFAR ResNet with two blocks per stage and projection shortcuts: layer1 pairs,
    layer2 and layer3 each have one identity block after their downsampling block."""
    return models.CifarResNet(models.BasicBlock, 2, "B")


def convert64(model: nn.Module, x: torch.Tensor, **options) -> torch.fx.GraphModule:
    return revcompile.convert(model, x.float(), **options).double()


def stages(gm: nn.Module) -> list[ReversibleSequence]:
    return [m for m in gm.modules() if isinstance(m, ReversibleSequence)]


def single_couplings(gm: nn.Module) -> list[nn.Module]:
    """The couplings made from one block (F and G cut from the same branch)."""
    report = revcompile.report(gm)
    single = {b.stage for b in report.blocks if b.fate == "single"}
    return [s.couplings[-1] for s in stages(gm) if s.name in single]


def _directional_fd(module: nn.Module, x: torch.Tensor, seed: int = 3) -> tuple[float, float]:
    """(backward's directional derivative, central finite difference) of a fixed
    weighted sum of ``module``'s outputs, along a random direction in input and
    parameter space. BatchNorm trains with batch statistics, so the function
    does not depend on the running statistics each call updates."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    dirs = [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in params]
    dx = torch.randn(x.shape, dtype=x.dtype, generator=generator)
    norm = (sum((d * d).sum() for d in dirs) + (dx * dx).sum()).sqrt()
    dirs, dx = [d / norm for d in dirs], dx / norm

    xt = x.detach().clone().requires_grad_()
    out = module(xt)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=generator)
    grads = torch.autograd.grad((out * weights).sum(), [xt, *params])
    derivative = float((grads[0] * dx).sum() + sum((g * d).sum() for g, d in zip(grads[1:], dirs)))

    def loss(t: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(t * d)
            value = float((module(x + t * dx) * weights).sum())
            for p, d in zip(params, dirs):
                p.sub_(t * d)
        return value

    h = 1e-5
    return derivative, (loss(h) - loss(-h)) / (2 * h)


@pytest.mark.parametrize(
    "block",
    [basic, bottleneck, preact, AlphaBlock, models.LayerScaleBlock],
    ids=lambda b: b.__name__,
)
def test_odd_chain_is_fully_reversible_and_exact(block) -> None:
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)
    gm = convert64(OddChain(block, channels=16), x, leftover="single")
    report = revcompile.report(gm)
    assert [b.fate for b in report.blocks] == ["F", "G", "single"]
    assert [s.blocks for s in report.stages] == [["blocks.0", "blocks.1", "blocks.2"]]
    (stage,) = stages(gm)
    assert len(stage.couplings) == 2
    compare_with_reference(gm, x, rtol=1e-9)
    derivative, central = _directional_fd(gm, x)
    assert abs(derivative - central) <= 1e-6 * abs(central)


def test_single_coupling_inverts_its_forward() -> None:
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)
    gm = convert64(OddChain(basic, n=1), x, leftover="single").eval()
    (coupling,) = single_couplings(gm)
    x1, x2 = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)
    back = coupling.inverse(*coupling(x1, x2))
    assert torch.allclose(back[0], x1, atol=1e-12) and torch.allclose(back[1], x2, atol=1e-12)


def test_single_slices_the_block_complementarily() -> None:
    """F reads x2 and writes y1's half, G reads y1 and writes y2's half: the two halves
    of each cut layer put together are the block's layer. The inner-width layers
    (here bn1) are copied for G, not tied to F's (benchmarks/leftover.py)."""
    torch.manual_seed(0)
    x = torch.randn(X)
    model = OddChain(basic, n=1)
    gm = revcompile.convert(model, x, leftover="single")
    (coupling,) = single_couplings(gm)
    block = model.blocks[0]
    f, g = coupling.F, coupling.G
    conv1 = torch.cat(
        [g.get_submodule("blocks.0.conv1").weight, f.get_submodule("blocks.0.conv1").weight], 1
    )
    conv2 = torch.cat(
        [f.get_submodule("blocks.0.conv2").weight, g.get_submodule("blocks.0.conv2").weight], 0
    )
    assert torch.equal(conv1, block.conv1.weight) and torch.equal(conv2, block.conv2.weight)
    f_bn1, g_bn1 = f.get_submodule("blocks.0.bn1"), g.get_submodule("blocks.0.bn1")
    assert f_bn1 is not g_bn1 and f_bn1.weight is not g_bn1.weight
    assert torch.equal(f_bn1.weight, block.bn1.weight) and torch.equal(g_bn1.weight, f_bn1.weight)
    inner = sum(p.numel() for p in block.bn1.parameters())
    assert count_parameters(gm) == count_parameters(model) + inner
    report = revcompile.report(gm)
    assert report.params_after == report.params_before + inner
    # state_dict: every tensor of the block once in F and once in G
    keys = [k.split(".", 3)[3] for k in gm.state_dict() if ".blocks.0." in k]
    assert sorted(keys) == sorted(f"{b}.blocks.0.{k}" for k in block.state_dict() for b in "FG")


class SharedInner(OddChain):
    """The head reuses the block's inner BatchNorm: G's own copy would untie it."""

    def __init__(self) -> None:
        super().__init__(basic, n=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks[0].bn1(self.blocks(self.stem(x)))
        return self.head(out.mean((2, 3)))


def test_a_single_block_sharing_an_inner_layer_is_kept() -> None:
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)
    gm = convert64(SharedInner(), x, leftover="single")
    (block,) = revcompile.report(gm).blocks
    assert (block.fate, block.code) == ("kept", KeptReason.SHARES_WEIGHTS.value)
    assert "bn1" in block.detail


def test_single_is_a_function_of_the_sliced_branch() -> None:
    """y1 = x1 + f(x2 -> low half), y2 = x2 + f(y1 -> high half), with f's dropped input
    channels zeroed (eval mode: BatchNorm uses its running statistics)."""
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)
    model = OddChain(basic, n=1).double().eval()
    for bn in (model.blocks[0].bn1, model.blocks[0].bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    gm = revcompile.convert(model, x, leftover="single").eval()
    (coupling,) = single_couplings(gm)
    block = model.blocks[0]

    def branch(v: torch.Tensor) -> torch.Tensor:
        return block.bn2(block.conv2(F.relu(block.bn1(block.conv1(v)))))

    x1, x2 = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)
    zeros = torch.zeros_like(x1)
    y1, y2 = coupling(x1, x2)
    want_y1 = x1 + branch(torch.cat([zeros, x2], 1))[:, :4]
    want_y2 = x2 + branch(torch.cat([want_y1, zeros], 1))[:, 4:]
    assert torch.allclose(y1, want_y1, atol=1e-12) and torch.allclose(y2, want_y2, atol=1e-12)


def test_resnet18_style_every_identity_block_reversible() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model = resnet18_style()
    gm = convert64(model, x, leftover="single")
    report = revcompile.report(gm)
    identity = [b for b in report.blocks if b.shortcut == "identity"]
    assert [b.fate for b in identity] == ["F", "G", "single", "single"]
    assert len(report.stages) == 3
    assert all(b.code == KeptReason.PROJECTION.value for b in report.kept)
    compare_with_reference(gm, x, rtol=1e-9)
    derivative, central = _directional_fd(gm, x)
    assert abs(derivative - central) <= 1e-6 * abs(central)
    stored = convert64(model, x, leftover="store", policy="store")
    single = convert64(model, x, leftover="single", policy="store")
    assert saved_activation_bytes(single, x) < saved_activation_bytes(stored, x)


@pytest.mark.parametrize("split", ["halve", "auto"])
def test_splits_that_halve_make_single_couplings(split: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)
    gm = convert64(OddChain(basic), x, leftover="single", split=split)
    report = revcompile.report(gm)
    assert [b.fate for b in report.blocks] == ["F", "G", "single"]
    assert [s.split for s in report.stages] == ["halve"]
    compare_with_reference(gm, x, rtol=1e-9)


def test_duplicate_keeps_the_leftover_with_the_reason() -> None:
    """A single-block coupling cuts the branch into channel halves: a full-width
    (duplicate) stage has none, so the leftover stays stored and the report says why."""
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)
    gm = convert64(OddChain(basic), x, leftover="single", split="duplicate")
    report = revcompile.report(gm)
    assert [b.fate for b in report.blocks] == ["F", "G", "kept"]
    assert report.blocks[2].code == KeptReason.ODD_NOT_SINGLE.value
    assert "duplicate" in report.blocks[2].detail
    compare_with_reference(gm, x, rtol=1e-9)


class Unsliceable(nn.Module):
    """A block whose branch mixes channels with ``flip`` (no channel halves),
    convertible at full width only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = models._branch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x).flip(1)


def test_auto_splits_a_halving_leftover_off_a_full_width_chain() -> None:
    """split="auto": the pairs run at full width when one of them cannot halve; the
    leftover that halves becomes its own halve stage (its pre-op stays on the trunk)."""
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)

    class Mixed(OddChain):
        def __init__(self) -> None:
            super().__init__(basic)
            self.blocks[0] = Unsliceable(8)

    gm = convert64(Mixed(), x, leftover="single", split="auto")
    report = revcompile.report(gm)
    assert [b.fate for b in report.blocks] == ["F", "G", "single"]
    assert [s.split for s in report.stages] == ["duplicate", "halve"]
    compare_with_reference(gm, x, rtol=1e-9)


def test_a_leftover_that_cannot_halve_keeps_its_reason() -> None:
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)
    gm = convert64(OddChain(Unsliceable, n=1), x, leftover="single", split="auto")
    (block,) = revcompile.report(gm).blocks
    assert (block.fate, block.code) == ("kept", KeptReason.ODD_NOT_SINGLE.value)
    assert block.detail


def test_plan_pairs_the_leftover_with_itself() -> None:
    model = models.cifar_resnet(20)
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(models.CIFAR_INPUT),))
    blocks, rejected = find_residuals(gm)
    single = plan(gm, blocks, rejected, partition(gm, blocks), leftover="single")
    assert [bp.fate for bp in single.blocks[:3]] == ["F", "G", "single"]
    last = single.stages[0].couplings[-1]
    assert last.f is last.g is blocks[2]
    assert last.f_pre_op is last.g_pre_op is blocks[1].post_op


def test_train_step_changes_every_half_of_the_leftover() -> None:
    """Unlike a half-coupling (y2 = x2), the single coupling updates both halves."""
    torch.manual_seed(0)
    x = torch.randn(X, dtype=torch.float64)
    gm = convert64(OddChain(basic, n=1), x, leftover="single")
    (coupling,) = single_couplings(gm)
    x1, x2 = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)
    with reference_mode():
        y1, y2 = copy.deepcopy(coupling)(x1, x2)
    assert not torch.allclose(y1, x1) and not torch.allclose(y2, x2)


def test_default_makes_every_identity_block_reversible() -> None:
    """The default leftover is the half-coupling (benchmarks/leftover.py: the saved
    bytes of "single", accuracy within seed noise, a faster step): a resnet18-style
    net has no identity block left stored."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model = resnet18_style()
    gm = convert64(model, x)
    report = revcompile.report(gm)
    assert report.leftover == DEFAULT_LEFTOVER == "half"
    identity = [b for b in report.blocks if b.shortcut == "identity"]
    assert [b.fate for b in identity] == ["F", "G", "half", "half"]
    assert "half-coupling" in str(report)
    compare_with_reference(gm, x, rtol=1e-9)
    # policy="store": the kept leftover is stored; (with "checkpoint" it would sit in
    # one checkpointed segment with the rest of the network, fewer saved bytes)
    half = convert64(model, x, policy="store")
    stored = convert64(model, x, leftover="store", policy="store")
    assert saved_activation_bytes(half, x) < saved_activation_bytes(stored, x)
    assert analyze(model, x.float()).blocks == report.blocks


@pytest.mark.parametrize("leftover", ["half", "single"])
@given(net=residual_nets())
def test_generated_networks_with_reversible_leftovers_match_reference(
    leftover: str, net: GeneratedNet
) -> None:
    """Every chain that ``leftover="store"`` pairs ends in a coupling too: its odd
    last block is not left stored."""
    torch.manual_seed(0)
    x = torch.randn(net.spec.input_shape)
    gm = convert64(net.build(), x, leftover=leftover)
    report = revcompile.report(gm)
    assert not [b for b in report.kept if b.code == KeptReason.ODD_LEFTOVER.value]
    paired = {name for chain in net.truth.chains if len(chain) > 1 for name in chain}
    assert paired <= {name for stage in report.stages for name in stage.blocks}
    compare_with_reference(gm, x.double(), rtol=1e-9)
