"""convert(): the converted network's reversible training step equals reference_mode.

DESIGN.md §8: every statement is about the converted network, compared with
itself under ``reference_mode()`` (plain autograd, activations stored).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable

import models
import pytest
import torch
import torchvision
from equivalence import compare_with_reference
from hypothesis import given
from strategies import GeneratedNet, residual_nets
from torch import nn
from torchvision.ops import StochasticDepth

import revcompile
from revcompile import reference_mode
from revcompile.conversion_report import KeptReason
from revcompile.memory import saved_activation_bytes
from revcompile.runtime import CheckpointedSegment, ReversibleSequence

TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
]


def convert64(model: nn.Module, x: torch.Tensor, **options) -> torch.fx.GraphModule:
    gm = revcompile.convert(model, x, **options).double()
    return gm


def stages(gm: nn.Module) -> list[ReversibleSequence]:
    return [m for m in gm.modules() if isinstance(m, ReversibleSequence)]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_gradients_match_reference(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = convert64(getattr(torchvision.models, name)(), x.float())
    assert len(stages(gm)) == 4  # resnet18: layers 2-4 are one half-coupling each
    compare_with_reference(gm, x, rtol=1e-9)


CIFAR: dict[str, Callable[[], nn.Module]] = {
    "resnet20_A": lambda: models.cifar_resnet(20, "A"),
    "resnet56_B": lambda: models.cifar_resnet(56, "B"),
    "resnet110_A": lambda: models.cifar_resnet(110, "A"),
    "resnet164": models.cifar_resnet164,
    "preact20": models.preact_resnet,
    "spellings": models.SpellingsNet,
    "add_assign": models.AddAssignNet,
    "nested": models.NestedResidualNet,
}


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
@pytest.mark.parametrize("name", list(CIFAR))
def test_cifar_and_spellings_match_reference(name: str, policy: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    gm = convert64(CIFAR[name](), x.float(), policy=policy)
    assert stages(gm), revcompile.report(gm)
    assert any(isinstance(m, CheckpointedSegment) for m in gm.modules()) == (policy == "checkpoint")
    compare_with_reference(gm, x, rtol=1e-9)


@given(residual_nets())
def test_generated_networks_match_reference(net: GeneratedNet) -> None:
    torch.manual_seed(0)
    x = torch.randn(net.spec.input_shape)
    gm = convert64(net.build(), x, leftover="store")  # the ground truth is store's
    report = revcompile.report(gm)
    assert [s.blocks for s in report.stages] == net.truth.stages
    compare_with_reference(gm, x.double(), rtol=1e-9)


def test_half_coupling_leftover() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    gm = convert64(models.cifar_resnet(20, "B"), x.float(), leftover="half")
    report = revcompile.report(gm)
    assert [b.fate for b in report.blocks].count("half") == 1  # layer1: 3 identity blocks
    assert any(c.G is None for s in stages(gm) for c in s.couplings)
    compare_with_reference(gm, x, rtol=1e-9)


class StochasticBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.drop_path = StochasticDepth(0.5, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.drop_path(self.branch(x)))


def stochastic_net(blocks: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        *(StochasticBlock(8) for _ in range(blocks)),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
def test_dropout_and_stochastic_depth_are_replayed(policy: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    gm = convert64(stochastic_net(4), x.float(), policy=policy)
    assert len(stages(gm)[0].couplings) == 2
    compare_with_reference(gm, x, rtol=1e-9)


def test_saved_bytes_do_not_grow_with_depth() -> None:
    x = torch.randn(4, 3, 16, 16)
    for policy in ("checkpoint", "store"):
        saved = [
            saved_activation_bytes(
                revcompile.convert(models.cifar_resnet(d, "B"), x, policy=policy), x
            )
            for d in (20, 32)  # 3 -> 5 blocks per stage: two more identity blocks each
        ]
        assert saved[0] == saved[1], policy
    originals = [saved_activation_bytes(models.cifar_resnet(d, "B"), x) for d in (20, 32)]
    assert originals[1] > 1.5 * originals[0]


def test_stochastic_blocks_only_add_rng_state() -> None:
    x = torch.randn(4, 3, 8, 8)
    rng_state_bytes = torch.get_rng_state().numel()
    saved = [saved_activation_bytes(revcompile.convert(stochastic_net(n), x), x) for n in (2, 4)]
    # Two more blocks are one more coupling: its stochastic F and G calls keep
    # one CPU RNG state each; nothing else grows.
    assert saved[1] - saved[0] == 2 * rng_state_bytes


@pytest.mark.parametrize(
    ("name", "checkpoint_bound", "store_bound"),
    [("resnet101", 0.08, 0.40), ("resnet152", 0.06, 0.30)],
)
def test_saved_bytes_ratio_at_224(name: str, checkpoint_bound: float, store_bound: float) -> None:
    """Issue #4's bounds at batch 2, 224x224.

    With ``policy="store"`` the odd leftover blocks (resnet101's layer2.3,
    resnet152's layer2.7 and layer3.35) are whole stored bottlenecks; the bound
    holds when they become half-couplings (``leftover="half"``).
    """
    model = getattr(torchvision.models, name)()
    x = torch.randn(2, 3, 224, 224)
    original = saved_activation_bytes(model, x)
    default = saved_activation_bytes(revcompile.convert(model, x), x)
    store = saved_activation_bytes(revcompile.convert(model, x, policy="store", leftover="half"), x)
    assert default / original <= checkpoint_bound
    assert store / original <= store_bound


def test_resnet50_float32_cosine_at_224() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    gm = revcompile.convert(torchvision.models.resnet50(), x)
    reference = copy.deepcopy(gm)
    gm(x).logsumexp(1).sum().backward()
    with reference_mode():
        reference(x).logsumexp(1).sum().backward()
    for (name, p), q in zip(gm.named_parameters(), reference.parameters()):
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos >= 0.99999, name


@pytest.fixture(scope="module")
def converted_resnet18() -> tuple[nn.Module, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    return model, revcompile.convert(model, x), x


def test_original_model_is_never_modified(converted_resnet18) -> None:
    model, _, x = converted_resnet18
    before = copy.deepcopy(model.state_dict())
    gm = revcompile.convert(model, x)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(x).sum().backward()
    optimizer.step()
    assert not set(map(id, gm.parameters())) & set(map(id, model.parameters()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_graph_module_is_readable(converted_resnet18) -> None:
    _, gm, _ = converted_resnet18
    code = gm.code
    for name in ("self.stem(", "self.layer1_rev(", "self.head("):
        assert name in code
    assert " + " not in code
    report = revcompile.report(gm)
    assert report.params_after < report.params_before
    assert report.policy == "checkpoint"
    assert any("moved to the start of G" in change for change in report.changes)


def test_state_dict_loads_into_fresh_convert(converted_resnet18) -> None:
    model, gm, x = converted_resnet18
    gm.train()
    gm(x)  # move BN statistics away from their initial values
    fresh = revcompile.convert(torchvision.models.resnet18(num_classes=10), x)
    fresh.load_state_dict(gm.state_dict())
    gm.eval()
    fresh.eval()
    assert torch.equal(gm(x), fresh(x))
    gm.train()


def test_save_load_and_deepcopy_round_trip(converted_resnet18) -> None:
    _, gm, x = converted_resnet18
    gm.eval()
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(gm)
    want = gm(x)
    assert torch.equal(loaded(x), want)
    assert torch.equal(copied(x), want)
    assert revcompile.report(loaded).to_dict() == revcompile.report(gm).to_dict()
    gm.train()


def test_train_eval_switch_uses_running_stats(converted_resnet18) -> None:
    _, gm, x = converted_resnet18
    gm = copy.deepcopy(gm).eval()
    assert not any(m.training for m in gm.modules())
    before = [b.clone() for b in gm.buffers()]
    first = gm(x)
    assert all(torch.equal(a, b) for a, b in zip(before, gm.buffers()))
    torch.testing.assert_close(gm(x[:1]), first[:1])  # running stats: no batch dependence
    gm.train()
    assert all(m.training for m in gm.modules())
    gm(x)
    assert not all(torch.equal(a, b) for a, b in zip(before, gm.buffers()))


def test_to_float64_and_compile_training_step(converted_resnet18) -> None:
    _, gm, x = converted_resnet18
    eager = copy.deepcopy(gm).double()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager")
    x64 = x.double()
    eager(x64).square().sum().backward()
    compiled(x64).square().sum().backward()
    for p, q in zip(eager.parameters(), compiled_module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_converting_a_converted_module_changes_nothing(converted_resnet18) -> None:
    _, gm, x = converted_resnet18
    again = revcompile.convert(gm, x)
    assert again.code == gm.code
    assert not revcompile.report(again).blocks
    gm.eval()
    again.eval()
    assert torch.equal(again(x), gm(x))
    gm.train()


def test_model_without_residual_blocks_comes_back_unchanged() -> None:
    torch.manual_seed(0)
    model = models.PlainNet().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = revcompile.convert(model, x)
    assert torch.equal(gm(x), model(x))
    report = revcompile.report(gm)
    assert not report.blocks and not report.stages
    assert "0 residual blocks" in str(report)


class OddChannelNet(nn.Module):
    """Two identity blocks on 7 channels, then two on 8 with a flatten inside."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 7, 3, padding=1)
        self.odd = nn.ModuleList(
            nn.Sequential(nn.Conv2d(7, 7, 3, padding=1), nn.ReLU()) for _ in range(2)
        )
        self.widen = nn.Conv2d(7, 8, 1)
        self.mixer = nn.ModuleList(nn.Linear(8 * 16, 8 * 16) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.odd:
            x = x + block(x)
        x = self.widen(x)
        for linear in self.mixer:
            x = x + linear(x.flatten(1)).view_as(x)
        return x


def test_unsupported_blocks_are_kept_with_reason() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    gm = convert64(OddChannelNet(), x.float(), split="halve")
    blocks = revcompile.report(gm).blocks
    assert {b.code for b in blocks} == {KeptReason.NOT_HALVABLE.value}
    assert all("odd channel count" in b.detail for b in blocks[:2])
    assert all("unsupported op" in b.detail for b in blocks[2:])
    assert not stages(gm)
    compare_with_reference(gm, x, rtol=1e-9)


def test_unknown_shapes_with_example_inputs_say_which_input() -> None:
    """Issue 12: the error said "pass example_inputs" when they were passed."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = models.cifar_resnet(14)

        def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
            return self.net(x) * scale

    with pytest.raises(revcompile.ConversionError) as info:
        revcompile.convert(Scaled(), (torch.randn(models.CIFAR_INPUT), 2.0))
    assert "scale (given a float)" in str(info.value)
    assert "pass example_inputs" not in str(info.value)


def test_exact_conversion_gradients_equal_reference_bitwise() -> None:
    """``convert(exact=True)``: every stage carries its trunk in fixed point, so the
    reversible step is bitwise equal to the same network under reference_mode()."""
    torch.manual_seed(0)
    model = models.cifar_resnet(20).float()
    x = torch.randn(4, 3, 16, 16)
    gm = revcompile.convert(model, x, exact=True)
    stages = [m for m in gm.modules() if isinstance(m, ReversibleSequence)]
    assert stages and all(stage.exact for stage in stages)
    results = []
    for reference in (False, True):
        net = copy.deepcopy(gm).train()
        inp = x.clone().requires_grad_()
        with reference_mode() if reference else contextlib.nullcontext():
            net(inp).square().sum().backward()
        results.append([inp.grad, *(p.grad for p in net.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))
