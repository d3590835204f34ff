"""The autograd Function that backpropagates through a stage by reconstruction (DESIGN.md §6).

Forward runs the couplings under ``no_grad`` with a recording call hook and
saves, through ``ctx.save_for_backward`` only: the final streams, the tensors
the stage used (parameters, and buffers no call changed: module state, not
activations), and what the recorder kept (RNG states of calls that consumed
randomness, pre-call values of buffers a call changed). Backward walks the
couplings from the top with ``inverse_step``; its call hook recomputes each
branch with grad in the state the forward saw (``Replay``), takes the
branch's input and parameter gradients with ``torch.autograd.grad`` and adds
them to the running stream gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from revcompile.runtime.coupling import Branch, forward_step, inverse_step
from revcompile.runtime.state import CallRecord, CallRecorder, Replay, UsedTensors, autocast_state

if TYPE_CHECKING:
    from revcompile.runtime.sequence import ReversibleSequence


class _ReversibleFunction(torch.autograd.Function):
    """Reversible backprop through a ReversibleSequence.

    Inputs: the stage input, the stage module, its UsedTensors, then the
    trainable parameters among them (so autograd, DDP hooks and
    ``torch.autograd.grad`` see them).
    """

    @staticmethod
    def forward(ctx, x: Tensor, stage: ReversibleSequence, used: UsedTensors, *params: Tensor):
        recorder = CallRecorder(x.device)
        grid = stage.grid(x.dtype)
        with torch.no_grad():
            streams = stage._streams(x)
            for coupling in stage.couplings:
                forward_step(coupling, streams, recorder.call, grid)
            y = stage._merge(streams, x.dtype)
        # ``duplicate`` merges into (y1 + y2) / 2, which loses the streams; an
        # exact stage's output is rounded to the input dtype, which loses bits
        # that a residual next to it keeps where it fits.
        residual = (
            None if stage.split != "halve" or grid is None else grid.residual(y, streams, stage.dim)
        )
        if residual is not None:
            kept = (y, residual)
        else:
            kept = (y,) if stage.split == "halve" and grid is None else tuple(streams)
        ctx.residual = residual is not None
        ctx.stage = stage
        ctx.grid = grid
        ctx.input_dtype = x.dtype
        ctx.used = used
        ctx.records = recorder.records
        ctx.cuda_device = recorder.cuda_device
        ctx.autocast = autocast_state(x.device.type)
        ctx.layout = (len(kept), len(used.tensors))
        ctx.save_for_backward(*kept, *used.to_save(recorder.rewound()), *recorder.saved)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        stage: ReversibleSequence = ctx.stage
        if torch.is_grad_enabled():
            raise RuntimeError(
                "revcompile: higher-order gradients (create_graph=True) are not supported "
                "through a reversible stage; run the model under revcompile.reference_mode() "
                "for double backward"
            )
        saved = _saved_tensors(ctx, stage)
        n_streams, n_used = ctx.layout
        kept = saved[:n_streams]
        replay = Replay(
            ctx.used,
            saved[n_streams : n_streams + n_used],
            saved[n_streams + n_used :],
            ctx.cuda_device,
            leaves=True,
            autocast=ctx.autocast,
        )
        with torch.no_grad():
            # The backward of _merge and of _streams, op for op as autograd runs
            # them in reference mode (exact mode's gradients are bitwise equal).
            if ctx.residual:
                streams = ctx.grid.restore(kept[0], kept[1], stage.dim)
            elif len(kept) == 1:
                streams = list(kept[0].chunk(2, dim=stage.dim))
            else:
                streams = list(kept)
            # dy is in the output's dtype, the stage input's: that of the trunk's
            # gradients in both modes (reference mode rounds an exact trunk's to it).
            if stage.split == "halve":
                dy1, dy2 = dy.chunk(2, dim=stage.dim)
                if ctx.grid is not None and ctx.grid.dtype != torch.float64:
                    # Reference mode's rounding from float64 copies these views
                    # (``_AddOnGrid``): the branches' backward kernels, whose sums
                    # follow the layout, get the same layout here.
                    dy1, dy2 = dy1.clone(), dy2.clone()
            else:  # output (y1 + y2) / 2
                dy1 = dy2 = dy / 2
            del kept, saved, dy
            backprop = _Backprop(replay, reversed(ctx.records), dy1, dy2)
            del dy1, dy2
            for coupling in reversed(stage.couplings):
                inverse_step(coupling, streams, backprop.call, ctx.grid)
            dx1, dx2 = backprop.grads
            # x1 and x2 are the two halves of x, or both x itself.
            dtype = ctx.input_dtype
            if stage.split == "halve":
                dx = torch.cat([dx1, dx2], dim=stage.dim).to(dtype)
            else:
                dx = dx1.to(dtype) + dx2.to(dtype)
        param_grads = [backprop.param_grads.get(i) for i in ctx.used.trainable]
        return (dx, None, None, *param_grads)


class _Backprop:
    """The backward's branch call hook.

    Holds the gradients of the two streams at the current coupling boundary.
    A call recomputes the branch in its forward state, returns its output
    (detached) for the reconstruction and adds its input gradient to the
    stream it reads (F reads stream 2, G stream 1) and its parameter
    gradients to ``param_grads``. The branch's output gradient is the one of
    the stream it was added to: both already hold every later contribution.
    """

    def __init__(
        self, replay: Replay, records: Iterator[CallRecord], dy1: Tensor, dy2: Tensor
    ) -> None:
        self.replay = replay
        self.records = records
        self.grads = [dy1, dy2]
        self.param_grads: dict[int, Tensor] = {}

    def call(self, fn: nn.Module, which: Branch, x: Tensor) -> Tensor:
        out_stream, in_stream = (0, 1) if which == "F" else (1, 0)
        indices = self.replay.trainable_of(fn)
        leaves = [self.replay.leaf(i) for i in indices]
        inp = x.detach().requires_grad_()
        with self.replay.recompute(fn, next(self.records)), torch.enable_grad():
            out = fn(inp)
        if out.requires_grad:
            # As autograd casts it (to a bfloat16 branch output).
            grad_out = self.grads[out_stream].to(out.dtype)
            grads = torch.autograd.grad(out, [inp, *leaves], grad_out, allow_unused=True)
        else:  # noise, a detached or a frozen branch: nothing depends on its inputs
            grads = (None,) * (1 + len(leaves))
        for i, g in zip(indices, grads[1:]):
            if g is not None:
                self.param_grads[i] = g if i not in self.param_grads else self.param_grads[i] + g
        if grads[0] is not None:
            self.grads[in_stream] = self.grads[in_stream] + grads[0]
        return out.detach()


def _saved_tensors(ctx, stage: ReversibleSequence) -> tuple[Tensor, ...]:
    """``ctx.saved_tensors``, with what to do if autograd refuses them."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        raise RuntimeError(
            f"revcompile: reversible stage {stage.describe()} cannot read what it saved for "
            f"backward: {error}. The stage reconstructs every coupling's input from its output; "
            "if that output (or a view of it) is modified in place after the stage (relu_(), "
            "nn.ReLU(inplace=True), nn.Dropout(inplace=True), +=), make that operation "
            "out-of-place."
        ) from error
