"""What fx does not see while tracing, made visible (DESIGN.md §9).

Symbolic tracing runs the model's Python code once, with Proxies for tensors.
Everything that is not a tensor operation is decided then and frozen, or runs
for real on the original model. ``TraceWatch`` is active during one
``Tracer.trace`` call and:

- notes Python-level randomness (``random``, ``numpy.random``), which fx would
  freeze into a constant (a ``sys.setprofile`` hook, so every spelling of the
  call is seen: ``random.random()``, ``from random import uniform``, ...);
- notes which modules' ``training`` flag the traced code reads (so that
  ``passes.trace`` can tell whether the graph depends on train/eval mode), or
  turns the root module's reads into a graph read of the flag at run time;
- records grad-mode changes (``torch.no_grad()``, ``torch.enable_grad()``,
  ``torch.set_grad_enabled``, ``torch.inference_mode()``) as
  ``torch._C._set_grad_enabled`` nodes: entering a region is
  ``torch._C._set_grad_enabled(False)`` (or True), leaving it restores the mode
  read at run time on entry, ``torch._C._set_grad_enabled(<torch.is_grad_enabled node>)``;
- keeps the user's ``torch.utils.checkpoint.checkpoint`` / ``checkpoint_sequential``
  calls as single ``call_function`` nodes (the module or bound method they
  recompute is read by a ``get_attr`` node).

``ModuleSnapshot`` records the model's Python state before tracing so that
attribute writes in ``forward`` (which fx cannot keep) are detected and undone.
"""

from __future__ import annotations

import copy
import functools
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.fx import Tracer
from torch.fx._symbolic_trace import _create_wrapped_func

try:
    import numpy

    _RANDOM_OWNERS: tuple[type, ...] = (
        random.Random,
        numpy.random.RandomState,
        numpy.random.Generator,
    )
except ImportError:  # numpy is optional
    _RANDOM_OWNERS = (random.Random,)

_RANDOM_MODULES = ("random", "numpy.random")
USER_CHECKPOINT_FUNCTIONS = (torch_checkpoint.checkpoint, torch_checkpoint.checkpoint_sequential)
_REAL_SET_GRAD_ENABLED = torch._C._set_grad_enabled
_REAL_IS_GRAD_ENABLED = torch.is_grad_enabled
_REAL_INFERENCE_MODE = torch._C._InferenceMode


def current_module(tracer: Tracer) -> str:
    """``layer1.0 (BasicBlock)``: the innermost module whose forward is being traced.

    fx pushes a module on ``tracer.module_stack`` before tracing its forward and
    pops it only when the forward returns, so after an exception the stack
    still ends at the module that raised.
    """
    if not getattr(tracer, "module_stack", None):
        return f"the root module ({type(tracer.root).__name__})"
    path, module_type = next(reversed(tracer.module_stack.values()))
    return f"{path or 'the root module'} ({getattr(module_type, '__name__', module_type)})"


@dataclass
class TraceWatch:
    """State observed during one ``tracer.trace`` call; see the module docstring.

    ``proxy_root_training``: reads of the root module's ``training`` become a
    ``get_attr`` node of ``training`` (read at run time) instead of a constant.
    """

    tracer: Tracer
    root: nn.Module
    proxy_root_training: bool = False
    training_reads: dict[int, nn.Module] = field(default_factory=dict)
    randomness: str | None = None

    def on_training_read(self, module: nn.Module) -> Any:
        if module is self.root and self.proxy_root_training:
            return self.tracer.create_proxy("get_attr", "training", (), {})
        self.training_reads[id(module)] = module
        return object.__getattribute__(module, "training")

    def on_profile_event(self, frame: Any, event: str, arg: Any) -> None:
        if self.randomness is not None:
            return
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), _RANDOM_OWNERS):
            caller, name = frame, f"{type(arg.__self__).__module__}.{arg.__name__}"
        elif event == "call" and _is_random_module(frame):
            caller, name = frame.f_back, f"{frame.f_globals['__name__']}.{frame.f_code.co_name}"
        else:
            return
        self.note_randomness(name, caller)

    def note_randomness(self, name: str, caller: Any) -> None:
        """Record the first draw, made by ``name`` called from frame ``caller``."""
        if self.randomness is not None or caller is None or _is_random_module(caller):
            return  # a call inside the random library itself, seen at its entry
        self.randomness = (
            f"{name}() at {caller.f_code.co_filename}:{caller.f_lineno} "
            f"in {current_module(self.tracer)}"
        )

    def set_grad_enabled(self, mode: Any) -> None:
        self.tracer.create_proxy("call_function", _REAL_SET_GRAD_ENABLED, (mode,), {})

    def is_grad_enabled(self) -> Any:
        if sys._getframe(1).f_globals.get("__name__") != "torch.autograd.grad_mode":
            return _REAL_IS_GRAD_ENABLED()  # user code reading the mode: frozen, as in fx
        return self.tracer.create_proxy("call_function", _REAL_IS_GRAD_ENABLED, (), {})


def _numpy_random_patches(watch: TraceWatch) -> list[tuple[Any, str, Any]]:
    """numpy's random functions are Cython methods that no profile event sees:
    each public one is replaced by a wrapper that notes the draw."""
    if "numpy" not in sys.modules:
        return []
    module = sys.modules["numpy"].random

    def noting(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def draw(*args: Any, **kwargs: Any) -> Any:
            watch.note_randomness(f"numpy.random.{name}", sys._getframe(1))
            return fn(*args, **kwargs)

        return draw

    return [
        (module, name, noting(name, getattr(module, name)))
        for name in getattr(module, "__all__", ())
        if callable(getattr(module, name, None)) and not isinstance(getattr(module, name), type)
    ]


def _is_random_module(frame: Any) -> bool:
    name = frame.f_globals.get("__name__", "")
    return any(name == m or name.startswith(m + ".") for m in _RANDOM_MODULES)


_ACTIVE: list[TraceWatch] = []


def _watching_getattribute(module: nn.Module, name: str) -> Any:
    if name == "training" and _ACTIVE:
        return _ACTIVE[-1].on_training_read(module)
    return object.__getattribute__(module, name)


class _RecordedInferenceMode:
    """Stands in for ``torch._C._InferenceMode`` while tracing: a grad-mode region."""

    def __init__(self, mode: bool) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        if self.mode:
            watch = _ACTIVE[-1]
            self.previous = watch.tracer.create_proxy(
                "call_function", _REAL_IS_GRAD_ENABLED, (), {}
            )
            watch.set_grad_enabled(False)

    def __exit__(self, *exc_info: object) -> None:
        if self.mode:
            _ACTIVE[-1].set_grad_enabled(self.previous)


@contextmanager
def watching(watch: TraceWatch) -> Iterator[TraceWatch]:
    """Install ``watch``'s hooks for the duration of the block (one trace)."""
    patches = [
        (nn.Module, "__getattribute__", _watching_getattribute),
        (torch._C, "_set_grad_enabled", watch.set_grad_enabled),
        (torch, "is_grad_enabled", watch.is_grad_enabled),
        (torch._C, "_InferenceMode", _RecordedInferenceMode),
        *(
            (torch_checkpoint, fn.__name__, _create_wrapped_func(fn))
            for fn in USER_CHECKPOINT_FUNCTIONS
        ),
        *_numpy_random_patches(watch),
    ]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    previous_profile = sys.getprofile()
    _ACTIVE.append(watch)
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        sys.setprofile(watch.on_profile_event)
        yield watch
    finally:
        if previous_profile is None or callable(previous_profile):
            sys.setprofile(previous_profile)
        else:  # a C profiler (cProfile) is not a profile function: re-enable it
            sys.setprofile(None)
            previous_profile.enable()
        _ACTIVE.pop()
        for owner, name, value in saved:
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


@dataclass
class ModuleSnapshot:
    """The Python state of every module of a model: attributes, the parameter,
    buffer and submodule tables, the contents of plain list and dict attributes
    (a cache that a forward fills, such as timm LeViT's ``attention_bias_cache``,
    would otherwise keep fx Proxies), and each tensor's version counter."""

    entries: list[tuple[str, nn.Module, dict, dict, dict, dict]]
    versions: dict[int, tuple[str, torch.Tensor, int]]
    containers: list[tuple[list | dict, list | dict]]

    @classmethod
    def take(cls, model: nn.Module) -> ModuleSnapshot:
        entries = [
            (name, m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
            for name, m in model.named_modules(remove_duplicate=False)
        ]
        versions = {
            id(t): (name, t, t._version)
            for name, t in (*model.named_parameters(), *model.named_buffers())
        }
        containers = [
            (value, copy.copy(value))
            for _, m in model.named_modules()
            for value in m.__dict__.values()
            if type(value) in (list, dict)
        ]
        return cls(entries, versions, containers)

    def changes(self) -> list[str]:
        """``layer1.0.last (Block)`` for each attribute the traced code wrote or deleted."""
        found = []
        for name, module, attributes, *tables in self.entries:
            now = (module.__dict__, module._parameters, module._buffers, module._modules)
            for before, after in zip((attributes, *tables), now):
                for key in set(before) | set(after):
                    if key == "training" or before.get(key, _MISSING) is after.get(key, _MISSING):
                        continue
                    found.append(f"{name + '.' if name else ''}{key} ({type(module).__name__})")
        found += [
            f"{name} (modified in place)"
            for name, tensor, version in self.versions.values()
            if tensor._version != version
        ]
        return sorted(set(found))

    def restore(self) -> None:
        """Put back every attribute, table entry and container's contents (not
        tensor values)."""
        for container, contents in self.containers:
            if _changed(container, contents):
                container.clear()
                (container.extend if isinstance(container, list) else container.update)(contents)
        for _, module, attributes, *tables in self.entries:
            now = (module.__dict__, module._parameters, module._buffers, module._modules)
            for before, after in zip((attributes, *tables), now):
                if set(before) != set(after) or any(before[k] is not after[k] for k in before):
                    after.clear()
                    after.update(before)


_MISSING = object()


def _changed(now: list | dict, before: list | dict) -> bool:
    """Whether a container's entries differ (by identity: entries may be tensors)."""
    if isinstance(now, list):
        return len(now) != len(before) or any(a is not b for a, b in zip(now, before))
    return now.keys() != before.keys() or any(now[k] is not before[k] for k in before)
