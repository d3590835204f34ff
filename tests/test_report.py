"""The report agrees with the plan and with the converted module (issue 13).

The report is built once, from the Plan and emit's rewrite records; these tests
check it against what ``analyze`` says and against the module ``convert``
returns, on a table of models.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import models
import pytest
import torch
import torchvision
from torch import nn

import revcompile
from revcompile.runtime import ReversibleSequence


class TiedHead(nn.Module):
    """A CIFAR ResNet whose two head layers are distinct Parameters viewing one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.net = models.cifar_resnet(14)
        self.extra = nn.Linear(10, 10)
        self.tied = nn.Linear(10, 10, bias=False)
        self.tied.weight = nn.Parameter(self.extra.weight)  # same memory, another Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tied(self.extra(self.net(x)))


def test_params_count_tensors_sharing_memory_once() -> None:
    model = TiedHead()
    gm = revcompile.convert(model, torch.randn(models.CIFAR_INPUT))
    report = revcompile.report(gm)
    tied = model.tied.weight.numel()
    assert report.params_before == sum(p.numel() for p in model.parameters()) - tied
    addresses = [p.data_ptr() for p in gm.parameters()]
    assert len(addresses) == len(set(addresses)) + 1  # the converted module keeps the tie
    assert report.params_after == sum(p.numel() for p in gm.parameters()) - tied


AGREEMENT_MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(weights=None),
    "cifar_resnet20": lambda: models.cifar_resnet(20),
    "no_residuals": models.PlainNet,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(AGREEMENT_MODELS))
def test_report_analysis_and_module_agree(name: str) -> None:
    torch.manual_seed(0)
    model = AGREEMENT_MODELS[name]()
    x = torch.randn(2, 3, 32, 32)
    analysis = revcompile.analyze(model, x)
    gm = revcompile.convert(model, x)
    converted = revcompile.report(gm)

    def fates(report: revcompile.ConversionReport) -> list[tuple]:
        return [(b.name, b.shortcut, b.fate, b.stage, b.code) for b in report.blocks]

    assert fates(converted) == fates(analysis)
    assert converted.stages == analysis.stages
    sequences = {n: m for n, m in gm.named_modules() if isinstance(m, ReversibleSequence)}
    assert sorted(sequences) == sorted(stage.name for stage in converted.stages)
    for stage in converted.stages:
        couplings = list(sequences[stage.name].couplings)
        assert sum(c.G is not None for c in couplings) == stage.couplings
        assert any(c.G is None for c in couplings) == stage.half
        assert len(couplings) == stage.couplings + stage.half
        assert sequences[stage.name].split == stage.split
    assert converted.params_after == sum(p.numel() for p in gm.parameters())
    assert converted.params_before == analysis.params_before


ROOT = Path(__file__).resolve().parents[1]
PASSES_MAY_IMPORT = (
    "revcompile.passes",
    "revcompile.runtime",
    "revcompile.errors",
    "revcompile.options",
    "revcompile.conversion_report",
    # runtime-level too (imports only torch): the memory planner's costs
    "revcompile.memory",
)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from revcompile import x`` as
    ``revcompile.x``), wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "revcompile":
                names.update(f"revcompile.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


def test_passes_and_runtime_import_only_the_layers_below() -> None:
    def own(path: Path) -> set[str]:
        return {name for name in imported_modules(path) if name.split(".")[0] == "revcompile"}

    for path in (ROOT / "passes").rglob("*.py"):
        bad = {name for name in own(path) if not name.startswith(PASSES_MAY_IMPORT)}
        assert not bad, f"{path.name} imports {bad}"
    for path in (ROOT / "revcompile" / "runtime").rglob("*.py"):
        bad = {n for n in own(path) if not n.startswith("revcompile.runtime")}
        assert not bad, f"{path.name} imports {bad}"
    assert "revcompile.api" not in imported_modules(ROOT / "revcompile" / "io.py")


def test_package_has_no_lazy_attributes_and_any_module_imports_first() -> None:
    assert "__getattr__" not in vars(revcompile)
    for first in ("revcompile.passes.emit", "revcompile.io", "revcompile.cli"):
        subprocess.run([sys.executable, "-c", f"import {first}; import revcompile"], check=True)
