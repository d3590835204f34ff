"""The planning pass on records it is given (no analysis inside plan)."""

from __future__ import annotations

import dataclasses

import models
import pytest
import torch
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.partition import partition
from revcompile.passes.plan import plan
from revcompile.passes.shape_prop import propagate_shapes
from revcompile.passes.trace import trace

from revcompile.conversion_report import KeptReason


def _planned(model: torch.nn.Module, x: torch.Tensor):
    gm = trace(model)
    propagate_shapes(gm, (x,))
    blocks, rejected = find_residuals(gm)
    return gm, blocks, rejected, partition(gm, blocks)


def test_stage_records_axis_and_width() -> None:
    gm, blocks, rejected, parts = _planned(models.cifar_resnet(20), torch.randn(models.CIFAR_INPUT))
    result = plan(gm, blocks, rejected, parts)
    assert [(s.dim, s.channels) for s in result.stages] == [(1, 16), (1, 32), (1, 64)]
    assert result.partitions == parts


@pytest.mark.parametrize("split", ["halve", "auto"])
def test_a_post_op_that_cannot_move_ends_the_chain(split: str) -> None:
    """Plan decides with the records emit builds from: no coupling whose pre-op
    cannot move into its branch. ``"auto"`` cuts the chain there too (every block
    halves), instead of duplicating it whole."""
    gm, blocks, rejected, parts = _planned(models.cifar_resnet(20), torch.randn(models.CIFAR_INPUT))
    second = blocks[1]
    parts = dict(parts)
    parts[second] = dataclasses.replace(
        parts[second], pre_op_roles=None, pre_op_reason="post-op x cannot move into the branch"
    )
    result = plan(gm, blocks, rejected, parts, leftover="store", split=split)
    fates = [bp.fate for bp in result.blocks[:3]]
    assert fates == ["kept", "F", "G"]
    assert {stage.split for stage in result.stages} == {"halve"}
    assert result.blocks[0].reason is KeptReason.ODD_LEFTOVER
    assert result.stages[0].couplings[0].f_pre_op is None


def _insert_grad_mode(gm: torch.fx.GraphModule, before: torch.fx.Node, after: torch.fx.Node):
    """``torch._C._set_grad_enabled(False)`` before ``before``, ``(True)`` after ``after``."""
    with gm.graph.inserting_before(before):
        gm.graph.call_function(torch._C._set_grad_enabled, (False,))
    with gm.graph.inserting_after(after):
        gm.graph.call_function(torch._C._set_grad_enabled, (True,))


def test_blocks_in_or_across_a_no_grad_span_are_kept() -> None:
    gm, blocks, rejected, parts = _planned(models.cifar_resnet(20), torch.randn(models.CIFAR_INPUT))
    first, second = blocks[0], blocks[1]
    # A span around block 0's whole computation, and one that starts inside block 1.
    _insert_grad_mode(gm, first.region[0], first.output)
    _insert_grad_mode(gm, second.region[1], second.output)
    result = plan(gm, blocks, rejected, parts)
    assert [(bp.fate, bp.reason) for bp in result.blocks[:2]] == [
        ("kept", KeptReason.GRAD_MODE),
        ("kept", KeptReason.GRAD_MODE),
    ]
    assert result.stages
    spans = [n for n in gm.graph.nodes if n.target is torch._C._set_grad_enabled]
    planned = {
        n for s in result.stages for c in s.couplings for b in (c.f, c.g) if b for n in b.region
    }
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert all(not order[spans[0]] < order[n] < order[spans[-1]] for n in planned)
