"""Smoke tests of the benchmark scripts, run as a user runs them (nothing here is timed).

Each script is started as ``python -m benchmarks.<script> ... --results-dir
<tmp>`` from the repository root; the tests read only what it writes. Every
eager variant builds and trains (``variant_check``); a quick run of
``memory_vs_depth`` and ``torchvision_models`` writes its table, CSV/JSON and
plot, reports a missing peer library as skipped instead of crashing, and shows
the shape the README claims (saved bytes of the original grow with depth,
revcompile's do not); ``runtime_overhead`` and ``conversion_time`` write their
results.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The variants variant_check runs (every variant but the isolated torch.compile one).
EAGER_VARIANTS = [
    "original",
    "checkpoint_per_block",
    "checkpoint_sequential",
    "memcnn_revnet",
    "revlib_revnet",
    "momentumnet",
    "revcompile_store",
    "revcompile_checkpoint",
    "revcompile_reference",
]


def run_script(script: str, *args: str, results_dir: Path, pythonpath: Path | None = None) -> None:
    """``python -m benchmarks.<script> ARGS --results-dir results_dir`` from the repository root."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *args, "--results-dir", str(results_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def results(stem: Path) -> dict[str, Any]:
    return json.loads(stem.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def variant_rows(tmp_path_factory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("variant_check")
    run_script("variant_check", "--spec", "cifar-n3", "--batch", "4", results_dir=out)
    return {row["variant"]: row for row in results(out / "variant_check")["rows"]}


@pytest.mark.parametrize("variant", EAGER_VARIANTS)
def test_variant_takes_a_training_step(variant: str, variant_rows) -> None:
    row = variant_rows[variant]
    if "skipped" in row:
        pytest.skip(row["skipped"])
    assert "error" not in row, row["error"]
    assert row["finite"]
    # Every parameter that reaches the loss moves; allow BN-cancelled biases to stay.
    assert row["moved"] >= 0.9 * row["parameters"], row["unchanged"]


def test_memory_vs_depth_quick_run(tmp_path) -> None:
    # A memcnn that fails to import, whether or not the real one is installed.
    shadow = tmp_path / "shadow"
    (shadow / "memcnn").mkdir(parents=True)
    (shadow / "memcnn" / "__init__.py").write_text("raise ModuleNotFoundError('test')\n")
    variants = ["original", "revcompile_checkpoint", "memcnn_revnet"]
    run_script(
        "memory_vs_depth",
        "--quick",
        "--no-peak",
        "--variants",
        *variants,
        results_dir=tmp_path,
        pythonpath=shadow,
    )

    stem = tmp_path / "memory_vs_depth_quick"
    for suffix in (".csv", ".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix
    saved = results(stem)
    rows = {(r["variant"], r["model"]): r for r in saved["rows"]}
    assert rows[("memcnn_revnet", "cifar-n3")]["skipped"].startswith("memcnn unavailable")
    assert "skipped" in stem.with_suffix(".md").read_text()
    growth = saved["meta"]["summary"]
    assert growth["original"]["saved_bytes_ratio_n9_over_n3"] > 2.5
    assert growth["revcompile_checkpoint"]["saved_bytes_ratio_n9_over_n3"] == 1.0


def test_torchvision_models_quick_run(tmp_path) -> None:
    variants = ["original", "revcompile_checkpoint", "revcompile_reference"]
    argv = ["--models", "resnet50", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    run_script(
        "torchvision_models", *argv, "--no-peak", "--variants", *variants, results_dir=tmp_path
    )

    stem = tmp_path / "torchvision_models"
    saved = results(stem)
    rows = {r["variant"]: r for r in saved["rows"]}
    assert all(rows[v]["median_s"] > 0 for v in variants)
    assert rows["revcompile_checkpoint"]["saved_ratio_vs_original"] < 0.08
    assert saved["meta"]["summary"]["resnet50"]["time_ratio_vs_reference"] > 0
    assert stem.with_suffix(".png").stat().st_size > 0


def test_runtime_overhead_quick_run(tmp_path) -> None:
    run_script("runtime_overhead", "--quick", "--no-peak", results_dir=tmp_path)

    stem = tmp_path / "runtime_overhead_quick"
    for suffix in (".csv", ".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix
    saved = results(stem)
    assert [r["variant"] for r in saved["rows"]] == ["reversible", "reference_mode"]
    assert all(len(r["times_s"]) == 3 for r in saved["rows"])
    summary = saved["meta"]["summary"]
    assert summary["time_ratio"] > 0
    # The reversible stage saves its output only; the reference stores every activation.
    assert summary["saved_bytes_ratio"] < 0.2


def test_conversion_time_quick_run(tmp_path) -> None:
    argv = ["--models", "resnet50", "--warmup", "0", "--repeats", "1"]
    run_script("conversion_time", *argv, results_dir=tmp_path)

    stem = tmp_path / "conversion_time"
    for suffix in (".csv", ".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix
    (row,) = results(stem)["rows"]
    assert row["model"] == "resnet50" and row["stages"] > 0
    assert row["convert_guessed_s"] > row["analyze_guessed_s"] > 0
    assert row["phases_fraction"] and abs(sum(row["phases_fraction"].values()) - 1) < 0.01


def test_fidelity_quick_run(tmp_path) -> None:
    run_script("fidelity", "--quick", results_dir=tmp_path)

    stem = tmp_path / "fidelity_quick"
    for suffix in (".csv", ".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix
    saved = results(stem)
    training = [r for r in saved["rows"] if r["table"] == "training"]
    depth = [r for r in saved["rows"] if r["table"] == "depth"]
    assert [r["step"] for r in training] == [0, 2, 4]
    assert [r["n"] for r in depth] == [2, 4]
    for row in training + depth:
        # Exact mode: bitwise equal to reference_mode; float mode: close, not equal.
        assert row["exact_bitwise"] and row["exact_angle_deg"] == 0.0
        assert 0.0 < row["float_angle_deg"] < 1.0
        assert row["stored32_rel_err"] > 0.0
        if saved["meta"]["peers"]["revlib"].startswith("unavailable"):
            assert "revlib_angle_deg" not in row
        else:
            assert 0.0 < row["revlib_angle_deg"] < 1.0
    assert saved["meta"]["summary"]["n3"]["exact_bitwise_every_step"]


def test_exact_cost_quick_run(tmp_path) -> None:
    run_script("exact_cost", "--quick", results_dir=tmp_path)

    stem = tmp_path / "exact_cost_quick"
    for suffix in (".csv", ".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix
    saved = results(stem)
    stages = [r for r in saved["rows"] if r["measure"] == "saved_bytes" and r["what"] == "stage"]
    # Two float64 streams instead of one float32 output, at every depth.
    assert [r["ratio"] for r in stages] == [2.0, 2.0]
    summary = saved["meta"]["summary"]
    assert summary["stage_saved_bound_met"] and summary["stage_exact_bytes_constant"]
    assert summary["stage_time_ratio"] > 0 and summary["network_time_ratio"] > 0


def test_compile_quick_run(tmp_path) -> None:
    # The "eager" backend: dynamo's graphs without code generation, to keep the smoke test short.
    run_script("compile", "--quick", "--backend", "eager", results_dir=tmp_path)

    stem = tmp_path / "compile_quick"
    for suffix in (".csv", ".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix
    rows = {r["variant"]: r for r in results(stem)["rows"]}
    assert list(rows) == ["original", "original_compiled", "converted", "converted_compiled"]
    for row in rows.values():
        assert not any(key.endswith("error") for key in row), row
        assert row["train_median_s"] > 0 and row["inference_median_s"] > 0
    assert rows["converted_compiled"]["output_max_abs_diff"] < 1e-4
    assert rows["converted"]["saved_bytes"] < rows["original"]["saved_bytes"]


def test_planner_quick_run(tmp_path) -> None:
    run_script("planner", "--quick", results_dir=tmp_path)

    stem = tmp_path / "planner_quick"
    for suffix in (".csv", ".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix
    rows = results(stem)["rows"]
    planned = [r for r in rows if r["method"] in ("planner", "planner_preserve")]
    assert {r["budget"] for r in planned} == {"1.0", "0.25", "min"}
    for row in planned:  # every budget is met, and exactly as predicted
        assert row["fits"] and row["saved_bytes"] == row["predicted_bytes"] <= row["budget_bytes"]
        assert row["step_ratio"] > 0 and row["best_ratio"] > 0
    assert "Noise: at budget 1.0" in stem.with_suffix(".md").read_text()
    # a method that cannot reach a budget says so instead of measuring another configuration
    assert any(r["method"] == "checkpoint_per_block" and r["fits"] is False for r in rows)


SCRIPTS = sorted(
    p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "gpu")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_imports_and_has_a_main(script: str) -> None:
    """A script without a smoke test of its own still must import (optim_in_backward
    imported a module removed long before, unnoticed)."""
    module = importlib.import_module(f"benchmarks.{script}")
    assert callable(module.main)
