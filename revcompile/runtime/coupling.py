"""The additive coupling and its two steps, written once (DESIGN.md §1).

``forward_step`` computes ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` and
``inverse_step`` computes ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``. Every user
of the coupling runs these two functions: the plain forward
(``AdditiveCoupling.forward``, reference mode), ``AdditiveCoupling.inverse``,
and the reversible autograd Function, whose forward records each branch call
and whose backward reconstructs the inputs while backpropagating. They differ
only in the *call hook* that evaluates a branch, in the spirit of
``torch.utils.checkpoint``'s single recompute function. In exact mode
(``Grid``, DESIGN.md §10) the same two steps add and subtract the branch
outputs rounded onto a fixed-point grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from revcompile.runtime.errors import ExactRangeError
from revcompile.runtime.trunk_update import add_on_grid, grid_integers, update_on_grid

__all__ = [
    "AdditiveCoupling",
    "BranchCall",
    "Grid",
    "forward_step",
    "inverse_step",
    "plain_call",
]

Branch = Literal["F", "G"]

#: ``call(branch_module, which, x)`` evaluates branch ``which`` ("F" reads
#: stream 2 and is added to stream 1; "G" reads stream 1 and is added to
#: stream 2) on ``x`` and returns its output.
BranchCall = Callable[[nn.Module, Branch, Tensor], Tensor]


def plain_call(fn: nn.Module, _which: Branch, x: Tensor) -> Tensor:
    """Evaluate the branch as an ordinary module call."""
    return fn(x)


class AdditiveCoupling(nn.Module):
    """RevNet additive coupling: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``.

    With ``G=None`` it is a half-coupling: ``y2 = x2``. ``F`` and ``G`` must map
    a tensor to one of the same shape. ``where`` names the coupling in errors;
    ReversibleSequence sets it to the stage name and position.
    """

    def __init__(self, F: nn.Module, G: nn.Module | None = None) -> None:
        super().__init__()
        self.F = F
        self.G = G
        self.where = "AdditiveCoupling"

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        streams = [x1, x2]
        forward_step(self, streams, plain_call)
        return streams[0], streams[1]

    def inverse(self, y1: Tensor, y2: Tensor) -> tuple[Tensor, Tensor]:
        """The inputs ``(x1, x2)`` that ``forward`` maps to ``(y1, y2)``."""
        streams = [y1, y2]
        inverse_step(self, streams, plain_call)
        return streams[0], streams[1]


@dataclass(frozen=True)
class Grid:
    """Exact mode's trunk: float64 values on the grid of multiples of ``2**-bits``.

    Sums of such values are exact while their magnitude stays below
    ``2**(53 - bits)`` (``limit``), so ``x1 = y1 - q(F(x2))`` gives back the
    forward's ``x1`` bit for bit when F recomputes deterministically. The
    branches run in ``dtype`` (the stage input's); their outputs are rounded
    onto the grid by ``quantise``, whose gradient passes straight through,
    rounded to ``dtype``: the trunk's gradients are in ``dtype``, as in float mode.
    """

    bits: int
    dtype: torch.dtype

    @property
    def limit(self) -> float:
        return 2.0 ** (53 - self.bits)

    def quantise(self, x: Tensor) -> Tensor:
        """``x`` rounded onto the grid, as float64; the gradient is the identity."""
        return _OnGrid.apply(x, self.bits)

    def check(self, x: Tensor, where: str, extremes: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x``, after checking that it lies in the exact range (and is finite).

        ``extremes``: ``x``'s min and max where the caller computed them already.
        """
        if extremes is None:
            if is_fake(x) or x.numel() == 0:
                return x
            # One pass (aminmax) rather than abs, compare and all: the check runs on
            # every trunk update.
            extremes = torch.aminmax(x)
        low, high = extremes
        # A NaN makes both extremes NaN, so the comparison fails too.
        if not bool((low > -self.limit) & (high < self.limit)):
            raise self._range_error(x.abs().max().item(), where)
        return x

    def residual(self, y: Tensor, streams: list[Tensor], dim: int) -> Tensor | None:
        """``r`` in ``y``'s dtype with ``y + r`` equal to ``cat(streams, dim)`` exactly, or None.

        A halve stage's output ``y`` is its float64 streams rounded to the input
        dtype; saving ``y`` (which the next segment saves anyway: one storage) and
        this residual instead of the streams costs ``2 * y`` bytes, not ``3 * y``
        next to the next segment's saved input. The residual is a multiple of
        ``2**-bits`` below half an ulp of ``y``: it fits a float32 while ``|y|`` is
        below ``2**(49 - bits)``; otherwise (or for a float64 stage, whose
        ``y`` is the streams) None, and the stage saves the streams.
        """
        if y.dtype == torch.float64 or is_fake(y):
            return None
        gap = torch.cat(streams, dim=dim).sub_(y.double())  # exact: y is cat's rounding
        residual = gap.to(y.dtype)
        return residual if torch.equal(residual.double(), gap) else None

    @staticmethod
    def restore(y: Tensor, residual: Tensor, dim: int) -> list[Tensor]:
        """The float64 streams that ``residual`` saved next to ``y`` (``residual``'s inverse)."""
        return list(y.double().add_(residual).chunk(2, dim=dim))

    def _range_error(self, largest: float, where: str) -> ExactRangeError:
        """The error for a trunk value of magnitude ``largest`` outside ``limit``."""
        range_ = f"+-2**{53 - self.bits} (exact_bits={self.bits})"
        if not math.isfinite(largest):
            return ExactRangeError(
                f"{where}: exact mode: a trunk value is not finite (outside {range_}); no grid "
                "holds it: find the NaN/inf in the stage's input or branches (lower the "
                "learning rate, normalise the input)",
                None,
            )
        # largest < 2**exponent; one bit more of headroom than that needs, as rounding
        # onto a coarser grid may round a value up to the next power of two.
        exponent = math.frexp(largest)[1]
        bits = 52 - exponent
        fix = (
            f"convert it with convert(..., exact=True, exact_bits={bits}) (or "
            f"ReversibleSequence(..., exact_bits={bits})), whose range +-2**{53 - bits} holds "
            "it, or normalise the stage's input"
            if bits >= 1
            else "no grid holds it: normalise the stage's input"
        )
        return ExactRangeError(
            f"{where}: exact mode: a trunk value reached {largest:.3g}, outside the range "
            f"{range_} in which float64 sums on the 2**-{self.bits} grid are exact; {fix}",
            bits if bits >= 1 else None,
        )


class _OnGrid(torch.autograd.Function):
    """Round to multiples of ``2**-bits`` in float64 (exact: scaling by a power of two)."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int) -> Tensor:
        ctx.dtype = x.dtype
        # Multiples of 2**-bits >= 2**-52 are normal numbers: scaling back is exact
        # too, and widening last keeps three of the four passes at the narrow width.
        return grid_integers(x, bits).mul_(2.0**-bits).double()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.dtype), None


class _AddOnGrid(torch.autograd.Function):
    """``add_on_grid`` for autograd (reference mode): the gradient passes straight
    through the rounding, as ``quantise``'s does, and is rounded to the grid's dtype.

    That rounding keeps the trunk's gradients in the stage input's dtype, as in
    float mode, so the reversible backward can carry them there: every trunk
    gradient is the float64 sum of two values of that dtype (the stream's next
    update and its branch read), whose rounding to that dtype is the rounding of
    their sum in it (double rounding through float64 is innocuous for a sum).
    """

    @staticmethod
    def forward(ctx, target: Tensor, x: Tensor, grid: Grid, sign: int) -> Tensor:
        ctx.dtypes, ctx.sign = (grid.dtype, x.dtype), sign
        return add_on_grid(target, x, grid.bits, sign)

    @staticmethod
    def backward(ctx, grad: Tensor):
        trunk_dtype, branch_dtype = ctx.dtypes
        trunk = grad.to(trunk_dtype)
        branch = trunk.to(branch_dtype)
        return trunk.to(grad.dtype), (branch if ctx.sign > 0 else -branch), None, None


class _TrunkGradient(torch.autograd.Function):
    """The identity, whose backward rounds the gradient to ``dtype`` (in reference mode).

    A half-coupling leaves its second stream as it is, so that stream is read by
    more than one branch; this node keeps each of its gradient sums to two
    terms, summed and rounded as the reversible backward sums them.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.dtype).to(grad.dtype), None


def forward_step(
    coupling: AdditiveCoupling, streams: list[Tensor], call: BranchCall, grid: Grid | None = None
) -> None:
    """``[x1, x2]`` becomes ``[y1, y2]``; ``call`` evaluates F, then G.

    The streams are updated in place so that no caller keeps an old stream
    alive while the next branch runs (in the reversible backward that is the
    peak of memory). With a ``grid`` the streams are exact-mode trunks.
    """
    streams[0] = _update(coupling, "F", streams, call, grid, 1)
    if coupling.G is not None:
        streams[1] = _update(coupling, "G", streams, call, grid, 1)
    elif grid is not None and torch.is_grad_enabled():
        streams[1] = _TrunkGradient.apply(streams[1], grid.dtype)


def inverse_step(
    coupling: AdditiveCoupling, streams: list[Tensor], call: BranchCall, grid: Grid | None = None
) -> None:
    """``[y1, y2]`` becomes ``[x1, x2]``; ``call`` evaluates G, then F (in place, as above)."""
    if coupling.G is not None:
        streams[1] = _update(coupling, "G", streams, call, grid, -1)
    streams[0] = _update(coupling, "F", streams, call, grid, -1)


def _update(
    coupling: AdditiveCoupling,
    which: Branch,
    streams: list[Tensor],
    call: BranchCall,
    grid: Grid | None,
    sign: int,
) -> Tensor:
    """The new value of the stream that branch ``which`` adds to (``sign=1``) or
    is subtracted from (``sign=-1``): F reads stream 2 into stream 1, G the reverse."""
    target, source = (0, 1) if which == "F" else (1, 0)
    # Exact mode: the branch reads a copy, also when its dtype is the trunk's (float64
    # models), as it does after a float32 conversion: a branch reading the trunk tensor
    # itself broke bitwise reconstruction when a post-op moved into it (LONG_RUN.md).
    x = streams[source] if grid is None else streams[source].to(grid.dtype, copy=True)
    fn = coupling.F if which == "F" else coupling.G
    out = call(fn, which, x)
    if out.shape != x.shape:
        raise ValueError(
            f"{coupling.where}: coupling function {which} maps shape {tuple(x.shape)} to "
            f"{tuple(out.shape)}; a coupling function must preserve the shape of its input half"
        )
    if grid is None:
        return streams[target] + out if sign > 0 else streams[target] - out
    # The reversible forward and backward run without grad: the plain (or fused)
    # arithmetic, without the autograd Function's per-call cost. Reconstruction
    # (sign < 0) is exact by construction: nothing to check.
    if torch.is_grad_enabled():
        updated, extremes = _AddOnGrid.apply(streams[target], out, grid, sign), None
    else:
        updated, extremes = update_on_grid(streams[target], out, grid.bits, sign, sign > 0)
    return updated if sign < 0 else grid.check(updated, coupling.where, extremes)
