"""Graph utilities shared by the passes: node order, module paths, unique
names, the shapes shape propagation recorded, and copying modules."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from revcompile.passes.ops import written_tensor
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

T = TypeVar("T")


def deep_copy(value: T, memo: dict[int, Any] | None = None) -> T:
    """``copy.deepcopy`` that also copies modules holding tensors computed in a
    forward: old-style ``weight_norm`` and ``torch.nn.utils.prune`` keep
    ``weight`` as a non-leaf attribute, recomputed from their parameters before
    every call, which deepcopy refuses (pytorch#103001). Those become detached
    clones; ``memo`` is deepcopy's."""
    memo = {} if memo is None else memo
    if isinstance(value, nn.Module):
        for module in value.modules():
            for tensor in vars(module).values():
                if isinstance(tensor, torch.Tensor) and not tensor.is_leaf:
                    memo.setdefault(id(tensor), tensor.detach().clone())
    return copy.deepcopy(value, memo)


def module_path(node: Node) -> str:
    """The dotted path of the innermost module whose forward created ``node``
    ("" for the root module or when fx recorded no module stack)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    innermost_path, _module_class = next(reversed(stack.values()))
    return innermost_path


def common_module_prefix(paths: Iterable[str]) -> str:
    """The longest dotted module path that every path in ``paths`` lies within."""
    split_paths = [path.split(".") for path in paths]
    if not split_paths:
        return ""
    prefix: list[str] = []
    for parts in zip(*split_paths):
        if any(part != parts[0] for part in parts):
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def graph_position(graph: Graph) -> Callable[[Node], int]:
    """A key function giving each node of ``graph`` its position (graph order)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__


def unique_name(base: str, used_names: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``, ...: the first not in ``used_names``
    (which is extended with it). Every name the passes create comes from here."""
    name, suffix = base, 1
    while name in used_names:
        suffix += 1
        name = f"{base}_{suffix}"
    used_names.add(name)
    return name


def tensor_shape(node: Node) -> tuple[int, ...] | None:
    """The shape shape propagation recorded for ``node``, or None when unknown
    (no example inputs, or not a single tensor)."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return None if shape is None else tuple(shape)


def stale_state_reads(gm: GraphModule) -> dict[Node, list[Node]]:
    """Every node that reads a parameter or buffer (a user of its ``get_attr``) and is
    followed in graph order by in-place writes of that attribute, with those writes.

    A recomputation of the reader (a reversible stage's backward, a checkpointed
    segment) after such a write would see the written value, not the one the
    forward read: the recorded state of a call covers only what the call itself
    changes (``revcompile.runtime.state``).
    """
    position = graph_position(gm.graph)
    writes: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        written = written_tensor(node, gm)
        if written is not None and written.op == "get_attr":
            writes.setdefault(str(written.target), []).append(node)
    stale: dict[Node, list[Node]] = {}
    for attr in gm.graph.nodes:
        for reader in attr.users if attr.op == "get_attr" else ():
            later = [w for w in writes.get(str(attr.target), []) if position(w) > position(reader)]
            if later:
                stale.setdefault(reader, []).extend(later)
    return stale


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# torch's own weight reparametrizations, which the partition pass slices with the layer.
_WEIGHT_HOOKS = (WeightNorm, SpectralNorm, BasePruningMethod)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, pre-forward or backward hooks of the user's
    (torch's old-style weight_norm, spectral_norm and pruning hooks aside).

    Traced through, a hook's Python code would run once on Proxies (a feature
    list would get an fx Proxy) and never again; kept as a leaf, the module
    is called as a module at run time and its hooks run as in the original.
    Recomputed (a checkpointed segment, a coupling branch), they would run again
    in backward: ``plan`` and ``emit`` keep such modules out of recomputation.
    """
    return any(
        not isinstance(hook, _WEIGHT_HOOKS)
        for name in _HOOK_DICTS
        for hook in (getattr(module, name, None) or {}).values()
    )


def drop_user_hooks(root: nn.Module) -> None:
    """Remove the user's hooks (``has_hooks``) from every module of ``root``, a
    private copy: shape propagation must not run them (a feature-extraction hook
    would keep a FakeTensor). torch's weight reparametrization hooks stay."""
    for module in root.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            for key in [
                k for k, hook in (hooks or {}).items() if not isinstance(hook, _WEIGHT_HOOKS)
            ]:
                del hooks[key]


def recomputation_needs(gm: GraphModule) -> Callable[[Node], frozenset[Node] | None]:
    """What recomputing a node in backward (a checkpointed run) needs to repeat its
    forward exactly: None when it never can (it calls a module with the user's
    hooks, ``has_hooks``: they would run again), else the in-place writes made
    later of the state it reads (``stale_state_reads``), which the recomputed run
    must contain (or it would read the written values). ``emit`` stores the runs
    that miss a need; the memory planner offers checkpointing only for the others.
    """
    stale = stale_state_reads(gm)

    def needs(node: Node) -> frozenset[Node] | None:
        if node.op == "call_module" and has_hooks(gm.get_submodule(str(node.target))):
            return None
        return frozenset(stale.get(node, ()))

    return needs
