"""What a module call saw in forward, recorded once and replayed in recomputation.

A recomputation (the reversible backward, a checkpointed segment) must run each
call of a module exactly as the forward ran it, and change nothing the forward
already changed:

* the same parameter and buffer tensors (those the forward used, even if
  ``torch.func.functional_call`` or FSDP swapped others in since):
  :class:`UsedTensors`, taken when the forward starts;
* the module state as it was *before* the call: buffers and plain Python scalar
  attributes the call changed (spectral norm's power-iteration vectors, a
  ``self.calls += 1`` counter), detected by comparing before and after like the
  RNG states, so only state a call really changes is kept: :class:`CallRecorder`;
* the same random numbers: the CPU (and CUDA) RNG state before the call, kept
  only if the call consumed randomness;
* the forward's train/eval flags, and no second update: BatchNorm layers that
  track running statistics in training normalise with batch statistics, so
  their output does not depend on the running statistics; their recomputation
  updates scratch copies instead (nothing needs to be saved for them, and the
  recomputation saves the same tensors as the forward, as checkpoint checks).

:class:`Replay` puts that state in place around one recomputed call and takes
it out again, leaving the module as the forward left it. Calls are replayed in
reverse order; a buffer that a later call changed is *rewound* to the value it
had before that call, so every earlier call sees its own state too.

Limits: a change made through ``tensor.data`` to a buffer of a FakeTensor is
not seen (FakeTensor values cannot be compared); state shared with a module
outside the recorded tree and changed there later is not rewound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm

__all__ = ["CallRecord", "CallRecorder", "Replay", "UsedTensors"]

# Plain Python attributes a module may update in forward (counters, flags).
_SCALARS = (bool, int, float)
_STANDARD_BN_FORWARDS = (_BatchNorm.forward, SyncBatchNorm.forward)


def _tracks_batch_stats(module: nn.Module) -> bool:
    """A stock BatchNorm in training that updates running statistics.

    Its output depends only on the batch, not on the values of its buffers.
    """
    return (
        type(module).forward in _STANDARD_BN_FORWARDS
        and module.training
        and module.track_running_stats
    )


def unique_modules(root: nn.Module) -> list[nn.Module]:
    """Every module of ``root``'s tree once (``modules()`` deduplicates shared ones)."""
    return list(root.modules())


@dataclass(frozen=True)
class Slot:
    """One parameter or buffer entry of a module: ``getattr(module, kind)[name]``."""

    module: nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    index: int  # into UsedTensors.tensors


class UsedTensors:
    """The parameter and buffer tensors a module tree uses, slot by slot.

    Postconditions: ``tensors`` holds each distinct tensor once (weight tying
    maps several slots to one index); ``trainable`` lists the indices of
    parameters that require grad; buffers of BatchNorm layers that track batch
    statistics are left out (their recomputation does not depend on them).
    """

    def __init__(self, root: nn.Module) -> None:
        self.tensors: list[Tensor] = []
        self.slots: dict[int, list[Slot]] = {}
        self.training: dict[int, bool] = {}
        self.batch_stats: set[int] = set()
        self.trainable: list[int] = []
        index: dict[int, int] = {}
        for module in unique_modules(root):
            key = id(module)
            self.training[key] = module.training
            batch_stats = _tracks_batch_stats(module)
            if batch_stats:
                self.batch_stats.add(key)
            slots = []
            for kind in ("_parameters", "_buffers"):
                if kind == "_buffers" and batch_stats:
                    continue
                for name, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    if id(tensor) not in index:
                        index[id(tensor)] = len(self.tensors)
                        self.tensors.append(tensor)
                        if kind == "_parameters" and tensor.requires_grad:
                            self.trainable.append(index[id(tensor)])
                    slots.append(Slot(module, kind, name, index[id(tensor)]))
            self.slots[key] = slots

    def to_save(self, rewound: set[tuple[int, str]]) -> list[Tensor | None]:
        """``tensors`` with None for buffers some call changed (replay rewinds those).

        Saving a changed buffer would only make a later in-place update of it
        (the next forward) fail the backward's version check for nothing.
        """
        changed = {
            slot.index
            for slots in self.slots.values()
            for slot in slots
            if (id(slot.module), slot.name) in rewound and slot.kind == "_buffers"
        }
        return [None if i in changed else t for i, t in enumerate(self.tensors)]


@dataclass
class CallRecord:
    """What replaying one call needs besides the UsedTensors.

    ``rng_index``: position in the recorder's ``saved`` of the RNG states taken
    before the call, or None if the call consumed no randomness. ``buffers``:
    (module, buffer name, position in ``saved`` of its value before the call)
    for each buffer the call changed. ``attrs``: (module, attribute, value
    before the call) for each scalar attribute the call changed.
    """

    rng_index: int | None = None
    buffers: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    attrs: list[tuple[nn.Module, str, Any]] = field(default_factory=list)


@dataclass
class _Before:
    rng: list[Tensor]
    buffers: list[tuple[nn.Module, str, Tensor, int, Tensor]]
    attrs: dict[tuple[int, str], tuple[nn.Module, Any]]


def _buffer_changed(module: nn.Module, name: str, old: Tensor, version: int, copy: Tensor) -> bool:
    now = module._buffers.get(name)
    if now is not old or old._version != version:
        return True
    # Kernels such as batch_norm update their buffers without bumping the
    # version counter, so values are compared too (FakeTensors cannot be).
    return not is_fake(old) and not torch.equal(old, copy)


class CallRecorder:
    """Runs calls in forward and records, per call, what its replay needs.

    ``saved`` collects the tensors to hand to ``ctx.save_for_backward`` (RNG
    states, pre-call buffer values); ``records`` one CallRecord per call.
    """

    def __init__(self, device: torch.device, rng: bool = True) -> None:
        self.cuda_device = device if device.type == "cuda" else None
        self.track_rng = rng
        self.saved: list[Tensor] = []
        self.records: list[CallRecord] = []

    def _rng_state(self) -> list[Tensor]:
        if not self.track_rng:
            return []
        states = [torch.get_rng_state()]
        if self.cuda_device is not None:
            states.append(torch.cuda.get_rng_state(self.cuda_device))
        return states

    def before(self, fn: nn.Module) -> _Before:
        buffers = []
        attrs: dict[tuple[int, str], tuple[nn.Module, Any]] = {}
        with torch.no_grad():
            for module in unique_modules(fn):
                for attr, value in vars(module).items():
                    if type(value) in _SCALARS:
                        attrs[(id(module), attr)] = (module, value)
                if _tracks_batch_stats(module):
                    continue
                for name, buf in module._buffers.items():
                    if buf is not None:
                        buffers.append((module, name, buf, buf._version, buf.clone()))
        return _Before(self._rng_state(), buffers, attrs)

    def after(self, before: _Before) -> CallRecord:
        """The record of the call that ran since ``before``; appended to ``records``."""
        record = CallRecord()
        rng_after = self._rng_state()
        if not all(torch.equal(a, b) for a, b in zip(before.rng, rng_after)):
            record.rng_index = len(self.saved)
            self.saved.extend(before.rng)
        for module, name, old, version, copy in before.buffers:
            if _buffer_changed(module, name, old, version, copy):
                record.buffers.append((module, name, len(self.saved)))
                self.saved.append(copy)
        for (_, attr), (module, value) in before.attrs.items():
            if vars(module).get(attr, value) != value:
                record.attrs.append((module, attr, value))
        self.records.append(record)
        return record

    def call(self, fn: nn.Module, _which: str, x: Tensor) -> Tensor:
        """``fn(x)``, recorded (a coupling's branch call hook)."""
        before = self.before(fn)
        out = fn(x)
        self.after(before)
        return out

    def rewound(self) -> set[tuple[int, str]]:
        """(id(module), buffer name) of every buffer some call changed."""
        return {(id(m), name) for r in self.records for m, name, _ in r.buffers}


class Replay:
    """Recomputes recorded calls with the state each one saw in forward.

    ``tensors`` are the UsedTensors' tensors (None for rewound buffers) and
    ``saved`` the recorder's, both as unpacked in backward. With
    ``leaves=True`` the parameters are put in as fresh leaves (``leaf(i)``),
    so that the gradient of a recomputation can be taken with respect to them
    without touching the tensors the forward used. Create one Replay per
    backward pass: rewinding consumes the calls in reverse order.
    """

    def __init__(
        self,
        used: UsedTensors,
        tensors: Sequence[Tensor | None],
        saved: Sequence[Tensor],
        cuda_device: torch.device | None,
        *,
        leaves: bool,
        autocast: tuple[str, bool, torch.dtype] | None = None,
    ) -> None:
        self.used = used
        self.values: list[Tensor | None] = list(tensors)
        if leaves:
            trainable = set(used.trainable)
            self.values = [
                None if t is None else t.detach().requires_grad_(i in trainable)
                for i, t in enumerate(tensors)
            ]
        self.saved = saved
        self.cuda_device = cuda_device
        self.autocast = autocast
        # id(module) -> {(kind, name): value before the earliest replayed call that changed it}
        self.rewound: dict[int, dict[tuple[str, str], Any]] = {}

    def leaf(self, index: int) -> Tensor | None:
        return self.values[index]

    def trainable_of(self, fn: nn.Module) -> list[int]:
        """Indices of the trainable tensors ``fn``'s modules use, each once."""
        trainable = set(self.used.trainable)
        seen: dict[int, None] = {}
        for module in unique_modules(fn):
            for slot in self.used.slots.get(id(module), ()):
                if slot.index in trainable:
                    seen.setdefault(slot.index)
        return list(seen)

    def _rewind(self, record: CallRecord) -> None:
        for module, name, index in record.buffers:
            self.rewound.setdefault(id(module), {})[("_buffers", name)] = self.saved[index]
        for module, attr, value in record.attrs:
            self.rewound.setdefault(id(module), {})[("attr", attr)] = value

    @contextlib.contextmanager
    def recompute(self, fn: nn.Module, record: CallRecord) -> Iterator[None]:
        """The state ``fn`` saw when ``record`` was taken, for the duration of the block."""
        self._rewind(record)
        undo: list[Callable[[], None]] = []
        try:
            for module in unique_modules(fn):
                self._install(module, undo)
            with self._rng(record), self._autocast():
                yield
        finally:
            for restore in reversed(undo):
                restore()

    def _install(self, module: nn.Module, undo: list[Callable[[], None]]) -> None:
        key = id(module)
        if key not in self.used.training:
            return  # a module the forward did not see: nothing recorded for it
        rewound = self.rewound.get(key, {})
        for slot in self.used.slots[key]:
            store = getattr(module, slot.kind)
            value = rewound.get((slot.kind, slot.name))
            # A clone: the recomputation may update it in place (power iteration),
            # and the rewound value must stay as it was for earlier calls.
            value = self.values[slot.index] if value is None else value.clone()
            undo.append(_setter(store, slot.name, store.get(slot.name)))
            store[slot.name] = value
        for (kind, name), value in rewound.items():
            if kind == "attr":
                undo.append(_attr_setter(module, name, vars(module).get(name)))
                setattr(module, name, value)
        if key in self.used.batch_stats:
            for name, buf in module._buffers.items():
                if buf is not None:
                    undo.append(_setter(module._buffers, name, buf))
                    module._buffers[name] = buf.clone()
        undo.append(_attr_setter(module, "training", module.training))
        module.training = self.used.training[key]

    def _rng(self, record: CallRecord) -> contextlib.AbstractContextManager:
        if record.rng_index is None:
            return contextlib.nullcontext()
        return _replayed_rng(self.saved, record.rng_index, self.cuda_device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        device_type, enabled, dtype = self.autocast
        return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _setter(store: dict, name: str, value: Any) -> Callable[[], None]:
    def restore() -> None:
        store[name] = value

    return restore


def _attr_setter(module: nn.Module, name: str, value: Any) -> Callable[[], None]:
    def restore() -> None:
        setattr(module, name, value)

    return restore


@contextlib.contextmanager
def _replayed_rng(
    saved: Sequence[Tensor], index: int, cuda_device: torch.device | None
) -> Iterator[None]:
    """The RNG as it was before the recorded call, on a fork of the global generators."""
    devices = [cuda_device] if cuda_device is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(saved[index])
        if cuda_device is not None:
            torch.cuda.set_rng_state(saved[index + 1], cuda_device)
        yield


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The autocast state of ``device_type`` now, to re-enter in recomputation."""
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )
