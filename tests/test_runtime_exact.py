"""Exact mode (DESIGN.md §10): reversible gradients bitwise equal to reference_mode's.

``ReversibleSequence(..., exact=True)`` carries the trunk in float64 on a
``2**-k`` grid and adds the rounded branch outputs; reconstruction is then
exact, so every gradient, the output and every buffer must be ``torch.equal``
to those of the same step under ``reference_mode()`` -- not merely close.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from equivalence import training_step
from hypothesis import given, settings
from test_runtime import StackSpec, make_input, make_layer, stack_specs
from torch import nn

import revcompile
from revcompile import AdditiveCoupling, ReversibleSequence
from revcompile.errors import ConversionError, ExactRangeError, RevcompileError
from revcompile.memory import saved_activation_bytes
from revcompile.runtime import check_inverse
from revcompile.runtime.coupling import Grid


def exact_stack(
    spec: StackSpec,
    dtype: torch.dtype = torch.float64,
    *,
    split: str = "halve",
    half_couplings: bool = False,
    exact: bool = True,
) -> ReversibleSequence:
    def branch() -> nn.Sequential:
        return nn.Sequential(*(make_layer(kind, spec) for kind in spec.layers))

    couplings = [
        AdditiveCoupling(branch(), None if half_couplings else branch())
        for _ in range(spec.couplings)
    ]
    stage = ReversibleSequence(couplings, name="stage", split=split, exact=exact)
    return stage.to(dtype)


def assert_bitwise_equal_to_reference(stage: nn.Module, x: torch.Tensor) -> None:
    reference = copy.deepcopy(stage)
    got = training_step(stage, x, reference=False)
    want = training_step(reference, x, reference=True)
    assert torch.equal(got.output, want.output)
    assert torch.equal(got.input_grad, want.input_grad)
    for g, w in zip(got.param_grads, want.param_grads, strict=True):
        assert (g is None and w is None) or torch.equal(g, w)
    for b, w in zip(got.buffers, want.buffers, strict=True):
        assert torch.equal(b, w)


@settings(max_examples=25, deadline=None)
@given(stack_specs())
def test_generated_stacks_bitwise_equal(spec: StackSpec) -> None:
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        assert_bitwise_equal_to_reference(exact_stack(spec, dtype), make_input(spec, dtype))


LAYERS = ("conv3", "bn", "relu", "dropout", "conv1")
DEEP = StackSpec(4, 2, 3, 2, 166, LAYERS)  # CIFAR ResNet-1001 depth (n = 166), small width
MEDIUM = StackSpec(4, 2, 3, 2, 40, LAYERS)


def test_166_couplings_bitwise_equal() -> None:
    """float32 branches with BatchNorm and dropout; inputs reconstructed bit for bit."""
    torch.manual_seed(0)
    stage, x = exact_stack(DEEP, torch.float32), make_input(DEEP, torch.float32)
    assert_bitwise_equal_to_reference(stage, x)
    check_inverse(stage, x)


def test_float64_branches_bitwise_equal_at_depth() -> None:
    torch.manual_seed(0)
    assert_bitwise_equal_to_reference(exact_stack(MEDIUM), make_input(MEDIUM))


@pytest.mark.parametrize("split", ["halve", "duplicate"])
@pytest.mark.parametrize("half_couplings", [False, True], ids=["full", "half"])
def test_splits_and_half_couplings_bitwise_equal(split: str, half_couplings: bool) -> None:
    torch.manual_seed(0)
    spec = StackSpec(4, 3, 4, 3, 12, ("conv3", "bn", "relu", "dropout"))
    stage = exact_stack(spec, torch.float32, split=split, half_couplings=half_couplings)
    x = make_input(spec, torch.float32)
    if split == "duplicate":
        x = x[:, : spec.half].detach().requires_grad_()
    assert_bitwise_equal_to_reference(stage, x)
    check_inverse(stage, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mixed_half_and_full_couplings_bitwise_equal(layout: str) -> None:
    """Half-couplings between full ones: a stream read by several branches, whose
    gradient sums (in float32, as float mode's) must be those of reference mode."""
    torch.manual_seed(0)
    spec = StackSpec(4, 3, 4, 3, 9, ("conv3", "bn", "relu"))
    full = exact_stack(spec, torch.float32)
    half = exact_stack(spec, torch.float32, half_couplings=True)
    couplings = [c for pair in zip(full.couplings, half.couplings) for c in pair]
    stage = ReversibleSequence(couplings, name="stage", exact=True)
    x = make_input(spec, torch.float32)
    if layout == "channels_last":
        stage = stage.to(memory_format=torch.channels_last)
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert_bitwise_equal_to_reference(stage, x)
    check_inverse(stage, x)


def test_bfloat16_autocast_bitwise_equal() -> None:
    torch.manual_seed(0)
    spec = StackSpec(4, 4, 6, 3, 24, ("conv3", "bn", "relu", "conv3"))
    stage = exact_stack(spec, torch.float32)
    x = make_input(spec, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_bitwise_equal_to_reference(stage, x)
        check_inverse(stage, x)


def test_reconstruction_is_bitwise_in_exact_mode_only() -> None:
    """check_inverse passes on the exact stage; the float stage fails it (the check can fail)."""
    torch.manual_seed(0)
    stage = exact_stack(MEDIUM, torch.float32)
    x = make_input(MEDIUM, torch.float32)
    check_inverse(stage, x)
    floating = ReversibleSequence(list(stage.couplings), name="stage")
    with pytest.raises(RuntimeError, match=r"stage, coupling \d+: reconstructed x[12] differs"):
        check_inverse(floating, x)


def test_check_inverse_has_no_side_effects() -> None:
    torch.manual_seed(0)
    spec = StackSpec(4, 2, 3, 2, 3, ("conv3", "bn", "dropout"))
    stage = exact_stack(spec)
    x = make_input(spec)
    before = copy.deepcopy(stage.state_dict())
    rng = torch.get_rng_state()
    check_inverse(stage, x)
    assert all(torch.equal(before[k], v) for k, v in stage.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_float_mode_gradients_are_not_bitwise_at_depth() -> None:
    """Guards the comparison: without exact mode the same deep stage is only close."""
    torch.manual_seed(0)
    stage = exact_stack(MEDIUM, torch.float32, exact=False)
    with pytest.raises(AssertionError):
        assert_bitwise_equal_to_reference(stage, make_input(MEDIUM, torch.float32))


def test_overflow_of_the_exact_range_raises() -> None:
    torch.manual_seed(0)
    spec = StackSpec(2, 2, 1, 4, 2, ("linear",))
    stage = exact_stack(spec)
    big = make_input(spec) * 2.0**22  # beyond 2**(53 - 32)
    with pytest.raises(OverflowError, match=r"stage: exact mode.*2\*\*21"):
        stage(big)

    growing = exact_stack(StackSpec(2, 2, 1, 4, 40, ("linear",)))
    with torch.no_grad():
        for p in growing.parameters():
            p.fill_(3.0)
    with pytest.raises(OverflowError, match=r"stage, coupling \d+: exact mode"):
        growing(make_input(spec))


def test_exact_stage_saves_both_streams_in_float64_independent_of_depth() -> None:
    def saved(n: int, exact: bool) -> int:
        torch.manual_seed(0)
        spec = StackSpec(4, 4, 8, 2, n, ("conv3", "bn", "relu"))
        stage = exact_stack(spec, torch.float32, exact=exact)
        return saved_activation_bytes(stage, make_input(spec, torch.float32))

    output = 2 * 8 * 8 * 8 * 4
    assert saved(2, False) == saved(16, False) == output
    assert saved(2, True) == saved(16, True) == 2 * output


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_quantise_rounds_half_to_even_onto_the_grid(dtype: torch.dtype) -> None:
    """Grid.quantise is round(x * 2**k) / 2**k computed in float64, whatever the branch dtype."""
    grid = Grid(32, dtype)
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.0, -1e-3]) * 2.0**-32
    x = torch.cat([torch.randn(4096) * 10.0 ** torch.randint(-14, 4, (4096,)), halves]).to(dtype)
    want = torch.round(x.double() * 2.0**32) / 2.0**32
    got = grid.quantise(x)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_range_check_rejects_non_finite_and_accepts_empty() -> None:
    grid = Grid(32, torch.float32)
    assert grid.check(torch.empty(0, dtype=torch.float64), "s").numel() == 0
    for bad in (float("nan"), float("inf"), -float("inf"), 2.0**21, -(2.0**21)):
        x = torch.zeros(8, dtype=torch.float64)
        x[3] = bad
        with pytest.raises(OverflowError, match="s: exact mode"):
            grid.check(x, "s")
    grid.check(torch.full((8,), 2.0**21 - 1, dtype=torch.float64), "s")


def test_overflow_error_names_exact_bits_that_hold_the_value_and_they_do() -> None:
    """The range error is a RevcompileError (and still an OverflowError) whose message
    gives, in convert()'s terms, an ``exact_bits`` whose range holds the value seen;
    converting with it then trains, bitwise equal to reference_mode()."""
    torch.manual_seed(0)
    model = models.cifar_resnet(14).train()
    with torch.no_grad():
        model.bn1.weight.fill_(1e7)  # stem output ~1e7, beyond the default range 2**21
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ExactRangeError) as info:
        revcompile.convert(model, x, exact=True)(x)
    error = info.value
    assert isinstance(error, OverflowError) and isinstance(error, RevcompileError)
    bits = error.suggested_bits
    assert bits is not None and 1 <= bits < 32
    assert f"convert(..., exact=True, exact_bits={bits})" in str(error)
    assert "use fewer exact bits" not in str(error)
    gm = revcompile.convert(model, x, exact=True, exact_bits=bits)
    assert {m.exact_bits for m in gm.modules() if isinstance(m, ReversibleSequence)} == {bits}
    got = training_step(gm, x, reference=False)
    want = training_step(copy.deepcopy(gm), x, reference=True)
    assert torch.equal(got.input_grad, want.input_grad)
    for g, w in zip(got.param_grads, want.param_grads, strict=True):
        assert (g is None and w is None) or torch.equal(g, w)


def test_non_finite_trunk_value_suggests_no_bits() -> None:
    with pytest.raises(ExactRangeError, match="not finite") as info:
        Grid(32, torch.float32).check(torch.tensor([1.0, float("nan")], dtype=torch.float64), "s")
    assert info.value.suggested_bits is None


@pytest.mark.parametrize("bad", [0, 53, 2.5, True, "32"])
def test_convert_rejects_invalid_exact_bits(bad: object) -> None:
    with pytest.raises(ConversionError, match="exact_bits must be an integer from 1 to 52"):
        revcompile.convert(models.cifar_resnet(14), torch.randn(2, 3, 8, 8), exact_bits=bad)


def test_exact_network_saves_one_residual_per_stage_beyond_float_mode() -> None:
    """The next segment saves an exact halve stage's float32 output as its input, as in
    float mode; the stage adds only a float32 residual of the output's size (not its
    float64 streams next to it), and its backward stays bitwise."""
    torch.manual_seed(0)
    model = models.cifar_resnet(20).train()  # one stage of one coupling per resolution
    x = torch.randn(2, 3, 16, 16)
    saved = {}
    for exact in (False, True):
        gm = revcompile.convert(model, x, exact=exact)
        saved[exact] = saved_activation_bytes(gm, x)
    assert len([m for m in gm.modules() if isinstance(m, ReversibleSequence)]) == 3
    outputs = sum(2 * c * (16 // s) ** 2 * 4 for c, s in ((16, 1), (32, 2), (64, 4)))
    assert saved[True] == saved[False] + outputs
