"""Smoke test of ``benchmarks/coverage.py`` (issue 14) and of how it classifies models.

The script runs as a user runs it, on two small models; the classification
(refused / crash / nothing reversible, the identity-block share) is checked
in-process on tiny hand-made models.
"""

from __future__ import annotations

import pytest
import torch
from test_benchmarks import results, run_script
from torch import nn

import revcompile
from benchmarks import coverage
from benchmarks.lib.exactness import fake_saved_bytes
from benchmarks.lib.zoo import ResUNet, ZooModel
from revcompile.memory import saved_activation_bytes


def test_coverage_run_on_two_models(tmp_path) -> None:
    run_script("coverage", "--models", "resnet18", "res_unet", results_dir=tmp_path)

    stem = tmp_path / "coverage_subset"
    saved = results(stem)
    rows = {row["model"]: row for row in saved["rows"]}
    assert list(rows) == ["resnet18", "res_unet"]
    resnet18 = rows["resnet18"]
    # 8 basic blocks, of which 3 downsample with a projection shortcut: 5 identity blocks.
    assert (resnet18["blocks"], resnet18["identity_blocks"]) == (8, 5)
    assert resnet18["kept"]["projection"] == 3
    for row in rows.values():
        assert row["status"] == "converted"
        assert 0 < row["reversible_identity"] <= row["identity_blocks"]
        check = row["gradient_check"]
        assert check["status"] == "passed" and check["max_rel_err"] <= 1e-9, check
        assert 0 < row["saved_ratio"] < 1
        assert row["halve"]["status"] == "converted"
    totals = saved["meta"]["totals"]
    identity = sum(r["identity_blocks"] for r in rows.values())
    assert totals["share"] == sum(r["reversible_identity"] for r in rows.values()) / identity
    assert totals["crashes"] == [] and totals["gradient_check_passed"] == 2
    table = stem.with_suffix(".md").read_text()
    assert "| **total: 2 models, 2 converted**" in table and "`res_unet`" in table


class NoResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu()


def _broken(size: int) -> nn.Module:
    raise RuntimeError("cannot build\nsecond line")


def test_failures_and_empty_models_are_listed() -> None:
    assert coverage.failure(revcompile.ConversionError("no way\nmore"))["status"] == "refused"
    crash = coverage.failure(KeyError("x"))
    assert crash["status"] == "crash" and crash["error"] == "KeyError: 'x'"

    tiny = {"check_size": 8, "memory_size": 8}
    rows = [
        coverage.measure(ZooModel("plain", "hand-written", "test", lambda s: NoResidual(), **tiny)),
        coverage.measure(ZooModel("broken", "hand-written", "test", _broken, **tiny)),
    ]
    assert rows[0]["status"] == "converted" and rows[0]["identity_blocks"] == 0
    assert rows[1]["status"] == "crash" and "RuntimeError: cannot build" in rows[1]["error"]
    totals = coverage.totals(rows)
    assert totals["share"] is None and totals["converted"] == 1
    why = dict(totals["nothing_reversible"])
    assert why["plain"].startswith("no residual blocks found")
    assert why["broken"].startswith("crash:")
    assert totals["crashes"] == ["broken (convert): building the model: RuntimeError: cannot build"]


@pytest.mark.parametrize(
    "code, counted", [("projection", False), ("broadcast", False), (None, True)]
)
def test_identity_blocks_exclude_projection_and_broadcast(code, counted) -> None:
    fate, reason = ("F", None) if code is None else ("kept", code)
    block = revcompile.conversion_report.BlockReport(
        "b", "identity" if code != "projection" else "projection", fate, code=reason
    )
    counts = coverage.block_counts(revcompile.ConversionReport(blocks=[block]))
    assert counts["identity_blocks"] == int(counted)
    assert counts["reversible_identity"] == int(counted)


def test_fake_saved_bytes_equal_the_measurement() -> None:
    torch.manual_seed(0)
    model = ResUNet().train()
    x = torch.randn(2, 3, 32, 32)
    gm = revcompile.convert(model, x).train()
    for module in (model, gm):
        assert fake_saved_bytes(module, x) == saved_activation_bytes(module, x)


def test_proxies_left_on_a_model_are_found() -> None:
    model = nn.Sequential(NoResidual())
    proxy = torch.fx.Proxy(torch.fx.Graph().placeholder("x"))
    assert coverage.proxies_left(model) == []
    model[0].cache = {"cpu": proxy}  # as timm's LeViT attention-bias cache after tracing
    model.last = [proxy]
    assert coverage.proxies_left(model) == ["last", "0.cache"]
