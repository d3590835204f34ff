"""One rule per layer type: how it moves channel spaces and how it is sliced.

A ``Rule`` pairs ``propagate(analysis, node, module)`` (the channel space of
the node's output, from the spaces of its inputs; None when the op is not
supported the way it is used) with ``cut(module, in_sl, out_sl)`` (a private
copy of a module with parameters kept slice it, for modules only). Rules live in
one registry keyed by module class (matched along the MRO, or by class name
for classes of optional libraries), by function (or its qualified name) and by
method name, in the style of Torch-Pruning's ``pruner/function.py``. Adding a
layer type means registering one rule here.

The activation sets come from ``revcompile.passes.ops`` (the vocabulary
``find_residuals`` uses for post-ops), so every post-op it records has a rule.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from revcompile.passes.ops import (
    ACTIVATION_NAMES,
    NOT_ELEMENTWISE,
    SPATIAL_MODULES,
    STOCHASTIC_DEPTH_CLASS_NAMES,
    STOCHASTIC_DEPTH_FUNCTIONS,
    method_base,
)
from revcompile.passes.partition.slicing import (
    slice_batchnorm,
    slice_conv,
    slice_groupnorm,
    slice_layernorm,
    slice_linear,
    slice_prelu,
)
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import _get_qualified_name

if TYPE_CHECKING:
    from revcompile.passes.partition.analysis import Analysis


@dataclass(frozen=True)
class Value:
    """The channel space of a tensor and where its channel axis is.

    A reduction over the channel axis gives a *channel-less* value (``space``
    None): one number per sample and position, which element-wise ops
    broadcast against channels without merging spaces. Its ``axis`` is a dim
    known to have size 1 (the remnant of the channel axis with
    ``keepdim=True``, or a dim ``unsqueeze`` added), or None.
    """

    space: int | None
    axis: int | None  # as given: 1 (channels first) or -1 (channels last), or moved since
    ndim: int | None

    @property
    def channelless(self) -> bool:
        return self.space is None

    def axis_is(self, dim: int) -> bool:
        """Whether the channel axis is ``dim``; False when the rank is needed but unknown."""
        if self.axis is None:
            return False
        if (self.axis < 0) == (dim < 0):
            return self.axis == dim
        return self.ndim is not None and self.axis % self.ndim == dim % self.ndim

    def from_right(self) -> int | None:
        """The channel axis (or its remnant) counted from the last dim (-1), if known."""
        if self.axis is None or self.axis < 0:
            return self.axis
        return None if self.ndim is None else self.axis - self.ndim


@dataclass(frozen=True)
class Size:
    """A shape read in the branch: ``x.shape`` (``index`` None) or one of its sizes."""

    of: Value
    index: int | None = None

    def may_be_channel_count(self) -> bool:
        """Whether this size is, or at an unknown rank may be, the channel count
        (which halving changes). Pre: ``index`` is not None."""
        assert self.index is not None
        if self.of.axis is None:  # channel-less without a remnant
            return False
        if self.of.ndim is None and (self.index < 0) != (self.of.axis < 0):
            return True
        return self.of.axis_is(self.index)


Propagate = Callable[["Analysis", Node, Any], "Value | Size | None"]
Cut = Callable[[nn.Module, "slice | None", "slice | None"], nn.Module]


@dataclass(frozen=True)
class Rule:
    """How one layer type moves channel spaces (``propagate``) and, for modules
    with per-channel tensors, how a copy keeps a slice of them (``cut``)."""

    propagate: Propagate
    cut: Cut | None = None


MODULES: dict[type | str, Rule] = {}
FUNCTIONS: dict[Callable[..., Any] | str, Rule] = {}
METHODS: dict[str, Rule] = {}


def register(
    registry: dict[Any, Rule], *keys: Any, cut: Cut | None = None
) -> Callable[[Propagate], Propagate]:
    """Register ``propagate`` (the decorated function) and ``cut`` for ``keys``."""

    def add(propagate: Propagate) -> Propagate:
        for key in keys:
            registry[key] = Rule(propagate, cut)
        return propagate

    return add


def module_rule(mod: nn.Module) -> Rule | None:
    """The rule of a module: by class along its MRO, then by class name."""
    for cls in type(mod).__mro__:
        if cls in MODULES:
            return MODULES[cls]
    return MODULES.get(type(mod).__name__)


def rule_for(node: Node, gm: GraphModule) -> Rule | None:
    """The rule of an fx node, or None when no rule knows the op."""
    if node.op == "call_module":
        return module_rule(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        rule = FUNCTIONS.get(node.target)
        return rule if rule is not None else FUNCTIONS.get(_get_qualified_name(node.target))
    if node.op == "call_method":
        return METHODS.get(method_base(str(node.target)))
    return None


def _per_channel(cut: Callable[[Any, slice], nn.Module]) -> Cut:
    """A cut for a channel-preserving module: one slice for input and output."""

    def cut_both(mod: nn.Module, in_sl: slice | None, out_sl: slice | None) -> nn.Module:
        index = in_sl if in_sl is not None else out_sl
        return mod if index is None else cut(mod, index)

    return cut_both


# --------------------------------------------------------------------------- vocabulary

ELEMENTWISE_ACTIVATIONS = ACTIVATION_NAMES - NOT_ELEMENTWISE - {"prelu"}
"""Activations applied element by element without parameters (PReLU has its own rule)."""


def _activation_modules() -> list[type]:
    return [
        cls
        for cls in vars(nn.modules.activation).values()
        if isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and cls.__name__.lower() in ELEMENTWISE_ACTIVATIONS
    ]


def _activation_functions() -> list[Callable[..., Any]]:
    found = []
    for name in sorted(ELEMENTWISE_ACTIVATIONS):
        for namespace in (torch, F):
            for spelling in (name, f"{name}_"):
                fn = getattr(namespace, spelling, None)
                if callable(fn) and fn not in found:
                    found.append(fn)
    return found


# --------------------------------------------------------------------------- rules


@register(MODULES, nn.Conv1d, nn.Conv2d, nn.Conv3d, cut=slice_conv)
def _conv(a: Analysis, node: Node, mod: nn.Conv2d) -> Value | None:
    x = a.source(node)
    if _along_channels(x, mod):  # copied whole: its weights index no channels
        return x
    a.require_axis(node, x, 1)
    a.note_width(x.space, mod.in_channels)
    if mod.groups == 1:
        return a.mix(str(node.target), x, mod.out_channels)
    if mod.groups == mod.in_channels == mod.out_channels:  # depthwise
        return a.preserve(str(node.target), x)
    reason = f"grouped conv (groups={mod.groups}) at the branch boundary"
    return a.opaque(x, mod.out_channels, reason)


def _along_channels(x: Value, mod: nn.Module) -> bool:
    """Whether ``mod`` is a one-channel Conv1d over ``x``'s channel axis as its length,
    keeping the length (timm's ECA, after ``.view(N, 1, -1)``). It keeps the space;
    halved at the branch boundary it runs over the kept half, zero-padded at its ends."""
    if not isinstance(mod, nn.Conv1d) or x.channelless or x.ndim != 3 or not x.axis_is(-1):
        return False
    span = mod.dilation[0] * (mod.kernel_size[0] - 1)
    same = mod.padding == "same" or isinstance(mod.padding, tuple) and 2 * mod.padding[0] == span
    return mod.in_channels == mod.out_channels == 1 and mod.stride == (1,) and same


@register(MODULES, nn.Linear, cut=slice_linear)
def _linear(a: Analysis, node: Node, mod: nn.Linear) -> Value | None:
    x = a.source(node)
    if x.ndim is None and x.axis == 1:  # rank unknown: channels-first Linear is (N, C)
        x = Value(x.space, 1, 2)
    a.require_axis(node, x, -1)
    a.note_width(x.space, mod.in_features)
    return a.mix(str(node.target), x, mod.out_features)


def _channel_norm(width: Callable[[Any], int]) -> Propagate:
    """A per-channel module on the channel axis at dim 1 with ``width(mod)`` channels."""

    def propagate(a: Analysis, node: Node, mod: Any) -> Value | None:
        x = a.source(node)
        a.require_axis(node, x, 1)
        a.note_width(x.space, width(mod))
        return a.preserve(str(node.target), x)

    return propagate


register(MODULES, nn.modules.batchnorm._BatchNorm, cut=_per_channel(slice_batchnorm))(
    _channel_norm(lambda mod: mod.num_features)
)
# torchvision's detection backbones: per-channel buffers, no num_features attribute.
register(MODULES, "FrozenBatchNorm2d", cut=_per_channel(slice_batchnorm))(
    _channel_norm(lambda mod: mod.weight.shape[0])
)


@register(MODULES, nn.GroupNorm, cut=_per_channel(slice_groupnorm))
def _groupnorm(a: Analysis, node: Node, mod: nn.GroupNorm) -> Value | None:
    value = _channel_norm(lambda m: m.num_channels)(a, node, mod)
    a.group_counts.append((value.space, mod.num_groups))
    return value


@register(MODULES, nn.PReLU, cut=_per_channel(slice_prelu))
def _prelu(a: Analysis, node: Node, mod: nn.PReLU) -> Value | None:
    if mod.num_parameters == 1:  # one shared slope: nothing to slice
        return a.source(node)
    return _channel_norm(lambda m: m.num_parameters)(a, node, mod)


@register(MODULES, nn.LayerNorm, cut=_per_channel(slice_layernorm))
def _layernorm(a: Analysis, node: Node, mod: nn.LayerNorm) -> Value | None:
    x = a.source(node)
    if len(mod.normalized_shape) != 1:
        return None
    a.require_axis(node, x, -1)
    a.note_width(x.space, mod.normalized_shape[0])
    return a.preserve(str(node.target), x)


def bind(node: Node, names: tuple[str, ...]) -> dict[str, Any]:
    """The arguments of a call_function/call_method node by parameter name."""
    return dict(zip(names, node.args)) | dict(node.kwargs)


def _functional_norm(a: Analysis, node: Node, bound: dict[str, Any], dim: int) -> Value | None:
    """A functional norm of ``bound["input"]`` over channel axis ``dim`` whose optional
    ``weight`` and ``bias`` are per-channel parameters; recorded in ``normalized`` so
    that emit rewrites its size argument when the channels are halved."""
    inp = bound.get("input")
    if not isinstance(inp, Node):
        return None
    x = a.tensor(inp, node)
    a.require_axis(node, x, dim)
    for name in ("weight", "bias"):
        operand = bound.get(name)
        if isinstance(operand, Node):
            if not a.is_constant(operand):
                return None
            a.channel_param(operand, x, indexed=True)
    a.normalized.append((node, x.space))
    return x


@register(FUNCTIONS, F.layer_norm)
def _layer_norm_function(a: Analysis, node: Node, _: None) -> Value | None:
    """``F.layer_norm`` over the channel axis (timm's LayerNorm, LayerNorm2d):
    the normalized shape is rewritten when the channels are halved."""
    bound = bind(node, ("input", "normalized_shape", "weight", "bias", "eps"))
    shape = bound.get("normalized_shape")
    if not isinstance(shape, list | tuple) or len(shape) != 1:
        return None
    x = _functional_norm(a, node, bound, -1)
    if x is not None:
        a.note_width(x.space, shape[0])
    return x


@register(FUNCTIONS, F.group_norm)
def _group_norm_function(a: Analysis, node: Node, _: None) -> Value | None:
    """``F.group_norm`` on channels-first input (timm's GroupNorm1, GroupNorm): the
    group count must split into halves (even, or one group), and is rewritten when
    the channels are halved."""
    bound = bind(node, ("input", "num_groups", "weight", "bias", "eps"))
    groups = bound.get("num_groups")
    if not isinstance(groups, int):
        return None
    x = _functional_norm(a, node, bound, 1)
    if x is not None:
        a.group_counts.append((x.space, groups))
    return x


@register(FUNCTIONS, torch.unsqueeze)
@register(METHODS, "unsqueeze")
def _unsqueeze(a: Analysis, node: Node, _: None) -> Value | None:
    bound = bind(node, ("input", "dim"))
    return a.unsqueeze(node, a.source(node), bound.get("dim"))


def _reduction(params: tuple[str, ...]) -> Propagate:
    """A reduction whose parameters after the input are ``params``: over ``dim``
    (every dim when absent) with ``keepdim``, see ``Analysis.reduce``; ``axis=`` is
    torch's alias of ``dim``."""

    def propagate(a: Analysis, node: Node, _: None) -> Value | None:
        bound = bind(node, ("input", *params))
        dim = bound.get("dim", bound.get("axis"))
        return a.reduce(node, a.source(node), dim, bound.get("keepdim", False))

    return propagate


def _unary(a: Analysis, node: Node, _: Any) -> Value | None:
    """Element-wise (or per-sample) ops: the space of their one tensor input."""
    return a.source(node)


def _spatial(a: Analysis, node: Node, _: Any) -> Value | None:
    """Per-channel ops acting on dims 2.. (pools, Dropout2d): the channel axis is dim 1."""
    x = a.source(node)
    a.require_axis(node, x, 1)
    return x


def _binary(a: Analysis, node: Node, _: Any) -> Value | None:
    return a.elementwise(node)


register(
    MODULES,
    *_activation_modules(),
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
    *STOCHASTIC_DEPTH_CLASS_NAMES,
)(_unary)
register(
    FUNCTIONS,
    *_activation_functions(),
    torch.clamp,
    torch.clamp_,
    torch.exp,
    torch.neg,
    operator.neg,
    F.dropout,
    F.alpha_dropout,
    *STOCHASTIC_DEPTH_FUNCTIONS,
)(_unary)
register(
    METHODS,
    *(name for name in ELEMENTWISE_ACTIVATIONS if hasattr(torch.Tensor, name)),
    "clamp",
    "exp",
    "neg",
    "contiguous",
    "clone",
)(_unary)
register(
    MODULES,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    *SPATIAL_MODULES,
)(_spatial)
register(
    FUNCTIONS,
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
)(_spatial)
register(
    FUNCTIONS,
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
)(_binary)
register(METHODS, "add", "sub", "mul", "div")(_binary)
# addcmul(input, t1, t2, value=v) = input + v * t1 * t2 (timm's GRN); addcdiv likewise
register(FUNCTIONS, torch.addcmul, torch.addcdiv)(_binary)
register(METHODS, "addcmul", "addcdiv")(_binary)
# y.expand_as(x) broadcasts y to x's shape: their channels line up as in y * x
register(METHODS, "expand_as")(_binary)
register(FUNCTIONS, torch.mean, torch.sum, torch.amax, torch.amin)(_reduction(("dim", "keepdim")))
register(METHODS, "mean", "sum", "amax", "amin")(_reduction(("dim", "keepdim")))
register(FUNCTIONS, torch.norm)(_reduction(("p", "dim", "keepdim")))
register(METHODS, "norm")(_reduction(("p", "dim", "keepdim")))
register(FUNCTIONS, torch.linalg.vector_norm)(_reduction(("ord", "dim", "keepdim")))


@register(FUNCTIONS, torch.permute)
def _permute_function(a: Analysis, node: Node, _: None) -> Value | None:
    return a.permute(a.source(node), node.args[1])


@register(METHODS, "permute")
def _permute_method(a: Analysis, node: Node, _: None) -> Value | None:
    dims = node.args[1:]
    return a.permute(a.source(node), dims[0] if len(dims) == 1 else dims)


@register(MODULES, "Permute")  # torchvision.ops.misc.Permute
def _permute_module(a: Analysis, node: Node, mod: Any) -> Value | None:
    dims = getattr(mod, "dims", None)
    return None if dims is None else a.permute(a.source(node), dims)
