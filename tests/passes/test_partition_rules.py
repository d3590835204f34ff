"""The partition package: one rule per layer type in one registry, frozen records."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.utils.prune
import torchvision
from equivalence import compare_with_reference
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.partition import partition
from revcompile.passes.partition.rules import module_rule, rule_for
from revcompile.passes.shape_prop import propagate_shapes
from revcompile.passes.trace import trace
from torch import nn

import revcompile


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


class _HookedBlock(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        if kind == "prune":
            torch.nn.utils.prune.l1_unstructured(self.c1, "weight", 0.3)
        else:
            self.c1 = torch.nn.utils.weight_norm(self.c1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(torch.relu(self.c1(x)))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated")
@pytest.mark.parametrize("kind", ["prune", "weight_norm"])
def test_old_style_weight_hooks_are_kept_when_halving_and_copied_when_duplicating(
    kind: str,
) -> None:
    """``prune`` / old ``weight_norm`` recompute ``weight`` in a pre-hook (a non-leaf
    attribute after a forward, which deepcopy refuses): halving would not slice what the
    hook computes, so the block is kept; at full width the hooked layer is copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _HookedBlock(kind), _HookedBlock(kind)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x)
    halved = revcompile.report(revcompile.convert(model, x, split="halve"))
    assert [b.code for b in halved.blocks] == ["not_halvable"] * 2
    assert "forward pre-hooks" in halved.blocks[0].reason
    gm = revcompile.convert(model, x, split="duplicate")
    assert revcompile.report(gm).stages
    compare_with_reference(gm, x)
