"""The reversible runtime against plain autograd on the same network (DESIGN.md §6, §8)."""

from __future__ import annotations

import copy
import gc
import weakref
from dataclasses import dataclass

import pytest
import torch
from equivalence import assert_close_rel, compare_with_reference, training_step
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from revcompile import AdditiveCoupling, ReversibleSequence, reference_mode
from revcompile.memory import saved_activation_bytes


@dataclass(frozen=True)
class StackSpec:
    ndim: int  # 2: (B, C); 4: (B, C, H, W)
    half: int  # channels per half
    spatial: int
    batch: int
    couplings: int
    layers: tuple[str, ...]  # layer kinds of every F and G


@st.composite
def stack_specs(draw) -> StackSpec:
    """Branches are 1-2 units of mixing layer -> optional norm -> optional
    activation -> optional dropout, the way residual branches are built."""
    ndim = draw(st.sampled_from([2, 4]))
    mixing = ("conv3", "conv1", "linear_w") if ndim == 4 else ("linear",)
    norms = ("bn", "gn") if ndim == 4 else ("bn",)
    layers: list[str] = []
    for _ in range(draw(st.integers(1, 2))):
        layers.append(draw(st.sampled_from(mixing)))
        layers += draw(st.lists(st.sampled_from(norms), max_size=1))
        layers += draw(st.lists(st.sampled_from(("relu", "tanh")), max_size=1))
        layers += draw(st.lists(st.just("dropout"), max_size=1))
    return StackSpec(
        ndim=ndim,
        half=draw(st.sampled_from([2, 4, 6])),
        spatial=draw(st.integers(3, 6)),
        # A norm over very few values (BatchNorm1d over 2 samples outputs +-1 whatever
        # the input) turns float64 rounding into gradient noise above 1e-10, so
        # every norm group here sees at least 4 samples or 2 * 3 * 3 values.
        batch=draw(st.integers(2, 4) if ndim == 4 else st.integers(4, 6)),
        couplings=draw(st.integers(1, 8)),
        layers=tuple(layers),
    )


def make_layer(kind: str, spec: StackSpec) -> nn.Module:
    c = spec.half
    return {
        "conv3": lambda: nn.Conv2d(c, c, 3, padding=1),
        "conv1": lambda: nn.Conv2d(c, c, 1),
        "bn": lambda: nn.BatchNorm2d(c) if spec.ndim == 4 else nn.BatchNorm1d(c),
        "gn": lambda: nn.GroupNorm(c // 2, c),
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "dropout": lambda: nn.Dropout(0.5),
        "linear": lambda: nn.Linear(c, c),
        "linear_w": lambda: nn.Linear(spec.spatial, spec.spatial),
    }[kind]()


def make_stack(spec: StackSpec) -> ReversibleSequence:
    def branch() -> nn.Sequential:
        return nn.Sequential(*(make_layer(kind, spec) for kind in spec.layers))

    couplings = [AdditiveCoupling(branch(), branch()) for _ in range(spec.couplings)]
    return ReversibleSequence(couplings, name="stage").double()


def make_input(spec: StackSpec, dtype=torch.float64) -> torch.Tensor:
    shape = (spec.batch, 2 * spec.half) + (spec.spatial,) * (spec.ndim - 2)
    return torch.randn(shape, dtype=dtype, requires_grad=True)


@given(stack_specs())
def test_generated_stacks_match_reference(spec: StackSpec) -> None:
    torch.manual_seed(0)
    compare_with_reference(make_stack(spec), make_input(spec))


def test_reversible_path_is_taken_and_differs_from_plain_autograd() -> None:
    """Guards the comparison itself: the two modes really run differently."""
    spec = StackSpec(4, 4, 4, 2, 2, ("conv3", "relu"))
    stage, x = make_stack(spec), make_input(spec)
    assert type(stage(x).grad_fn).__name__ == "_ReversibleFunctionBackward"
    with reference_mode():
        assert type(stage(x).grad_fn).__name__ == "CatBackward0"


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_buffers_updated_once(momentum) -> None:
    torch.manual_seed(0)
    spec = StackSpec(4, 4, 4, 3, 3, ("conv3", "bn", "relu"))
    stage = make_stack(spec)
    for m in stage.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    before = [b.clone() for b in stage.buffers()]
    compare_with_reference(stage, make_input(spec))
    after = list(stage.buffers())
    tracked = [b for b in after if b.dtype == torch.long]
    assert tracked and all(int(b) == 1 for b in tracked)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


def test_dropout_is_replayed_in_backward() -> None:
    torch.manual_seed(0)
    spec = StackSpec(4, 4, 5, 2, 4, ("conv3", "dropout", "relu", "conv1", "dropout"))
    compare_with_reference(make_stack(spec), make_input(spec))


def test_dropout_without_replay_would_be_caught() -> None:
    """A different RNG stream gives different gradients: the replay test can fail."""
    torch.manual_seed(0)
    spec = StackSpec(4, 4, 5, 2, 2, ("conv3", "dropout"))
    stage = make_stack(spec)
    x = make_input(spec)
    a = training_step(stage, x, reference=True, seed=0)
    stage.zero_grad()
    b = training_step(stage, x, reference=True, seed=1)
    assert not torch.allclose(a.param_grads[0], b.param_grads[0])


def test_gradcheck_small_stacks() -> None:
    torch.manual_seed(0)
    spec = StackSpec(4, 1, 2, 2, 2, ("conv3", "tanh", "conv1"))
    stage = make_stack(spec)
    x = make_input(spec)
    assert torch.autograd.gradcheck(stage, (x,))
    spec2d = StackSpec(2, 2, 1, 3, 3, ("linear", "tanh", "linear"))
    stage2d = make_stack(spec2d)
    assert torch.autograd.gradcheck(stage2d, (make_input(spec2d),))


def test_autograd_grad_and_retain_graph() -> None:
    torch.manual_seed(0)
    spec = StackSpec(4, 4, 4, 2, 3, ("conv3", "bn", "relu"))
    stage = make_stack(spec)
    x = make_input(spec)
    params = list(stage.parameters())
    loss = stage(x).pow(2).sum()
    grads = torch.autograd.grad(loss, [x, *params])
    with reference_mode():
        ref_grads = torch.autograd.grad(stage(x).pow(2).sum(), [x, *params])
    floor = 1e-3 * max(r.abs().max().item() for r in ref_grads)
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, 1e-10, floor)

    loss = stage(x).pow(2).sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in params]
    loss.backward()
    for p, g in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=0)


def test_create_graph_raises_clear_error() -> None:
    spec = StackSpec(4, 2, 3, 2, 1, ("conv3", "tanh"))
    stage, x = make_stack(spec), make_input(spec)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(stage(x).sum(), x, create_graph=True)


def test_saved_bytes_do_not_grow_with_depth() -> None:
    def saved(n: int) -> int:
        torch.manual_seed(0)
        spec = StackSpec(4, 8, 16, 4, n, ("conv3", "bn", "relu", "conv3", "bn"))
        return saved_activation_bytes(make_stack(spec), make_input(spec))

    shallow, deep = saved(2), saved(32)
    output_bytes = 4 * 16 * 16 * 16 * 8
    assert shallow == deep == output_bytes
    with reference_mode():
        assert saved(32) > 10 * saved(2)


def test_stage_input_is_freed_after_forward() -> None:
    spec = StackSpec(4, 4, 8, 2, 4, ("conv3", "relu"))
    stage = make_stack(spec)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    h = x * 2  # a non-leaf whose producer saves nothing: only the stage could keep it
    ref = weakref.ref(h)
    out = stage(h)
    del h
    gc.collect()
    assert ref() is None
    out.sum().backward()
    assert x.grad is not None


def test_grad_disabled_runs_plain_forward() -> None:
    spec = StackSpec(4, 4, 4, 2, 2, ("conv3", "bn", "relu"))
    stage, x = make_stack(spec), make_input(spec)
    with torch.no_grad():
        out = stage(x)
    assert out.grad_fn is None
    stage.eval()
    with reference_mode():
        want = stage(x)
    torch.testing.assert_close(stage(x), want)


def test_frozen_parameters_get_no_gradient() -> None:
    spec = StackSpec(4, 4, 4, 2, 2, ("conv3", "relu"))
    stage = make_stack(spec)
    frozen = stage.couplings[0].F[0].weight
    frozen.requires_grad_(False)
    compare_with_reference(stage, make_input(spec))
    assert frozen.grad is None


def test_bfloat16_autocast_matches_reference() -> None:
    """Under CPU bf16 autocast F and G run in bf16 and the trunk stays float32.

    Reconstruction replays the same bf16 computations, so the only difference
    from stored activations is the float32 rounding of x = y - F(...): about
    1e-7 relative per coupling, far below bf16's own 4e-3. Gradients agree to
    cosine >= 0.9999.
    """
    torch.manual_seed(0)
    spec = StackSpec(4, 8, 8, 4, 4, ("conv3", "bn", "relu", "conv3"))
    stage = make_stack(spec).float()
    x = make_input(spec, dtype=torch.float32)
    reference = copy.deepcopy(stage)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = training_step(stage, x, reference=False)
        want = training_step(reference, x, reference=True)
    assert got.output.dtype == torch.float32
    for g, w in zip([got.input_grad, *got.param_grads], [want.input_grad, *want.param_grads]):
        cos = torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0)
        assert cos >= 0.9999


def test_odd_stage_input_names_stage_and_shape() -> None:
    stage = ReversibleSequence([AdditiveCoupling(nn.Linear(2, 2), nn.Linear(2, 2))], name="s1")
    with pytest.raises(ValueError, match=r"s1.*\(3, 5\).*odd"):
        stage(torch.randn(3, 5))


def test_shape_changing_branch_names_stage_and_shapes() -> None:
    stage = ReversibleSequence([AdditiveCoupling(nn.Linear(2, 3), nn.Linear(2, 2))], name="s2")
    x = torch.randn(3, 4, requires_grad=True)
    for mode in (reference_mode, torch.enable_grad):
        with mode(), pytest.raises(ValueError, match=r"s2, coupling 0.*F.*\(3, 2\).*\(3, 3\)"):
            stage(x)


def test_coupling_inverse_reconstructs_input() -> None:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 3))
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    coupling.double()
    r1, r2 = coupling.inverse(*coupling(x1, x2))
    torch.testing.assert_close(r1, x1)
    torch.testing.assert_close(r2, x2)
    half = AdditiveCoupling(nn.Linear(3, 3).double())
    y1, y2 = half(x1, x2)
    assert torch.equal(y2, x2)
    torch.testing.assert_close(half.inverse(y1, y2)[0], x1)
