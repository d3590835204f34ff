"""find_residuals on the add spellings of torchvision, timm and papers' reference code.

Each row of SPELLINGS is one block written the way some library writes it,
with the kind find_residuals must give it: an identity or projection block,
a rejected add (with words of the reason), or no add at all. Every row also
checks find_residuals' postcondition: each add-like node appears exactly once,
as a block's join or as a rejected add.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass

import models
import pytest
import torch
import torch.nn.functional as F
import torchvision
from equivalence import compare_with_reference
from original_function import assert_same_function, assert_state_unchanged, state_snapshot
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.normalize import normalize
from revcompile.passes.ops import is_add, is_scale
from revcompile.passes.shape_prop import propagate_shapes
from revcompile.passes.trace import trace
from timm.layers import DropPath
from torch import nn

import revcompile
from revcompile.conversion_report import KeptReason

C = 8
IMAGE = (2, C, 6, 6)
TOKENS = (2, 5, C)


def _convs() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1)
    )


class Spelled(nn.Module):
    """One block: ``forward`` is ``spelling(self, x)`` with a conv branch ``f``,
    a second branch ``g``, a token MLP ``mlp`` with ``norm`` and ``drop_path``,
    a 1x1 ``proj`` shortcut and a layer scale ``gamma``."""

    def __init__(self, spelling: Callable[[Spelled, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.spelling = spelling
        self.f, self.g = _convs(), _convs()
        self.half_a = nn.Conv2d(C, C // 2, 3, padding=1)
        self.half_b = nn.Conv2d(C, C // 2, 3, padding=1)
        self.norm = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
        self.drop_path = DropPath(0.0)
        self.proj = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C))
        self.shortcut = nn.Identity()
        self.empty = nn.Sequential()
        self.gamma = nn.Parameter(torch.full((C, 1, 1), 0.1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spelling(self, x)


def _out_add_statement(m: Spelled, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    x = m.f(x)
    x.add_(shortcut)
    return x


def _aug_assign(m: Spelled, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = m.f(x)
    out += identity
    return m.relu(out)


def _projection(m: Spelled, x: torch.Tensor) -> torch.Tensor:
    out = m.f(x)
    out = out + m.proj(x)
    return F.relu(out)


def _view_write(m: Spelled, x: torch.Tensor) -> torch.Tensor:
    out = m.f(x)
    out.narrow(1, 0, C // 2).mul_(0.5)
    return out + x


def _out_buffer(m: Spelled, x: torch.Tensor) -> torch.Tensor:
    buf = torch.empty_like(x)
    torch.add(x, m.f(x), out=buf)
    return buf


def _alpha_out_buffer(m: Spelled, x: torch.Tensor) -> torch.Tensor:
    buf = torch.empty_like(x)
    torch.add(x, m.f(x), alpha=0.5, out=buf)
    return buf


@dataclass
class Row:
    spelling: Callable[[Spelled, torch.Tensor], torch.Tensor]
    kind: str  # "identity", "projection", "rejected" or "none"
    reason: str = ""
    shape: tuple[int, ...] = IMAGE


SPELLINGS: dict[str, Row] = {
    # torchvision ResNet BasicBlock / Bottleneck
    "out += identity; relu(inplace)": Row(_aug_assign, "identity"),
    "out = out + self.shortcut(x) (nn.Identity)": Row(
        lambda m, x: m.f(x) + m.shortcut(x), "identity"
    ),
    "out = out + self.shortcut(x) (empty nn.Sequential)": Row(
        lambda m, x: m.f(x) + m.empty(x), "identity"
    ),
    "out = out + self.shortcut(x) (1x1 conv + BN)": Row(_projection, "projection"),
    # timm ViT / Swin / ConvNeXt / EfficientNet
    "x = x + self.drop_path(self.mlp(self.norm(x)))": Row(
        lambda m, x: x + m.drop_path(m.mlp(m.norm(x))), "identity", shape=TOKENS
    ),
    "x = self.drop_path(x) + shortcut": Row(lambda m, x: m.drop_path(m.f(x)) + x, "identity"),
    "x = shortcut + x": Row(lambda m, x: x + m.f(x), "identity"),
    "x.add_(shortcut) statement": Row(_out_add_statement, "identity"),
    "x = x.add_(shortcut)": Row(lambda m, x: m.f(x).add_(x), "identity"),
    "x.add_(f(x)) into the model input": Row(
        lambda m, x: x.add_(m.f(x)), "rejected", "writes in place"
    ),
    "x += self.gamma * y (layer scale)": Row(lambda m, x: x + m.gamma * m.f(x), "identity"),
    # functional spellings
    "torch.add(x, y)": Row(lambda m, x: torch.add(x, m.f(x)), "identity"),
    "torch.add(y, x)": Row(lambda m, x: torch.add(m.f(x), x), "identity"),
    "torch.add(input=x, other=f)": Row(lambda m, x: torch.add(input=x, other=m.f(x)), "identity"),
    "x.add(f)": Row(lambda m, x: x.add(m.f(x)), "identity"),
    "x.add(other=f)": Row(lambda m, x: x.add(other=m.f(x)), "identity"),
    "operator.iadd(out, x)": Row(lambda m, x: operator.iadd(m.f(x), x), "identity"),
    "torch.cat then add": Row(
        lambda m, x: x + torch.cat([m.half_a(x), m.half_b(x)], 1), "identity"
    ),
    "sum([x, f(x)])": Row(lambda m, x: sum([x, m.f(x)]), "identity"),
    "sum([f(x), x])": Row(lambda m, x: sum([m.f(x), x]), "identity"),
    "torch.add(x, f, alpha=1)": Row(lambda m, x: torch.add(x, m.f(x), alpha=1), "identity"),
    # scaled residuals: the constant alpha scales the branch (block.branch_scale)
    "torch.add(x, f, alpha=0.5)": Row(lambda m, x: torch.add(x, m.f(x), alpha=0.5), "identity"),
    "x.add(f, alpha=2)": Row(lambda m, x: x.add(m.f(x), alpha=2), "identity"),
    "x.add_(f, alpha=0.1)": Row(lambda m, x: (x * 1).add_(m.f(x), alpha=0.1), "projection"),
    # adds that are not residual blocks, or must stay as they are
    "f.add(x, alpha=0.5) (scaled shortcut)": Row(
        lambda m, x: m.f(x).add(x, alpha=0.5), "rejected", "scales its shortcut (alpha=0.5)"
    ),
    "torch.add(x, f, alpha=0.5, out=buf)": Row(_alpha_out_buffer, "rejected", "out=empty_like"),
    "torch.add(x, f, out=buf)": Row(_out_buffer, "rejected", "out=empty_like"),
    "f(x) + g(x) (Inception)": Row(lambda m, x: m.f(x) + m.g(x), "rejected", "parallel branches"),
    "x + x": Row(lambda m, x: x + x, "rejected", "to itself"),
    "x + 1": Row(lambda m, x: m.f(x) + 1, "rejected", "constant"),
    "write through a view in the block": Row(_view_write, "rejected", "writes in place"),
    "x - f(x)": Row(lambda m, x: x - m.f(x), "none"),
    "torch.sub(x, f)": Row(lambda m, x: torch.sub(x, m.f(x)), "none"),
}


def _analysed(row: Row) -> tuple[torch.fx.GraphModule, list, list]:
    model = Spelled(row.spelling).double()
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(row.shape, dtype=torch.float64),))
    blocks, rejected = find_residuals(normalize(gm))
    return gm, blocks, rejected


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_add_spellings(name: str) -> None:
    row = SPELLINGS[name]
    gm, blocks, rejected = _analysed(row)
    adds = [node for node in gm.graph.nodes if is_add(node)]
    seen = [block.join for block in blocks] + [item.node for item in rejected]
    assert sorted(seen, key=adds.index) == adds  # each add once, as a block or a rejection
    if row.kind == "none":
        assert not blocks and not rejected
    elif row.kind == "rejected":
        assert not blocks
        assert any(row.reason in item.reason for item in rejected), [r.reason for r in rejected]
    else:
        assert [b.shortcut for b in blocks] == [row.kind]  # sum()'s 0 + x is rejected
        (block,) = blocks
        assert block.fork.op == "placeholder"


@pytest.mark.parametrize("spelling", ["sum([x, f(x)])", "sum([f(x), x])"])
def test_sum_adds_zero_to_the_shortcut_only(spelling: str) -> None:
    _, blocks, rejected = _analysed(SPELLINGS[spelling])
    (block,) = blocks
    (zero,) = rejected
    assert "sum() starts at 0" in zero.reason
    assert zero.node in block.region or zero.node is block.branch_out


class Chain(nn.Module):
    def __init__(self, spelling: Callable[[Spelled, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Spelled(spelling) for _ in range(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


@pytest.mark.parametrize(
    "name", ["f.add(x, alpha=0.5) (scaled shortcut)", "write through a view in the block"]
)
@pytest.mark.parametrize("policy", ["store", "checkpoint"])
def test_adds_kept_as_they_are_keep_the_function(name: str, policy: str) -> None:
    """No block converts; the model computes the original function bit for bit
    (aten's add with alpha is a fused multiply-add: it must stay as it is)."""
    model = Chain(SPELLINGS[name].spelling).double()
    x = torch.randn(IMAGE, dtype=torch.float64)
    before = state_snapshot(model)
    gm = revcompile.convert(model, x, policy=policy)
    assert not revcompile.report(gm).stages
    assert_same_function(model, gm, x)
    assert_state_unchanged(model, before)


def test_block_with_constant_alpha_converts_with_the_scale_in_its_branch() -> None:
    """``torch.add(x, f, alpha=a)`` blocks become couplings that add ``a * F``: the
    converted module equals the conversion of ``x + a * f(x)`` with the same weights."""
    alpha = Chain(SPELLINGS["torch.add(x, f, alpha=0.5)"].spelling).double()
    scaled = Chain(lambda m, x: x + m.f(x) * 0.5).double()
    scaled.load_state_dict(alpha.state_dict())
    x = torch.randn(IMAGE, dtype=torch.float64)
    gm_alpha, gm_scaled = revcompile.convert(alpha, x), revcompile.convert(scaled, x)
    assert [b.fate for b in revcompile.report(gm_alpha).blocks] == ["F", "G", "F", "G"]
    for mode in ("eval", "train"):
        a, b = copy.deepcopy(gm_alpha), copy.deepcopy(gm_scaled)
        getattr(a, mode)(), getattr(b, mode)()
        assert torch.equal(a(x), b(x))
    compare_with_reference(gm_alpha, x)


def test_sum_chain_converts_as_identity_blocks() -> None:
    """``sum([x, f(x)])`` blocks convert to the same couplings as ``x + f(x)``:
    the converted modules agree bit for bit (the ``0 + x`` is gone with its block)."""
    summed = Chain(SPELLINGS["sum([x, f(x)])"].spelling).double()
    plus = Chain(SPELLINGS["x = shortcut + x"].spelling).double()
    plus.load_state_dict(summed.state_dict())
    x = torch.randn(IMAGE, dtype=torch.float64)
    x[0, 0, 0, 0] = -0.0
    gm_sum, gm_plus = revcompile.convert(summed, x), revcompile.convert(plus, x)
    assert [b.fate for b in revcompile.report(gm_sum).blocks] == ["F", "G", "F", "G"]
    assert not any(is_add(node) for node in gm_sum.graph.nodes)
    for mode in ("eval", "train"):
        a, b = copy.deepcopy(gm_sum), copy.deepcopy(gm_plus)
        getattr(a, mode)(), getattr(b, mode)()
        assert torch.equal(a(x), b(x))
    compare_with_reference(gm_sum, x)


def test_single_sum_block_keeps_the_function_and_signed_zeros() -> None:
    """Unconverted, ``0 + x`` still maps -0.0 to +0.0, exactly as the original."""
    model = Spelled(lambda m, x: sum([x, m.f(x) * 0.0])).double()
    x = torch.randn(IMAGE, dtype=torch.float64)
    x[0, 0] = -0.0
    gm = revcompile.convert(model, x, leftover="store")  # the lone block stays a block
    assert not revcompile.report(gm).stages
    assert_same_function(model, gm, x)
    got = gm.eval()(x)
    assert torch.equal(torch.signbit(got), torch.signbit(model.eval()(x)))


def test_adds_into_the_model_input_stay_as_they_are() -> None:
    """``x.add_(f(x))`` in every block writes the caller's input tensor, block
    after block (the same memory): every add is kept, and the converted module
    writes the caller's tensor exactly as the original does."""
    model = Chain(lambda m, x: x.add_(m.f(x))).double().eval()
    x = torch.randn(IMAGE, dtype=torch.float64)
    the_report = revcompile.analyze(model, x)
    assert not the_report.blocks
    assert all("writes in place" in item.reason for item in the_report.rejected)
    gm = revcompile.convert(model, x)
    x_model, x_gm = x.clone(), x.clone()
    with torch.no_grad():
        assert torch.equal(gm(x_gm), model(x_model))
    assert torch.equal(x_gm, x_model) and not torch.equal(x_gm, x)


@pytest.mark.parametrize(
    "factory",
    [
        models.SpellingsNet,
        models.NestedResidualNet,
        models.InceptionAddNet,
        models.FeatureTapNet,
        models.ConstantAddNet,
        lambda: models.cifar_resnet(20),
        lambda: torchvision.models.resnet18(weights=None),
        lambda: torchvision.models.vit_b_16(weights=None),
    ],
    ids=["spellings", "nested", "inception", "tap", "constant", "cifar20", "resnet18", "vit"],
)
def test_every_add_once_on_the_zoo(factory: Callable[[], nn.Module]) -> None:
    """find_residuals' postcondition, after normalize, on the test zoo."""
    gm = normalize(trace(factory()))
    blocks, rejected = find_residuals(gm)
    adds = [node for node in gm.graph.nodes if is_add(node)]
    seen = [block.join for block in blocks] + [item.node for item in rejected]
    assert sorted(seen, key=adds.index) == adds


class CounterBetween(nn.Module):
    """A buffer counter written after the fork: before the block computes anything
    (the block is found) or in the middle of its branch (the block is rejected)."""

    def __init__(self, middle: bool) -> None:
        super().__init__()
        self.middle = middle
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.middle:
            self.calls.add_(1)
        h = self.conv1(x)
        if self.middle:
            self.calls.add_(1)
        return x + self.conv2(torch.relu(h))


def test_a_state_write_before_the_block_computes_keeps_the_block() -> None:
    gm = trace(CounterBetween(middle=False))
    blocks, _ = find_residuals(normalize(gm))
    assert [b.shortcut for b in blocks] == ["identity"]


def test_a_state_write_inside_the_block_rejects_it() -> None:
    gm = trace(CounterBetween(middle=True))
    blocks, rejected = find_residuals(normalize(gm))
    assert not blocks
    assert any("writes in place" in r.reason for r in rejected)


# ----------------------------------------------------------------- scaled and gated (issue 14)


class _Gained(nn.Module):
    """``spelling(self, x)`` with a conv branch ``f``, a scalar gain ``c`` and a constant."""

    def __init__(self, spelling: Callable[[_Gained, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.spelling = spelling
        self.f = _convs()
        self.c = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spelling(self, x)


def _blocks(spelling: Callable[[_Gained, torch.Tensor], torch.Tensor]) -> list:
    blocks, rejected = find_residuals(normalize(trace(_Gained(spelling))))
    assert not rejected
    return blocks


@pytest.mark.parametrize(
    "spelling",
    [
        lambda m, x: x * 0.5 + m.f(x),
        lambda m, x: 0.5 * x + m.f(x),
        lambda m, x: m.f(x) + x / 2,
        lambda m, x: torch.mul(x, m.c) + m.f(x),
        lambda m, x: m.f(x) + x.mul(m.c.exp()),
    ],
    ids=["x*0.5", "0.5*x", "x/2", "torch.mul(x,gain)", "x.mul(exp(gain))"],
)
def test_a_scaled_shortcut_is_a_block_kept_with_its_reason(spelling) -> None:
    (block,) = _blocks(spelling)
    assert block.kept is not None and block.kept[0] is KeptReason.SCALED_SHORTCUT
    assert block.shortcut_out.all_input_nodes[0] is block.fork
    assert "scales its shortcut" in block.kept[1]


@pytest.mark.parametrize(
    "spelling",
    [
        lambda m, x: x + m.c * m.f(x),
        lambda m, x: m.f(x) * 0.2 + x,
        lambda m, x: x + m.f(torch.relu(x) * 1.5) * m.c,
        lambda m, x: x + m.f(x) * torch.sigmoid(x.mean((2, 3), keepdim=True)),
    ],
    ids=["x+gain*f", "f*alpha+x", "x+f(act(x)*beta)*gain", "x+f*sigmoid(gate(x))"],
)
def test_gains_of_the_branch_stay_in_the_branch(spelling) -> None:
    (block,) = _blocks(spelling)
    assert (block.shortcut, block.kept, block.shortcut_out) == ("identity", None, block.fork)
    assert is_scale(block.branch_out) and block.branch_out in block.region


def test_timm_normfree_block_is_traced_through() -> None:
    """timm lists NormFreeBlock as not traceable (fx drops ``out.mul_(skipinit_gain)``);
    the trace keeps the statement, so the block and its in-place gain are seen."""
    from timm.models.nfnet import NormFreeBlock

    block = NormFreeBlock(C, C, bottle_ratio=1.0, skipinit=True, act_layer=nn.SiLU)
    gm = normalize(trace(nn.Sequential(block, copy.deepcopy(block))))
    blocks, rejected = find_residuals(gm)
    assert [(b.shortcut, b.kept) for b in blocks] == [("identity", None)] * 2 and not rejected
    gains = [n for n in blocks[0].region if n.op == "call_method" and n.target == "mul_"]
    assert len(gains) == 1


# ----------------------------------------------------------------- partial channels (issue 14)


class PartialChannels(nn.Module):
    """timm's ReXNet block: the shortcut is added to the first C channels of a wider
    output, ``torch.cat([h[:, 0:C] + x, h[:, C:]], dim=1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(C, 2 * C, 1), nn.ReLU(), nn.Conv2d(2 * C, C + 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.f(x)
        return torch.cat([h[:, 0:C] + x, h[:, C:]], dim=1)


def test_a_partial_channel_residual_is_kept_with_its_reason() -> None:
    (block,) = find_residuals(normalize(trace(PartialChannels())))[0]
    assert block.shortcut == "identity"
    assert block.kept is not None and block.kept[0] is KeptReason.PARTIAL_CHANNELS
    assert "[0:8] along dim 1" in block.kept[1]


# ----------------------------------------------------------------- nested residuals (issue 14)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = _convs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class _Outer(nn.Module):
    """``x + conv(inner blocks(x))`` with ``inner`` identity blocks inside."""

    def __init__(self, inner: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(_Inner() for _ in range(inner)), nn.Conv2d(C, C, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@pytest.mark.parametrize(
    ("outer", "inner", "inside"),
    [(2, 1, True), (2, 2, True), (1, 1, True), (1, 2, False), (1, 0, False)],
)
def test_nested_blocks_join_the_enclosing_block_that_can_convert(outer, inner, inside) -> None:
    """Blocks inside an enclosing block are part of its branch (kept, INSIDE_BLOCK) when
    the enclosing block chains with a neighbour or nothing inside it could pair; a
    lone enclosing block around a chain leaves the chain to planning."""
    model = nn.Sequential(*(_Outer(inner) for _ in range(outer)))
    blocks, _ = find_residuals(normalize(trace(model)))
    enclosing = [b for b in blocks if "." not in b.name]
    inner_blocks = [b for b in blocks if b not in enclosing]
    assert len(enclosing) == outer and len(inner_blocks) == outer * inner
    assert all(b.kept is None for b in enclosing)
    want = (KeptReason.INSIDE_BLOCK, f"part of the branch of {enclosing[0].name}")
    assert [b.kept for b in inner_blocks[:inner]] == [want if inside else None] * inner
