"""``torch.compile`` inside the reversible stages and segments (issue 16).

The training path of a stage or a checkpointed segment is a graph break (its
autograd Function and checkpoint save the memory), but what it calls runs
compiled with ``convert(..., compile=...)``: each F and G in the forward and in
the backward's recomputation, each segment body in both. In eval mode under
``torch.no_grad()`` the whole converted module is one graph.

Compiling is slow on a small CPU: the models are tiny (one 2-coupling stage,
8 channels, 8x8); one test runs inductor, on two distinct graphs, and the
others dynamo and AOTAutograd without code generation (``aot_eager``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from equivalence import StepResult, assert_close_rel, training_step
from models import _branch
from torch import nn
from torch._inductor.compile_fx import compile_fx

import revcompile
from revcompile.errors import OptionError
from revcompile.runtime.compiling import compiled_parts


class TinyNet(nn.Module):
    """Stem, four identity residual blocks (one stage of two couplings), head."""

    def __init__(self, dropout: float = 0.0, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(_branch(channels), nn.Dropout(dropout)) for _ in range(4)
        )
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def _converted(policy: str = "checkpoint", dropout: float = 0.0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = revcompile.convert(TinyNet(dropout).double(), x, policy=policy, **kwargs)
    stages = [m for m in gm.modules() if isinstance(m, revcompile.ReversibleSequence)]
    assert [len(stage.couplings) for stage in stages] == [2]
    return gm


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


class CountingInductor:
    """A ``torch.compile`` backend: inductor, counting the graphs it compiles and runs."""

    def __init__(self) -> None:
        self.compiled = 0
        self.runs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.compiled += 1
        compiled = compile_fx(graph, example_inputs)

        def run(*args: Any) -> Any:
            self.runs += 1
            return compiled(*args)

        return run


def _assert_steps_close(got: StepResult, want: StepResult, rtol: float = 1e-10) -> None:
    """As ``equivalence.compare_with_reference``: gradients relative to at least 1e-3
    of the step's largest; buffers too (compiled kernels may round differently)."""
    assert_close_rel(got.output, want.output, rtol)
    assert_close_rel(got.input_grad, want.input_grad, rtol)
    floor = 1e-3 * max(w.abs().max().item() for w in want.param_grads if w is not None)
    for g, w in zip(got.param_grads, want.param_grads, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert_close_rel(g, w, rtol, floor)
    for b, w in zip(got.buffers, want.buffers, strict=True):
        if b.is_floating_point():
            assert_close_rel(b, w, rtol, floor=1.0)
        else:
            assert torch.equal(b, w)


def test_compile_option_is_checked_and_keeps_the_module() -> None:
    with pytest.raises(OptionError, match="fullgraph"):
        _converted(compile={"fullgraph": True})
    with pytest.raises(OptionError, match="compile must be"):
        _converted(compile="inductor")
    plain = _converted()
    gm = _converted(compile={"backend": "eager"})
    assert list(gm.state_dict()) == list(plain.state_dict())
    parts = compiled_parts(gm)
    # Two couplings (F and G each), the stem and the head segments, the module.
    assert len(parts) == 2 * 2 + 2 + 1
    assert all(part._compiled_call_impl is not None for part in parts)
    # As for any compiled module, a deep copy is an uncompiled one.
    assert all(part._compiled_call_impl is None for part in compiled_parts(copy.deepcopy(gm)))


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
def test_eval_no_grad_forward_is_one_graph(policy: str) -> None:
    gm = _converted(policy).eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(gm)(_input())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_fullgraph_eval_equals_eager() -> None:
    gm = _converted().eval()
    x = _input()
    with torch.no_grad():
        want = gm(x)
        got = torch.compile(gm, fullgraph=True, backend="aot_eager")(x)
    assert_close_rel(got, want, 1e-12)


def test_training_runs_branches_compiled_in_forward_and_recomputation() -> None:
    """Inductor: each branch runs compiled once in forward and once in the backward's
    recomputation; the gradients equal reference_mode's on the same compiled
    branches (dropout included: the recomputation replays the compiled random
    numbers); a second step compiles nothing new.

    To keep inductor's compile time low, only the four branches are compiled
    (two distinct graphs): ``policy="store"`` leaves no segments, and the root
    would be the whole network as one more graph under reference_mode.
    """
    backend = CountingInductor()
    gm = _converted("store", dropout=0.2)
    parts = compiled_parts(gm)[:-1]
    assert len(parts) == 4
    for part in parts:
        part.compile(backend=backend)
    x = _input().requires_grad_()
    compiled_after_step = []
    for step in range(2):
        runs = backend.runs
        torch.manual_seed(step)
        out = gm(x)
        assert backend.runs - runs == len(parts)
        out.sum().backward()
        assert backend.runs - runs == 2 * len(parts)
        compiled_after_step.append(backend.compiled)
    assert compiled_after_step[0] == compiled_after_step[1]
    before = copy.deepcopy(gm.state_dict())
    gm.zero_grad(set_to_none=True)
    got = training_step(gm, x, reference=False)
    gm.load_state_dict(before)
    gm.zero_grad(set_to_none=True)
    want = training_step(gm, x, reference=True)
    _assert_steps_close(got, want)


def test_compiled_training_step_equals_eager() -> None:
    """Every part compiled (branches, segment bodies, the root), through AOTAutograd."""
    gm = _converted()
    eager = copy.deepcopy(gm)
    revcompile.runtime.compile_parts(gm, backend="aot_eager")
    x = _input()
    _assert_steps_close(
        training_step(gm, x, reference=False), training_step(eager, x, reference=False)
    )
