"""Branch extraction: which nodes a residual branch is, and a standalone copy of it.

``branch_nodes`` finds the nodes that compute a block's branch output;
``build_branch`` copies them into their own GraphModule, at full width or with
every layer sliced by the roles the analysis recorded (``ChannelRoles``), and
with every in-place op made out-of-place (the branch input is a view of the
stage input, which backward needs).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from revcompile.passes.graph_utils import deep_copy
from revcompile.passes.ir import BranchPartition, ChannelRoles, ResidualBlock, Side
from revcompile.passes.ops import op_name, out_of_place, reads_metadata_only
from revcompile.passes.partition.analysis import fetch_attr, reshaped_attr
from revcompile.passes.partition.rules import module_rule
from revcompile.passes.partition.slicing import fresh, kept_count, kept_groups, take
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from revcompile.errors import PartitionError


def branch_nodes(gm: GraphModule, block: ResidualBlock) -> list[Node]:
    """The nodes of the block that compute ``block.branch_out``, in graph order.

    These are the nodes of ``block.region`` that reach ``branch_out``, plus
    in-place ops whose result is unused (``h.relu_()`` as a statement) applied
    to one of them: they act through their first argument, which later nodes
    read, and are not part of the region (they reach no node). Values computed
    from parameters alone that the branch reads (a reshaped layer scale, a
    relative position bias) belong to the branch too: they are not in the
    region (nothing of the fork flows into them). Those computed before the
    fork come first.
    """
    region = set(block.region)
    keep = {block.branch_out} if block.branch_out in region else set()
    stack = list(keep)
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in region and arg not in keep:
                keep.add(arg)
                stack.append(arg)
    constants = _constant_inputs(keep, outside=region | {block.fork})
    keep.update(constants)
    branch = []
    node = block.fork.next
    while node is not block.join and node.op != "root":
        if node in keep:
            branch.append(node)
        elif (
            not node.users
            and node.args
            and (node.args[0] in keep or node.args[0] is block.fork)
            and out_of_place(node, gm)[3]
        ):
            keep.add(node)
            branch.append(node)
        node = node.next
    walked = set(branch)
    return [node for node in constants if node not in walked] + branch


def _constant_inputs(nodes: set[Node], outside: set[Node]) -> list[Node]:
    """The nodes read by ``nodes`` from outside ``outside`` that are computed
    from parameters alone (``get_attr`` nodes excluded), inputs before users."""
    found: list[Node] = []
    found_set: set[Node] = set()
    seen: set[Node] = set()

    def visit(node: Node) -> bool:
        """Whether ``node`` is a constant; constants are appended in post-order."""
        if node.op == "get_attr":
            return True
        if node in seen:
            return node in found_set
        seen.add(node)
        if node.op == "placeholder" or not all(map(visit, node.all_input_nodes)):
            return False
        found.append(node)
        found_set.add(node)
        return True

    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in outside and arg not in nodes:
                visit(arg)
    return found


def pre_op_input(pre_op: Node) -> Node:
    """The one tensor a pre-op (a moved post-op) applies to."""
    tensors = [arg for arg in pre_op.all_input_nodes if arg.op != "get_attr"]
    if len(tensors) != 1:
        raise PartitionError(f"post-op {pre_op.name} cannot move into the branch")
    return tensors[0]


def outside_read(block: ResidualBlock, nodes: list[Node]) -> str | None:
    """Why the branch is not a function of its input and parameters, or None."""
    inside = {block.fork, *nodes}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr":
                return f"branch reads {arg.name} from outside the block"
    return None


def outside_shape_read(block: ResidualBlock, nodes: list[Node]) -> str | None:
    """Which op outside the branch reads the shape of a branch value, or None.

    Shape reads of the trunk (the fork) are fine: every trunk value of a chain
    has the stage input's shape. A branch value has no counterpart outside a
    coupling (and a different width inside a halved one).
    """
    inside = set(nodes) | {block.join}
    for node in nodes:
        for user in node.users:
            if user not in inside and reads_metadata_only(user):
                return f"{op_name(user)} reads the shape of {node.name}"
    return None


Copies = dict[tuple[int, Any, Any], Any]
"""Copies made for branches, by ``copy_key``."""


def copy_key(original: object, in_sl: slice | None, out_sl: slice | None) -> tuple[int, Any, Any]:
    """The memo key of a copy of ``original`` keeping ``in_sl``/``out_sl`` (None: all)."""

    def bounds(index: slice | None) -> Any:
        return None if index is None else (index.start, index.stop, index.step)

    return id(original), bounds(in_sl), bounds(out_sl)


_SLICES = dict[Side, "slice | None"]


def build_branch(
    gm: GraphModule,
    part: BranchPartition,
    *,
    pre_op: Node | None,
    reads: slice | None,
    writes: slice | None,
    copies: Copies | None = None,
) -> GraphModule:
    """A standalone GraphModule computing the branch of ``part.block`` from one input.

    The placeholder ``x`` replaces the fork; ``pre_op`` (None or
    ``part.pre_op``: the post-op of the previous block) is applied to ``x``
    first; the output is the value of ``branch_out``.

    ``reads``/``writes`` (both or neither): the channels of the branch input it
    keeps and of the branch output it produces (F: ``slice(C//2, C)`` and
    ``slice(0, C//2)``; G the other way round). Layers are sliced by the roles
    ``part`` recorded (no analysis here). With both None the branch is copied
    at full width (two-stream "duplicate" mode). ``copies`` memoizes the copies
    by original and cut (``copy_key``): branches built with one memo share the
    copy of a module or tensor they cut the same way, as the original was shared.

    Post: the result shares no parameter or buffer with ``gm`` (modules are
    deep copies, sliced tensors fresh Parameters/buffers); every in-place op is
    out-of-place, so the input is never written; submodules keep their
    qualified names (``layer1.1.conv1``). ``gm`` is not modified. Raises
    PartitionError (the recorded reason) when slicing is asked for and the
    branch cannot halve, or when the branch reads a value from outside the block.
    """
    if (reads is None) != (writes is None):
        raise ValueError("reads and writes must both be slices or both None")
    if part.outside is not None:
        raise PartitionError(part.outside)
    roles = None
    if reads is not None:
        roles, reason = part.halving(pre_op)
        if roles is None:
            raise PartitionError(reason or "branch cannot be halved")
    slices: _SLICES = {"in": reads, "out": writes, None: None}
    block = part.block
    memo: Copies = {} if copies is None else copies
    graph = Graph()
    attrs: dict[str, Any] = {}
    env: dict[Node, Node] = {}

    def copy_node(node: Node) -> Node:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.get_attr(str(arg.target))
                attrs[str(arg.target)] = _copy_attr(gm, str(arg.target), roles, slices, memo)
        target, args, kwargs, inplace = out_of_place(node, gm)
        if roles is not None:
            args, kwargs = _normalized_sizes(node, args, kwargs, roles, slices)
            args = _param_view_sizes(node, args, roles, slices)
        new_args, new_kwargs = map_arg((args, kwargs), env.__getitem__)
        name = node.name if target == node.target else None  # renamed: relu_ -> relu
        new = graph.create_node(node.op, target, new_args, new_kwargs, name, node.type)
        new.meta = dict(node.meta)
        if roles is not None:  # shapes changed
            new.meta.pop("tensor_meta", None)
            new.meta.pop("val", None)
        if inplace and isinstance(args[0], Node):  # later readers see the written value
            env[args[0]] = new
        if node.op == "call_module" and node.target not in attrs:
            attrs[str(node.target)] = _copy_module(gm, str(node.target), roles, slices, memo)
        return new

    env[block.fork] = graph.placeholder("x")
    if pre_op is not None:
        env[pre_op_input(pre_op)] = env.pop(block.fork)
        env[block.fork] = copy_node(pre_op)
    for node in part.nodes:
        env[node] = copy_node(node)
    out = env[block.branch_out]
    if block.branch_scale != 1:  # torch.add(x, f, alpha=a): the coupling adds a * f
        out = graph.call_function(operator.mul, (out, block.branch_scale))
    graph.output(out)
    result = GraphModule(attrs, graph, class_name="Branch")
    result.training = gm.training
    return result


def _copy_module(
    gm: GraphModule, target: str, roles: ChannelRoles | None, slices: _SLICES, memo: Copies
) -> nn.Module:
    """A private (sliced) copy of the module called as ``target``, never in place."""
    mod = gm.get_submodule(target)
    in_side, out_side = (None, None)
    if roles is not None and target in roles.modules:
        in_side, out_side = roles.modules[target]
    key = copy_key(mod, slices[in_side], slices[out_side])
    if key in memo:
        return memo[key]
    if in_side is None and out_side is None:
        new = deep_copy(mod)
    else:
        # Copy the module around its own tensors, cut, then copy whatever the
        # cut did not replace: each weight is copied once, at its final size.
        originals = {id(t): t for t in (*mod.parameters(), *mod.buffers())}
        new = deep_copy(mod, dict(originals))
        rule = module_rule(new)
        if rule is not None and rule.cut is not None:
            new = rule.cut(new, slices[in_side], slices[out_side])
        for owner in new.modules():
            for tensors in (owner._parameters, owner._buffers):
                for name, tensor in tensors.items():
                    if tensor is not None and id(tensor) in originals:
                        tensors[name] = fresh(tensor, tensor)
    if hasattr(new, "inplace"):
        new.inplace = False
    memo[key] = new
    return new


def _copy_attr(
    gm: GraphModule, target: str, roles: ChannelRoles | None, slices: _SLICES, memo: Copies
) -> Any:
    """A private (sliced) copy of a value read by ``get_attr``."""
    value = fetch_attr(gm, target)
    side, dim = (None, 0)
    if roles is not None and target in roles.attrs:
        side, dim = roles.attrs[target]
    index = slices[side]
    key = copy_key(value, index, index)
    if key not in memo:
        if not isinstance(value, torch.Tensor):
            memo[key] = copy.deepcopy(value)
        else:
            memo[key] = fresh(value, value if index is None else take(value, dim, index))
    return memo[key]


def _normalized_sizes(
    node: Node, args: tuple, kwargs: dict[str, Any], roles: ChannelRoles, slices: _SLICES
) -> tuple[tuple, dict[str, Any]]:
    """``node``'s arguments with the size argument of a halved functional norm
    rewritten: ``F.layer_norm``'s normalized shape, ``F.group_norm``'s group count."""
    if node not in roles.normalized:
        return args, kwargs
    index = slices[roles.normalized[node]]
    if index is None:
        return args, kwargs
    if node.target is F.group_norm:
        name = "num_groups"
        groups = args[1] if len(args) > 1 else kwargs[name]
        size: Any = kept_groups(groups, roles.width, index)
    else:
        name, size = "normalized_shape", (kept_count(roles.width, index),)
    if len(args) > 1:
        return (args[0], size, *args[2:]), kwargs
    return args, {**kwargs, name: size}


def _param_view_sizes(node: Node, args: tuple, roles: ChannelRoles, slices: _SLICES) -> tuple:
    """``node``'s arguments with the channel size of a reshape of a sliced per-channel
    parameter written as -1 (poolformer's ``scale.view(64, 1, 1)``).

    Pre: the analysis accepted the reshape (``reshaped_attr``), so its shape
    (``tensor_meta``) has one size other than 1 when any size is explicit.
    """
    attr = None if node.op == "get_attr" else reshaped_attr(node)
    if attr is None:
        return args
    side = roles.attrs.get(str(attr.target), (None, 0))[0]
    meta = node.meta.get("tensor_meta")
    if side is None or slices[side] is None or meta is None:
        return args
    sizes = tuple(1 if n == 1 else -1 for n in meta.shape)
    return (args[0], sizes) if node.target is torch.reshape else (args[0], *sizes)
