"""``reference_mode()``: every reversible or checkpointed part runs with plain autograd."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["in_reference_mode", "reference_mode"]

_reference_mode: ContextVar[bool] = ContextVar("revcompile_reference_mode", default=False)


@contextlib.contextmanager
def reference_mode() -> Iterator[None]:
    """Run every ReversibleSequence and CheckpointedSegment with plain autograd.

    Activations are stored as in an ordinary network; the network and its
    parameters are unchanged, only the backward strategy differs. Used to check
    that reversible gradients are exact, to measure what reversibility costs,
    and to debug.
    """
    token = _reference_mode.set(True)
    try:
        yield
    finally:
        _reference_mode.reset(token)


def in_reference_mode() -> bool:
    """True inside a ``reference_mode()`` block."""
    return _reference_mode.get()
