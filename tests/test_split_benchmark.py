"""Smoke test of ``benchmarks/split.py`` (issue 14: the evidence for the default of ``split``).

The script runs as a user runs it (``--quick`` on the ViT, without the peak
memory: a fresh process per variant takes seconds). What each network is for
is checked in-process on its conversion reports: the ViT's attention blocks
and every ConvNeXt block (channel-axis LayerNorm) are kept ``not_halvable``
under ``split="halve"`` and become couplings under ``"auto"``; on the ResNet
``"auto"`` plans exactly what ``"halve"`` plans.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from test_benchmarks import results, run_script

import revcompile
from benchmarks import split
from revcompile.conversion_report import ConversionReport

X = torch.randn(4, 1, 16, 16)


def report(network: str, variant: str) -> ConversionReport:
    return revcompile.report(split.build(variant, network, 0, X, "checkpoint"))


def test_quick_run_measures_every_variant(tmp_path) -> None:
    run_script("split", "--quick", "--no-peak", results_dir=tmp_path)

    stem = tmp_path / "split_quick"
    rows = {row["variant"]: row for row in results(stem)["rows"]}
    assert list(rows) == list(split.VARIANTS)
    assert {row["network"] for row in rows.values()} == {"vit"}
    for row in rows.values():
        assert row["step_s"] > 0 and row["saved_bytes_store"] > 0
        assert row["peak_bytes"] is None
        assert math.isfinite(row["final_train_loss"]) and 0 <= row["test_accuracy"] <= 100
    assert (rows["halve"]["reversible"], rows["auto"]["reversible"]) == ("4/8", "8/8")
    assert rows["halve"]["kept"] == "not_halvable ×4"
    # Duplicate keeps the original weights; halve slices the MLP blocks.
    assert rows["original"]["parameters"] == rows["auto"]["parameters"]
    assert rows["halve"]["parameters"] < rows["auto"]["parameters"]
    for variant in ("halve", "auto"):
        saved = rows[variant]["saved_bytes_checkpoint"]
        assert saved < rows["original"]["saved_bytes_checkpoint"]
    table = stem.with_suffix(".md").read_text()
    assert "| vit | auto | 8/8 | duplicate ×1 | - |" in table
    assert stem.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize(
    ("network", "unknown", "halved"),
    [("vit", "MultiheadAttention", 4), ("convnext", "Tensor.pow", 0)],
)
def test_branches_that_do_not_halve(network: str, unknown: str, halved: int) -> None:
    halve, auto = report(network, "halve"), report(network, "auto")
    blocks = len(halve.blocks)
    assert Counter(b.fate for b in halve.blocks) == Counter(
        {"kept": blocks - halved, "half": halved} if halved else {"kept": blocks}
    )
    for block in halve.kept:
        assert block.code == "not_halvable"
        assert block.detail == f"unsupported op {unknown} in branch"
    assert not auto.kept and {s.split for s in auto.stages} == {"duplicate"}
    assert sum(len(s.blocks) for s in auto.stages) == blocks


def test_auto_is_halve_where_every_chain_halves() -> None:
    halve, auto = report("resnet", "halve"), report("resnet", "auto")
    assert {s.split for s in halve.stages} == {"halve"}
    assert auto.stages == halve.stages
    assert auto.blocks == halve.blocks
