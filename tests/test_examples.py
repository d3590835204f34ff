"""The examples run and print what their docstrings promise (so they cannot rot).

Each example runs in a fresh interpreter, as a user runs it, with small flags.
The repository root is put first on ``PYTHONPATH`` so the checkout's
``revcompile`` is the one imported. Budget: about 60 s for the three.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"


def run_example(script: str, *args: str, timeout: float = 120) -> str:
    """Run ``examples/<script>`` with ``args``; return its stdout (fail on error)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the test machine's cores are shared
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, (
        f"{script} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    )
    return completed.stdout


def test_train_digits_quick(tmp_path: Path) -> None:
    out = run_example("train_digits.py", "--quick", "--no-progress", "--out-dir", str(tmp_path))
    for network in ("ResNet", "RevNet"):
        assert re.search(rf"{network} seed 0 epoch  1/1: train loss [\d.]+", out)
        assert re.search(rf"{network} seed 0: final test accuracy [\d.]+%", out)
    assert "reversible stages" in out  # the conversion report
    results = json.loads((tmp_path / "digits_quick_results.json").read_text())
    assert {run["network"] for run in results["runs"]} == {"ResNet", "RevNet"}
    assert 0 < results["summary"]["saved_bytes_ratio"] < 1
    assert (tmp_path / "digits_quick_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_convert_torchvision() -> None:
    out = run_example("convert_torchvision.py", "--resolution", "64", "--budget-gb", "1")
    assert "reversible stages" in out
    ratio = float(re.search(r"ratio ([\d.]+)", out).group(1))
    assert 0 < ratio < 1
    before = int(re.search(r"^  resnet50\s+(\d+)$", out, re.M).group(1))
    after = int(re.search(r"^  converted \(RevNet\)\s+(\d+)\s+[\d.]+x$", out, re.M).group(1))
    assert after > before


def test_reversible_by_hand() -> None:
    out = run_example("reversible_by_hand.py", "--depths", "1", "4", "--channels", "8")
    assert "training step, loss" in out
    float64_difference = re.search(r"torch.float64: max relative difference (\S+)", out)
    assert float(float64_difference.group(1)) < 1e-10
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+) MiB\s+([\d.]+) MiB\s+([\d.]+)$", out, re.M)
    assert [int(depth) for depth, *_ in rows] == [1, 4]
    reversible = [float(row[1]) for row in rows]
    stored = [float(row[2]) for row in rows]
    assert reversible[0] == reversible[1]  # flat in depth
    assert stored[1] > stored[0] > reversible[0]  # grows with depth
