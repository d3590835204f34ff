"""Flatten a converted model into a plain ``torch.fx.GraphModule``.

``inline(gm)`` replaces every ``ReversibleSequence`` and ``CheckpointedSegment``
call by the ordinary nodes of the function it computes (the plain forward:
split, couplings ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, merge; a segment's
body), and inlines the GraphModules that revcompile made for their branches
and bodies. The result references no revcompile class or function: it can be
pickled, exported or loaded where revcompile is not installed. It computes
exactly what ``gm`` computes under ``reference_mode()``, in eval and training
mode; what it loses is the memory saving (autograd stores every activation)
and the checks of the runtime (odd channel counts, shape-changing branches),
and under autocast a stage's trunk stays in the autocast dtype instead of
float32.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import fx, nn

from revcompile.runtime import AdditiveCoupling, CheckpointedSegment, ReversibleSequence

__all__ = ["inline"]


def inline(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule computing ``gm``'s function with no revcompile module in it.

    Pre: ``gm`` is a GraphModule (e.g. from ``revcompile.convert``). Post: the
    result has the same inputs, outputs and training flag; its graph calls the
    leaf modules of ``gm`` at their qualified names in ``gm`` (so parameter and
    buffer names are ``gm``'s, e.g. ``layer1_rev.couplings.0.F.layer1.0.conv1.weight``),
    on private copies of them: training one does not change the other. Every
    GraphModule reached is inlined; any other module is called as it is.
    """
    root = copy.deepcopy(gm)
    graph = fx.Graph()
    graph.output(_inline_graph(graph, root, "", None, {}))
    flat = fx.GraphModule(root, graph, class_name="InlinedGraphModule")
    flat.graph.lint()
    flat.train(gm.training)
    return flat


def _emit(
    graph: fx.Graph, module: nn.Module, path: str, args: tuple, kwargs: dict[str, Any]
) -> Any:
    """Append to ``graph`` the nodes of ``module(*args, **kwargs)``; return the result's value.

    ``module`` lives at qualified name ``path`` in the root module.
    """
    if isinstance(module, ReversibleSequence):
        (x,) = args
        return _emit_stage(graph, module, path, x)
    if isinstance(module, CheckpointedSegment):
        return _emit(graph, module.body, _join(path, "body"), args, kwargs)
    if isinstance(module, AdditiveCoupling):
        return _emit_coupling(graph, module, path, *args)
    if isinstance(module, fx.GraphModule):
        return _inline_graph(graph, module, path, args, kwargs)
    return graph.call_module(path, args, kwargs)


def _emit_stage(graph: fx.Graph, stage: ReversibleSequence, path: str, x: fx.Node) -> fx.Node:
    """``ReversibleSequence._plain_forward`` as nodes (same ops, same order)."""
    if stage.split == "duplicate":
        x1 = x2 = x
    else:
        halves = graph.call_method("chunk", (x, 2), {"dim": stage.dim})
        x1 = graph.call_function(operator.getitem, (halves, 0))
        x2 = graph.call_function(operator.getitem, (halves, 1))
    for i, coupling in enumerate(stage.couplings):
        x1, x2 = _emit_coupling(graph, coupling, _join(path, f"couplings.{i}"), x1, x2)
    if stage.split == "duplicate":
        total = graph.call_function(operator.add, (x1, x2))
        return graph.call_function(operator.truediv, (total, 2))
    return graph.call_function(torch.cat, ([x1, x2],), {"dim": stage.dim})


def _emit_coupling(
    graph: fx.Graph, coupling: AdditiveCoupling, path: str, x1: fx.Node, x2: fx.Node
) -> tuple[fx.Node, fx.Node]:
    """``AdditiveCoupling.forward`` as nodes: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``."""
    y1 = graph.call_function(
        operator.add, (x1, _emit(graph, coupling.F, _join(path, "F"), (x2,), {}))
    )
    if coupling.G is None:
        return y1, x2
    g = _emit(graph, coupling.G, _join(path, "G"), (y1,), {})
    return y1, graph.call_function(operator.add, (x2, g))


def _inline_graph(
    graph: fx.Graph,
    source: fx.GraphModule,
    path: str,
    args: tuple | None,
    kwargs: dict[str, Any],
) -> Any:
    """Copy ``source``'s graph into ``graph``; return the value its output node returns.

    ``args``/``kwargs`` bind its placeholders (positionally, then by name, then
    to their defaults); ``args=None`` copies the placeholders themselves (the
    root graph). Module and attribute targets are prefixed with ``path``.
    """
    env: dict[fx.Node, Any] = {}
    positional = list(args or ())
    for node in source.graph.nodes:
        if node.op == "placeholder":
            if args is None:
                env[node] = graph.node_copy(node)
            elif positional:
                env[node] = positional.pop(0)
            elif node.target in kwargs:
                env[node] = kwargs[node.target]
            else:
                (env[node],) = node.args  # the default value
            continue
        if node.op == "output":
            return fx.map_arg(node.args[0], env.__getitem__)
        node_args = fx.map_arg(node.args, env.__getitem__)
        node_kwargs = fx.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            target = _join(path, node.target)
            submodule = source.get_submodule(node.target)
            env[node] = _emit(graph, submodule, target, node_args, node_kwargs)
        elif node.op == "get_attr":
            env[node] = graph.get_attr(_join(path, node.target))
        elif _is_unpacking(node, node_args):
            # Indexing the tuple a flattened module returns: take the element.
            container, index = node_args
            env[node] = container[index]
        else:
            env[node] = graph.create_node(node.op, node.target, node_args, node_kwargs)
    raise AssertionError("an fx graph ends with an output node")


def _is_unpacking(node: fx.Node, node_args: tuple) -> bool:
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node_args[0], tuple | list)
        and isinstance(node_args[1], int)
    )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
