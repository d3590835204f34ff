"""``ReversibleSequence``: a stage of additive couplings on two streams (DESIGN.md §6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from revcompile.runtime.coupling import AdditiveCoupling, Grid, forward_step, plain_call
from revcompile.runtime.function import _ReversibleFunction
from revcompile.runtime.modes import runs_plain, under_transform
from revcompile.runtime.state import UsedTensors

__all__ = ["ReversibleSequence", "Split"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

Split = Literal["halve", "duplicate"]


def trunk_input(x: Tensor) -> Tensor:
    """The stage input in the dtype the stage computes in.

    Under autocast the stage input is often a low-precision conv output; a
    low-precision trunk would reconstruct ``x2 = y2 - G(y1)`` with 2**-8
    rounding, compounding over couplings. The trunk is carried in float32.
    """
    if x.dtype in _LOW_PRECISION and torch.is_autocast_enabled(x.device.type):
        return x.float()
    return x


class ReversibleSequence(nn.Module):
    """A stage of additive couplings on two streams made from its input.

    ``split="halve"`` (RevNet): the streams ``(x1, x2)`` are the two halves of
    ``x`` along ``dim`` and the output is ``cat(y1, y2)``. ``split="duplicate"``
    (two-stream, as in reversible vision transformers): ``(x1, x2) = (x, x)``,
    F and G act at full width and the output is ``(y1 + y2) / 2``; ``dim`` only
    names the channel axis in messages.

    With grad enabled (training) it stores only the final streams (the output
    for ``halve``, ``y1`` and ``y2`` for ``duplicate``); backward reconstructs
    the inputs of every coupling. Under ``reference_mode()`` or with grad
    disabled it is a plain forward. Under autocast a float16/bfloat16 input is
    carried in float32 (F and G still run in the autocast dtype), so
    reconstruction is exact up to float32 rounding.

    ``exact=True`` (DESIGN.md §10): the trunk is carried in fixed point,
    float64 values on the grid of multiples of ``2**-exact_bits``, and each
    coupling adds its branch output rounded onto that grid,
    ``y1 = x1 + q(F(x2))``; F and G still run in the input's dtype, gradients
    pass straight through ``q``, and ``reference_mode()`` runs the same
    quantised forward. Reconstruction is then bit for bit, so the reversible
    gradients equal reference_mode's exactly (given deterministic F and G, as
    on CPU; on CUDA use ``torch.use_deterministic_algorithms(True)`` and verify
    with ``check_inverse``). A trunk value leaving the exact range
    ``+-2**(53 - exact_bits)`` raises OverflowError. The trunk's gradients stay
    in the input's dtype, as in float mode. The stage saves its output and a
    residual in its dtype that restores the float64 streams (the streams where
    that does not fit).
    """

    def __init__(
        self,
        couplings: Sequence[AdditiveCoupling],
        dim: int = 1,
        name: str = "",
        split: Split = "halve",
        exact: bool = False,
        exact_bits: int = 32,
    ) -> None:
        super().__init__()
        if not couplings:
            raise ValueError("ReversibleSequence needs at least one coupling")
        if split not in ("halve", "duplicate"):
            raise ValueError(f"split must be 'halve' or 'duplicate', not {split!r}")
        if not 0 < exact_bits < 53:
            raise ValueError(f"exact_bits must be between 1 and 52, not {exact_bits}")
        self.couplings = nn.ModuleList(couplings)
        self.dim = dim
        self.name = name
        self.split = split
        self.exact = exact
        self.exact_bits = exact_bits
        for i, coupling in enumerate(couplings):
            coupling.where = f"reversible stage {self.describe()}, coupling {i}"

    def describe(self) -> str:
        """The stage's name in messages."""
        return self.name or type(self).__name__

    def extra_repr(self) -> str:
        name = f", name={self.name!r}" if self.name else ""
        exact = f", exact=True, exact_bits={self.exact_bits}" if self.exact else ""
        return f"dim={self.dim}{name}, split={self.split!r}{exact}"

    def grid(self, dtype: torch.dtype) -> Grid | None:
        """The exact-mode trunk for a stage input of ``dtype``, or None in float mode."""
        return Grid(self.exact_bits, dtype) if self.exact else None

    def _streams(self, x: Tensor) -> list[Tensor]:
        """The two coupling streams ``[x1, x2]`` of the stage input.

        In exact mode they are quantised copies; with ``duplicate`` two of
        them, so that (as in the float trunk) each stream is its own tensor.
        """
        grid = self.grid(x.dtype)
        if self.split == "duplicate":
            if grid is None:
                return [x, x]
            return [grid.check(grid.quantise(x), self.describe()) for _ in range(2)]
        size = x.shape[self.dim]
        if size % 2:
            raise ValueError(
                f"reversible stage {self.describe()}: input of shape "
                f"{tuple(x.shape)} has odd size {size} along dim {self.dim}; "
                "the stage splits it into two equal halves"
            )
        if grid is not None:
            x = grid.check(grid.quantise(x), self.describe())
        return list(x.chunk(2, dim=self.dim))

    def _merge(self, streams: list[Tensor], dtype: torch.dtype) -> Tensor:
        """The stage output (in the input's ``dtype``) made from the two final streams."""
        if self.split == "duplicate":
            return ((streams[0] + streams[1]) / 2).to(dtype)
        return torch.cat(streams, dim=self.dim).to(dtype)

    def _plain_forward(self, x: Tensor) -> Tensor:
        streams = self._streams(x)
        grid = self.grid(x.dtype)
        for coupling in self.couplings:
            forward_step(coupling, streams, plain_call, grid)
        return self._merge(streams, x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = trunk_input(x)
        if runs_plain(x):
            return self._plain_forward(x)
        return self._reversible_forward(x)

    # torch.compile runs the training path eagerly (a graph break): dynamo cannot
    # trace the RNG and state bookkeeping, and the custom backward is what saves
    # the memory. What it calls runs compiled after ``compile_parts``.
    @torch.compiler.disable
    def _reversible_forward(self, x: Tensor) -> Tensor:
        # The tensors in the module's slots now (functional_call, FSDP may have
        # swapped them in): the backward uses these, not a later lookup.
        used = UsedTensors(self)
        params = [used.tensors[i] for i in used.trainable]
        if under_transform(x) or not (x.requires_grad or params):
            return self._plain_forward(x)
        return _ReversibleFunction.apply(x, self, used, *params)
