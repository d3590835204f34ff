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
  space of the tensor it multiplies;
* a reduction (``mean``, ``sum``, ``amax``, ``amin``, ``norm``) over other dims
  keeps the space (the channel axis moves when ``keepdim=False`` drops dims
  before it); over the channel axis it gives a *channel-less* value (space
  None, one number per sample), which element-wise ops broadcast against a
  tensor's channels without merging: only where its shape really broadcasts
  (a size-1 remnant at the channel axis, or a rank too small to reach it), so
  that halving the channels cannot change how it broadcasts. No layer may
  read it as channels (a conv on the remnant), and it cannot be the branch
  output.

At an inner space nothing changes with halving. At the branch boundary (the
spaces ``IN`` and ``OUT``, which are sliced) every op sees the kept half
only: a reduction over the channel axis reduces over the kept half (``mean``,
``amax``, ``amin`` then differ from the full width's; ``sum`` and ``norm`` of
the branch input equal those of the input with the dropped channels zeroed),
like LayerNorm over the channel axis; a GroupNorm of one group normalises over
the kept half; a gate computed from the output channels (an SE or ECA at the
end of a bottleneck) sees the written half. The halved branch is still a
function of its half alone, which is all a coupling needs to be exactly
invertible.

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
from revcompile.passes.partition.rules import Size, Value, rule_for
from torch.fx import GraphModule, Node

from revcompile.errors import PartitionError


@dataclass
class Analysis:
    """Channel spaces of one branch being analysed (mutable while it runs)."""

    gm: GraphModule
    constants: set[Node]
    parent: list[int] = field(default_factory=list)
    widths: dict[int, int] = field(default_factory=dict)
    values: dict[Node, Value | Size] = field(default_factory=dict)
    # target -> (input space, output space) of each use
    modules: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # target -> (space, dim) of each use of a per-channel parameter
    attrs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # spaces that must stay inner, with the reason if they do not
    inner_only: list[tuple[int, str]] = field(default_factory=list)
    # spaces that may be sliced only if the group count is even
    group_counts: list[tuple[int, int]] = field(default_factory=list)
    mixers: int = 0
    # F.layer_norm / F.group_norm nodes and the space they normalize
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
        return self.tensor(node.args[0], node)

    def tensor(self, operand: Node, user: Node) -> Value:
        """The value of ``operand`` read by ``user`` as a tensor (not a shape)."""
        value = self.values[operand]
        if not isinstance(value, Value):
            raise PartitionError(f"{op_name(user)} of a shape in branch")
        return value

    def require_axis(self, node: Node, value: Value, dim: int) -> None:
        """Pre for layers that read channels: ``value`` has channels, on axis ``dim``."""
        if value.channelless:
            raise PartitionError(f"{op_name(node)} applied to a reduction over the channel dim")
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
        if x.ndim not in (None, ndim):
            return None
        if x.axis is None:  # channel-less, no remnant: nothing to move
            return Value(x.space, None, ndim)
        if not -ndim <= x.axis < ndim:
            return None
        return Value(x.space, [d % ndim for d in dims].index(x.axis % ndim), ndim)

    def unsqueeze(self, node: Node, x: Value, dim: Any) -> Value:
        """The value of ``x.unsqueeze(dim)``: the channel axis moves past the new dim;
        a channel-less value without a size-1 remnant gets the new dim as one."""
        if not isinstance(dim, int) or x.ndim is None or not -x.ndim - 1 <= dim <= x.ndim:
            raise PartitionError(f"unsupported use of {op_name(node)} in branch")
        ndim = x.ndim + 1
        new = dim % ndim
        if x.axis is None:
            return Value(x.space, new, ndim)
        axis = x.axis % x.ndim
        return Value(x.space, axis + (axis >= new), ndim)

    def reduce(self, node: Node, x: Value, dims: Any, keepdim: Any) -> Value:
        """The value of reducing ``x`` over ``dims`` (None or ``()``: every dim).

        Post: over other dims the space is kept and the axis moved past the
        dims ``keepdim=False`` drops; over the channel axis the result is
        channel-less (its remnant kept with ``keepdim``).
        """
        if not isinstance(keepdim, bool):
            raise PartitionError(f"unsupported use of {op_name(node)} in branch")
        if dims is None or dims == () or dims == []:
            return Value(None, x.axis, x.ndim) if keepdim else Value(None, None, 0)
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, list | tuple) or not all(isinstance(d, int) for d in dims):
            raise PartitionError(f"unsupported use of {op_name(node)} in branch")
        ndim = None if x.ndim is None or keepdim else x.ndim - len(set(d % x.ndim for d in dims))
        if x.axis is None:
            return Value(None, None, x.ndim if keepdim else ndim)
        if x.ndim is None and any((d < 0) != (x.axis < 0) for d in dims):
            raise PartitionError(f"{op_name(node)} over dims {list(dims)} at an unknown rank")
        hit = any(x.axis_is(d) for d in dims)
        if keepdim:
            return Value(None if hit else x.space, x.axis, x.ndim)
        if hit:
            return Value(None, None, ndim)
        if x.ndim is not None:
            axis = x.axis % x.ndim
            return Value(x.space, axis - sum(d % x.ndim < axis for d in dims), ndim)
        if x.axis >= 0:
            return Value(x.space, x.axis - sum(d < x.axis for d in dims), None)
        return Value(x.space, x.axis + sum(d > x.axis for d in dims), None)

    def elementwise(self, node: Node) -> Value:
        """A broadcasting element-wise op: merge the spaces of its branch operands.

        Channel-less operands broadcast against the others without merging;
        with no operand that has channels the result is channel-less.
        """
        tensors = [a for a in node.all_input_nodes if not self.is_constant(a)]
        if not tensors:
            raise PartitionError(f"unsupported use of {op_name(node)} in branch")
        values = [self.tensor(t, node) for t in tensors]
        carriers = [v for v in values if not v.channelless]
        if not carriers:
            first = _channelless_broadcast(values)
        else:
            first = max(carriers, key=lambda v: v.ndim or 0)  # the rank of the result
            for other in carriers:
                if not _same_axis(first, other):
                    raise PartitionError(f"{op_name(node)} broadcasts across the channel dim")
                first = Value(self.union(first.space, other.space), first.axis, first.ndim)
            for other in values:
                if other.channelless and not _broadcasts_without_channels(other, first):
                    raise PartitionError(f"{op_name(node)} broadcasts across the channel dim")
        for operand in node.all_input_nodes:
            if self.is_constant(operand):
                self.channel_param(operand, first)
        return first

    def channel_param(self, operand: Node, x: Value, *, indexed: bool = False) -> None:
        """A parameter operand must be a scalar or a per-channel vector aligned with x.

        The operand is a parameter read by ``get_attr``, possibly reshaped with
        ``-1`` as its only non-singleton size (timm's ``gamma.reshape(1, -1,
        1, 1)``), so that slicing the parameter keeps the reshape valid.
        ``indexed``: the op indexes the vector by channel (a functional norm's
        ``weight``) instead of broadcasting it, so its dim need not line up.
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
        if x.channelless:  # the result would have the parameter's channels, in no space
            raise PartitionError(f"parameter {attr.target} broadcast onto a channel reduction")
        (dim,) = big if len(big) == 1 else (None,)
        neg = x.axis if x.axis < 0 else (None if x.ndim is None else x.axis - x.ndim)
        if dim is None or (not indexed and neg is not None and dim - len(shape) != neg):
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
            # one group normalises over the kept half, like LayerNorm; other odd
            # counts cannot be split into whole groups
            if self.find(space) in (inp, out) and groups % 2 and groups != 1:
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
    out = getattr(self.values[branch_out], "space", None)
    try:
        if out is None:
            raise PartitionError("branch output is a reduction over the channel dim")
        self.out = out
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


def _same_axis(a: Value, b: Value) -> bool:
    """Whether broadcasting lines up the channel axes of two values with channels."""
    if a.ndim is not None and b.ndim is not None:
        return a.from_right() == b.from_right()
    return a.axis == b.axis


def _broadcasts_without_channels(z: Value, x: Value) -> bool:
    """Whether channel-less ``z`` broadcasts against ``x`` the same at any channel count:
    a size-1 remnant where ``x`` has its channel axis, or too few dims to reach it;
    and no more dims than ``x`` (the channel axis of the result stays where it is)."""
    if z.ndim is None or x.ndim is None:
        return z.axis is not None and z.axis == x.axis and z.ndim == x.ndim
    reach = x.from_right()
    return z.ndim <= x.ndim and (z.from_right() == reach or z.ndim < -reach)


def _channelless_broadcast(values: list[Value]) -> Value:
    """The channel-less result of broadcasting channel-less values: the remnant is
    kept where all of them have it at one place and rank."""
    first = values[0]
    if all(v.axis == first.axis and v.ndim == first.ndim for v in values):
        return first
    ranks = [v.ndim for v in values]
    return Value(None, None, None if None in ranks else max(ranks))


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
    """The ``get_attr`` that ``node`` is, or reshapes with sizes 1 and -1 only, or
    with explicit sizes where the reshape's shape is known (``tensor_meta``), so that
    ``branch`` can rewrite them for a sliced parameter (poolformer's ``view(64, 1, 1)``)."""
    while node.op != "get_attr":
        if node.op == "call_method" and node.target in ("reshape", "view"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
                sizes = sizes[0]
        elif node.op == "call_function" and node.target is torch.reshape:
            sizes = node.args[1]
        else:
            return None
        if not isinstance(node.args[0], Node) or not all(isinstance(n, int) for n in sizes):
            return None
        if not all(n in (1, -1) for n in sizes) and "tensor_meta" not in node.meta:
            return None
        node = node.args[0]
    return node
