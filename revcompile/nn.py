"""Reversible runtime: additive couplings and the stage that backpropagates through them.

``ReversibleSequence`` runs a chain of ``AdditiveCoupling`` blocks on the two
channel halves of its input. In training it uses one ``torch.autograd.Function``
(``_ReversibleFunction``) that stores only the stage output and, in backward,
reconstructs every coupling's input from its output (Gomez et al. 2017,
Algorithm 1) while computing the gradients. See DESIGN.md §1 and §6.

This module is the runtime: it never imports the compiler passes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "AdditiveCoupling",
    "CheckpointedSegment",
    "ReversibleSequence",
    "preserved_buffers",
    "reference_mode",
]

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


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` on exit.

    Recomputing a forward (reversible backward, activation checkpointing) must
    not update BatchNorm running statistics a second time.
    """
    buffers = [b for b in module.buffers() if b is not None]
    snapshot = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, snapshot):
                buffer.copy_(saved)


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
        y1 = x1 + _shape_checked(self.where, "F", x2, self.F(x2))
        y2 = x2 if self.G is None else x2 + _shape_checked(self.where, "G", y1, self.G(y1))
        return y1, y2

    def inverse(self, y1: Tensor, y2: Tensor) -> tuple[Tensor, Tensor]:
        x2 = y2 if self.G is None else y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return x1, x2


def _shape_checked(where: str, which: str, inp: Tensor, out: Tensor) -> Tensor:
    if out.shape != inp.shape:
        raise ValueError(
            f"{where}: coupling function {which} maps shape {tuple(inp.shape)} to "
            f"{tuple(out.shape)}; a coupling function must preserve the shape of its input half"
        )
    return out


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
            coupling.where = f"reversible stage {name or type(self).__name__}, coupling {i}"

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
                f"reversible stage {self.name or type(self).__name__}: input of shape "
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
        x1, x2 = self._streams(x)
        for coupling in self.couplings:
            x1, x2 = coupling(x1, x2)
        return self._merge(x1, x2)

    # torch.compile runs the stage eagerly (a graph break): dynamo cannot trace the
    # RNG bookkeeping, and the custom backward is what saves the memory.
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in _LOW_PRECISION and torch.is_autocast_enabled(x.device.type):
            # Under autocast the stage input is often a low-precision conv output;
            # a low-precision trunk would reconstruct x2 = y2 - G(y1) with 2**-8
            # rounding, compounding over couplings. The trunk is carried in float32.
            x = x.float()
        params = [p for p in self.parameters() if p.requires_grad]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if in_reference_mode() or not needs_grad:
            return self._plain_forward(x)
        return _ReversibleFunction.apply(x, self, len(params), *params)


@dataclass
class _CallRecord:
    """What backward needs to replay one F or G call exactly.

    ``rng_index`` points into the saved tensors at the RNG states taken before
    the call, or is None when the call consumed no random numbers.
    """

    rng_index: int | None


class _RngTracker:
    """Saves the RNG state before a call only if the call consumed randomness."""

    def __init__(self, device: torch.device) -> None:
        self.cuda_device = device if device.type == "cuda" else None
        self.states: list[Tensor] = []

    def _state(self) -> list[Tensor]:
        states = [torch.get_rng_state()]
        if self.cuda_device is not None:
            states.append(torch.cuda.get_rng_state(self.cuda_device))
        return states

    def call(self, fn: nn.Module, x: Tensor) -> tuple[Tensor, _CallRecord]:
        before = self._state()
        out = fn(x)
        after = self._state()
        if all(torch.equal(a, b) for a, b in zip(before, after)):
            return out, _CallRecord(rng_index=None)
        index = len(self.states)
        self.states.extend(before)
        return out, _CallRecord(rng_index=index)

    @contextlib.contextmanager
    def replay(self, record: _CallRecord, states: Sequence[Tensor]) -> Iterator[None]:
        if record.rng_index is None:
            yield
            return
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(states[record.rng_index])
            if self.cuda_device is not None:
                torch.cuda.set_rng_state(states[record.rng_index + 1], self.cuda_device)
            yield


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _ReversibleFunction(torch.autograd.Function):
    """Reversible backprop through a ReversibleSequence (DESIGN.md §1, §6).

    Inputs: the stage input, the stage module, the number of trainable
    parameters, then those parameters (so autograd, DDP hooks and
    ``torch.autograd.grad`` see them). Saved for backward: what reconstruction
    needs (the stage output for ``halve``; both final streams for
    ``duplicate``, whose output ``(y1 + y2) / 2`` loses them) and the RNG
    states of the calls that consumed randomness — nothing else.
    """

    @staticmethod
    def forward(ctx, x: Tensor, stage: ReversibleSequence, n_params: int, *params: Tensor):
        rng = _RngTracker(x.device)
        records: list[tuple[_CallRecord, _CallRecord | None]] = []
        with torch.no_grad():
            x1, x2 = stage._streams(x)
            for coupling in stage.couplings:
                f_out, f_record = rng.call(coupling.F, x2)
                x1 = x1 + _shape_checked(coupling.where, "F", x2, f_out)
                g_record = None
                if coupling.G is not None:
                    g_out, g_record = rng.call(coupling.G, x1)
                    x2 = x2 + _shape_checked(coupling.where, "G", x1, g_out)
                records.append((f_record, g_record))
            y = stage._merge(x1, x2)
        ctx.stage = stage
        ctx.params = params
        ctx.rng = rng
        ctx.records = records
        ctx.autocast = _autocast_state(x.device.type)
        streams = (y,) if stage.split == "halve" else (x1, x2)
        ctx.n_streams = len(streams)
        ctx.save_for_backward(*streams, *rng.states)
        rng.states.clear()  # the saved tensors own them now
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "revcompile: higher-order gradients (create_graph=True) are not supported "
                "through a reversible stage; run the model under revcompile.reference_mode() "
                "for double backward"
            )
        stage: ReversibleSequence = ctx.stage
        saved = ctx.saved_tensors
        streams, rng_states = saved[: ctx.n_streams], saved[ctx.n_streams :]
        index_of = {id(p): i for i, p in enumerate(ctx.params)}
        param_grads: list[Tensor | None] = [None] * len(ctx.params)
        autocast_enabled, autocast_dtype = ctx.autocast
        device_type = dy.device.type

        def backprop(fn: nn.Module, record: _CallRecord, inp: Tensor, grad_out: Tensor):
            """Recompute ``fn(inp)``; return its value and the input gradient."""
            fn_params = [p for p in fn.parameters() if id(p) in index_of]
            leaf = inp.detach().requires_grad_()
            # Buffers are restored only after autograd.grad: BatchNorm's backward
            # checks the version of the running stats it was called with.
            with preserved_buffers(fn):
                with (
                    torch.enable_grad(),
                    ctx.rng.replay(record, rng_states),
                    torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled),
                ):
                    out = fn(leaf)
                grads = torch.autograd.grad(out, [leaf, *fn_params], grad_out, allow_unused=True)
            for p, g in zip(fn_params, grads[1:]):
                if g is not None:
                    i = index_of[id(p)]
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            grad_in = grads[0] if grads[0] is not None else torch.zeros_like(inp)
            return out.detach(), grad_in

        with torch.no_grad():
            if stage.split == "halve":
                (y,) = streams
                y1, y2 = (t.detach() for t in y.chunk(2, dim=stage.dim))
                dy1, dy2 = dy.chunk(2, dim=stage.dim)
            else:  # output (y1 + y2) / 2
                y1, y2 = (t.detach() for t in streams)
                dy1 = dy2 = dy / 2
            for coupling, (f_record, g_record) in zip(
                reversed(stage.couplings), reversed(ctx.records)
            ):
                # A branch's output and input gradient are dropped as soon as
                # they are used: the next branch's recomputation is the peak.
                if coupling.G is not None:
                    g_out, dg = backprop(coupling.G, g_record, y1, dy2)
                    y2, dy1 = y2 - g_out, dy1 + dg
                    del g_out, dg
                f_out, df = backprop(coupling.F, f_record, y2, dy1)
                y1, dy2 = y1 - f_out, dy2 + df
                del f_out, df
            # x1 and x2 are the two halves of x, or both x itself.
            dx = torch.cat([dy1, dy2], dim=stage.dim) if stage.split == "halve" else dy1 + dy2
        return (dx, None, None, *param_grads)


class CheckpointedSegment(nn.Module):
    """A non-reversible part of a converted network that is recomputed in backward.

    With grad enabled it runs ``body`` under non-reentrant
    ``torch.utils.checkpoint`` (only its inputs are kept; dropout is replayed
    from the saved RNG state) and restores ``body``'s buffers after the
    recomputation, so BatchNorm statistics are updated once per forward. With
    grad disabled or under ``reference_mode()`` it is a plain call.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    @torch.compiler.disable
    def forward(self, *args):
        if in_reference_mode() or not torch.is_grad_enabled():
            return self.body(*args)
        contexts = functools.partial(_recompute_contexts, self.body)
        return checkpoint(self.body, *args, use_reentrant=False, context_fn=contexts)


def _recompute_contexts(body: nn.Module) -> tuple[AbstractContextManager, AbstractContextManager]:
    """No context for the forward; the recomputation restores ``body``'s buffers."""
    return contextlib.nullcontext(), preserved_buffers(body)
