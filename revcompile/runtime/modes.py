"""``reference_mode()``: every reversible or checkpointed part runs with plain autograd."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

__all__ = ["in_reference_mode", "reference_mode", "runs_plain"]

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


def runs_plain(*inputs: object) -> bool:
    """Whether a stage or segment must run its plain forward (the same function).

    Under ``reference_mode()`` and with grad disabled; under the JIT tracer
    (``torch.jit.trace``, the legacy ONNX exporter), which cannot record an
    autograd Function whose forward calls modules; and under ``torch.func``
    transforms (``vmap``), for which the Function has no rules: a trace or a
    transform records one forward, and the memory-saving backward is no part of it.

    Under ``torch.compile`` the transform check is left to :func:`under_transform`
    in the eagerly run training path: dynamo cannot trace it, and skipping it here
    keeps the plain (eval, no-grad) path one graph.
    """
    return (
        in_reference_mode()
        or not torch.is_grad_enabled()
        or torch.jit.is_tracing()
        or (not torch.compiler.is_compiling() and under_transform(*inputs))
    )


def under_transform(*inputs: object) -> bool:
    """Whether any input is a ``torch.func`` transform's wrapped tensor (eager only)."""
    return any(
        isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in inputs
    )
