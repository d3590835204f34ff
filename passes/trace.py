"""Pass 1: trace an ``nn.Module`` into a module-level ``torch.fx.GraphModule``.

``nn.Identity`` is traced through (it leaves no node), so an identity shortcut
written ``self.shortcut = nn.Identity()`` reads the block input directly.

Leaf modules (kept as single ``call_module`` nodes instead of being traced
through):

- everything fx treats as a leaf by default (``torch.nn`` layers: Conv2d,
  BatchNorm2d, Linear, activations, ...), subclasses of them that only
  configure them (torchvision's ``Conv3DSimple``: ``configures_torch_layer``)
  and torchvision's ``FrozenBatchNorm2d`` (so its buffers keep their
  state_dict keys);
- stochastic-depth modules (class name ``DropPath`` or ``StochasticDepth``, as
  in timm and ``torchvision.ops``), so the graph does not depend on train/eval
  mode;
- every other module whose traced code depends on its ``training`` flag
  (``F.dropout(h, p, self.training)``, ``if self.training:``): it then reads
  its flag at run time, so ``.train()``/``.eval()`` behave as in the original.
  The root module cannot be a leaf: its reads of ``self.training`` become a
  run-time read of the converted module's flag, or the model is refused;
- revcompile's own runtime modules (``ReversibleSequence``,
  ``AdditiveCoupling``), so converted models can be analysed again;
- timm's registered no-trace modules and functions, when timm is installed
  (but ``TRACED_TIMM_CLASS_NAMES``: NF-nets' block is traced through);
- every module with hooks of its own (``register_forward_hook``, feature
  extraction, debugging), so that its hooks run at run time as in the original
  (the root's hooks are refused: the converted module would not run them).

What else fx would silently change is preserved or refused (see
``passes.trace_guards``): grad-mode regions, the user's checkpoint calls,
output containers (``OrderedDict``, dataclasses), buffers (read by
``get_attr``, so in-place updates stay in the graph), augmented assignments
(``h += s`` is recorded as ``operator.iadd``, which writes ``h`` as eager
PyTorch does, not as ``h = h + s``), Python randomness and attribute writes in
``forward`` (refused).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import operator
from collections.abc import Callable
from typing import Any

import torch
from revcompile.passes.graph_utils import has_hooks
from revcompile.passes.ops import STOCHASTIC_DEPTH_CLASS_NAMES
from revcompile.passes.trace_guards import (
    USER_CHECKPOINT_FUNCTIONS,
    ModuleSnapshot,
    TraceWatch,
    current_module,
    watching,
)
from torch import nn
from torch.fx import Graph, GraphModule, Proxy, Tracer
from torch.fx._symbolic_trace import _assert_is_none

from revcompile.errors import ConversionError, PythonRandomnessError, UntraceableError

LEAF_CLASS_NAMES = frozenset({"FrozenBatchNorm2d"})
"""Modules of other libraries kept as leaves, by class name (torchvision.ops.misc)."""

_CONSTANT_TYPES = (type(None), bool, int, float, str)

_CONFIGURING_METHODS = frozenset({"__init__", "extra_repr", "reset_parameters"})
"""Methods a subclass of a torch.nn layer may override and still compute what the layer does."""


def configures_torch_layer(cls: type) -> bool:
    """Whether ``cls`` is a subclass of a torch.nn layer that only configures it.

    torchvision's ``Conv3DSimple(nn.Conv3d)`` sets the layer up in ``__init__``
    and adds helpers of its own: its forward is ``Conv3d.forward`` and computes
    what a ``Conv3d`` computes, so it is a leaf like one (and the passes' layer
    rules apply to it). A subclass that overrides anything else the layer has
    (``forward``, ``_conv_forward``, ``__getattr__``) is traced through.
    """
    layer = next(
        (c for c in cls.__mro__[1:] if c.__module__.startswith(("torch.nn.", "torch.ao.nn."))),
        None,
    )
    if (
        layer is None
        or layer is nn.Module
        or issubclass(layer, nn.Sequential | nn.ModuleList | nn.ModuleDict)
    ):
        return False
    overridden = {
        name
        for c in cls.__mro__[: cls.__mro__.index(layer)]
        for name, value in vars(c).items()
        if hasattr(layer, name) and _is_behaviour(value)
    }
    return overridden <= _CONFIGURING_METHODS


def _is_behaviour(value: object) -> bool:
    """A class attribute that is code (a method or property), not configuration data."""
    return callable(value) or isinstance(value, staticmethod | classmethod | property)


TRACED_TIMM_CLASS_NAMES = frozenset({"NormFreeBlock"})
"""timm no-trace modules traced through all the same: timm lists NF-nets' block
because fx drops its ``out.mul_(self.skipinit_gain)`` statement, which
``passes.normalize`` keeps as a side effect."""


def timm_notrace_registry() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's registered no-trace module classes and functions; empty without timm."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        try:
            from timm.models._features_fx import get_notrace_functions, get_notrace_modules
        except ImportError:
            return (), ()
    modules = [m for m in get_notrace_modules() if m.__name__ not in TRACED_TIMM_CLASS_NAMES]
    return tuple(modules), tuple(get_notrace_functions())


_AUGMENTED_ASSIGNMENTS = (
    "iadd", "iand", "ifloordiv", "ilshift", "imatmul", "imod", "imul", "ior", "ipow",
    "irshift", "isub", "itruediv", "ixor",
)  # fmt: skip


class AugmentedAssignmentProxy(Proxy):
    """A Proxy whose ``h += s`` records ``operator.iadd(h, s)``.

    A plain Proxy has no ``__iadd__``, so Python falls back to ``h = h + s``: a
    new tensor, where eager PyTorch writes ``h`` in place (other views of ``h``
    see the write, and the result keeps ``h``'s memory layout).
    """


def _augmented_assignment(name: str) -> Callable[[Proxy, Any], Proxy]:
    target = getattr(operator, name)

    def record(self: Proxy, other: Any) -> Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    return record


for _name in _AUGMENTED_ASSIGNMENTS:
    setattr(AugmentedAssignmentProxy, f"__{_name}__", _augmented_assignment(_name))


class ResidualTracer(Tracer):
    """fx tracer with revcompile's leaves (module docstring); buffers are read by
    ``get_attr`` nodes; modules, their bound methods, dict subclasses and
    dataclasses may appear as arguments (``checkpoint(self.layer, x)``, an
    ``OrderedDict`` output)."""

    def __init__(self, mode_dependent: frozenset[int] = frozenset()) -> None:
        timm_modules, timm_functions = timm_notrace_registry()
        super().__init__(autowrap_functions=(*timm_functions, *USER_CHECKPOINT_FUNCTIONS))
        self.extra_leaf_classes = timm_modules
        self.mode_dependent = mode_dependent
        # A buffer read by get_attr keeps its state_dict key, and an in-place update
        # of it (a counter, running statistics) becomes a node instead of running on
        # the original model while tracing.
        self.proxy_buffer_attributes = True

    def proxy(self, node: torch.fx.Node) -> Proxy:
        return AugmentedAssignmentProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        module_class = type(m)
        if module_class is nn.Identity:
            return False
        return (
            super().is_leaf_module(m, module_qualified_name)
            or module_class.__name__ in STOCHASTIC_DEPTH_CLASS_NAMES
            or module_class.__name__ in LEAF_CLASS_NAMES
            or configures_torch_layer(module_class)
            or module_class.__module__.startswith("revcompile")
            or isinstance(m, self.extra_leaf_classes)
            or id(m) in self.mode_dependent
            or has_hooks(m)
        )

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, nn.Module) or (inspect.ismethod(a) and isinstance(a.__self__, nn.Module)):
            module = a if isinstance(a, nn.Module) else a.__self__
            if module is self.root:
                raise ConversionError(
                    f"{type(module).__name__} passes itself (or one of its methods) to a "
                    "function it calls in forward (e.g. torch.utils.checkpoint); move that code "
                    "into a submodule and pass the submodule"
                )
            node = self.create_node("get_attr", self.path_of_module(module), (), {})
            if module is a:
                return node
            return self.create_node("call_function", getattr, (node, a.__name__), {})
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.init}
            return self.create_node("call_function", type(a), (), self.create_arg(fields))
        if isinstance(a, dict) and type(a) is not dict:
            return self.create_node(
                "call_function", type(a), (self.create_arg(list(a.items())),), {}
            )
        return super().create_arg(a)


class TracedGraphModule(GraphModule):
    """A GraphModule whose ``get_attr`` nodes may read whole submodules (the
    module a user's ``checkpoint`` call recomputes): those are kept with all
    their children when unused submodules are deleted."""

    def delete_all_unused_submodules(self) -> None:
        used: set[str] = set()
        for node in self.graph.nodes:
            if node.op not in ("call_module", "get_attr") or not isinstance(node.target, str):
                continue
            used.update(itertools.accumulate(node.target.split("."), "{}.{}".format))
            target = self.get_submodule(node.target) if node.op == "call_module" else None
            if node.op == "get_attr":
                found = self
                for part in node.target.split("."):
                    found = getattr(found, part, None)
                target = found if isinstance(found, nn.Module) else None
            if target is not None:
                used.update(f"{node.target}.{name}" for name, _ in target.named_modules() if name)
        for name, _ in list(self.named_modules()):
            if name and name not in used:
                self.delete_submodule(name)


def trace(
    model: nn.Module,
    n_inputs: int | None = None,
    make_tracer: Callable[[frozenset[int]], ResidualTracer] | None = None,
) -> GraphModule:
    """Trace ``model`` into a GraphModule at module level.

    Preconditions: ``model`` is an ``nn.Module`` whose ``forward`` fx can trace
    symbolically (no data-dependent control flow outside leaf modules).

    ``forward`` parameters beyond the first ``n_inputs`` (by default: the
    parameters without a default) keep their placeholders with their defaults
    (``gm(x, scale=2.0)`` works). Those with default None, and the others when
    tracing needs their value for control flow (``if is_causal:``), are fixed to
    their default: the placeholder stays, guarded by an assertion that fails
    when a call passes another value.

    Postconditions: the returned GraphModule computes the same function as
    ``model``, in train and in eval mode, and shares its submodules,
    parameters and buffers (nothing is copied; ``model``'s attributes, flags
    and tensors are as before). Each node keeps ``meta["nn_module_stack"]``.
    Grad-mode regions are ``torch._C._set_grad_enabled`` nodes (see
    ``passes.trace_guards``).

    ``make_tracer(mode_dependent)`` builds the tracer (default ``ResidualTracer``;
    ``passes.trace_shapes`` gives one that carries shapes).

    Raises ``UntraceableError`` naming the submodule whose forward failed (and
    the usual remedies) when fx cannot trace the model, and ``ConversionError``
    naming the construct for Python randomness and attribute writes in ``forward``.
    """
    if has_hooks(model):
        raise ConversionError(
            f"{type(model).__name__} has forward or backward hooks of its own, which the "
            "converted module would not run; remove them and register them on the module "
            "convert() returns (hooks on submodules are kept: those stay modules)"
        )
    snapshot = ModuleSnapshot.take(model)
    try:
        return _trace_mode_independent(
            model, _constant_defaults(model, n_inputs), snapshot, make_tracer or ResidualTracer
        )
    finally:
        snapshot.restore()


def trace_in_current_mode(model: nn.Module) -> GraphModule:
    """The graph of ``model`` in the mode it is in now, for analysis only (the
    report's blocks inside modules kept whole, ``passes.opaque``): reads of
    ``self.training`` are frozen at their current value. ``model`` is restored
    as ``trace`` restores it; raises ``ConversionError`` where ``trace`` would."""
    snapshot = ModuleSnapshot.take(model)
    try:
        tracer, graph, _ = _trace_fixing(model, snapshot, frozenset(), False, {})
    except _Untraceable as failure:
        raise failure.error from failure.error.__cause__
    finally:
        snapshot.restore()
    return TracedGraphModule(tracer.root, graph, type(model).__name__)


def _trace_mode_independent(
    model: nn.Module,
    defaults: dict[str, object],
    snapshot: ModuleSnapshot,
    make_tracer: Callable[[frozenset[int]], ResidualTracer],
) -> GraphModule:
    """Trace until the graph no longer depends on any module's ``training`` flag:
    each module whose flag changes the graph becomes a leaf (the root instead
    reads its flag at run time)."""
    mode_dependent: set[int] = set()
    proxy_root = False
    while True:
        try:
            tracer, graph, watch = _trace_once(
                model, defaults, snapshot, frozenset(mode_dependent), proxy_root, make_tracer
            )
        except PythonRandomnessError:
            raise
        except ConversionError as error:
            if not proxy_root:
                raise
            raise ConversionError(
                f"the forward of {type(model).__name__} branches on self.training; move the "
                "mode-dependent code into a submodule (it is then kept as a leaf module that "
                "reads its own flag)"
            ) from error
        culprits = _mode_dependent_modules(
            watch,
            graph,
            functools.partial(
                _retrace, model, defaults, snapshot, tracer.mode_dependent, proxy_root, make_tracer
            ),
        )
        if not culprits:
            return TracedGraphModule(tracer.root, graph, type(model).__name__)
        if any(m is model for m in culprits) and proxy_root:
            raise ConversionError(
                f"the forward of {type(model).__name__} still depends on self.training after "
                "reading it at run time; move the mode-dependent code into a submodule"
            )
        proxy_root = proxy_root or any(m is model for m in culprits)
        mode_dependent.update(id(m) for m in culprits if m is not model)


def _retrace(*args: Any) -> Graph:
    return _trace_once(*args)[1]


def _mode_dependent_modules(
    watch: TraceWatch, graph: Graph, retrace: Callable[[], Graph]
) -> list[nn.Module]:
    """The modules read by the trace whose ``training`` flag changes the graph.

    Flipping every flag read first (one more trace) settles the usual case,
    where none matters; otherwise each is flipped alone. ``retrace`` traces
    the model as it is and restores every flag afterwards (``ModuleSnapshot``).
    """
    read = list(watch.training_reads.values())
    code = graph.python_code("self").src

    def changes_graph(modules: list[nn.Module]) -> bool:
        for m in modules:
            m.training = not m.training
        try:
            return retrace().python_code("self").src != code
        except PythonRandomnessError:
            raise
        except ConversionError:
            return True

    if not read or not changes_graph(read):
        return []
    return [m for m in read if changes_graph([m])] or read


class _Untraceable(Exception):
    """fx failed; ``error`` is the ConversionError to raise if no retry helps."""

    def __init__(self, error: ConversionError) -> None:
        super().__init__(str(error))
        self.error = error


def _trace_once(
    model: nn.Module,
    defaults: dict[str, object],
    snapshot: ModuleSnapshot,
    mode_dependent: frozenset[int],
    proxy_root: bool,
    make_tracer: Callable[[frozenset[int]], ResidualTracer] = ResidualTracer,
) -> tuple[ResidualTracer, Graph, TraceWatch]:
    """One traced graph: the None defaults fixed; if control flow needs more,
    every default fixed, then each non-None one freed again where tracing
    still succeeds without it (``scale`` stays a parameter next to a fixed
    ``is_causal``)."""
    trace_with = functools.partial(
        _trace_fixing, model, snapshot, mode_dependent, proxy_root, make_tracer=make_tracer
    )
    fixed = {k: v for k, v in defaults.items() if v is None}
    try:
        return trace_with(fixed)
    except _Untraceable as failure:
        if fixed == defaults:
            raise failure.error from failure.error.__cause__
    fixed = dict(defaults)
    try:
        result = trace_with(fixed)
    except _Untraceable as failure:
        raise failure.error from failure.error.__cause__
    for name in [k for k, v in defaults.items() if v is not None]:
        freed = {k: v for k, v in fixed.items() if k != name}
        try:
            result = trace_with(freed)
        except _Untraceable:
            continue
        fixed = freed
    return result


def _trace_fixing(
    model: nn.Module,
    snapshot: ModuleSnapshot,
    mode_dependent: frozenset[int],
    proxy_root: bool,
    fixed: dict[str, object],
    make_tracer: Callable[[frozenset[int]], ResidualTracer] = ResidualTracer,
) -> tuple[ResidualTracer, Graph, TraceWatch]:
    """Trace with ``fixed`` as concrete_args; refuses randomness and attribute
    writes (ConversionError); raises ``_Untraceable`` when fx fails; restores
    ``model``."""
    tracer = make_tracer(mode_dependent)
    watch = TraceWatch(tracer, model, proxy_root_training=proxy_root)
    try:
        with watching(watch):
            graph = tracer.trace(model, concrete_args=fixed or None)
        _refuse_hidden_state(model, watch, snapshot)
    except ConversionError:
        raise
    except Exception as error:
        _refuse_hidden_state(model, watch, snapshot)
        conversion_error = _trace_error(model, tracer, error)
        conversion_error.__cause__ = error
        raise _Untraceable(conversion_error) from error
    finally:
        snapshot.restore()
    _guard_fixed_parameters(graph, set(fixed))
    for node in list(graph.nodes):
        # fx's code for a wrapped function registers torch.fx.wrap of its dotted
        # name when executed, which breaks every later trace in the process.
        if node.target in USER_CHECKPOINT_FUNCTIONS:
            node.meta.pop("is_wrapped", None)
        # grad-mode contexts read the mode more often than they restore it
        if node.target is torch.is_grad_enabled and not node.users:
            graph.erase_node(node)
    return tracer, graph, watch


def _refuse_hidden_state(model: nn.Module, watch: TraceWatch, snapshot: ModuleSnapshot) -> None:
    """ConversionError for what fx would freeze or lose: Python randomness,
    attribute writes and in-place updates of tensors that are not buffers."""
    model_class = type(model).__name__
    if watch.randomness is not None:
        raise PythonRandomnessError(
            f"{model_class} uses Python-level randomness in traced code: {watch.randomness}. "
            "torch.fx would freeze it into a constant and recomputation could not replay it; "
            "use torch RNG (torch.rand, torch.bernoulli, F.dropout) instead"
        )
    written = snapshot.changes()
    if written:
        raise ConversionError(
            f"the forward of {model_class} writes Python state that a traced graph cannot "
            f"keep: {', '.join(written)}. Return the value instead, keep counters in buffers "
            "updated in place, or make that module a leaf"
        )


def _trace_error(model: nn.Module, tracer: Tracer, error: Exception) -> ConversionError:
    where = current_module(tracer)
    message = str(error).split("\n")[0]
    return UntraceableError(
        f"torch.fx cannot trace {type(model).__name__}: the forward of {where} failed with "
        f"{type(error).__name__}: {message}. Make that module a leaf module (keep "
        "data-dependent code inside a leaf nn.Module, or torch.fx.wrap a function), or trace "
        "with concrete_args fixing the value the control flow depends on."
    )


def _constant_defaults(model: nn.Module, n_inputs: int | None) -> dict[str, object]:
    """The ``forward`` parameters past the inputs given that have a constant default."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return {}
    if n_inputs is None:
        n_inputs = sum(p.default is p.empty for p in parameters)
    return {
        p.name: p.default
        for p in parameters[n_inputs:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
        and isinstance(p.default, _CONSTANT_TYPES)
    }


def _guard_fixed_parameters(graph: Graph, names: set[str]) -> None:
    """Keep the guards of fixed parameters through dead-code elimination.

    fx names a fixed parameter's placeholder ``mask_1``: the generated
    ``forward`` gets the user's parameter name back, so keyword calls reach the
    guard. fx guards a fixed None with ``_assert_is_none``, which dead-code
    elimination deletes; it becomes ``torch._assert(mask is None, ...)``.
    """
    for node in graph.nodes:
        if node.op == "placeholder" and node.target.removesuffix("_1") in names:
            node.target = node.target.removesuffix("_1")
        elif node.op == "call_function" and node.target is _assert_is_none:
            value, message = node.args
            with graph.inserting_before(node):
                is_none = graph.call_function(operator.is_, (value, None))
                node.target, node.args = torch._assert, (is_none, message)
