"""The emit pass on a planned CIFAR ResNet-20: what it writes into the graph."""

from __future__ import annotations

import operator

import models
import pytest
import torch
from revcompile.passes.cleanup import cleanup
from revcompile.passes.emit import emit
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.ir import PostOpPlaced, SegmentCheckpointed, StageEmitted
from revcompile.passes.partition import partition
from revcompile.passes.plan import plan
from revcompile.passes.shape_prop import propagate_shapes
from revcompile.passes.trace import trace

from revcompile.runtime import CheckpointedSegment, ReversibleSequence


def _planned():
    model = models.cifar_resnet(20)
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(models.CIFAR_INPUT),))
    blocks, rejected = find_residuals(gm)
    # leftover="store": the formulas below count full couplings (odd leftovers stay blocks)
    return model, gm, plan(gm, blocks, rejected, partition(gm, blocks), leftover="store")


def _called(gm: torch.fx.GraphModule, kind: type) -> list[str]:
    return [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), kind)
    ]


def test_one_reversible_sequence_node_per_planned_stage() -> None:
    _, gm, the_plan = _planned()
    rewrites = emit(gm, the_plan, policy="store")
    cleanup(gm)
    assert _called(gm, ReversibleSequence) == [stage.name for stage in the_plan.stages]
    for stage in the_plan.stages:
        module = gm.get_submodule(stage.name)
        assert (module.dim, module.split) == (stage.dim, stage.split)
        assert len(module.couplings) == len(stage.couplings)
    emitted = [r for r in rewrites if isinstance(r, StageEmitted)]
    assert [r.stage for r in emitted] == [stage.name for stage in the_plan.stages]
    assert _called(gm, CheckpointedSegment) == []


def test_checkpoint_policy_outlines_every_other_compute_node() -> None:
    _, gm, the_plan = _planned()
    rewrites = emit(gm, the_plan, policy="checkpoint")
    cleanup(gm)
    segments = _called(gm, CheckpointedSegment)
    assert segments and segments == [r.name for r in rewrites if isinstance(r, SegmentCheckpointed)]
    outside = [
        n
        for n in gm.graph.nodes
        if n.op in ("call_module", "call_function", "call_method")
        and not (
            n.op == "call_module" and str(n.target) in segments + _called(gm, ReversibleSequence)
        )
        and n.target is not operator.getitem
    ]
    assert outside == []


def test_post_ops_are_moved_or_kept_after_the_stage_and_recorded() -> None:
    _, gm, the_plan = _planned()
    rewrites = emit(gm, the_plan, policy="store")
    moved = [r for r in rewrites if isinstance(r, PostOpPlaced) and r.branch is not None]
    after = [r for r in rewrites if isinstance(r, PostOpPlaced) and r.branch is None]
    # CIFAR basic blocks end in a ReLU: every coupling's G (and every F but the
    # chain's first) starts with the previous block's ReLU; the last stays after.
    assert len(after) == len(the_plan.stages)
    couplings = sum(len(stage.couplings) for stage in the_plan.stages)
    assert len(moved) == 2 * couplings - len(the_plan.stages)
    assert all(r.describe() for r in rewrites)


def test_emit_leaves_the_original_model_untouched() -> None:
    model, gm, the_plan = _planned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    emit(gm, the_plan, policy="checkpoint")
    cleanup(gm)
    assert dict(model.named_modules()).keys() == modules.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_policy_is_refused() -> None:
    _, gm, the_plan = _planned()
    with pytest.raises(ValueError, match="policy"):
        emit(gm, the_plan, policy="drop")  # type: ignore[arg-type]
