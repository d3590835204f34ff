"""Smoke tests of the benchmark scripts (nothing here is timed).

Every variant of ``benchmarks._common`` builds and takes a training step; a
quick run of ``memory_vs_depth`` and ``torchvision_models`` writes its table,
CSV/JSON and plot, reports a missing peer library as skipped instead of
crashing, and shows the shape the README claims (saved bytes of the original
grow with depth, revcompile's do not). Results go to a temporary folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import _common as common
from benchmarks import memory_vs_depth, torchvision_models

# memcnn frees storages through the deprecated TypedStorage API.
pytestmark = pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")

EAGER_VARIANTS = sorted(set(common.VARIANTS) - common.ISOLATED_VARIANTS)


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize("variant", EAGER_VARIANTS)
def test_variant_takes_a_training_step(variant: str) -> None:
    reason = common.skip_reason(variant, common.peer_status())
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = common.build("cifar-n3", variant)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = common.training_step(
        model, torch.randn(4, 3, 32, 32), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    step()
    changed = [
        name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])
    ]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Every parameter that reaches the loss moves; allow BN-cancelled biases to stay.
    assert len(changed) >= 0.9 * len(before), sorted(set(before) - set(changed))


def test_memory_vs_depth_quick_run(results_dir, monkeypatch) -> None:
    real_status = common.peer_status
    monkeypatch.setattr(
        common,
        "peer_status",
        lambda: {**real_status(), "memcnn": "unavailable: ModuleNotFoundError: test"},
    )
    variants = ["original", "revcompile_checkpoint", "memcnn_revnet"]
    assert memory_vs_depth.main(["--quick", "--no-peak", "--variants", *variants]) == 0

    stem = results_dir / "memory_vs_depth_quick"
    for suffix in (".csv", ".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix
    saved = json.loads(stem.with_suffix(".json").read_text())
    rows = {(r["variant"], r["model"]): r for r in saved["rows"]}
    assert rows[("memcnn_revnet", "cifar-n3")]["skipped"].startswith("memcnn unavailable")
    assert "skipped" in stem.with_suffix(".md").read_text()
    growth = saved["meta"]["summary"]
    assert growth["original"]["saved_bytes_ratio_n9_over_n3"] > 2.5
    assert growth["revcompile_checkpoint"]["saved_bytes_ratio_n9_over_n3"] == 1.0


def test_torchvision_models_quick_run(results_dir) -> None:
    variants = ["original", "revcompile_checkpoint", "revcompile_reference"]
    argv = ["--models", "resnet50", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    assert torchvision_models.main([*argv, "--no-peak", "--variants", *variants]) == 0

    stem = results_dir / "torchvision_models"
    saved = json.loads(stem.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in saved["rows"]}
    assert all(rows[v]["median_s"] > 0 for v in variants)
    assert rows["revcompile_checkpoint"]["saved_ratio_vs_original"] < 0.08
    assert saved["meta"]["summary"]["resnet50"]["time_ratio_vs_reference"] > 0
    assert stem.with_suffix(".png").stat().st_size > 0
