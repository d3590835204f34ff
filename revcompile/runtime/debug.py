"""``check_inverse``: does a stage's reconstruction give back its inputs bit for bit?"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from revcompile.runtime.coupling import Branch, forward_step, inverse_step
from revcompile.runtime.sequence import ReversibleSequence, trunk_input
from revcompile.runtime.state import CallRecorder, Replay, UsedTensors, autocast_state

__all__ = ["check_inverse"]


def check_inverse(stage: ReversibleSequence, x: Tensor) -> None:
    """Raise RuntimeError unless reconstruction recovers every coupling's input exactly.

    Runs ``stage`` on the batch ``x`` as a training step does (recording RNG
    and module state), keeps the streams entering every coupling, then
    reconstructs them from the stage's final streams with the reversible
    backward's own inverse step and recomputation replay, and compares with
    ``torch.equal``. In exact mode (``exact=True``) they must be equal; a
    difference means F or G does not recompute deterministically (on CUDA:
    ``torch.use_deterministic_algorithms(True)``). In float mode the message
    tells how large the reconstruction error is.

    Side effects: none; the check runs on a deep copy of ``stage`` with the
    global RNG forked.
    """
    stage = copy.deepcopy(stage)
    x = trunk_input(x)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        used = UsedTensors(stage)
        recorder = CallRecorder(x.device)
        grid = stage.grid(x.dtype)
        streams = stage._streams(x)
        inputs = []
        for coupling in stage.couplings:
            inputs.append(list(streams))
            forward_step(coupling, streams, recorder.call, grid)
        replay = Replay(
            used,
            used.tensors,
            recorder.saved,
            recorder.cuda_device,
            leaves=False,
            autocast=autocast_state(x.device.type),
        )
        records = reversed(recorder.records)

        def call(fn: torch.nn.Module, _which: Branch, inp: Tensor) -> Tensor:
            with replay.recompute(fn, next(records)):
                return fn(inp)

        for coupling, want in zip(reversed(stage.couplings), reversed(inputs)):
            inverse_step(coupling, streams, call, grid)
            for name, got, expected in zip(("x1", "x2"), streams, want):
                if not torch.equal(got, expected):
                    wrong = (got != expected).sum().item()
                    worst = (got - expected).abs().max().item()
                    raise RuntimeError(
                        f"{coupling.where}: reconstructed {name} differs from the forward's in "
                        f"{wrong} of {got.numel()} elements (largest difference {worst:.3g}); "
                        "use exact=True for bitwise reconstruction, and deterministic F and G"
                    )
