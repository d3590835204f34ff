"""Exact mode's trunk update, ``target + sign * q(x)`` (DESIGN.md §10), eager or fused.

``add_on_grid`` is the arithmetic: it rounds the branch output ``x`` onto the
``2**-bits`` grid and adds it to the float64 trunk ``target`` in one rounding.
Eager PyTorch runs it as four elementwise passes (scale, round, widen, add),
and the range check a fifth; ``update_on_grid`` runs the same code compiled by
``torch.compile`` (inductor) where it can, as one kernel that reads ``target``
and ``x`` once and writes the sum once. Every step of the arithmetic is exact
but the final add, whose single rounding inductor keeps (a fused multiply-add
of the exact product gives the same sum), so both paths give the same bits
(``tests/test_trunk_update.py`` compares them on rounding ties, extremes and
random values).

The fused path is taken for large contiguous CPU or CUDA tensors; anything
else (small tensors, views, fake tensors, a machine without a C++ compiler)
runs eagerly. A compilation that fails is reported once with a warning and
the process keeps the eager path. ``use_fused_update(False)`` turns fusion off.

Example::

    >>> target = torch.zeros(4, dtype=torch.float64)
    >>> updated, extremes = update_on_grid(target, torch.tensor([0.5, -1.25, 3.0, 1e-12]), 32, 1)
    >>> updated.tolist(), [e.item() for e in extremes]
    ([0.5, -1.25, 3.0, 0.0], [-1.25, 3.0])
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["add_on_grid", "grid_integers", "update_on_grid", "use_fused_update"]

#: Below this many elements the elementwise passes cost less than a compiled call.
FUSED_MIN_NUMEL = 1 << 16

_fusion = {"enabled": True}

Extremes = tuple[Tensor, Tensor]


def use_fused_update(enabled: bool) -> None:
    """Run exact mode's trunk updates compiled (the default) or eagerly; the same values."""
    _fusion["enabled"] = enabled


def grid_integers(x: Tensor, bits: int) -> Tensor:
    """``round(x * 2**bits)``, computed exactly in ``x``'s dtype (float16: in float32).

    Scaling by a power of two and rounding to an integer are exact in the
    branch's dtype (float16 excepted: ``2**bits`` overflows it), so this equals
    rounding in float64 at half the memory traffic.
    """
    wide = x.float() if x.dtype == torch.float16 else x
    return (wide * 2.0**bits).round_()


def add_on_grid(target: Tensor, x: Tensor, bits: int, sign: int) -> Tensor:
    """``target + sign * q(x)`` in one float64 add: ``add(target, n, alpha)``.

    ``n = round(x * 2**bits)`` is an integer and ``alpha = sign * 2**-bits`` a
    power of two, so ``alpha * n`` is exact and the one rounding of the sum gives
    ``target + sign * q(x)`` bit for bit, without materialising the float64
    rounded branch output. ``n`` is computed at the branch's width and widened
    before the add, as a mixed-dtype add takes a slow, unvectorised path. (No
    ``out=``: inductor compiles the update with it into a slower kernel.)
    """
    return torch.add(target, grid_integers(x, bits).double(), alpha=sign * 2.0**-bits)


def update_on_grid(
    target: Tensor, x: Tensor, bits: int, sign: int, extremes: bool = True
) -> tuple[Tensor, Extremes | None]:
    """``add_on_grid(target, x, bits, sign)`` and, with ``extremes``, its min and max.

    Fused into one compiled kernel where ``_fusable``; eagerly otherwise. The
    extremes are 0-d tensors (``torch.aminmax``), None without ``extremes``.
    """
    if _fusable(target, x):
        try:
            # Flat: one graph for every shape (contiguous, so the views are free).
            updated, found = _compiled(bits, sign, extremes)(target.view(-1), x.view(-1))
            return updated.view(target.shape), found
        except Exception as error:  # no compiler, an unsupported device: eager from now on
            _fusion["enabled"] = False
            warnings.warn(
                f"revcompile: exact mode's fused trunk update did not compile ({error!r:.300}); "
                "it runs eagerly from now on (the same values, more elementwise passes)",
                RuntimeWarning,
                stacklevel=2,
            )
    return _eager(target, x, bits, sign, extremes)


def _eager(
    target: Tensor, x: Tensor, bits: int, sign: int, extremes: bool
) -> tuple[Tensor, Extremes | None]:
    updated = add_on_grid(target, x, bits, sign)
    if not extremes or is_fake(updated) or updated.numel() == 0:
        return updated, None
    return updated, torch.aminmax(updated)


def _fusable(target: Tensor, x: Tensor) -> bool:
    """Whether the compiled kernel applies: large, contiguous, plain CPU/CUDA tensors
    (``type(...) is Tensor`` excludes fake and other subclass tensors)."""
    return (
        _fusion["enabled"]
        and type(target) is Tensor
        and type(x) is Tensor
        and target.device == x.device
        and target.device.type in ("cpu", "cuda")
        and target.numel() >= FUSED_MIN_NUMEL
        and target.shape == x.shape
        and target.is_contiguous()
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
    )


@functools.cache
def _compiled(bits: int, sign: int, extremes: bool) -> Callable[[Tensor, Tensor], tuple]:
    """The compiled update for one grid and sign, whose constants are baked into the
    kernel (as symbolic values the kernel computes ``2**bits`` per element)."""

    def update(target: Tensor, x: Tensor) -> tuple[Tensor, Extremes | None]:
        updated = add_on_grid(target, x, bits, sign)
        return updated, (torch.aminmax(updated) if extremes else None)

    # Dynamo keeps one cache, and one recompilation limit, per code object: its own
    # code object keeps each grid and sign from using up the others' limit. Not
    # ``dynamic=True``, which would make ``bits`` and ``sign`` symbolic too; the
    # (flat) size becomes dynamic once a second size is seen.
    update.__code__ = update.__code__.replace(co_name=f"update_{bits}_{sign}_{int(extremes)}")
    return torch.compile(update, fullgraph=True)
