"""normalize: in-place writes become data flow where that is exact; dead pure code goes."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from revcompile.passes.normalize import hidden_writes, normalize
from revcompile.passes.trace import trace
from torch import nn
from torch.fx import Graph, GraphModule


def _input() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6, dtype=torch.float64)


class StatementResidual(nn.Module):
    """``out = f(x); out.add_(x); out.relu_(); return out``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        out.add_(x)
        out.relu_()
        return out


class ViewWrite(nn.Module):
    """A write through a view (``out.narrow(...).add_(...)``): the data flow cannot
    show it, since ``out`` is read through another node than the write."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out.narrow(1, 0, 2).add_(x.narrow(1, 0, 2))
        return out + x


def test_statement_writes_become_data_flow() -> None:
    model = StatementResidual().double()
    gm = normalize(trace(model))
    nodes = {node.name: node for node in gm.graph.nodes}
    assert nodes["relu_"].args[0] is nodes["add_"]
    (output,) = [node for node in gm.graph.nodes if node.op == "output"]
    assert output.args[0] is nodes["relu_"]
    assert not hidden_writes(gm)
    x = _input()
    assert torch.equal(gm(x), model(x))


def test_hidden_writes_of_a_graph_not_normalized() -> None:
    gm = trace(StatementResidual())
    assert {node.name for node in hidden_writes(gm)} == {"add_", "relu_"}


def test_write_through_a_view_stays_as_it_is() -> None:
    model = ViewWrite().double()
    gm = normalize(trace(model))
    hidden = hidden_writes(gm)
    assert [node.name for node in hidden] == ["add_"]
    (aliases,) = hidden.values()
    assert {"conv", "narrow", "add_"} <= {node.name for node in aliases}
    add = next(node for node in gm.graph.nodes if node.target is operator.add)
    assert add.args[0].name == "conv"  # still the view's base, the write still in place
    x = _input()
    assert torch.equal(gm(x), model(x))


def test_writes_into_inputs_and_parameters_are_hidden() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.scale = nn.Parameter(torch.ones(4, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.relu_()
            s = self.scale.view(1, 4, 1, 1)
            with torch.no_grad():
                self.scale.clamp_(min=0.5)
            return self.conv(x) * s

    gm = normalize(trace(Net()))
    assert {node.name for node in hidden_writes(gm)} == {"relu_", "clamp_"}


def test_chained_writes_and_detach_alias() -> None:
    """``h.sub_(1).mul_(2)`` is one chain of writes of ``h``; ``h.detach()``
    shares ``h``'s memory, so a later write of ``h`` is hidden."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.conv(x)
            h.sub_(1).mul_(2)
            g = self.conv(h)
            d = g.detach()
            g.mul_(3)
            return h * 1, d

    model = Net().double()
    gm = normalize(trace(model))
    nodes = {node.name: node for node in gm.graph.nodes}
    assert nodes["mul_"].args[0] is nodes["sub_"]
    assert nodes["conv_1"].args[0] is nodes["mul_"]
    assert {node.name for node in hidden_writes(gm)} == {"mul__1"}
    x = _input()
    for got, want in zip(gm(x), model(x)):
        assert torch.equal(got, want)


def test_set_item_is_a_hidden_write() -> None:
    """``out[:, :2] = y`` (fx cannot trace it on a Proxy; graphs built by hand can hold it)."""
    graph = Graph()
    x = graph.placeholder("x")
    out = graph.call_function(torch.zeros_like, (x,))
    half = graph.call_function(operator.getitem, (x, (slice(None), slice(None, 2))))
    graph.call_function(operator.setitem, (out, (slice(None), slice(None, 2)), half))
    graph.output(out)
    gm = GraphModule(nn.Module(), graph)
    normalize(gm)
    assert [node.target for node in hidden_writes(gm)] == [operator.setitem]
    value = torch.randn(3, 4)
    assert torch.equal(gm(value)[:, :2], value[:, :2])


def test_dead_pure_code_goes_side_effects_stay() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.unused = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            self.unused(h)
            self.bn(h)  # updates running statistics in training
            torch._assert(h.dim() == 4, "4-d")
            return h * 2

    gm = normalize(trace(Net()))
    targets = [node.target for node in gm.graph.nodes]
    assert "unused" not in targets
    assert "bn" in targets and torch._assert in targets


def test_operator_iadd_is_a_write_and_a_join() -> None:
    """``operator.iadd`` (fx records ``out += x`` as ``operator.add`` on a Proxy;
    hand-built graphs and other tracers hold ``iadd``) writes its first argument."""
    from revcompile.passes.find_residuals import find_residuals

    root = nn.Module()
    root.conv = nn.Conv2d(4, 4, 3, padding=1)
    graph = Graph()
    x = graph.placeholder("x")
    out = graph.call_module("conv", (x,))
    graph.call_function(operator.iadd, (out, x))
    graph.output(graph.call_function(torch.relu, (out,)))
    gm = GraphModule(root, graph)
    value = _input().float()
    want = gm(value)
    normalize(gm)
    assert not hidden_writes(gm)
    assert torch.equal(gm(value), want)
    (block,), rejected = find_residuals(gm)
    assert block.shortcut == "identity" and block.join.target is operator.iadd and not rejected


class PassThroughWrite(nn.Module):
    """``drop(h).add_(x)``: timm's DropPath and nn.Dropout return their input itself
    in eval; nothing else reads ``h`` afterwards, so the write is exact data flow."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        out = self.drop(h.view(h.shape)).add_(x)
        return out.relu()


class OwnState(nn.Module):
    """Returns a buffer of its own: a write into its output writes module state."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 4, 6, 6, dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.cache


def _drop_path() -> nn.Module:
    from timm.layers import DropPath

    return DropPath(0.2)


def test_writes_of_pass_through_outputs_become_data_flow() -> None:
    for layer in (nn.Dropout(0.5), _drop_path(), nn.Identity()):
        model = PassThroughWrite(layer).double().eval()
        gm = normalize(trace(model))
        nodes = {node.name: node for node in gm.graph.nodes}
        assert not hidden_writes(gm), type(layer).__name__
        assert nodes["relu"].args[0] is nodes["add_"]
        x = _input()
        assert torch.equal(gm(x), model(x))


def test_a_pass_through_view_read_again_after_the_write_stays_hidden() -> None:
    class Net(PassThroughWrite):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            self.drop(h).add_(x)
            return h * 2  # reads the written storage through h

    gm = normalize(trace(Net(nn.Dropout(0.5)).double().eval()))
    assert [node.name for node in hidden_writes(gm)] == ["add_"]


def test_writes_into_a_user_module_output_stay_hidden() -> None:
    gm = normalize(trace(PassThroughWrite(OwnState()).double()))
    assert [node.name for node in hidden_writes(gm)] == ["add_"]


def test_a_fresh_mask_drawn_in_place_is_data_flow() -> None:
    """Hand-written stochastic depth: ``h.new_empty(...).bernoulli_(p)`` allocates
    (``new_empty`` is no view of ``h``), so the draw is exact data flow."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            keep = h.new_empty(h.shape[0], 1, 1, 1).bernoulli_(0.8)
            return x + h * keep / 0.8

    gm = normalize(trace(Net()))
    assert not hidden_writes(gm)


def test_a_user_module_reading_the_written_value_later_sees_it_by_data_flow() -> None:
    """``out.relu_()`` then ``self.user(out)``: the user module may return its own
    state, but it reads ``out`` only after the write, through the data flow."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.user = OwnState()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x) + x
            out.relu_()
            return self.user(out)

    gm = normalize(trace(Net()))
    assert not hidden_writes(gm)
