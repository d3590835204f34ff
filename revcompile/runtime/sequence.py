"""``ReversibleSequence``: a stage of additive couplings on two streams (DESIGN.md §6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from revcompile.runtime.coupling import AdditiveCoupling, forward_step, plain_call
from revcompile.runtime.function import _ReversibleFunction
from revcompile.runtime.modes import in_reference_mode
from revcompile.runtime.state import UsedTensors

__all__ = ["ReversibleSequence", "Split"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

Split = Literal["halve", "duplicate"]


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
    """

    def __init__(
        self,
        couplings: Sequence[AdditiveCoupling],
        dim: int = 1,
        name: str = "",
        split: Split = "halve",
    ) -> None:
        super().__init__()
        if not couplings:
            raise ValueError("ReversibleSequence needs at least one coupling")
        if split not in ("halve", "duplicate"):
            raise ValueError(f"split must be 'halve' or 'duplicate', not {split!r}")
        self.couplings = nn.ModuleList(couplings)
        self.dim = dim
        self.name = name
        self.split = split
        for i, coupling in enumerate(couplings):
            coupling.where = f"reversible stage {self.describe()}, coupling {i}"

    def describe(self) -> str:
        """The stage's name in messages."""
        return self.name or type(self).__name__

    def extra_repr(self) -> str:
        name = f", name={self.name!r}" if self.name else ""
        return f"dim={self.dim}{name}, split={self.split!r}"

    def _streams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two coupling streams ``(x1, x2)`` of the stage input."""
        if self.split == "duplicate":
            return x, x
        size = x.shape[self.dim]
        if size % 2:
            raise ValueError(
                f"reversible stage {self.describe()}: input of shape "
                f"{tuple(x.shape)} has odd size {size} along dim {self.dim}; "
                "the stage splits it into two equal halves"
            )
        x1, x2 = x.chunk(2, dim=self.dim)
        return x1, x2

    def _merge(self, y1: Tensor, y2: Tensor) -> Tensor:
        """The stage output made from the two final streams."""
        if self.split == "duplicate":
            return (y1 + y2) / 2
        return torch.cat([y1, y2], dim=self.dim)

    def _plain_forward(self, x: Tensor) -> Tensor:
        streams = list(self._streams(x))
        for coupling in self.couplings:
            forward_step(coupling, streams, plain_call)
        return self._merge(*streams)

    # torch.compile runs the stage eagerly (a graph break): dynamo cannot trace the
    # RNG bookkeeping, and the custom backward is what saves the memory.
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in _LOW_PRECISION and torch.is_autocast_enabled(x.device.type):
            # Under autocast the stage input is often a low-precision conv output;
            # a low-precision trunk would reconstruct x2 = y2 - G(y1) with 2**-8
            # rounding, compounding over couplings. The trunk is carried in float32.
            x = x.float()
        if in_reference_mode() or not torch.is_grad_enabled():
            return self._plain_forward(x)
        # The tensors in the module's slots now (functional_call, FSDP may have
        # swapped them in): the backward uses these, not a later lookup.
        used = UsedTensors(self)
        params = [used.tensors[i] for i in used.trainable]
        if not (x.requires_grad or params):
            return self._plain_forward(x)
        return _ReversibleFunction.apply(x, self, used, *params)
