"""Channel-role propagation through one residual branch (DESIGN.md §5).

Every tensor the branch computes lives in a *channel space*: the set of
channel indices it is indexed by. The branch input (the block's fork) opens the
space ``IN``. Walking the branch forward in graph order, each op's rule
(``rules.py``) gives the space of its output:

* a channel-mixing layer (``Conv`` with ``groups == 1``, ``Linear`` on the
  channel axis) reads one space and opens a fresh one for its output;
* a channel-preserving op (norms, activations, dropout, stochastic depth,
  pools, depthwise conv, permutes) keeps the space of its input; permutes
  only move the channel axis;
* an element-wise op of several branch tensors (an SE gate ``x * s``) merges
  their spaces (union-find); a parameter operand (a layer-scale ``gamma`` of
  shape ``(C, 1, 1)``, or timm's ``gamma.reshape(1, -1, 1, 1)``) takes the
  space of the tensor it multiplies.

The space of the branch output is ``OUT``. The result is a frozen
``ChannelRoles``: for every module and parameter the side (``"in"``, ``"out"``
or inner) of the spaces it reads and writes, which is all slicing needs. A
grouped conv is opaque: allowed only between two inner spaces. Any op no rule
knows makes the branch unsupported (``PartitionError`` with the report's
words).

Shapes are optional: ShapeProp metadata on the fork (``tensor_meta``) gives
the rank and the channel count; without it a ``Linear`` on a channels-first
value is taken to act on an ``(N, C)`` tensor, and a parameter operand is
matched to the channel axis by its one non-singleton dim and its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from revcompile.passes.ir import ChannelRoles, Side
from revcompile.passes.ops import op_name
from revcompile.passes.partition.rules import Value, rule_for
from torch.fx import GraphModule, Node

from revcompile.errors import PartitionError


@dataclass
class Analysis:
    """Channel spaces of one branch being analysed (mutable while it runs)."""

    gm: GraphModule
    constants: set[Node]
    parent: list[int] = field(default_factory=list)
    widths: dict[int, int] = field(default_factory=dict)
    values: dict[Node, Value] = field(default_factory=dict)
    # target -> (input space, output space) of each use
    modules: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # target -> (space, dim) of each use of a per-channel parameter
    attrs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # spaces that must stay inner, with the reason if they do not
    inner_only: list[tuple[int, str]] = field(default_factory=list)
    # spaces that may be sliced only if the group count is even
    group_counts: list[tuple[int, int]] = field(default_factory=list)
    mixers: int = 0
    # F.layer_norm nodes and the space they normalize
    normalized: list[tuple[Node, int]] = field(default_factory=list)
    inp: int = 0
    out: int = 0

    # ---- union-find over spaces

    def new_space(self, width: int | None = None) -> int:
        self.parent.append(len(self.parent))
        space = len(self.parent) - 1
        if width is not None:
            self.note_width(space, width)
        return space

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def note_width(self, space: int, width: int) -> None:
        root = self.find(space)
        known = self.widths.setdefault(root, width)
        if known != width:
            raise PartitionError(f"channel count mismatch in branch ({known} vs {width})")

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.widths:
                self.note_width(ra, self.widths.pop(rb))
        return ra

    def side(self, space: int) -> Side:
        """``"in"`` for the input space, ``"out"`` for the output space, else None."""
        root = self.find(space)
        if root == self.find(self.inp):
            return "in"
        return "out" if root == self.find(self.out) else None

    def is_constant(self, node: Node) -> bool:
        return node.op == "get_attr" or node in self.constants

    # ---- propagation

    def step(self, node: Node) -> None:
        """Give ``node`` its value by its rule; PartitionError when no rule applies."""
        rule = rule_for(node, self.gm)
        module = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if module is not None and any(m._forward_pre_hooks for m in module.modules()):
            # weight_norm / prune recompute ``weight`` from their own tensors before
            # each call: slicing the layer would not slice what the hook computes.
            raise PartitionError(
                f"{op_name(node)} has forward pre-hooks (torch.nn.utils.weight_norm or prune)"
            )
        value = None if rule is None else rule.propagate(self, node, module)
        if value is None:
            raise PartitionError(f"unsupported op {op_name(node)} in branch")
        self.values[node] = value

    def source(self, node: Node) -> Value:
        """The value of the one tensor argument of a unary op (its first argument)."""
        if not node.args or not isinstance(node.args[0], Node) or len(node.all_input_nodes) != 1:
            raise PartitionError(f"unsupported use of {op_name(node)} in branch")
        return self.values[node.args[0]]

    def require_axis(self, node: Node, value: Value, dim: int) -> None:
        if not value.axis_is(dim):
            raise PartitionError(f"{op_name(node)} not applied to the channel dim")

    def mix(self, target: str, x: Value, out_width: int) -> Value:
        out = self.new_space(out_width)
        self.modules.setdefault(target, []).append((x.space, out))
        self.mixers += 1
        return Value(out, x.axis, x.ndim)

    def preserve(self, target: str, x: Value) -> Value:
        self.modules.setdefault(target, []).append((x.space, x.space))
        return x

    def opaque(self, x: Value, out_width: int, reason: str) -> Value:
        """A layer whose channels can be sliced on neither side (a grouped conv)."""
        out = self.new_space(out_width)
        self.inner_only += [(x.space, reason), (out, reason)]
        return Value(out, x.axis, x.ndim)

    def permute(self, x: Value, dims: Any) -> Value | None:
        if not isinstance(dims, list | tuple) or not all(isinstance(d, int) for d in dims):
            return None
        ndim = len(dims)
        if x.ndim not in (None, ndim) or not -ndim <= x.axis < ndim:
            return None
        return Value(x.space, [d % ndim for d in dims].index(x.axis % ndim), ndim)

    def elementwise(self, node: Node) -> Value:
        """A broadcasting element-wise op: merge the spaces of its branch operands."""
        tensors = [a for a in node.all_input_nodes if not self.is_constant(a)]
        if not tensors:
            raise PartitionError(f"unsupported use of {op_name(node)} in branch")
        first = self.values[tensors[0]]
        for other in map(self.values.__getitem__, tensors[1:]):
            same_axis = first.axis == other.axis or (
                first.ndim is not None
                and first.ndim == other.ndim
                and first.axis % first.ndim == other.axis % other.ndim
            )
            if not same_axis:
                raise PartitionError(f"{op_name(node)} broadcasts across the channel dim")
            first = Value(self.union(first.space, other.space), first.axis, first.ndim)
        for operand in node.all_input_nodes:
            if self.is_constant(operand):
                self.channel_param(operand, first)
        return first

    def channel_param(self, operand: Node, x: Value) -> None:
        """A parameter operand must be a scalar or a per-channel vector aligned with x.

        The operand is a parameter read by ``get_attr``, possibly reshaped with
        ``-1`` as its only non-singleton size (timm's ``gamma.reshape(1, -1,
        1, 1)``), so that slicing the parameter keeps the reshape valid.
        """
        attr = reshaped_attr(operand)
        if attr is None:
            raise PartitionError(f"{op_name(operand)} of a parameter in branch")
        tensor = fetch_attr(self.gm, str(attr.target))
        meta = operand.meta.get("tensor_meta")
        shape = tuple(tensor.shape) if operand is attr else getattr(meta, "shape", None)
        if shape is None:
            raise PartitionError(f"shape of {operand.name} is unknown")
        big = [i for i, n in enumerate(shape) if n != 1]
        if not big:
            return
        (dim,) = big if len(big) == 1 else (None,)
        neg = x.axis if x.axis < 0 else (None if x.ndim is None else x.axis - x.ndim)
        if dim is None or (neg is not None and dim - len(shape) != neg):
            raise PartitionError(f"parameter {attr.target} is not per-channel")
        self.note_width(x.space, shape[dim])
        (attr_dim,) = [i for i, n in enumerate(tensor.shape) if n != 1]
        self.attrs.setdefault(str(attr.target), []).append((x.space, attr_dim))

    def finish(self) -> None:
        """Check the spaces of the input and output; PartitionError if they cannot halve."""
        inp, out = self.find(self.inp), self.find(self.out)
        if inp == out:
            if not self.mixers:
                raise PartitionError("branch has no channel-mixing layer")
            raise PartitionError("branch output channels are tied to its input channels")
        width, out_width = self.widths.get(inp), self.widths.get(out)
        if width is None:
            raise PartitionError("cannot determine the branch's channel count")
        if width % 2:
            raise PartitionError("odd channel count")
        if out_width is not None and out_width != width:
            raise PartitionError(f"branch changes the channel count ({width} -> {out_width})")
        for space, reason in self.inner_only:
            if self.find(space) in (inp, out):
                raise PartitionError(reason)
        for space, groups in self.group_counts:
            if self.find(space) in (inp, out) and groups % 2:
                raise PartitionError("GroupNorm with odd group count")
        for target, seen in {**self._module_sides(), **self._attr_sides()}.items():
            if len(seen) > 1:
                raise PartitionError(f"{target} is shared by layers with different channel roles")

    def _module_sides(self) -> dict[str, set[tuple[Side, Side]]]:
        return {
            t: {(self.side(i), self.side(o)) for i, o in uses} for t, uses in self.modules.items()
        }

    def _attr_sides(self) -> dict[str, set[tuple[Side, int]]]:
        return {
            t: {(self.side(space), dim) for space, dim in uses} for t, uses in self.attrs.items()
        }

    def roles(self, axis: int) -> ChannelRoles:
        """The frozen result. Pre: ``finish`` passed (one role per target)."""
        return ChannelRoles(
            axis=axis,
            width=self.widths[self.find(self.inp)],
            modules=MappingProxyType({t: next(iter(s)) for t, s in self._module_sides().items()}),
            attrs=MappingProxyType({t: next(iter(s)) for t, s in self._attr_sides().items()}),
            normalized=MappingProxyType({n: self.side(s) for n, s in self.normalized}),
        )


def analyze(
    gm: GraphModule, fork: Node, branch_out: Node, nodes: list[Node], axis: int
) -> Analysis:
    """Propagate channel spaces from ``fork`` through ``nodes`` along ``axis``.

    Pre: ``nodes`` is the closed branch of a block (graph order). Post: ``inp``
    and ``out`` are the spaces of the branch input and output, distinct, of the
    same even width; raises PartitionError (with ``progress``) otherwise.
    """
    self = Analysis(gm, constants=constants_of(nodes))
    shape = getattr(fork.meta.get("tensor_meta"), "shape", None)
    self.inp = self.new_space(None if shape is None else shape[axis])
    self.values[fork] = Value(self.inp, axis, None if shape is None else len(shape))
    for position, node in enumerate(nodes, start=1):
        if node in self.constants:  # operands of branch ops, checked there
            continue
        try:
            self.step(node)
        except PartitionError as error:
            error.progress = position
            raise
    self.out = self.values[branch_out].space
    try:
        self.finish()
    except PartitionError as error:
        error.progress = len(nodes) + 1
        raise
    return self


def add_pre_op(self: Analysis, fork: Node, pre_op: Node, pre_op_input: Node) -> None:
    """Extend a finished analysis with ``pre_op`` applied to the branch input first.

    A moved post-op must keep the input's space (it is applied to one half of
    the trunk); raises PartitionError otherwise, or when it gives a layer a
    second, different role.
    """
    self.values[pre_op_input] = self.values[fork]
    self.step(pre_op)
    if self.find(self.values[pre_op].space) != self.find(self.inp):
        raise PartitionError(f"post-op {op_name(pre_op)} cannot move into the branch")
    self.finish()


# --------------------------------------------------------------------------- graph helpers


def fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for name in target.split("."):
        obj = getattr(obj, name)
    return obj


def constants_of(nodes: list[Node]) -> set[Node]:
    """The nodes of ``nodes`` (in graph order) computed from parameters alone."""
    constants: set[Node] = set()
    for node in nodes:
        if all(arg.op == "get_attr" or arg in constants for arg in node.all_input_nodes):
            constants.add(node)
    return constants


def reshaped_attr(node: Node) -> Node | None:
    """The ``get_attr`` that ``node`` is, or reshapes with sizes 1 and -1 only."""
    while node.op != "get_attr":
        if node.op == "call_method" and node.target in ("reshape", "view"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
                sizes = sizes[0]
        elif node.op == "call_function" and node.target is torch.reshape:
            sizes = node.args[1]
        else:
            return None
        if not isinstance(node.args[0], Node) or not all(n in (1, -1) for n in sizes):
            return None
        node = node.args[0]
    return node
