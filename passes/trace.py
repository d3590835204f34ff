"""Pass 1: trace an ``nn.Module`` into a module-level ``torch.fx.GraphModule``.

``nn.Identity`` is traced through (it leaves no node), so an identity shortcut
written ``self.shortcut = nn.Identity()`` reads the block input directly.

Leaf modules (kept as single ``call_module`` nodes instead of being traced
through):

- everything fx treats as a leaf by default (``torch.nn`` layers: Conv2d,
  BatchNorm2d, Linear, activations, ...);
- stochastic-depth modules (class name ``DropPath`` or ``StochasticDepth``, as
  in timm and ``torchvision.ops``), so the graph does not depend on train/eval
  mode;
- revcompile's own runtime modules (``ReversibleSequence``,
  ``AdditiveCoupling``), so converted models can be analysed again;
- timm's registered no-trace modules and functions, when timm is installed.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable

import torch
from revcompile.passes.graph_utils import graph_position
from revcompile.passes.ops import STOCHASTIC_DEPTH_CLASS_NAMES
from torch import nn
from torch.fx import GraphModule, Tracer

from revcompile.errors import ConversionError


def _timm_notrace_registry() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's registered no-trace module classes and functions; empty without timm."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        try:
            from timm.models._features_fx import get_notrace_functions, get_notrace_modules
        except ImportError:
            return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class ResidualTracer(Tracer):
    """fx tracer that keeps ``torch.nn`` layers, stochastic depth, revcompile's
    runtime modules and timm's no-trace modules as leaves."""

    def __init__(self) -> None:
        timm_modules, timm_functions = _timm_notrace_registry()
        super().__init__(autowrap_functions=timm_functions)
        self.extra_leaf_classes = timm_modules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        module_class = type(m)
        if module_class is nn.Identity:
            return False
        return (
            super().is_leaf_module(m, module_qualified_name)
            or module_class.__name__ in STOCHASTIC_DEPTH_CLASS_NAMES
            or module_class.__module__.startswith("revcompile")
            or isinstance(m, self.extra_leaf_classes)
        )


def trace(model: nn.Module, n_inputs: int | None = None) -> GraphModule:
    """Trace ``model`` into a GraphModule at module level.

    Preconditions: ``model`` is an ``nn.Module`` whose ``forward`` fx can trace
    symbolically (no data-dependent control flow outside leaf modules).

    ``forward`` parameters with a constant default (``attn_mask=None``,
    ``is_causal=False``, as in timm's ViT) beyond the first ``n_inputs`` (by
    default: the parameters without a default) are fixed to that default, so
    that branches on them are resolved while tracing; the returned
    GraphModule has no placeholder for them.

    Postconditions: the returned GraphModule computes the same function as
    ``model`` and shares its submodules, parameters and buffers (nothing is
    copied, nothing of ``model`` is modified: tracing runs no tensor code). Each
    node keeps ``meta["nn_module_stack"]``, the module call path fx recorded.

    Raises ``ConversionError`` naming the model class, the failing construct and
    the usual remedies when fx cannot trace the model.
    """
    tracer = ResidualTracer()
    model_class = type(model).__name__
    fixed = _constant_defaults(model, n_inputs)
    try:
        graph = tracer.trace(model, concrete_args=fixed or None)
    except Exception as error:
        raise ConversionError(
            f"torch.fx cannot trace {model_class}: {type(error).__name__}: {error}. "
            "Make the module containing this construct a leaf module (e.g. "
            "torch.fx.wrap a function, or keep data-dependent code inside a leaf "
            "nn.Module), or trace with concrete_args fixing the value the control "
            "flow depends on."
        ) from error
    _drop_specialized_placeholders(graph, set(fixed))
    return GraphModule(tracer.root, graph, model_class)


_CONSTANT_TYPES = (type(None), bool, int, float, str)


def _constant_defaults(model: nn.Module, n_inputs: int | None) -> dict[str, object]:
    """The ``forward`` parameters to fix: constant defaults past the inputs given."""
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


def _drop_specialized_placeholders(graph: torch.fx.Graph, names: set[str]) -> None:
    """Erase the placeholders fx made for fixed parameters, with the checks that
    guard their value; keep any whose value the computation reads."""
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"]:
        if placeholder.target.removesuffix("_1") not in names:
            continue
        guards: list[torch.fx.Node] = []
        pending = list(placeholder.users)
        while pending:
            node = pending.pop()
            if node not in guards:
                guards.append(node)
                pending.extend(node.users)
        if not any(_is_assert(node) for node in guards) or not all(
            _is_assert(node) or node.target is operator.eq for node in guards
        ):
            continue
        for node in sorted(guards, key=graph_position(graph), reverse=True):
            graph.erase_node(node)
        graph.erase_node(placeholder)


def _is_assert(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in (
        "_assert",
        "_assert_is_none",
    )
