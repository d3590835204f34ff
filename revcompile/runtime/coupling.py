"""The additive coupling and its two steps, written once (DESIGN.md §1).

``forward_step`` computes ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` and
``inverse_step`` computes ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``. Every user
of the coupling runs these two functions: the plain forward
(``AdditiveCoupling.forward``, reference mode), ``AdditiveCoupling.inverse``,
and the reversible autograd Function, whose forward records each branch call
and whose backward reconstructs the inputs while backpropagating. They differ
only in the *call hook* that evaluates a branch, in the spirit of
``torch.utils.checkpoint``'s single recompute function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

__all__ = ["AdditiveCoupling", "BranchCall", "forward_step", "inverse_step", "plain_call"]

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


def forward_step(coupling: AdditiveCoupling, streams: list[Tensor], call: BranchCall) -> None:
    """``[x1, x2]`` becomes ``[y1, y2]``; ``call`` evaluates F, then G.

    The streams are updated in place so that no caller keeps an old stream
    alive while the next branch runs (in the reversible backward that is the
    peak of memory).
    """
    streams[0] = streams[0] + _checked(coupling, "F", streams[1], call)
    if coupling.G is not None:
        streams[1] = streams[1] + _checked(coupling, "G", streams[0], call)


def inverse_step(coupling: AdditiveCoupling, streams: list[Tensor], call: BranchCall) -> None:
    """``[y1, y2]`` becomes ``[x1, x2]``; ``call`` evaluates G, then F (in place, as above)."""
    if coupling.G is not None:
        streams[1] = streams[1] - _checked(coupling, "G", streams[0], call)
    streams[0] = streams[0] - _checked(coupling, "F", streams[1], call)


def _checked(coupling: AdditiveCoupling, which: Branch, x: Tensor, call: BranchCall) -> Tensor:
    fn = coupling.F if which == "F" else coupling.G
    out = call(fn, which, x)
    if out.shape != x.shape:
        raise ValueError(
            f"{coupling.where}: coupling function {which} maps shape {tuple(x.shape)} to "
            f"{tuple(out.shape)}; a coupling function must preserve the shape of its input half"
        )
    return out
