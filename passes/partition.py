"""Channel partitioning: turn a residual branch into a C/2 -> C/2 function.

A coupling ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` feeds each branch one half
of the channels and adds its output to the other half (DESIGN.md §5). This pass
builds such a half-width branch from an original full-width one by slicing
weights; inner widths (bottleneck width, MLP expansion) stay as they are.

Channel-role propagation
------------------------
Every tensor the branch computes lives in a *channel space*: the set of
channel indices it is indexed by. The branch input (the block's fork) opens the
space ``IN``. Walking the branch forward in graph order:

* a channel-mixing layer (``Conv`` with ``groups == 1``, ``Linear`` on the
  channel axis) reads one space and opens a fresh one for its output;
* a channel-preserving op (BatchNorm, GroupNorm, LayerNorm over the channel
  axis as a module or ``F.layer_norm`` as timm calls it, activations,
  dropout, stochastic depth, pools, depthwise conv with
  ``groups == in == out``, permutes) keeps the space of its input; permutes
  only move the channel axis;
* an element-wise op of several branch tensors (an SE gate ``x * s``) merges
  their spaces (union-find); a parameter operand (a layer-scale ``gamma`` of
  shape ``(C, 1, 1)``, or timm's ``gamma.reshape(1, -1, 1, 1)``) takes the
  space of the tensor it multiplies.

Values computed from parameters alone (a reshaped layer scale, Swin's
relative position bias) are copied into the branch with it.

The space of the branch output is ``OUT``. Afterwards every op is sliced by the
role of its space: ops in ``IN`` keep the channels in ``reads`` (the first
mixing layers keep those *input* channels), ops in ``OUT`` keep the channels in
``writes`` (the last mixing layers keep those *output* channels and biases),
all other spaces are inner and left alone. A grouped conv is opaque: allowed
only between two inner spaces. Any op whose channel behaviour is not known
makes the branch unsupported; ``unsupported_reason`` says which, in the words
the conversion report uses after ``"kept: "``.

With ``reads``/``writes`` slices (F: ``reads = slice(C//2, C)``,
``writes = slice(0, C//2)``; G the other way round), the built branch satisfies
``half(x[:, reads]) == full'(x)[:, writes]`` where ``full'`` is the original
branch with the dropped input channels of its first mixing layers zeroed, in
both train and eval mode (BatchNorm and GroupNorm statistics are per channel or
per whole group; LayerNorm over the channel axis is the one op whose statistics
change with halving).

Shapes are optional: ShapeProp metadata on the fork (``tensor_meta``) gives
the rank and the channel count; without it a ``Linear`` on a channels-first
value is taken to act on an ``(N, C)`` tensor, and a parameter operand is
matched to the channel axis by its one non-singleton dim and its size.

The per-layer rewrite functions (``slice_conv``, ``slice_linear``,
``slice_batchnorm`` ...) follow Torch-Pruning's ``pruner/function.py``: each
takes a private copy of a module and slices its parameters and buffers.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from revcompile.passes.ir import ResidualBlock
from revcompile.passes.ops import (
    STOCHASTIC_DEPTH_CLASS_NAMES,
    STOCHASTIC_DEPTH_FUNCTIONS,
    method_base,
    op_name,
    out_of_place,
)
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import _get_qualified_name, map_arg

from revcompile.errors import PartitionError

__all__ = [
    "PartitionError",
    "out_of_place",
    "build_branch",
    "channel_axes",
    "halving_dim",
    "slice_batchnorm",
    "slice_conv",
    "slice_groupnorm",
    "slice_layernorm",
    "slice_linear",
    "slice_prelu",
    "unsupported_reason",
]


# --------------------------------------------------------------------------- op tables

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
)
# Per-channel ops that need the channel axis at dim 1 (they act on dims 2..).
_SPATIAL_MODULES = (
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
)
_ELEMENTWISE_FUNCTIONS = frozenset(
    {
        torch.relu,
        torch.relu_,
        F.relu,
        F.relu_,
        F.relu6,
        F.leaky_relu,
        F.leaky_relu_,
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.hardtanh_,
        F.elu,
        F.elu_,
        F.selu,
        F.celu,
        F.softplus,
        torch.sigmoid,
        torch.sigmoid_,
        F.sigmoid,
        torch.tanh,
        torch.tanh_,
        F.tanh,
        torch.clamp,
        torch.clamp_,
        torch.exp,
        torch.neg,
        operator.neg,
        F.dropout,
        F.alpha_dropout,
    }
)
_SPATIAL_FUNCTIONS = frozenset(
    {
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        F.interpolate,
    }
)
_BINARY_FUNCTIONS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
    }
)
_PERMUTE_FUNCTIONS = frozenset({torch.permute})

_ELEMENTWISE_METHODS = frozenset(
    {"relu", "sigmoid", "tanh", "clamp", "exp", "neg", "contiguous", "clone"}
)
_BINARY_METHODS = frozenset({"add", "sub", "mul", "div"})


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class _Value:
    """The channel space of a tensor and where its channel axis is."""

    space: int
    axis: int  # as given: 1 (channels first) or -1 (channels last), or after a permute
    ndim: int | None

    def axis_is(self, dim: int) -> bool:
        """Whether the channel axis is ``dim``; False when the rank is needed but unknown."""
        if (self.axis < 0) == (dim < 0):
            return self.axis == dim
        return self.ndim is not None and self.axis % self.ndim == dim % self.ndim


@dataclass
class _Partition:
    """Channel spaces of one branch and the slicing each module/parameter needs."""

    gm: GraphModule
    parent: list[int] = field(default_factory=list)
    widths: dict[int, int] = field(default_factory=dict)
    values: dict[Node, _Value] = field(default_factory=dict)
    # target -> (input space, output space) of each use
    modules: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # target -> (space, dim) of each use of a per-channel parameter
    attrs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # spaces that must stay inner, with the reason if they do not
    inner_only: list[tuple[int, str]] = field(default_factory=list)
    # spaces that may be sliced only if the group count is even
    group_counts: list[tuple[int, int]] = field(default_factory=list)
    mixers: int = 0
    constants: set[Node] = field(default_factory=set)
    # F.layer_norm nodes and the space they normalize
    normalized: list[tuple[Node, int]] = field(default_factory=list)
    reads: slice | None = None
    writes: slice | None = None
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

    def side(self, space: int) -> str | None:
        """``"in"`` for the input space, ``"out"`` for the output space, else None."""
        root = self.find(space)
        if root == self.find(self.inp):
            return "in"
        return "out" if root == self.find(self.out) else None

    def role(self, space: int) -> slice | None:
        """The slice kept by ops in ``space``: ``reads`` for IN, ``writes`` for OUT."""
        return {"in": self.reads, "out": self.writes, None: None}[self.side(space)]

    def is_constant(self, node: Node) -> bool:
        return node.op == "get_attr" or node in self.constants

    # ---- propagation

    @classmethod
    def analyze(
        cls,
        gm: GraphModule,
        block: ResidualBlock,
        branch: list[Node],
        pre_op: Node | None,
        channels_dim: int,
    ) -> _Partition:
        """Propagate channel spaces through ``[pre_op] + branch``.

        Pre: ``branch`` is closed (see ``_check_closed``). Post: ``inp``/``out``
        are the spaces of the branch input and output, distinct, of the same
        even width; raises PartitionError otherwise.
        """
        self = cls(gm, constants=_constants_of(branch))
        meta = block.fork.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        self.inp = self.new_space(None if shape is None else shape[channels_dim])
        start = _Value(self.inp, channels_dim, None if shape is None else len(shape))
        if pre_op is not None:
            self.values[_pre_op_input(pre_op)] = start
            self.step(pre_op)
            start = self.values[pre_op]
        self.values[block.fork] = start
        for position, node in enumerate(branch, start=1):
            if node in self.constants:  # operands of branch ops, checked there
                continue
            try:
                self.step(node)
            except PartitionError as error:
                error.progress = position
                raise
        self.out = self.values[block.branch_out].space
        try:
            self.finish()
        except PartitionError as error:
            error.progress = len(branch) + 1
            raise
        return self

    def step(self, node: Node) -> None:
        if node.op == "call_module":
            value = self.module_step(node, self.gm.get_submodule(node.target))
        elif node.op == "call_function":
            value = self.function_step(node)
        elif node.op == "call_method":
            value = self.method_step(node)
        else:
            value = None
        if value is None:
            raise PartitionError(f"unsupported op {op_name(node)} in branch")
        self.values[node] = value

    def source(self, node: Node) -> _Value:
        """The value of the one tensor argument of a unary op (its first argument)."""
        if not node.args or not isinstance(node.args[0], Node) or len(node.all_input_nodes) != 1:
            raise PartitionError(f"unsupported use of {op_name(node)} in branch")
        return self.values[node.args[0]]

    def require_axis(self, node: Node, value: _Value, dim: int) -> None:
        if not value.axis_is(dim):
            raise PartitionError(f"{op_name(node)} not applied to the channel dim")

    def module_step(self, node: Node, mod: nn.Module) -> _Value | None:
        target = str(node.target)
        if isinstance(mod, _CONVS):
            x = self.source(node)
            self.require_axis(node, x, 1)
            self.note_width(x.space, mod.in_channels)
            if mod.groups == 1:
                return self.mix(target, x, mod.out_channels)
            if mod.groups == mod.in_channels == mod.out_channels:  # depthwise
                return self.preserve(target, x)
            out = self.new_space(mod.out_channels)
            reason = f"grouped conv (groups={mod.groups}) at the branch boundary"
            self.inner_only += [(x.space, reason), (out, reason)]
            return _Value(out, x.axis, x.ndim)
        if isinstance(mod, nn.Linear):
            x = self.source(node)
            if x.ndim is None and x.axis == 1:  # rank unknown: channels-first Linear is (N, C)
                x = _Value(x.space, 1, 2)
            self.require_axis(node, x, -1)
            self.note_width(x.space, mod.in_features)
            return self.mix(target, x, mod.out_features)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.PReLU):
            x = self.source(node)
            if isinstance(mod, nn.PReLU) and mod.num_parameters == 1:
                return x
            self.require_axis(node, x, 1)
            if isinstance(mod, nn.GroupNorm):
                self.note_width(x.space, mod.num_channels)
                self.group_counts.append((x.space, mod.num_groups))
            else:
                width = mod.num_parameters if isinstance(mod, nn.PReLU) else mod.num_features
                self.note_width(x.space, width)
            return self.preserve(target, x)
        if isinstance(mod, nn.LayerNorm):
            x = self.source(node)
            if len(mod.normalized_shape) != 1:
                return None
            self.require_axis(node, x, -1)
            self.note_width(x.space, mod.normalized_shape[0])
            return self.preserve(target, x)
        if isinstance(mod, _SPATIAL_MODULES):
            x = self.source(node)
            self.require_axis(node, x, 1)
            return x
        if isinstance(mod, _ELEMENTWISE_MODULES) or (
            type(mod).__name__ in STOCHASTIC_DEPTH_CLASS_NAMES
        ):
            return self.source(node)
        if type(mod).__name__ == "Permute" and hasattr(mod, "dims"):
            return self.permute(self.source(node), mod.dims)
        return None

    def function_step(self, node: Node) -> _Value | None:
        fn = node.target
        if fn in _ELEMENTWISE_FUNCTIONS:
            return self.source(node)
        if fn is F.layer_norm:
            return self.layer_norm(node)
        if fn in _SPATIAL_FUNCTIONS:
            x = self.source(node)
            self.require_axis(node, x, 1)
            return x
        if fn in _BINARY_FUNCTIONS:
            return self.elementwise(node)
        if fn in _PERMUTE_FUNCTIONS:
            return self.permute(self.source(node), node.args[1])
        if _get_qualified_name(fn) in STOCHASTIC_DEPTH_FUNCTIONS:
            return self.source(node)
        return None

    def method_step(self, node: Node) -> _Value | None:
        name = method_base(str(node.target))
        if name in _ELEMENTWISE_METHODS:
            return self.source(node)
        if name in _BINARY_METHODS:
            return self.elementwise(node)
        if name == "permute":
            dims = node.args[1:]
            return self.permute(self.source(node), dims[0] if len(dims) == 1 else dims)
        return None

    def layer_norm(self, node: Node) -> _Value | None:
        """``F.layer_norm`` over the channel axis (timm's LayerNorm, LayerNorm2d):
        weight and bias are per-channel parameters; the normalized shape is
        rewritten when the channels are halved (``arguments``)."""
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        inp, shape = bound.get("input"), bound.get("normalized_shape")
        if not isinstance(inp, Node) or not isinstance(shape, list | tuple) or len(shape) != 1:
            return None
        x = self.values[inp]
        self.require_axis(node, x, -1)
        self.note_width(x.space, shape[0])
        for name in ("weight", "bias"):
            operand = bound.get(name)
            if isinstance(operand, Node):
                if not self.is_constant(operand):
                    return None
                self.channel_param(operand, x)
        self.normalized.append((node, x.space))
        return x

    def mix(self, target: str, x: _Value, out_width: int) -> _Value:
        out = self.new_space(out_width)
        self.modules.setdefault(target, []).append((x.space, out))
        self.mixers += 1
        return _Value(out, x.axis, x.ndim)

    def preserve(self, target: str, x: _Value) -> _Value:
        self.modules.setdefault(target, []).append((x.space, x.space))
        return x

    def permute(self, x: _Value, dims: Any) -> _Value | None:
        if not isinstance(dims, list | tuple) or not all(isinstance(d, int) for d in dims):
            return None
        ndim = len(dims)
        if x.ndim not in (None, ndim) or not -ndim <= x.axis < ndim:
            return None
        return _Value(x.space, [d % ndim for d in dims].index(x.axis % ndim), ndim)

    def elementwise(self, node: Node) -> _Value:
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
            first = _Value(self.union(first.space, other.space), first.axis, first.ndim)
        for operand in node.all_input_nodes:
            if self.is_constant(operand):
                self.channel_param(operand, first)
        return first

    def channel_param(self, operand: Node, x: _Value) -> None:
        """A parameter operand must be a scalar or a per-channel vector aligned with x.

        The operand is a parameter read by ``get_attr``, possibly reshaped with
        ``-1`` as its only non-singleton size (timm's ``gamma.reshape(1, -1,
        1, 1)``), so that slicing the parameter keeps the reshape valid.
        """
        attr = _reshaped_attr(operand)
        if attr is None:
            raise PartitionError(f"{op_name(operand)} of a parameter in branch")
        tensor = _fetch_attr(self.gm, str(attr.target))
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
        sides = {
            t: {tuple(map(self.side, use)) for use in uses} for t, uses in self.modules.items()
        }
        for target, uses in self.attrs.items():
            sides[target] = {(self.side(space), dim) for space, dim in uses}
        for target, seen in sides.items():
            if len(seen) > 1:
                raise PartitionError(f"{target} is shared by layers with different channel roles")

    # ---- rewriting

    def module(self, target: str, mod: nn.Module) -> nn.Module:
        """A sliced private copy of the module called as ``target``."""
        if target not in self.modules:
            return copy.deepcopy(mod)
        in_space, out_space = self.modules[target][0]
        in_sl = self.role(in_space)
        out_sl = self.role(out_space)
        # Copy the module around its own tensors, slice, then copy whatever the
        # slicing did not replace: each weight is copied once, at its final size.
        originals = {id(t): t for t in (*mod.parameters(), *mod.buffers())}
        new = copy.deepcopy(mod, dict(originals))
        if isinstance(new, _CONVS):
            new = slice_conv(new, in_sl, out_sl)
        elif isinstance(new, nn.Linear):
            new = slice_linear(new, in_sl, out_sl)
        elif in_sl is not None:
            new = _slice_preserving(new, in_sl)
        for owner in new.modules():
            for tensors in (owner._parameters, owner._buffers):
                for name, tensor in tensors.items():
                    if tensor is not None and id(tensor) in originals:
                        tensors[name] = _fresh(tensor, tensor)
        return new

    def arguments(self, node: Node, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """``node``'s arguments with a halved ``F.layer_norm`` normalized shape."""
        for normalized, space in self.normalized:
            sl = self.role(space)
            if normalized is node and sl is not None:
                width = len(range(self.widths[self.find(space)])[sl])
                if len(args) > 1:
                    return (args[0], (width,), *args[2:]), kwargs
                return args, {**kwargs, "normalized_shape": (width,)}
        return args, kwargs

    def attr(self, target: str, tensor: torch.Tensor) -> torch.Tensor:
        """A (sliced) private copy of a parameter read by ``get_attr``."""
        if target not in self.attrs:
            return _fresh(tensor, tensor)
        space, dim = self.attrs[target][0]
        sl = self.role(space)
        return _fresh(tensor, tensor if sl is None else _take(tensor, dim, sl))


# --------------------------------------------------------------------------- per-layer rewrites


def _take(tensor: torch.Tensor, dim: int, index: slice) -> torch.Tensor:
    return tensor.narrow(dim, *_bounds(index, tensor.shape[dim]))


def _bounds(index: slice, size: int) -> tuple[int, int]:
    """(start, length) of a contiguous slice of ``range(size)``."""
    kept = range(size)[index]
    if kept.step != 1 or not kept:
        raise ValueError(f"channel slice {index} must be contiguous and non-empty")
    return kept.start, len(kept)


def _fresh(like: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """A new tensor holding a copy of ``data``, a Parameter if ``like`` is one."""
    data = data.detach().clone()
    if isinstance(like, nn.Parameter):
        return nn.Parameter(data, requires_grad=like.requires_grad)
    return data


def _slice_tensors(module: nn.Module, names: tuple[str, ...], dim: int, index: slice) -> None:
    """Replace the named parameters/buffers of ``module`` by copies of their slice."""
    for name in names:
        old = getattr(module, name, None)
        if isinstance(old, torch.Tensor) and old.dim() > dim:
            if name in module._parameters:
                module._parameters[name] = _fresh(old, _take(old, dim, index))
            else:
                module._buffers[name] = _take(old, dim, index).clone()


def slice_conv(conv: nn.Conv2d, in_sl: slice | None, out_sl: slice | None) -> nn.Conv2d:
    """Keep input channels ``in_sl`` and output channels ``out_sl`` of a conv copy.

    Pre: ``conv`` is a private copy, ``groups == 1`` or depthwise
    (``groups == in == out``, then ``in_sl == out_sl``). Post: the same object,
    its weight/bias fresh Parameters, channel counts and groups updated.
    """
    if conv.groups > 1:  # depthwise: one slice for input, output and groups
        index = in_sl if in_sl is not None else out_sl
        if index is not None:
            _slice_tensors(conv, ("weight", "bias"), 0, index)
            conv.in_channels = conv.out_channels = conv.groups = conv.weight.shape[0]
        return conv
    if in_sl is not None:
        _slice_tensors(conv, ("weight",), 1, in_sl)
        conv.in_channels = conv.weight.shape[1]
    if out_sl is not None:
        _slice_tensors(conv, ("weight", "bias"), 0, out_sl)
        conv.out_channels = conv.weight.shape[0]
    return conv


def slice_linear(linear: nn.Linear, in_sl: slice | None, out_sl: slice | None) -> nn.Linear:
    """Keep input features ``in_sl`` and output features ``out_sl`` of a Linear copy.

    Pre: ``linear`` is a private copy. Post: the same object, features updated.
    """
    if in_sl is not None:
        _slice_tensors(linear, ("weight",), 1, in_sl)
        linear.in_features = linear.weight.shape[1]
    if out_sl is not None:
        _slice_tensors(linear, ("weight", "bias"), 0, out_sl)
        linear.out_features = linear.weight.shape[0]
    return linear


def slice_batchnorm(bn: nn.modules.batchnorm._BatchNorm, index: slice) -> nn.Module:
    """Keep channels ``index`` of a BatchNorm copy (affine params and running stats).

    Pre: ``bn`` is a private copy. Post: ``num_features`` updated;
    ``num_batches_tracked``, momentum and eps kept.
    """
    _slice_tensors(bn, ("weight", "bias", "running_mean", "running_var"), 0, index)
    bn.num_features = len(range(bn.num_features)[index])
    return bn


def slice_groupnorm(gn: nn.GroupNorm, index: slice) -> nn.GroupNorm:
    """Keep channels ``index`` of a GroupNorm copy, with the groups covering them.

    Pre: ``index`` is a union of whole groups (an even group count and a half).
    Post: ``num_groups`` and ``num_channels`` scaled by the kept fraction, so
    every kept group normalizes exactly the channels it did before.
    """
    per_group = gn.num_channels // gn.num_groups
    kept = len(range(gn.num_channels)[index])
    if kept % per_group or range(gn.num_channels)[index].start % per_group:
        raise PartitionError("GroupNorm with odd group count")
    _slice_tensors(gn, ("weight", "bias"), 0, index)
    gn.num_channels, gn.num_groups = kept, kept // per_group
    return gn


def slice_layernorm(ln: nn.LayerNorm, index: slice) -> nn.LayerNorm:
    """Keep channels ``index`` of a LayerNorm copy normalizing over the channel axis.

    Pre: ``len(ln.normalized_shape) == 1``. Post: statistics are taken over the
    kept channels only (the one op whose output changes beyond restriction).
    """
    _slice_tensors(ln, ("weight", "bias"), 0, index)
    ln.normalized_shape = (len(range(ln.normalized_shape[0])[index]),)
    return ln


def slice_prelu(prelu: nn.PReLU, index: slice) -> nn.PReLU:
    """Keep channels ``index`` of a per-channel PReLU copy."""
    _slice_tensors(prelu, ("weight",), 0, index)
    prelu.num_parameters = prelu.weight.shape[0]
    return prelu


def _slice_preserving(mod: nn.Module, index: slice) -> nn.Module:
    """Dispatch a channel-preserving module with parameters to its rewrite."""
    if isinstance(mod, _CONVS):
        return slice_conv(mod, index, index)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return slice_batchnorm(mod, index)
    if isinstance(mod, nn.GroupNorm):
        return slice_groupnorm(mod, index)
    if isinstance(mod, nn.LayerNorm):
        return slice_layernorm(mod, index)
    return slice_prelu(mod, index)


# --------------------------------------------------------------------------- graph helpers


def _fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for name in target.split("."):
        obj = getattr(obj, name)
    return obj


def _branch_nodes(gm: GraphModule, block: ResidualBlock) -> list[Node]:
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

    found_set: set[Node] = set()
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in outside and arg not in nodes:
                visit(arg)
    return found


def _constants_of(branch: list[Node]) -> set[Node]:
    """The nodes of ``branch`` (in graph order) computed from parameters alone."""
    constants: set[Node] = set()
    for node in branch:
        if all(arg.op == "get_attr" or arg in constants for arg in node.all_input_nodes):
            constants.add(node)
    return constants


def _reshaped_attr(node: Node) -> Node | None:
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


def _pre_op_input(pre_op: Node) -> Node:
    """The one tensor a pre-op (a moved post-op) applies to."""
    tensors = [arg for arg in pre_op.all_input_nodes if arg.op != "get_attr"]
    if len(tensors) != 1:
        raise PartitionError(f"post-op {pre_op.name} cannot move into the branch")
    return tensors[0]


def _check_closed(block: ResidualBlock, branch: list[Node], pre_op: Node | None) -> None:
    """Raise unless the branch reads only its input, its own nodes and parameters."""
    if pre_op is not None:
        _pre_op_input(pre_op)
    inside = {block.fork, *branch}
    for node in branch:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr":
                raise PartitionError(f"branch reads {arg.name} from outside the block")


# --------------------------------------------------------------------------- public API


def unsupported_reason(
    gm: GraphModule, block: ResidualBlock, *, channels_dim: int | None = None
) -> str | None:
    """Why the branch of ``block`` cannot become a C/2 -> C/2 function, or None.

    ``channels_dim=None`` accepts any channel axis ``halving_dim`` may find.
    Pre: ``block`` was computed on ``gm``'s graph. The reason is short and is
    reported verbatim after ``"kept: "``. Cheap (no tensors touched beyond
    reading parameter shapes): about 0.2 ms for a bottleneck block.
    """
    try:
        halving_dim(gm, block, axes=None if channels_dim is None else (channels_dim,))
    except PartitionError as error:
        return error.reason
    return None


def halving_dim(
    gm: GraphModule, block: ResidualBlock, *, axes: tuple[int, ...] | None = None
) -> int:
    """The channel axis of the trunk along which ``block``'s branch can be halved.

    ``axes`` are tried in order; by default they follow the fork's rank (from
    ``tensor_meta``): tokens ``(B, T, C)`` try -1 then 1, 4-d and 5-d tensors 1
    (NCHW) then -1 (channels-last, as in Swin), others and unknown shapes 1.
    Raises PartitionError when no axis works, with the reason of the reading
    that got furthest through the branch (the first one on a tie).
    """
    branch = _branch_nodes(gm, block)
    _check_closed(block, branch, None)
    failures: list[PartitionError] = []
    for axis in axes or channel_axes(block.fork):
        try:
            _Partition.analyze(gm, block, branch, None, axis)
        except PartitionError as error:
            failures.append(error)
            continue
        return axis
    raise max(failures, key=lambda error: error.progress)


def channel_axes(fork: Node) -> tuple[int, ...]:
    """The channel axes of the trunk at ``fork`` to try, most likely first."""
    shape = getattr(fork.meta.get("tensor_meta"), "shape", None)
    rank = None if shape is None else len(shape)
    if rank == 3:
        return (-1, 1)
    if rank is not None and rank >= 4:
        return (1, -1)
    return (1,)


def build_branch(
    gm: GraphModule,
    block: ResidualBlock,
    *,
    pre_op: Node | None,
    reads: slice | None,
    writes: slice | None,
    channels_dim: int = 1,
) -> GraphModule:
    """A standalone GraphModule computing ``block``'s branch from one input tensor.

    The placeholder ``x`` replaces ``block.fork``; ``pre_op`` (a post-op of the
    previous block, with one tensor input) is applied to ``x`` first; the
    output is the value of ``block.branch_out``.

    ``reads``/``writes`` (both or neither): the channels of the branch input it
    keeps and of the branch output it produces (F: ``slice(C//2, C)`` and
    ``slice(0, C//2)``; G the other way round). Weights are sliced by the
    channel-role propagation of the module docstring. With both None the branch
    is copied at full width (two-stream "duplicate" mode, no channel analysis).

    Post: the result shares no parameter or buffer with ``gm`` (modules are
    deep copies, sliced tensors fresh Parameters/buffers); every in-place op is
    out-of-place, so the input is never written; submodules keep their
    qualified names (``layer1.1.conv1``). ``gm`` is not modified.
    Raises PartitionError (with the reason ``unsupported_reason`` gives) when
    slicing is asked for and the branch does not support it, or when the
    branch reads a value from outside the block.
    """
    if (reads is None) != (writes is None):
        raise ValueError("reads and writes must both be slices or both None")
    branch = _branch_nodes(gm, block)
    _check_closed(block, branch, pre_op)
    plan = None
    if reads is not None and writes is not None:
        plan = _Partition.analyze(gm, block, branch, pre_op, channels_dim)
        plan.reads, plan.writes = reads, writes

    graph = Graph()
    attrs: dict[str, Any] = {}
    env: dict[Node, Node] = {}

    def copy_attr(target: str) -> Any:
        value = _fetch_attr(gm, target)
        if not isinstance(value, torch.Tensor):
            return copy.deepcopy(value)
        return _fresh(value, value) if plan is None else plan.attr(target, value)

    def copy_module(target: str) -> nn.Module:
        mod = gm.get_submodule(target)
        new = copy.deepcopy(mod) if plan is None else plan.module(target, mod)
        if hasattr(new, "inplace"):
            new.inplace = False
        return new

    def copy_node(node: Node) -> Node:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.get_attr(str(arg.target))
                attrs[str(arg.target)] = copy_attr(str(arg.target))
        target, args, kwargs, inplace = out_of_place(node, gm)
        if plan is not None:
            args, kwargs = plan.arguments(node, args, kwargs)
        new_args, new_kwargs = map_arg((args, kwargs), env.__getitem__)
        name = node.name if target == node.target else None  # renamed: relu_ -> relu
        new = graph.create_node(node.op, target, new_args, new_kwargs, name, node.type)
        new.meta = dict(node.meta)
        if plan is not None:  # shapes changed
            new.meta.pop("tensor_meta", None)
            new.meta.pop("val", None)
        if inplace and isinstance(args[0], Node):  # later readers see the written value
            env[args[0]] = new
        if node.op == "call_module" and node.target not in attrs:
            attrs[str(node.target)] = copy_module(str(node.target))
        return new

    env[block.fork] = graph.placeholder("x")
    if pre_op is not None:
        env[_pre_op_input(pre_op)] = env.pop(block.fork)
        env[block.fork] = copy_node(pre_op)
    for node in branch:
        env[node] = copy_node(node)
    graph.output(env[block.branch_out])
    result = GraphModule(attrs, graph, class_name="Branch")
    result.training = gm.training
    return result
