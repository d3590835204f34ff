"""Exact mode's fused trunk update gives the eager update's bits (runtime/trunk_update.py).

The compiled kernel must agree with ``add_on_grid`` bit for bit on every input
the trunk can see: rounding ties of the grid (which round half to even),
values at the range limit, signed zeros, subnormal and non-finite branch
outputs, every branch dtype and both signs; and a stage large enough to take
the fused path must still give reference mode's gradients exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_runtime import StackSpec, make_input
from test_runtime_exact import assert_bitwise_equal_to_reference, exact_stack

from revcompile.errors import ExactRangeError
from revcompile.runtime import check_inverse, trunk_update
from revcompile.runtime.trunk_update import FUSED_MIN_NUMEL, add_on_grid, update_on_grid

N = FUSED_MIN_NUMEL


@pytest.fixture(scope="module")
def compiles() -> None:
    """Skip where torch.compile cannot build a kernel (no C++ compiler)."""
    try:
        torch.compile(lambda t: t + 1, fullgraph=True)(torch.zeros(2))
    except Exception as error:
        pytest.skip(f"torch.compile cannot build kernels here: {error!r:.200}")


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch, compiles: None) -> dict[str, int]:
    """Count the updates that run fused and eagerly."""
    counts = {"fused": 0, "eager": 0}
    compiled, eager = trunk_update._compiled, trunk_update._eager

    def counted_compiled(*key):
        kernel = compiled(*key)

        def call(*args):
            counts["fused"] += 1
            return kernel(*args)

        return call

    def counted_eager(*args):
        counts["eager"] += 1
        return eager(*args)

    monkeypatch.setattr(trunk_update, "_compiled", counted_compiled)
    monkeypatch.setattr(trunk_update, "_eager", counted_eager)
    monkeypatch.setitem(trunk_update._fusion, "enabled", True)
    return counts


def branch_outputs(dtype: torch.dtype, bits: int) -> torch.Tensor:
    """``N`` branch outputs: grid ties, tiny, huge, signed zeros, subnormals, random."""
    g = torch.Generator().manual_seed(bits)
    ties = (torch.arange(-64, 64, dtype=torch.float64) + 0.5) * 2.0**-bits
    special = torch.tensor(
        [0.0, -0.0, 2.0**-bits, -(2.0**-bits), 2.0 ** (-bits - 1), 3 * 2.0 ** (-bits - 1)],
        dtype=torch.float64,
    )
    random = torch.randn(N, generator=g, dtype=torch.float64)
    random *= 2.0 ** torch.randint(-40, 12, (N,), generator=g)
    x = torch.cat([ties, special, random])[:N].to(dtype)
    tiny = torch.finfo(dtype).tiny
    x[200:204] = torch.tensor([tiny, -tiny, tiny / 4, -tiny / 4], dtype=dtype)
    return x.reshape(16, -1)


def trunk(bits: int, shape: torch.Size) -> torch.Tensor:
    g = torch.Generator().manual_seed(bits + 1)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0**10
    values.view(-1)[:4] = torch.tensor([0.0, -0.0, 2.0 ** (52 - bits), -(2.0 ** (52 - bits))])
    return (values * 2.0**bits).round_() * 2.0**-bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bits", [32, 8])
def test_fused_update_equals_eager_bit_for_bit(
    dtype: torch.dtype, bits: int, paths: dict[str, int]
) -> None:
    x = branch_outputs(dtype, bits)
    target = trunk(bits, x.shape)
    for sign in (1, -1):
        got, extremes = update_on_grid(target, x, bits, sign, extremes=sign > 0)
        want = add_on_grid(target, x, bits, sign)
        assert got.dtype == torch.float64
        # Bits, not values: -0.0 and 0.0 compare equal but are different trunks.
        assert torch.equal(got.view(torch.int64), want.view(torch.int64))
        if sign > 0:
            assert torch.equal(torch.stack(list(extremes)), torch.stack(list(torch.aminmax(want))))
        else:
            assert extremes is None
    assert paths == {"fused": 2, "eager": 0}


def test_fused_extremes_propagate_nan(paths: dict[str, int]) -> None:
    x = branch_outputs(torch.float32, 32)
    x[3, 5] = float("nan")
    _, (low, high) = update_on_grid(trunk(32, x.shape), x, 32, 1)
    assert low.isnan() and high.isnan()


SPEC = StackSpec(4, 16, 32, 4, 6, ("conv3", "bn", "relu", "conv3", "bn"))  # halves of 65,536


def test_stage_on_the_fused_path_bitwise_equal_to_reference(paths: dict[str, int]) -> None:
    assert SPEC.batch * SPEC.half * SPEC.spatial**2 >= N
    torch.manual_seed(0)
    stage, x = exact_stack(SPEC, torch.float32), make_input(SPEC, torch.float32)
    assert_bitwise_equal_to_reference(stage, x)
    assert paths["fused"] > 0
    check_inverse(stage, x)


def test_range_error_on_the_fused_path(paths: dict[str, int]) -> None:
    torch.manual_seed(0)
    stage, x = exact_stack(SPEC, torch.float32), make_input(SPEC, torch.float32)
    stage.exact_bits = 50  # range +-8: the input fits, the sums of six couplings do not
    assert x.abs().max() < 8
    with pytest.raises(ExactRangeError, match=r"coupling \d+: exact mode: a trunk value reached"):
        stage(x).sum().backward()
    assert paths["fused"] > 0


def test_a_failed_compilation_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*key):
        def call(*args):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(trunk_update, "_compiled", broken)
    monkeypatch.setitem(trunk_update._fusion, "enabled", True)
    x = branch_outputs(torch.float32, 32)
    target = trunk(32, x.shape)
    with pytest.warns(RuntimeWarning, match="did not compile.*no C\\+\\+ compiler"):
        got, _ = update_on_grid(target, x, 32, 1)
    assert torch.equal(got, add_on_grid(target, x, 32, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = update_on_grid(target, x, 32, 1)
    assert torch.equal(again, got)


def test_fusion_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*key):
        raise AssertionError("fused update used while turned off")

    monkeypatch.setattr(trunk_update, "_compiled", unreachable)
    monkeypatch.setitem(trunk_update._fusion, "enabled", True)
    trunk_update.use_fused_update(False)
    torch.manual_seed(0)
    stage, x = exact_stack(SPEC, torch.float32), make_input(SPEC, torch.float32)
    assert_bitwise_equal_to_reference(stage, x)
