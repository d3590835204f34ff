"""The planning pass on records it is given (no analysis inside plan)."""

from __future__ import annotations

import dataclasses

import models
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


def test_a_post_op_that_cannot_move_ends_the_chain() -> None:
    """Plan decides with the records emit builds from: no coupling whose pre-op
    cannot move into its branch."""
    gm, blocks, rejected, parts = _planned(models.cifar_resnet(20), torch.randn(models.CIFAR_INPUT))
    second = blocks[1]
    parts = dict(parts)
    parts[second] = dataclasses.replace(
        parts[second], pre_op_roles=None, pre_op_reason="post-op x cannot move into the branch"
    )
    result = plan(gm, blocks, rejected, parts)
    fates = [bp.fate for bp in result.blocks[:3]]
    assert fates == ["kept", "F", "G"]
    assert result.blocks[0].reason is KeptReason.ODD_LEFTOVER
    assert result.stages[0].couplings[0].f_pre_op is None
