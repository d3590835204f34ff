"""``convert(model, x, memory_budget=B)``: measured saved bytes equal the plan's
prediction and fit the budget; preserve_function keeps the original's function
exactly; unmeetable and malformed budgets are refused.

Measured means ``revcompile.memory.saved_activation_bytes`` of the converted
module on the example input, in a separate call from the one ``convert`` makes
for the report.
"""

from __future__ import annotations

import copy
import json

import cli_factories
import models
import pytest
import torch
import torchvision
from equivalence import compare_with_reference
from torch import nn

from revcompile import convert, load, report
from revcompile.cli import main
from revcompile.conversion_report import ConversionReport
from revcompile.errors import BudgetError, ConversionError, OptionError
from revcompile.memory import saved_activation_bytes
from revcompile.runtime import CheckpointedSegment, ReversibleSequence

BUDGETS = (1.0, 0.5, 0.25, 0.1)


class DropoutBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.branch(x))


class DropoutNet(nn.Module):
    """Dropout in the branches: reversible stages save RNG states too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[DropoutBlock(8) for _ in range(4)])
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _keep_features(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    module.features = output.detach()


def hooked_stem() -> nn.Module:
    """A forward hook on the stem (feature extraction): a checkpointed stem would run
    its hook again in backward, so emit stores it; the plan must know."""
    model = DropoutNet()
    model.stem.register_forward_hook(_keep_features)
    return model


class DecayingScale(DropoutNet):
    """A buffer read by the stem and written in place after the blocks: recomputing
    the stem in backward would read the new value, so emit stores it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x) * self.scale)
        self.scale.mul_(0.5)
        return self.head(h.mean((2, 3)))


def tiny_torchvision_resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


MODELS = {
    "cifar_resnet20": (lambda: models.cifar_resnet(20), models.CIFAR_INPUT),
    "cifar_bottleneck": (
        lambda: models.CifarResNet(models.Bottleneck, 3, "B"),
        models.CIFAR_INPUT,
    ),
    "preact_resnet20": (models.preact_resnet, models.CIFAR_INPUT),
    "dropout_net": (DropoutNet, (2, 3, 16, 16)),
    "hooked_stem": (hooked_stem, (2, 3, 16, 16)),
    "decaying_scale": (DecayingScale, (2, 3, 16, 16)),
    "torchvision_resnet18": (tiny_torchvision_resnet, (2, 3, 64, 64)),
}


def built(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(dtype).train()
    return model, torch.randn(shape, dtype=dtype)


def smallest(model: nn.Module, x: torch.Tensor, preserve_function: bool = False) -> int:
    with pytest.raises(BudgetError) as raised:
        convert(model, x, memory_budget=1, preserve_function=preserve_function)
    return raised.value.smallest


@pytest.mark.parametrize("preserve_function", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_measured_saved_bytes_equal_the_prediction_within_the_budget(
    name: str, preserve_function: bool
) -> None:
    model, x = built(name)
    original = saved_activation_bytes(model, x)
    budgets = [*BUDGETS, smallest(model, x, preserve_function)]
    flops = []
    for budget in budgets:
        gm = convert(model, x, memory_budget=budget, preserve_function=preserve_function)
        plan = report(gm).budget
        assert plan is not None
        assert plan.original_bytes == original
        measured = saved_activation_bytes(gm, x)
        assert measured == plan.measured_bytes == plan.predicted_bytes <= plan.budget_bytes, budget
        assert sum(row.predicted_bytes for row in plan.segments) == plan.predicted_bytes
        assert sum(row.recompute_flops for row in plan.segments) == plan.recompute_flops
        flops.append(plan.recompute_flops)
    assert flops[0] == 0  # the whole budget: everything stored
    assert flops == sorted(flops), "a smaller budget never needs fewer recomputed FLOPs"


def test_the_whole_budget_stores_everything_and_changes_nothing() -> None:
    model, x = built("cifar_resnet20")
    gm = convert(model, x, memory_budget=1.0)
    assert not any(isinstance(m, CheckpointedSegment | ReversibleSequence) for m in gm.modules())
    assert {row.choice for row in report(gm).budget.segments} == {"store"}


def test_a_tight_budget_uses_reversible_stages_unless_the_function_is_preserved() -> None:
    model, x = built("cifar_resnet20")
    gm = convert(model, x, memory_budget=0.05)
    assert any(isinstance(m, ReversibleSequence) for m in gm.modules())
    kept = convert(model, x, memory_budget=0.05, preserve_function=True)
    assert not any(isinstance(m, ReversibleSequence) for m in kept.modules())
    assert {b.code for b in report(kept).blocks if b.fate == "kept"} >= {"preserve_function"}
    # the reversible plan recomputes less for the same budget
    assert report(gm).budget.recompute_flops < report(kept).budget.recompute_flops


def _normalised(name: str) -> str:
    """A layer's name in the original: checkpointed segments add ``<segment>.body.``."""
    return name.split(".body.", 1)[-1]


def _step(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    module = copy.deepcopy(module).train()
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    out = module(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    values = {"output": out.detach(), "input grad": x.grad}
    values.update({f"grad {_normalised(n)}": p.grad for n, p in module.named_parameters()})
    values.update({f"buffer {_normalised(n)}": b for n, b in module.named_buffers()})
    return values


@pytest.mark.parametrize("budget", [0.5, 0.2, "min"])
@pytest.mark.parametrize("name", ["cifar_resnet20", "dropout_net", "torchvision_resnet18"])
def test_preserve_function_keeps_outputs_and_gradients_exactly(name: str, budget: object) -> None:
    model, x = built(name, torch.float64)
    if budget == "min":
        budget = smallest(model, x, preserve_function=True)
    gm = convert(model, x, memory_budget=budget, preserve_function=True)
    assert any(isinstance(m, CheckpointedSegment) for m in gm.modules())
    want, got = _step(model, x), _step(gm, x)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    model.eval(), gm.eval()
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize(("name", "budget"), [("cifar_resnet20", 0.1), ("dropout_net", 0.25)])
def test_reversible_plans_train_like_reference_mode(name: str, budget: float) -> None:
    model, x = built(name, torch.float64)
    gm = convert(model, x, memory_budget=budget)
    assert any(isinstance(m, ReversibleSequence) for m in gm.modules())
    compare_with_reference(gm, x)


def test_an_unmeetable_budget_names_the_smallest_size() -> None:
    model, x = built("cifar_resnet20")
    with pytest.raises(
        BudgetError, match=r"smallest saved activations any plan .* are 24,576 bytes"
    ):
        convert(model, x, memory_budget="1KB")
    least = smallest(model, x)
    assert least == x.nbytes  # checkpointing the whole network keeps only its input
    convert(model, x, memory_budget=least)
    with pytest.raises(BudgetError) as raised:
        convert(model, x, memory_budget=least - 1)
    assert isinstance(raised.value, ConversionError)
    assert (raised.value.budget, raised.value.smallest) == (least - 1, least)


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        (1.5, r"fraction must be in \(0, 1\]"),
        (0.0, r"fraction must be in \(0, 1\]"),
        (-3, "must be positive"),
        (True, "must be a fraction"),
        ("12XB", "expected a size such as"),
        ("0GB", "must be positive"),
        ([1], "must be a fraction"),
    ],
)
def test_malformed_budgets_are_refused(budget: object, match: str) -> None:
    model, x = built("cifar_resnet20")
    with pytest.raises(ValueError, match=match):
        convert(model, x, memory_budget=budget)


def test_a_budget_needs_example_inputs() -> None:
    with pytest.raises(ConversionError, match="pass example_inputs"):
        convert(models.cifar_resnet(20), memory_budget=0.5)


def test_sizes_and_bytes_are_absolute() -> None:
    model, x = built("cifar_resnet20")
    assert report(convert(model, x, memory_budget="1MB")).budget.budget_bytes == 10**6
    assert report(convert(model, x, memory_budget="1MiB")).budget.budget_bytes == 2**20
    assert report(convert(model, x, memory_budget=123456)).budget.budget_bytes == 123456


def test_the_plan_is_in_the_report_and_survives_serialisation() -> None:
    model, x = built("cifar_resnet20")
    the_report = report(convert(model, x, memory_budget=0.25))
    assert ConversionReport.from_dict(the_report.to_dict()) == the_report
    text = str(the_report)
    assert "memory plan:" in text and "predicted" in text and "measured" in text
    for row in the_report.budget.segments:
        assert row.name in text and row.choice in ("store", "checkpoint", "reversible")


# --- command line -------------------------------------------------------------

FACTORY = "cli_factories:small_resnet"
SHAPE = "2,3,32,32"


def test_cli_convert_plans_within_the_budget(tmp_path, capsys) -> None:
    out, json_report = tmp_path / "model.pt", tmp_path / "report.json"
    argv = ["convert", FACTORY, "--input-shape", SHAPE, "--memory-budget", "0.2"]
    assert main([*argv, "-o", str(out), "--report", str(json_report)]) == 0
    printed = capsys.readouterr().out
    assert "memory plan:" in printed
    plan = json.loads(json_report.read_text())["budget"]
    assert plan["measured_bytes"] == plan["predicted_bytes"] <= plan["budget_bytes"]
    assert plan["budget_bytes"] == int(0.2 * plan["original_bytes"])
    assert report(load(out)).budget.predicted_bytes == plan["predicted_bytes"]


@pytest.mark.parametrize("preserve", [[], ["--preserve-function"]])
def test_cli_inspect_prints_the_plan_and_the_largest_batch_that_fits(capsys, preserve) -> None:
    argv = ["inspect", FACTORY, "--input-shape", SHAPE, "--memory-budget", "1MB", *preserve]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    largest = result["memory"]["plan_max_batch"]
    assert result["report"]["budget"]["budget_bytes"] == 10**6
    model = cli_factories.small_resnet()
    for batch, fits in ((largest, True), (largest + 1, False)):
        x = torch.randn(batch, 3, 32, 32)
        if fits:
            convert(model, x, memory_budget=10**6, preserve_function=bool(preserve))
        else:
            with pytest.raises(BudgetError):
                convert(model, x, memory_budget=10**6, preserve_function=bool(preserve))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "memory plan:" in printed
    fitting = "largest batch whose planned saved activations fit in 976.6 KiB (input 3x32x32)"
    assert f"{fitting}: {largest:,}" in printed


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--input-shape", SHAPE, "--memory-budget", "12XB"], 2, "malformed --memory-budget"),
        (["--memory-budget", "0.5"], 2, "--memory-budget needs --input-shape"),
        (["--input-shape", SHAPE, "--memory-budget", "10"], 1, "cannot be met"),
    ],
)
def test_cli_memory_budget_errors(capsys, args: list[str], code: int, message: str) -> None:
    try:
        result = main(["inspect", FACTORY, *args])
    except SystemExit as exit_:  # argparse
        result = exit_.code
    assert result == code
    assert message in capsys.readouterr().err


def test_a_given_batch_size_plans_as_an_example_of_that_batch_would() -> None:
    """Planned on meta tensors at batch 8 from an example of batch 2: the same plan as
    from a real example of batch 8, and the plan fits when measured at batch 8."""
    model, x = built("cifar_resnet20")
    x8 = torch.randn((8, *x.shape[1:]))
    original8 = saved_activation_bytes(model, x8)
    gm = convert(model, x, memory_budget=0.25, budget_batch_size=8)
    plan = report(gm).budget
    want = report(convert(model, x8, memory_budget=0.25)).budget
    assert plan.original_bytes == original8 == want.original_bytes
    choices = [(row.name, row.choice) for row in plan.segments]
    assert choices == [(row.name, row.choice) for row in want.segments]
    assert plan.measured_bytes is None  # not measured: no batch-8 forward at convert time
    assert saved_activation_bytes(gm, x8) == plan.predicted_bytes <= plan.budget_bytes


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_a_malformed_budget_batch_size_is_refused(size: object) -> None:
    model, x = built("cifar_resnet20")
    with pytest.raises(OptionError, match="budget_batch_size"):
        convert(model, x, memory_budget=0.5, budget_batch_size=size)


def test_a_budget_batch_size_needs_a_budget() -> None:
    model, x = built("cifar_resnet20")
    with pytest.raises(OptionError, match="give both"):
        convert(model, x, budget_batch_size=8)
