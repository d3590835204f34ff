"""The partition package: one rule per layer type in one registry, frozen records."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torchvision
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.partition import partition
from revcompile.passes.partition.rules import module_rule, rule_for
from revcompile.passes.shape_prop import propagate_shapes
from revcompile.passes.trace import trace
from torch import nn


class Residual(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def test_every_elementwise_post_op_has_a_rule() -> None:
    """find_residuals records these as post-ops; partition must be able to move them."""
    posts = (nn.RReLU(), nn.Threshold(0.1, 0.0), nn.LogSigmoid(), nn.Softsign(), nn.Tanhshrink())
    for mod in posts:
        assert module_rule(mod) is not None, type(mod).__name__


def test_frozen_batchnorm_is_sliced_like_batchnorm() -> None:
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(8)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(torch.rand(8) + 0.5)
    rule = module_rule(frozen)
    assert rule is not None and rule.cut is not None
    half = rule.cut(copy.deepcopy(frozen), slice(4, 8), slice(4, 8))
    assert half.weight.shape == (4,) and torch.equal(half.running_var, frozen.running_var[4:])


def test_records_are_frozen_and_hold_the_axis() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Residual(nn.Sequential(nn.Conv2d(8, 8, 1))))
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(2, 3, 4, 4),))
    blocks, _ = find_residuals(gm)
    (part,) = partition(gm, blocks).values()
    assert part.roles is not None and part.roles.axis == 1 and part.roles.width == 8
    assert part.roles.modules["1.branch.0"] == ("in", "out")
    with pytest.raises(dataclasses.FrozenInstanceError):
        part.roles = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        part.roles.modules["x"] = (None, None)  # type: ignore[index]


def test_unknown_op_has_no_rule() -> None:
    gm = torch.fx.symbolic_trace(Residual(nn.Flatten()))
    flatten = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert rule_for(flatten, gm) is None
