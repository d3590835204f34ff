"""Residual analysis: trace -> shapes -> find_residuals -> plan -> report."""

from __future__ import annotations

import copy
import dataclasses
import json
import operator

import models
import pytest
import torch
import torchvision
from hypothesis import given
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.partition import partition
from revcompile.passes.plan import plan
from revcompile.passes.shape_prop import propagate_shapes
from revcompile.passes.trace import trace
from strategies import GeneratedNet, build_model, residual_nets

from revcompile.api import analyze, pipeline
from revcompile.conversion_report import ConversionReport, KeptReason
from revcompile.errors import ConversionError
from revcompile.report_builder import build_report


def _split(report: ConversionReport) -> tuple[list[str], list[str]]:
    projection = [b.name for b in report.blocks if b.shortcut == "projection"]
    identity = [b.name for b in report.blocks if b.shortcut == "identity"]
    return projection, identity


def _torchvision_stage_layout(report: ConversionReport, layers: tuple[int, ...]) -> None:
    """Each torchvision stage: projection first block (except resnet18/34's
    layer1), then identity blocks paired in order, an odd last one a
    half-coupling (the default ``leftover="half"``)."""
    by_name = {block.name: block for block in report.blocks}
    assert list(by_name) == [
        f"layer{stage + 1}.{index}" for stage, count in enumerate(layers) for index in range(count)
    ]
    for block in report.blocks:
        if block.shortcut == "projection":
            assert (block.fate, block.code) == ("kept", KeptReason.PROJECTION.value)
    for stage in report.stages:
        assert stage.blocks == sorted(stage.blocks, key=list(by_name).index)
        fates = [by_name[name].fate for name in stage.blocks]
        pairs, odd = divmod(len(stage.blocks), 2)
        assert fates == ["F", "G"] * pairs + ["half"] * odd
        assert (stage.couplings, stage.half) == (pairs, bool(odd))
    for layer in range(1, len(layers) + 1):
        identity = [
            b
            for b in report.blocks
            if b.name.startswith(f"layer{layer}.") and b.shortcut == "identity"
        ]
        if len(identity) % 2:
            assert (identity[-1].fate, identity[-1].code) == ("half", None)


@pytest.mark.parametrize(
    ("factory", "layers", "projections"),
    [
        (torchvision.models.resnet18, (2, 2, 2, 2), 3),
        (torchvision.models.resnet34, (3, 4, 6, 3), 3),
        (torchvision.models.resnet50, (3, 4, 6, 3), 4),
        (torchvision.models.resnet101, (3, 4, 23, 3), 4),
        (torchvision.models.resnet152, (3, 8, 36, 3), 4),
        (torchvision.models.wide_resnet50_2, (3, 4, 6, 3), 4),
        (torchvision.models.resnext50_32x4d, (3, 4, 6, 3), 4),
    ],
)
def test_torchvision_resnets(factory, layers, projections) -> None:
    report = analyze(factory(weights=None))
    projection, identity = _split(report)
    assert len(report.blocks) == sum(layers)
    assert len(projection) == projections
    assert len(identity) == sum(layers) - projections
    assert report.shapes_checked
    assert not report.rejected
    _torchvision_stage_layout(report, layers)


def test_resnet50_and_resnet18_counts() -> None:
    r50 = analyze(torchvision.models.resnet50(weights=None))
    assert [len(part) for part in _split(r50)] == [4, 12]
    assert [s.name for s in r50.stages] == ["layer1_rev", "layer2_rev", "layer3_rev", "layer4_rev"]
    assert [s.couplings for s in r50.stages] == [1, 1, 2, 1]
    assert {b.name for b in r50.blocks if b.fate == "half"} == {"layer2.3", "layer3.5"}
    r18 = analyze(torchvision.models.resnet18(weights=None))
    assert [len(part) for part in _split(r18)] == [3, 5]
    assert [b.fate for b in r18.blocks] == ["F", "G"] + ["kept", "half"] * 3
    assert [s.name for s in r18.stages] == [
        "layer1_rev",
        "layer2_1_rev",
        "layer3_1_rev",
        "layer4_1_rev",
    ]


def test_analysis_leaves_model_unmodified() -> None:
    model = torchvision.models.resnet18(weights=None).train()
    before = copy.deepcopy(model.state_dict())
    analyze(model)
    analyze(model, torch.randn(2, 3, 64, 64))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert model.training


@pytest.mark.parametrize("option", ["A", "B"])
@pytest.mark.parametrize("depth", [20, 56, 110])
def test_cifar_resnets(depth: int, option: str) -> None:
    n = (depth - 2) // 6
    report = analyze(models.cifar_resnet(depth, option), torch.randn(models.CIFAR_INPUT))
    projection, identity = _split(report)
    assert projection == ["layer2.0", "layer3.0"]
    assert len(identity) == 3 * n - 2
    assert [s.blocks for s in report.stages] == [
        [f"layer1.{i}" for i in range(n)],
        [f"layer2.{i}" for i in range(1, n)],
        [f"layer3.{i}" for i in range(1, n)],
    ]
    assert [b.name for b in report.blocks if b.fate == "half"] == [
        f"layer{k}.{n - 1}" for k in (1, 2, 3) if (n - (k > 1)) % 2
    ]


def test_cifar_resnet164_bottleneck() -> None:
    report = analyze(models.cifar_resnet164(), torch.randn(models.CIFAR_INPUT))
    projection, identity = _split(report)
    assert projection == ["layer1.0", "layer2.0", "layer3.0"]
    assert len(identity) == 51
    assert [s.couplings for s in report.stages] == [8, 8, 8]
    assert [b.name for b in report.blocks if b.fate == "half"] == [
        "layer1.17",
        "layer2.17",
        "layer3.17",
    ]


def test_preact_resnet() -> None:
    result = pipeline(models.preact_resnet(20), torch.randn(models.CIFAR_INPUT), rewrite=False)
    report = result.report
    assert _split(report)[0] == ["layer2.0", "layer3.0"]
    assert [s.blocks for s in report.stages] == [
        ["layer1.0", "layer1.1", "layer1.2"],
        ["layer2.1", "layer2.2"],
        ["layer3.1", "layer3.2"],
    ]
    assert all(bp.block.post_op is None for bp in result.plan.blocks)


def test_residual_spellings_nested_in_containers() -> None:
    result = pipeline(models.SpellingsNet(), torch.randn(2, 3, 8, 8), rewrite=False)
    names = ["stages.0.0", "stages.0.1.inner", "stages.1.0", "stages.1.1"]
    assert [b.name for b in result.report.blocks] == names
    assert [b.fate for b in result.report.blocks] == ["F", "G", "F", "G"]
    assert [s.blocks for s in result.report.stages] == [names]
    blocks = [bp.block for bp in result.plan.blocks]
    assert [b.join.target for b in blocks] == [torch.add, "add", "add_", operator.add]
    assert blocks[1].post_op is not None and blocks[1].post_op.target == "relu"
    # the method-add's ReLU moves to the start of the next coupling's F branch
    (stage,) = result.plan.stages
    assert stage.couplings[1].f_pre_op is blocks[1].post_op
    assert stage.couplings[0].f_pre_op is None


def test_add_assign_at_top_level() -> None:
    report = analyze(models.AddAssignNet(), torch.randn(2, 3, 8, 8))
    assert [(b.name, b.fate) for b in report.blocks] == [("block1", "F"), ("block2", "G")]


def test_nested_residual_blocks() -> None:
    report = analyze(models.NestedResidualNet(), torch.randn(2, 3, 8, 8))
    fates = {b.name: (b.fate, b.code) for b in report.blocks}
    assert fates["outer.0"][0] == "F" and fates["outer.1"][0] == "G"
    assert fates["outer"] == ("kept", KeptReason.NESTED.value)
    (outer,) = [b for b in report.blocks if b.name == "outer"]
    assert outer.detail == "outer.0, outer.1"


def test_inception_style_add_is_rejected() -> None:
    report = analyze(models.InceptionAddNet(), torch.randn(2, 3, 8, 8))
    assert report.blocks == [] and report.stages == []
    (rejected,) = report.rejected
    assert "parallel branches" in rejected.reason


def test_broadcasting_adds_are_kept_with_shapes() -> None:
    report = analyze(models.BroadcastAddNet(), torch.randn(2, 3, 8, 8))
    assert report.stages == []
    for block in report.blocks:
        assert (block.fate, block.code) == ("kept", KeptReason.BROADCAST.value)
        assert "(2, 8, 1, 1)" in block.detail and "(2, 8, 8, 8)" in block.detail


def test_feature_tap_block_is_kept() -> None:
    report = analyze(models.FeatureTapNet(), torch.randn(2, 3, 8, 8))
    tapped, clean = report.blocks
    assert tapped.name == "block1" and tapped.fate == "kept"
    assert tapped.code == KeptReason.TAPPED.value
    assert "aux_head" in tapped.detail
    assert (clean.name, clean.fate, clean.code) == ("block2", "half", None)


def test_constant_adds_are_rejected() -> None:
    report = analyze(models.ConstantAddNet(), torch.randn(2, 3, 8, 8))
    assert report.blocks == []
    assert len(report.rejected) == 2
    assert all("adds a constant" in item.reason for item in report.rejected)


def test_model_without_residuals_gives_empty_plan() -> None:
    report = analyze(models.PlainNet())
    assert (report.blocks, report.stages, report.rejected) == ([], [], [])
    assert "0 residual blocks" in str(report)


def test_untraceable_model_raises_conversion_error() -> None:
    with pytest.raises(ConversionError) as info:
        analyze(models.DataDependentNet())
    message = str(info.value)
    assert "DataDependentNet" in message
    assert "control flow" in message
    assert "leaf" in message and "concrete_args" in message


def test_rejected_input_shape_names_the_shape() -> None:
    with pytest.raises(ConversionError, match=r"\(2, 5, 32, 32\)"):
        analyze(models.cifar_resnet(20), torch.randn(2, 5, 32, 32))


def test_shapes_unknown_without_guessable_input() -> None:
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + self.f(torch.relu(x)) + y

    report = analyze(TwoInputs())
    assert not report.shapes_checked
    assert [b.fate for b in report.blocks] == ["half"]
    assert any("different model inputs" in r.reason for r in report.rejected)


def test_odd_channel_count_is_kept() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), models.TorchAddBlock(3))
    report = analyze(model, torch.randn(2, 3, 8, 8), split="halve")
    (block,) = report.blocks
    assert (block.fate, block.code) == ("kept", KeptReason.NOT_HALVABLE.value)
    assert "odd channel count" in block.detail


def test_half_leftover_and_branch_check() -> None:
    gm = trace(models.cifar_resnet(20))
    propagate_shapes(gm, (torch.randn(models.CIFAR_INPUT),))
    blocks, rejected = find_residuals(gm)
    parts = partition(gm, blocks)
    half = plan(gm, blocks, rejected, parts, leftover="half")
    assert [bp.fate for bp in half.blocks[:3]] == ["F", "G", "half"]
    assert half.stages[0].couplings[-1].g is None
    assert half.stages[0].couplings[-1].f_pre_op is blocks[1].post_op
    unsplittable = {
        block: dataclasses.replace(
            part, roles=None, reason="unsupported op x", pre_op_roles=None, pre_op_reason="x"
        )
        for block, part in parts.items()
    }
    refuse = plan(gm, blocks, rejected, unsplittable, split="halve")
    assert refuse.stages == []
    identity_blocks = [bp for bp in refuse.blocks if bp.block.shortcut == "identity"]
    assert {(bp.reason, bp.detail) for bp in identity_blocks} == {
        (KeptReason.NOT_HALVABLE, "unsupported op x")
    }
    with pytest.raises(ValueError):
        plan(gm, blocks, rejected, parts, leftover="drop")


def test_report_round_trip_and_table() -> None:
    report = analyze(torchvision.models.resnet18(weights=None))
    data = json.loads(json.dumps(report.to_dict()))
    assert ConversionReport.from_dict(data) == report
    text = str(report)
    assert "layer1_rev" in text and KeptReason.PROJECTION.words in text
    assert build_report(pipeline(models.PlainNet(), rewrite=False).plan).blocks == []


def test_report_without_codes_still_loads() -> None:
    """Reports written before BlockReport had ``code`` and ``detail``."""
    data = analyze(torchvision.models.resnet18(weights=None)).to_dict()
    for block in data["blocks"]:
        del block["code"], block["detail"]
    old = ConversionReport.from_dict(data)
    assert [b.reason for b in old.kept] == [b["reason"] for b in data["blocks"] if b["reason"]]
    assert {b.code for b in old.blocks} == {None}


@given(residual_nets())
def test_generated_networks_match_ground_truth(net: GeneratedNet) -> None:
    model = build_model(net.spec)
    # the ground truth is that of leftover="store"
    report = pipeline(model, torch.randn(net.spec.input_shape), rewrite=False, leftover="store")
    report = report.report
    truth = net.truth
    assert {b.name: b.shortcut for b in report.blocks} == truth.shortcuts
    assert list(truth.shortcuts) == [b.name for b in report.blocks]
    assert {b.name: b.fate for b in report.blocks} == truth.fates
    assert [s.blocks for s in report.stages] == truth.stages
    assert len({s.name for s in report.stages}) == len(report.stages)
    assert report.rejected == []
