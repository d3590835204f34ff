"""Per-segment saved bytes and FLOPs on fake tensors: the memory planner's costs.

:func:`attribute` runs a traced graph once under a ``FakeTensorMode`` (no real
memory, no real compute) with the pack hook of :mod:`.saved`, and records for
every saved storage which segments saved it, for every segment boundary its
storage, and for every segment its forward FLOPs (``torch.utils.flop_counter``).
:func:`measure_call` does the same for one module called on one fresh input
(a reversible stage, which the traced graph does not contain yet).

Like the rest of this package it imports only torch and the standard library.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from revcompile.memory.formula import recording_saved
from revcompile.memory.saved import SavedStorageRecorder, storage_keys


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and grad flag of a tensor to create fresh (fake) for a measurement."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @staticmethod
    def of(tensor: torch.Tensor) -> TensorSpec:
        return TensorSpec(tuple(tensor.shape), tensor.dtype, tensor.requires_grad)


@dataclass
class Attribution:
    """What one fake forward of a segmented graph saved, by segment.

    ``savers`` maps each saved storage still alive after the forward (a key)
    to its nbytes and the segments that saved it; ``boundary_keys[k]`` /
    ``boundary_bytes[k]`` are the storage key and nbytes of boundary ``k``'s
    value (None for a non-tensor); ``boundary_specs[k]`` its spec; ``flops[u]``
    segment ``u``'s forward FLOPs.
    """

    savers: dict[int, tuple[int, set[int]]] = field(default_factory=dict)
    boundary_keys: list[int | None] = field(default_factory=list)
    boundary_bytes: list[int] = field(default_factory=list)
    boundary_specs: list[TensorSpec | None] = field(default_factory=list)
    flops: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class CallCost:
    """What one call saves: bytes of storages other than its input's and output's,
    whether it saves its input's / output's storage, the output's storage nbytes,
    and its forward FLOPs."""

    internal: int
    saves_input: bool
    saves_output: bool
    output_bytes: int
    flops: int


class _FlopCount(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s FLOP formulas over the ops run under it.

    ``FlopCounterMode`` itself also tracks modules with hooks that fail inside
    custom autograd Functions running under ``no_grad`` (ReversibleSequence);
    its formulas (``flop_registry``) are what is reused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


class _AttributingRecorder(SavedStorageRecorder):
    """The pack hook of :mod:`.saved`, also noting which segment saved each storage."""

    def __init__(self, excluded: set[int]) -> None:
        super().__init__(excluded)
        self.current = -1
        self.savers: dict[int, set[int]] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError, TypeError):
            key = StorageWeakRef(tensor.untyped_storage()).cdata
            self.savers.setdefault(key, set()).add(self.current)
        return super().pack(tensor)


@contextlib.contextmanager
def _fake_forward(module: nn.Module, recorder_type: type = SavedStorageRecorder) -> Iterator[Any]:
    """Inside: a FakeTensorMode, and the recorder; yields ``(call, recorder, fake_mode)``.

    ``call(*args)`` runs ``module`` with fake copies of its parameters and
    buffers swapped in (``torch.func.functional_call``: the module keeps its
    own), grad enabled, the RNG forked and real-tensor logic kept real
    (``formula.recording_saved``), as :func:`..formula.activation_memory_formula`
    runs a forward.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        state = {
            name: fake_mode.from_tensor(t, static_shapes=True)
            for name, t in [*module.named_parameters(), *module.named_buffers()]
        }
        recorder = recorder_type(storage_keys(state.values()))
        with recording_saved(recorder):
            yield (
                lambda *args: torch.func.functional_call(module, state, args),
                recorder,
                fake_mode,
            )


def _fresh(spec: TensorSpec) -> torch.Tensor:
    """A fresh tensor of ``spec`` (fake when called inside a FakeTensorMode)."""
    return torch.empty(spec.shape, dtype=spec.dtype).requires_grad_(spec.requires_grad)


def _key(value: Any) -> int | None:
    if not isinstance(value, torch.Tensor):
        return None
    keys = storage_keys([value])
    return next(iter(keys)) if keys else None


class _SegmentInterpreter(Interpreter):
    """Runs the graph noting the current segment and each boundary's storage."""

    def __init__(
        self,
        gm: GraphModule,
        recorder: _AttributingRecorder,
        segment_of: Mapping[Node, int],
        boundaries: Sequence[Node],
        counter: _FlopCount,
        result: Attribution,
    ) -> None:
        super().__init__(gm)
        self.recorder, self.segment_of, self.counter = recorder, segment_of, counter
        self.boundary_index = {node: k for k, node in enumerate(boundaries)}
        self.result = result

    def run_node(self, n: Node) -> Any:
        segment = self.segment_of.get(n, -1)
        self.recorder.current = segment
        before = self.counter.total
        value = super().run_node(n)
        if segment >= 0:
            self.result.flops[segment] += self.counter.total - before
        k = self.boundary_index.get(n)
        if k is not None:
            self.result.boundary_keys[k] = _key(value)
            self.result.boundary_specs[k] = (
                TensorSpec.of(value) if isinstance(value, torch.Tensor) else None
            )
            self.result.boundary_bytes[k] = (
                value.untyped_storage().nbytes() if isinstance(value, torch.Tensor) else 0
            )
        return value


class _Interpreting(nn.Module):
    """``gm`` run by an interpreter, as a module (so functional_call can swap its state)."""

    def __init__(self, gm: GraphModule, make: Callable[[GraphModule], Interpreter]) -> None:
        super().__init__()
        self.gm = gm
        self.make = make

    def forward(self, *args: Any) -> Any:
        return self.make(self.gm).run(*args)


def attribute(
    gm: GraphModule,
    inputs: Sequence[torch.Tensor],
    segment_of: Mapping[Node, int],
    boundaries: Sequence[Node],
    n_segments: int,
) -> Attribution:
    """One fake training forward of ``gm`` on fresh inputs shaped like ``inputs``.

    Preconditions: ``segment_of`` maps the nodes of ``gm.graph`` to segment
    indices ``0 .. n_segments - 1`` (nodes outside every segment, such as
    placeholders, map to nothing); ``boundaries`` are nodes of the graph.
    Postconditions: see :class:`Attribution`; ``gm`` and its state are unchanged.
    """
    result = Attribution(
        boundary_keys=[None] * len(boundaries),
        boundary_bytes=[0] * len(boundaries),
        boundary_specs=[None] * len(boundaries),
        flops=[0] * n_segments,
    )
    counter = _FlopCount()
    holder: dict[str, _AttributingRecorder] = {}

    def make(graph_module: GraphModule) -> Interpreter:
        return _SegmentInterpreter(
            graph_module, holder["recorder"], segment_of, boundaries, counter, result
        )

    with _fake_forward(_Interpreting(gm, make), _AttributingRecorder) as (call, recorder, _):
        holder["recorder"] = recorder
        fresh = [_fresh(TensorSpec.of(t)) for t in inputs]
        with counter:
            output = call(*fresh)
        alive = recorder.live_storages()
        result.savers = {key: (int(n), recorder.savers[key]) for key, n in alive.items()}
        del output
    return result


def measure_call(module: nn.Module, spec: TensorSpec) -> CallCost:
    """What ``module(x)`` saves for backward, for a fresh (fake) ``x`` of ``spec``,
    and its forward FLOPs; ``module`` is unchanged."""
    counter = _FlopCount()
    with _fake_forward(module) as (call, recorder, _):
        x = _fresh(spec)
        with counter:
            output = call(x)
        alive = recorder.live_storages()
        input_key, output_key = _key(x), _key(output)
        output_bytes = output.untyped_storage().nbytes()
        del output
    internal = sum(int(n) for key, n in alive.items() if key not in (input_key, output_key))
    return CallCost(
        internal=internal,
        saves_input=input_key in alive,
        saves_output=output_key in alive,
        output_bytes=int(output_bytes),
        flops=counter.total,
    )
