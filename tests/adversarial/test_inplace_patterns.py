"""In-place statements, dead code and writes through views, as people write them.

Each model is checked against the ORIGINAL: the original is unchanged by
``convert`` and by training the result; where no block becomes reversible,
eval outputs and a training step's gradients are bit for bit the original's;
where blocks convert, the converted module's reversible step equals its
``reference_mode()`` step and the report agrees with the module.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from equivalence import compare_with_reference
from original_function import assert_same_function, assert_state_unchanged, state_snapshot
from torch import nn

import revcompile
from revcompile.runtime import AdditiveCoupling, ReversibleSequence

C = 8
INPUT = (2, C, 6, 6)


def _branch() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1)
    )


class StatementAdd(nn.Module):
    """``out = f(x); out.add_(x)`` as a statement (the residual is a side effect)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = _branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.f(x)
        out.add_(x)
        return out


class AugAssignInplaceRelu(nn.Module):
    """torchvision's BasicBlock: ``out += identity; out = self.relu(out)`` (inplace ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return out


class ReluStatementAfterAdd(nn.Module):
    """``out = x + f(x); F.relu(out, inplace=True); return out``: the post-op is a statement."""

    def __init__(self) -> None:
        super().__init__()
        self.f = _branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.f(x)
        F.relu(out, inplace=True)
        return out


class InplaceInsideBranch(nn.Module):
    """``h = conv1(x); h.relu_(); x.add_(conv2(h))``-style branch statements."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h.relu_()
        out = self.conv2(h)
        out.mul_(0.5)
        return out + x


class DeadCodeInBranch(nn.Module):
    """``unused = self.conv_unused(h)`` inside the block's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)
        self.conv_unused = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        unused = self.conv_unused(h).relu() * 2  # noqa: F841
        return x + self.conv2(h)


class ViewWriteBlock(nn.Module):
    """A write through a view inside the block: ``out.narrow(1, 0, C // 2).mul_(0.5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.f = _branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.f(x)
        out.narrow(1, 0, C // 2).mul_(0.5)
        return out + x


class DeadStatefulLayerInBranch(nn.Module):
    """A BatchNorm nobody reads still updates its statistics: the block is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.f = _branch()
        self.probe = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.f(x)
        self.probe(h)
        return x + h


class Chain(nn.Module):
    def __init__(self, block: Callable[[], nn.Module], n: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(block() for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


CONVERTED = {
    "out.add_(x) statement": StatementAdd,
    "out += identity; inplace ReLU": AugAssignInplaceRelu,
    "F.relu(out, inplace=True) statement": ReluStatementAfterAdd,
    "h.relu_() and out.mul_ in branch": InplaceInsideBranch,
    "dead layer in branch": DeadCodeInBranch,
}
KEPT = {
    "write through a view": (ViewWriteBlock, "writes in place"),
    "dead BatchNorm in branch": (DeadStatefulLayerInBranch, None),
}


def _input() -> torch.Tensor:
    return torch.randn(INPUT, dtype=torch.float64)


def _convert(model: nn.Module, x: torch.Tensor, **options) -> torch.fx.GraphModule:
    before = state_snapshot(model)
    gm = revcompile.convert(model, x, **options)
    assert_state_unchanged(model, before)
    return gm


def _assert_report_matches_module(gm: torch.fx.GraphModule) -> None:
    the_report = revcompile.report(gm)
    stages = [m for m in gm.modules() if isinstance(m, ReversibleSequence)]
    assert len(stages) == len(the_report.stages)
    couplings = [m for m in gm.modules() if isinstance(m, AdditiveCoupling)]
    assert len(couplings) == sum(s.couplings + s.half for s in the_report.stages)
    converted = [b for b in the_report.blocks if b.fate != "kept"]
    assert len(converted) == sum(len(s.blocks) for s in the_report.stages)


@pytest.mark.parametrize("name", list(CONVERTED))
def test_in_place_residual_chains_convert_exactly(name: str) -> None:
    model = Chain(CONVERTED[name]).double()
    x = _input()
    before = state_snapshot(model)
    gm = _convert(model, x)
    the_report = revcompile.report(gm)
    assert [b.shortcut for b in the_report.blocks] == ["identity"] * 4
    assert [b.fate for b in the_report.blocks] == ["F", "G", "F", "G"]
    _assert_report_matches_module(gm)
    compare_with_reference(gm, x)
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("policy", ["store", "checkpoint"])
@pytest.mark.parametrize("name", list(CONVERTED))
def test_single_in_place_block_keeps_the_function(name: str, policy: str) -> None:
    """One block (an odd leftover) kept with ``leftover="store"``: nothing converts,
    the function is the original's."""
    model = CONVERTED[name]().double()
    x = _input()
    gm = _convert(model, x, policy=policy, leftover="store")
    assert [b.fate for b in revcompile.report(gm).blocks] == ["kept"]
    assert_same_function(model, gm, x)


@pytest.mark.parametrize("policy", ["store", "checkpoint"])
@pytest.mark.parametrize("name", list(KEPT))
def test_blocks_with_hidden_effects_are_kept(name: str, policy: str) -> None:
    model_class, rejected_words = KEPT[name]
    model = Chain(model_class).double()
    x = _input()
    gm = _convert(model, x, policy=policy)
    the_report = revcompile.report(gm)
    assert not the_report.stages
    if rejected_words is not None:
        reasons = [r.reason for r in the_report.rejected]
        assert sum(rejected_words in reason for reason in reasons) == 4
    else:
        assert [b.fate for b in the_report.blocks] == ["kept"] * 4
    _assert_report_matches_module(gm)
    assert_same_function(model, gm, x)


def test_hidden_write_in_one_block_keeps_only_that_block() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(
                StatementAdd(), StatementAdd(), ViewWriteBlock(), StatementAdd(), StatementAdd()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x)

    model = Mixed().double()
    x = _input()
    gm = _convert(model, x)
    the_report = revcompile.report(gm)
    assert [b.name for b in the_report.blocks if b.fate != "kept"] == [
        "blocks.0",
        "blocks.1",
        "blocks.3",
        "blocks.4",
    ]
    assert any("blocks.2" in r.node and "writes in place" in r.reason for r in the_report.rejected)
    _assert_report_matches_module(gm)
    compare_with_reference(gm, x)
