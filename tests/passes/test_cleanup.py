"""cleanup: dead code goes, side effects stay (DESIGN.md §9: in-place statements
are side effects, not dead code)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from original_function import assert_same_function, assert_state_unchanged, state_snapshot
from revcompile.passes.cleanup import cleanup
from revcompile.passes.trace import trace
from torch import nn

import revcompile

STATEMENTS: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
    "out.add_(x)": lambda h, x: h.add_(x),
    "x.mul_(0)": lambda h, x: h.mul_(0),
    "x.relu_()": lambda h, x: h.relu_(),
    "x.sub_(1).mul_(2)": lambda h, x: h.sub_(1).mul_(2),
    "torch.relu_(h)": lambda h, x: torch.relu_(h),
    "F.relu(h, inplace=True)": lambda h, x: F.relu(h, inplace=True),
    "h.copy_(x)": lambda h, x: h.copy_(x),
    "h.zero_()": lambda h, x: h.zero_(),
    "h.clamp_(min=0)": lambda h, x: h.clamp_(min=0.0),
    "h.masked_fill_(x > 0, 1)": lambda h, x: h.masked_fill_(x > 0, 1.0),
    "h.fill_(0.5)": lambda h, x: h.fill_(0.5),
    "torch._assert": lambda h, x: torch._assert(h.shape[1] == 4, "four channels"),
}


class StatementNet(nn.Module):
    """``h = conv1(x)``, then the statement (result unused), then ``conv2(h)``."""

    def __init__(self, statement: Callable[[torch.Tensor, torch.Tensor], object]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.statement = statement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        self.statement(h, x)
        return self.conv2(h)


class OutArgumentNet(nn.Module):
    """``torch.add(a, b, out=buf)`` as a statement (eval only: no autograd with out=)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        buf = torch.zeros_like(h)
        torch.add(h, x, out=buf)
        return buf * 2


class DeadCodeNet(nn.Module):
    """A layer whose result nobody reads, and a pure computation nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        self.unused(h)
        _ = h * 3 + 1
        return h.relu()


def _input() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6, dtype=torch.float64)


@pytest.mark.parametrize("statement", list(STATEMENTS), ids=list(STATEMENTS))
def test_cleanup_keeps_in_place_statements(statement: str) -> None:
    model = StatementNet(STATEMENTS[statement]).double()
    gm = cleanup(trace(model))
    x = _input()
    assert torch.equal(gm(x), model(x))


def test_cleanup_keeps_out_argument_write() -> None:
    model = OutArgumentNet().double().eval()
    gm = cleanup(trace(model))
    x = _input()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_cleanup_removes_dead_pure_code() -> None:
    gm = cleanup(trace(DeadCodeNet()))
    targets = [node.target for node in gm.graph.nodes]
    assert "unused" not in targets and not hasattr(gm, "unused")
    assert [node.op for node in gm.graph.nodes].count("call_function") == 0


def test_cleanup_keeps_layers_with_state_and_randomness() -> None:
    """A BatchNorm nobody reads still updates its running statistics in training;
    a dropout nobody reads still draws from the RNG."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            self.bn(h)
            self.drop(h)
            return F.dropout(h, 0.5, True)

    gm = cleanup(trace(Net()))
    assert {"bn", "drop"} <= {node.target for node in gm.graph.nodes}


@pytest.mark.parametrize("policy", ["store", "checkpoint"])
@pytest.mark.parametrize("statement", list(STATEMENTS), ids=list(STATEMENTS))
def test_convert_keeps_in_place_statements(statement: str, policy: str) -> None:
    """A model with in-place statements and no convertible block comes back
    computing exactly the original function, and the original is unchanged."""
    model = StatementNet(STATEMENTS[statement]).double()
    x = _input()
    before = state_snapshot(model)
    # leftover="store": the lone `out.add_(x)` block stays a block (no stage).
    gm = revcompile.convert(model, x, policy=policy, leftover="store")
    assert_state_unchanged(model, before)
    assert not revcompile.report(gm).stages
    assert_same_function(model, gm, x)
    assert_state_unchanged(model, before)
