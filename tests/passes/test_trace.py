"""passes.trace: the graph fx produces, with what plain fx would silently change.

The end-to-end checks against the original model live in
tests/adversarial/test_frontend_patterns.py; these pin the graph
representation other passes rely on.
"""

from __future__ import annotations

import collections
import operator

import pytest
import torch
import torch.nn.functional as F
from models import BufferCounter as Counter
from revcompile.passes.trace import trace
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from revcompile.errors import ConversionError, PythonRandomnessError

C = 4


def calls(gm: torch.fx.GraphModule, target: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


class NoGradStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.head = nn.Conv2d(C, C, 1)

    def forward(self, x):
        with torch.no_grad():
            h = self.stem(x)
        return self.head(h)


def test_no_grad_region_is_a_pair_of_set_grad_enabled_nodes() -> None:
    """Entering sets False; leaving restores the mode read on entry at run time."""
    gm = trace(NoGradStem())
    enter, leave = calls(gm, torch._C._set_grad_enabled)
    (read,) = calls(gm, torch.is_grad_enabled)
    assert enter.args == (False,) and leave.args == (read,)
    order = list(gm.graph.nodes)
    stem = next(n for n in order if n.target == "stem")
    head = next(n for n in order if n.target == "head")
    assert order.index(read) < order.index(enter) < order.index(stem) < order.index(leave)
    assert order.index(leave) < order.index(head)
    assert torch.is_grad_enabled()


def test_buffers_are_read_by_get_attr_and_updates_stay_in_the_graph() -> None:
    model = Counter()
    gm = trace(model)
    assert model.calls.item() == 0, "tracing ran the update on the original"
    (read,) = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert read.target == "calls"
    assert [n.target for n in read.users] == ["add_"]
    gm(torch.zeros(1, C, 2, 2))
    assert gm.calls.item() == 1, "the traced graph updates the (shared) buffer"


def test_frozen_batchnorm_is_a_leaf_module() -> None:
    model = nn.Sequential(nn.Conv2d(C, C, 1), FrozenBatchNorm2d(C))
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert gm.state_dict().keys() == model.state_dict().keys()


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x, scale=1.0, mask=None, causal=False):
        h = self.conv(x) * scale
        if mask is not None:
            h = h + mask
        if causal:
            h = h.tril()
        return h


def test_forward_parameters_keep_their_names_and_defaults() -> None:
    model = Keywords()
    gm = trace(model)
    placeholders = {n.target: n.args for n in gm.graph.nodes if n.op == "placeholder"}
    assert placeholders == {"x": (), "scale": (1.0,), "mask": (None,), "causal": (False,)}
    guards = calls(gm, torch._assert)
    assert len(guards) == 2, "mask and causal are fixed, with guards dead-code elimination keeps"
    assert all(n.is_impure() for n in guards)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert len(calls(gm, torch._assert)) == 2 and calls(gm, operator.is_)
    x = torch.randn(1, C, 2, 2)
    assert torch.equal(gm(x, scale=2.0), model(x, scale=2.0))
    assert torch.equal(gm(x, 3.0), model(x, 3.0))
    with pytest.raises(AssertionError, match="mask has been specialized"):
        gm(x, mask=torch.ones(1))
    with pytest.raises(AssertionError, match="causal has been specialized"):
        gm(x, causal=True)


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return collections.OrderedDict(out=self.a(x), aux=x)


def test_ordered_dict_output_survives_recompile() -> None:
    gm = trace(Heads())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    out = gm(torch.randn(1, C, 2, 2))
    assert type(out) is collections.OrderedDict and list(out) == ["out", "aux"]


class DropoutBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return F.dropout(self.conv(x), 0.5, self.training)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = DropoutBlock()
        self.other = nn.Sequential(nn.Conv2d(C, C, 1), nn.ReLU())
        self.double_input = False

    def forward(self, x):
        if self.training and self.double_input:
            x = x * 2
        return self.other(self.block(x))


@pytest.mark.parametrize("training", [True, False])
def test_mode_dependent_module_becomes_a_leaf(training: bool) -> None:
    """Only the module whose flag changes the graph; the root's harmless read is not."""
    model = Net().train(training)
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [
        "block",
        "other.0",
        "other.1",
    ]
    assert all(m.training == training for m in model.modules()), "flags restored"


class RootDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)

    def forward(self, x):
        return F.dropout(self.fc(x), p=0.5, training=self.training)


def test_root_training_reads_become_a_run_time_read() -> None:
    gm = trace(RootDropout().eval())
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["training"]
    x = torch.randn(8, C)
    assert torch.equal(gm(x), gm(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))


class RootBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)

    def forward(self, x):
        if self.training:
            return self.fc(x)
        return x


def test_root_branching_on_training_is_refused() -> None:
    with pytest.raises(ConversionError, match="branches on self.training"):
        trace(RootBranch())


class NumpyDraw(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)

    def forward(self, x):
        import numpy

        return self.fc(x) * float(numpy.random.uniform(0.5, 1.5))


def test_python_randomness_names_function_location_and_module() -> None:
    model = nn.Sequential(nn.ReLU(), NumpyDraw())
    with pytest.raises(PythonRandomnessError, match=r"numpy\.random\.uniform\(\) at .*test_trace"):
        trace(model)
    with pytest.raises(PythonRandomnessError, match=r"in 1 \(NumpyDraw\)"):
        trace(model)


class Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_trace_error_names_the_innermost_failing_module() -> None:
    model = nn.Sequential(nn.Sequential(nn.ReLU(), Inner()))
    with pytest.raises(ConversionError, match=r"the forward of 0\.1 \(Inner\) failed"):
        trace(model)


# ---------------------------------------------------------------- subclasses of torch.nn layers


class Conv3DSimple(nn.Conv3d):
    """torchvision.models.video.resnet's conv: a Conv3d configured in __init__."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__(in_planes, out_planes, (3, 3, 3), padding=1, bias=False)

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class StandardizedConv(nn.Conv2d):
    """Overrides a method forward calls: what it computes is not Conv2d's."""

    def _conv_forward(self, x, weight, bias):
        weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / weight.std((1, 2, 3), True)
        return super()._conv_forward(x, weight, bias)


class Renamed(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize("layer", [Conv3DSimple(C, C), Renamed(C)], ids=["conv3d", "bn"])
def test_subclass_of_a_torch_layer_that_only_configures_it_is_a_leaf(layer):
    gm = trace(nn.Sequential(layer, nn.ReLU()))
    assert [n.op for n in gm.graph.nodes][1] == "call_module"
    assert isinstance(gm.get_submodule("0"), type(layer))


def test_subclass_overriding_a_method_of_the_layer_is_traced_through():
    gm = trace(nn.Sequential(StandardizedConv(C, C, 3), nn.ReLU()))
    assert calls(gm, torch.conv2d)
