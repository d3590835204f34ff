"""Tests for revcompile.memory: measured and symbolic activation memory."""

from __future__ import annotations

import copy
import functools
import os
import time
from pathlib import Path

import models
import pytest
import sympy
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from revcompile.memory import (
    activation_memory_formula,
    max_batch_size,
    peak_step_memory,
    saved_activation_bytes,
)

B, H, W = (sympy.Symbol(n, integer=True, positive=True) for n in "BHW")


def _at(formula: sympy.Expr, shape: tuple[int, ...]) -> int:
    value = formula.subs({B: shape[0], H: shape[2], W: shape[3]})
    assert value.is_Integer, value
    return int(value)


# ---------------------------------------------------------------- models


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class PlainResNet(nn.Module):
    """Small CIFAR-style residual net: stem, ``depth`` identity blocks, head."""

    def __init__(self, depth: int, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.blocks = nn.Sequential(*[BasicBlock(c) for _ in range(depth)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


class Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


class SaveOutput(torch.autograd.Function):
    """Like revcompile's ReversibleSequence: no_grad forward, saves output + RNG state."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rng = torch.get_rng_state()
        with torch.no_grad():
            y = torch.tanh(x * w)
        ctx.save_for_backward(y, rng)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        y, _ = ctx.saved_tensors
        return grad * (1 - y * y), None


class CustomAndCheckpoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.w = nn.Parameter(torch.ones(1))
        self.segment = nn.Sequential(
            nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(3, 2)
        )
        self.tail = nn.Conv2d(6, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = SaveOutput.apply(self.conv(x), self.w)
        x = checkpoint(self.segment, x, use_reentrant=False)
        return torch.relu(self.tail(x))


def small_convnet() -> nn.Module:
    """Factory for peak_step_memory (module level: picklable for the spawn worker)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1)]
    for _ in range(3):
        layers += [nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class _ScaledStage(nn.Module):
    """``stage(x * scale).mean()``: the scale makes the stage input require grad."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x * self.scale).mean((2, 3))


def reversible_stage() -> nn.Module:
    """Factory: 8 couplings of half-width basic-block branches on 16 channels."""
    from revcompile import AdditiveCoupling, ReversibleSequence

    couplings = [
        AdditiveCoupling(models.residual_function(8, 8), models.residual_function(8, 8))
        for _ in range(8)
    ]
    return _ScaledStage(ReversibleSequence(couplings))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).train()


@pytest.fixture(scope="module")
def resnet50_formula(resnet50: nn.Module) -> sympy.Expr:
    return activation_memory_formula(resnet50, (torch.randn(2, 3, 64, 64),))


# ---------------------------------------------------------------- formula


def test_resnet50_formula_exact_at_other_sizes(resnet50, resnet50_formula):
    assert resnet50_formula.free_symbols == {B, H, W}
    for shape in [(1, 3, 96, 80), (3, 3, 112, 112), (2, 3, 128, 160), (2, 3, 65, 67)]:
        measured = saved_activation_bytes(resnet50, torch.randn(*shape))
        assert _at(resnet50_formula, shape) == measured, shape


def test_formula_keeps_floor_rounding(resnet50, resnet50_formula):
    assert resnet50_formula.has(sympy.floor)
    # Odd sizes: the stride-2 convolutions and pooling round down; one pixel more
    # or less changes the count in steps, exactly as measured.
    for shape in [(1, 3, 63, 63), (1, 3, 63, 64), (1, 3, 64, 65)]:
        measured = saved_activation_bytes(resnet50, torch.randn(*shape))
        assert _at(resnet50_formula, shape) == measured, shape


def test_formula_custom_function_and_checkpoint():
    torch.manual_seed(0)
    model = CustomAndCheckpoint().train()
    formula = activation_memory_formula(model, torch.randn(2, 3, 16, 16))
    for shape in [(3, 3, 20, 24), (5, 3, 33, 17), (1, 3, 9, 40)]:
        assert _at(formula, shape) == saved_activation_bytes(model, torch.randn(*shape)), shape
    # The RNG state saved by the Function is a real tensor: a constant term.
    assert formula.subs({B: 0, H: 0, W: 0}) == torch.get_rng_state().numel()


def test_formula_reversible_sequence_with_dropout():
    """revcompile's own Function: saves its output, and RNG states only for random calls."""
    from revcompile.runtime import AdditiveCoupling, ReversibleSequence

    def branch(c: int, p: float) -> nn.Module:
        return nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.Dropout(p)
        )

    for p in (0.0, 0.2):
        torch.manual_seed(0)
        stage = ReversibleSequence([AdditiveCoupling(branch(4, p), branch(4, p)) for _ in range(2)])
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), stage, nn.Conv2d(8, 4, 3, stride=2))
        formula = activation_memory_formula(model.train(), torch.randn(2, 3, 16, 16))
        for shape in [(3, 3, 20, 24), (5, 3, 33, 17)]:
            measured = saved_activation_bytes(model, torch.randn(*shape))
            assert _at(formula, shape) == measured, (p, shape)
        rng_bytes = formula.subs({B: 0, H: 0, W: 0})
        assert rng_bytes == (4 * torch.get_rng_state().numel() if p else 0)


def test_formula_checkpointed_resnet():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).train()
    for name in ["layer1", "layer2", "layer3", "layer4"]:
        layer = getattr(model, name)
        for i in range(len(layer)):
            layer[i] = Checkpointed(layer[i])
    formula = activation_memory_formula(model, torch.randn(2, 3, 64, 64))
    shape = (3, 3, 96, 80)
    assert _at(formula, shape) == saved_activation_bytes(model, torch.randn(*shape))


def test_formula_other_dynamic_names():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    formula = activation_memory_formula(
        model, torch.randn(5, 7, 16), dynamic={"N": (0, 0), "L": (0, 1)}
    )
    n, length = sympy.symbols("N L", integer=True, positive=True)
    assert formula.free_symbols == {n, length}
    measured = saved_activation_bytes(model, torch.randn(3, 11, 16))
    assert formula.subs({n: 3, length: 11}) == measured


def test_formula_specialized_dimension_raises():
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[2] == 16:
                x = x * 2
            return self.conv(x)

    with pytest.raises(ValueError, match="specializes dimension 'H'"):
        activation_memory_formula(Picky(), torch.randn(2, 3, 16, 16))


def test_formula_warns_on_constrained_dimensions():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
    with pytest.warns(UserWarning, match="only valid where"):
        activation_memory_formula(model, torch.randn(2, 3, 16, 16))


def test_formula_rejects_size_one_example():
    with pytest.raises(ValueError, match=">= 2"):
        activation_memory_formula(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))


# ---------------------------------------------------------------- max batch


def test_max_batch_size_boundary(resnet50_formula):
    fixed = {"H": 224, "W": 224}
    per_224 = _at(resnet50_formula, (1, 3, 224, 224))
    for budget in [per_224 - 1, per_224, 10**9, 4 * 2**30 + 12345, 3.5e9]:
        b = max_batch_size(resnet50_formula, budget, **fixed)
        f = resnet50_formula.subs({H: 224, W: 224})
        if b == 0:
            assert f.subs(B, 1) > budget
        else:
            assert f.subs(B, b) <= budget < f.subs(B, b + 1)
    assert max_batch_size(resnet50_formula, per_224 - 1, **fixed) == 0
    assert max_batch_size(resnet50_formula, per_224, **fixed) == 1


def test_max_batch_size_floor_terms_and_errors():
    formula = 100 * B * sympy.floor((H - 1) / 2) + 7
    assert max_batch_size(formula, 100 * 3 * 7 + 7, H=15) == 3
    assert max_batch_size(formula, 100 * 3 * 7 + 6, H=15) == 2
    with pytest.raises(ValueError, match="give a value"):
        max_batch_size(formula, 10**6)
    with pytest.raises(ValueError, match="does not grow"):
        max_batch_size(sympy.Integer(5) + 0 * B, 10**6)


# ---------------------------------------------------------------- measured


def test_saved_bytes_dedup_views_and_dead_storages():
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.exp(x * self.w)  # mul saves x (w excluded); exp saves a
            torch.exp(a * 2)  # saved result, but this graph branch dies at once
            b, c = a.chunk(2, dim=0)  # two views of a's storage
            return (b * c).sum()  # saves b and c: a's storage, once

    x = torch.randn(4, 1000)
    assert saved_activation_bytes(Toy(), x) == 2 * x.nbytes
    # (Only the feature dim is symbolic: chunk(2) of a symbolic batch adds guards.)
    formula = activation_memory_formula(Toy(), x, dynamic={"D": (0, 1)})
    assert formula == 2 * 4 * 4 * sympy.Symbol("D", integer=True, positive=True)


def test_saved_bytes_grow_with_depth():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    sizes = [saved_activation_bytes(PlainResNet(d).train(), x) for d in (1, 2, 4, 8)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    per_block = sizes[1] - sizes[0]
    assert per_block > 0
    assert sizes[2] - sizes[1] == 2 * per_block and sizes[3] - sizes[2] == 4 * per_block


def test_checkpoint_inputs_are_visible():
    """Non-reentrant checkpoint saves its inputs in the outer hook context."""
    torch.manual_seed(0)
    plain = PlainResNet(6).train()
    ckpt = copy.deepcopy(plain)
    ckpt.blocks = nn.Sequential(*[Checkpointed(b) for b in plain.blocks])
    x = torch.randn(4, 3, 16, 16)
    plain_bytes = saved_activation_bytes(plain, x)
    ckpt_bytes = saved_activation_bytes(ckpt, x)
    assert 0 < ckpt_bytes < plain_bytes
    # Each of the 6 checkpointed blocks keeps its input (an 8x16x16 map per sample).
    block_input = 4 * 8 * 16 * 16 * 4
    assert ckpt_bytes >= 6 * block_input


def test_measuring_has_no_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(PlainResNet(2), nn.Dropout(0.5)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    rng = torch.get_rng_state()
    first = saved_activation_bytes(model, x)
    assert saved_activation_bytes(model, x) == first
    activation_memory_formula(model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    eval_bytes = saved_activation_bytes(model.eval(), x)
    assert not model.training and eval_bytes < first


def test_peak_step_memory_grows_with_batch():
    small = peak_step_memory(small_convnet, (8, 3, 32, 32))
    # The same factory given as "module:function" (imported in the worker).
    large = peak_step_memory(f"{small_convnet.__module__}:small_convnet", (64, 3, 32, 32))
    assert small > 0
    # 64 samples hold ~30 MiB more activations and gradients of activations than 8.
    assert large > small + 16 * 2**20
    assert large < 2 * 2**30


# peak_step_memory's CPU number is RSS: "expect a few hundred KiB of noise".
RSS_NOISE_BYTES = 256 * 2**10


def test_reversible_backward_recomputes_one_branch_at_a_time():
    """Peak of a reversible stage's step, in half-stream tensors (4 MiB here).

    Live at the peak (the recomputation of one branch): the saved stage output
    (2 halves), the reconstructed streams and their gradients (4), the branch's
    recomputed activations and their gradients (about 8), plus the input
    gradient of the scale: 16 halves. Keeping the previous branch's output and
    input gradient alive as well measured 19 halves.

    The bound is the 16 halves plus the RSS noise of the measurement, which
    alone put one CI run 48 KiB over them.
    """
    half = 128 * 8 * 32 * 32 * 4
    peak = peak_step_memory(reversible_stage, (128, 16, 32, 32), loss="sum")
    assert peak <= 16 * half + RSS_NOISE_BYTES, peak / half


def test_peak_step_memory_reports_worker_errors():
    with pytest.raises(RuntimeError, match="has no attribute 'no_such_factory'"):
        peak_step_memory(f"{small_convnet.__module__}:no_such_factory", (2, 3, 8, 8))


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
def test_converted_resnet50_formula_exact_at_other_sizes(resnet50, policy):
    import revcompile

    example = torch.randn(2, 3, 64, 64)
    converted = revcompile.convert(resnet50, example, policy=policy).train()
    formula = activation_memory_formula(converted, (example,))
    assert formula.free_symbols == {B, H, W}
    for shape in [(1, 3, 96, 80), (3, 3, 112, 112), (2, 3, 65, 67)]:
        measured = saved_activation_bytes(converted, torch.randn(*shape))
        assert _at(formula, shape) == measured, shape


@pytest.mark.parametrize("convert", [False, True], ids=["original", "converted"])
def test_formula_through_zero_pad_shortcuts(convert):
    """Option-A shortcuts (``F.pad`` of a strided slice) keep every dimension symbolic."""
    import revcompile

    example = torch.randn(2, 3, 32, 32)
    model = models.cifar_resnet(20, "A").train()
    if convert:
        model = revcompile.convert(model, example).train()
    formula = activation_memory_formula(model, (example,))
    assert formula.free_symbols == {B, H, W}
    for shape in [(5, 3, 32, 32), (3, 3, 27, 40)]:
        assert _at(formula, shape) == saved_activation_bytes(model, torch.randn(*shape)), shape


# ---------------------------------------------------------------- package structure


def test_fresh_process_failures_are_typed():
    """Callers branch on the class of the failure, never on its message."""
    from revcompile.memory.fresh_process import (
        WorkerDied,
        WorkerFailed,
        WorkerTimedOut,
        run_in_fresh_process,
    )

    with pytest.raises(WorkerFailed, match="invalid literal for int"):
        run_in_fresh_process(functools.partial(int, "not a number"))
    with pytest.raises(WorkerDied, match="exit code 3"):
        run_in_fresh_process(functools.partial(os._exit, 3))
    start = time.perf_counter()
    with pytest.raises(WorkerTimedOut):
        run_in_fresh_process(functools.partial(time.sleep, 60), timeout=1)
    assert time.perf_counter() - start < 30


def test_memory_imports_no_compiler_module():
    """The memory model is runtime-level: no module of it imports a pass, the API,
    the CLI or io (``import revcompile`` itself loads everything eagerly)."""
    from test_report import imported_modules

    package = Path(__file__).resolve().parents[1] / "revcompile" / "memory"
    compiler = ("revcompile.api", "revcompile.passes", "revcompile.cli", "revcompile.io")
    for path in package.rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith(compiler)}
        assert not bad, f"{path.name} imports {bad}"
