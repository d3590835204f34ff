"""Saved activation bytes: the storages autograd keeps for backward after one forward.

The pack-hook recorder here is shared by the real measurement
(:func:`saved_activation_bytes`) and the symbolic one
(:func:`revcompile.memory.formula.activation_memory_formula`), so both count
exactly the same storages.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes


class SavedStorageRecorder:
    """``saved_tensors_hooks`` pack hook that records distinct saved storages.

    Each saved tensor's untyped storage is recorded once, keyed by the address
    of its ``StorageImpl`` (``StorageWeakRef.cdata``). Holding the weak
    reference keeps that address from being reused by a later storage (the
    intrusive weak count keeps the ``StorageImpl`` object allocated), so two
    different storages never collide even if the first one is freed during the
    forward. :meth:`live_nbytes` counts only storages that are still alive, i.e.
    that autograd really keeps for backward at the end of the forward (a storage
    saved by a part of the graph that was discarded during the forward is not
    counted). Views count their whole storage, once.

    The hook returns ``tensor.detach()`` (an alias of the same storage) so that
    saving an op's own output does not create a reference cycle through its
    ``grad_fn``; memory held is the same as without the hook.
    """

    def __init__(self, excluded: set[int]) -> None:
        self._excluded = excluded
        self._storages: dict[int, tuple[StorageWeakRef, Any]] = {}
        # Tensors without an accessible storage (exotic subclasses): weakref + nbytes.
        self._other: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            key = id(tensor)
            if key not in self._other:
                self._other[key] = (weakref.ref(tensor), tensor.numel() * tensor.element_size())
            return tensor
        ref = StorageWeakRef(storage)
        if ref.cdata not in self._excluded and ref.cdata not in self._storages:
            self._storages[ref.cdata] = (ref, storage.nbytes())
        # Outside any dispatch mode: under FakeTensorMode a real tensor (an RNG
        # state saved by a custom Function) would otherwise be detached into a
        # fake copy and its real storage would die.
        with _disable_current_modes():
            return tensor.detach()

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def live_nbytes(self) -> list[Any]:
        """nbytes (int or SymInt) of every recorded storage still alive."""
        sizes = [n for ref, n in self._storages.values() if not ref.expired()]
        sizes += [n for ref, n in self._other.values() if ref() is not None]
        return sizes

    def live_storages(self) -> dict[int, Any]:
        """nbytes (int or SymInt) of every recorded storage still alive, by storage key;
        tensors without an accessible storage are not included."""
        return {key: n for key, (ref, n) in self._storages.items() if not ref.expired()}

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield


def storage_keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    """``StorageWeakRef.cdata`` of every tensor's storage (those without one are skipped).

    Precondition: the tensors stay alive while the keys are used (the weak
    references are dropped at once; live tensors keep the addresses valid).
    """
    keys: set[int] = set()
    for t in tensors:
        with contextlib.suppress(RuntimeError, NotImplementedError, TypeError):
            keys.add(StorageWeakRef(t.untyped_storage()).cdata)
    return keys


@contextlib.contextmanager
def _restore_module_state(model: nn.Module, inputs: Sequence[Any]) -> Iterator[None]:
    """Snapshot buffers (BatchNorm statistics, counters) and the RNG; restore on exit.

    Buffers are restored in place (same tensor objects, values copied back) and
    re-registered if the forward replaced them. The CPU RNG and the RNG of every
    CUDA device holding a parameter, buffer or input are forked, so dropout in
    the measured forward does not advance the global generators. Python-level
    state a module mutates in ``forward`` (counters kept as plain attributes)
    cannot be restored.
    """
    snapshot: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                snapshot.append((module, name, buf, buf.detach().clone()))
    devices = {
        t.device.index or 0
        for t in [*model.parameters(), *model.buffers(), *pytree.tree_leaves(list(inputs))]
        if isinstance(t, torch.Tensor) and t.device.type == "cuda"
    }
    try:
        with torch.random.fork_rng(devices=sorted(devices)):
            yield
    finally:
        with torch.no_grad():
            for module, name, buf, saved in snapshot:
                module._buffers[name] = buf
                buf.copy_(saved)


def saved_activation_bytes(model: nn.Module, *inputs: Any) -> int:
    """Bytes of the distinct storages autograd saves during one training forward.

    Runs ``model(*inputs)`` once with grad enabled, in the model's current mode
    (call ``model.train()`` first for training numbers), under a
    ``torch.autograd.graph.saved_tensors_hooks`` pack hook, and sums the
    ``nbytes`` of the distinct untyped storages of the saved tensors that are
    still alive when the forward returns (the forward output is kept alive for
    the count, then dropped).

    * Deduplicated by storage: a tensor saved by several ops, or several views of
      one storage, count once, with the storage's full size.
    * Storages of the model's parameters and buffers are excluded (they exist
      whether or not anything is saved); input tensors that autograd saves (the
      first convolution saves the network input) are included.
    * Tensors saved through ``ctx.save_for_backward`` of custom autograd
      Functions are seen, and so are the inputs that non-reentrant
      ``torch.utils.checkpoint`` keeps (they are saved as ``SavedVariable`` in
      the outer hook context); what checkpoint saves inside its region goes to
      checkpoint's own hooks, is recomputed in backward, and is not counted.
      Tensors stashed as plain attributes on ``ctx`` are invisible (as they are
      to autograd's own accounting).

    Side effects: none on the model -- buffers (BatchNorm running statistics,
    ``num_batches_tracked``) are snapshot and restored, and the RNG is forked, so
    measuring does not change what the next real step computes.

    Args:
        model: the network; left in its mode and state.
        *inputs: positional inputs of ``model``.

    Returns:
        The number of bytes.
    """
    recorder = SavedStorageRecorder(storage_keys([*model.parameters(), *model.buffers()]))
    with _restore_module_state(model, inputs), torch.enable_grad():
        with recorder.hooks():
            output = model(*inputs)
        total = sum(int(n) for n in recorder.live_nbytes())
        del output
    return total
