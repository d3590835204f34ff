"""``CheckpointedSegment``: a non-reversible part recomputed in backward.

It runs its body under non-reentrant ``torch.utils.checkpoint`` (which keeps
only the inputs and replays the RNG) with a ``context_fn`` that records what
the forward call saw and replays it in the recomputation (``state.Replay``):
the parameter and buffer tensors of the forward, the buffers and scalar
attributes as they were before the call, no second BatchNorm update. The
recompute context is re-entrant, so ``backward(retain_graph=True)`` may run
the recomputation several times.

The pre-call values of buffers the body changed are held by the recompute
context, not saved through a saved-tensor hook (checkpoint runs the body under
its own hooks); they are module-state sized, never activation sized.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from revcompile.runtime.modes import runs_plain, under_transform
from revcompile.runtime.state import CallRecorder, Replay, UsedTensors

__all__ = ["CheckpointedSegment"]


class CheckpointedSegment(nn.Module):
    """A non-reversible part of a converted network that is recomputed in backward.

    With grad enabled it runs ``body`` under non-reentrant
    ``torch.utils.checkpoint`` (only its inputs are kept; dropout is replayed
    from the saved RNG state); the recomputation sees the state the forward
    call saw and changes nothing, so BatchNorm statistics, spectral-norm
    vectors and counters are updated once per forward. With grad disabled or
    under ``reference_mode()`` it is a plain call.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, *args):
        if runs_plain(*args):
            return self.body(*args)
        return self._checkpointed(*args)

    # As ReversibleSequence's training path: eager under torch.compile.
    @torch.compiler.disable
    def _checkpointed(self, *args):
        if under_transform(*args):
            return self.body(*args)
        call = _RecordedCall(self.body)
        return checkpoint(
            self.body, *args, use_reentrant=False, context_fn=lambda: (call, call.replaying())
        )


class _RecordedCall:
    """The forward context: records the body's call (entered once, in forward)."""

    def __init__(self, body: nn.Module) -> None:
        self.body = body
        self.used = UsedTensors(body)
        # torch.utils.checkpoint replays the RNG itself.
        self.recorder = CallRecorder(torch.device("cpu"), rng=False)

    def __enter__(self) -> None:
        self._before = self.recorder.before(self.body)

    def __exit__(
        self, kind: type | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.recorder.after(self._before)
        del self._before

    def replaying(self) -> _Replaying:
        return _Replaying(self)


class _Replaying:
    """The recompute context; may be entered again for every backward pass."""

    def __init__(self, call: _RecordedCall) -> None:
        self.call = call

    def __enter__(self) -> None:
        call = self.call
        replay = Replay(call.used, call.used.tensors, call.recorder.saved, None, leaves=False)
        self._block = replay.recompute(call.body, call.recorder.records[0])
        self._block.__enter__()

    def __exit__(
        self, kind: type | None, value: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        block, self._block = self._block, None
        return block.__exit__(kind, value, tb)
