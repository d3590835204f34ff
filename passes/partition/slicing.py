"""Per-layer slicing: keep a contiguous range of channels of a module copy.

Each function takes a private copy of a module and replaces its parameters
and buffers by fresh copies of their slice, as Torch-Pruning's
``pruner/function.py`` does for pruning; channel counts and group counts are
updated so the module's forward works at the new width.
"""

from __future__ import annotations

import torch
from torch import nn

from revcompile.errors import PartitionError


def take(tensor: torch.Tensor, dim: int, index: slice) -> torch.Tensor:
    """The contiguous slice ``index`` of ``tensor`` along ``dim`` (a view)."""
    return tensor.narrow(dim, *_bounds(index, tensor.shape[dim]))


def _bounds(index: slice, size: int) -> tuple[int, int]:
    """(start, length) of a contiguous slice of ``range(size)``."""
    kept = range(size)[index]
    if kept.step != 1 or not kept:
        raise ValueError(f"channel slice {index} must be contiguous and non-empty")
    return kept.start, len(kept)


def kept_count(size: int, index: slice) -> int:
    """How many of ``size`` channels ``index`` keeps."""
    return len(range(size)[index])


def fresh(like: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """A new tensor holding a copy of ``data``, a Parameter if ``like`` is one."""
    data = data.detach().clone()
    if isinstance(like, nn.Parameter):
        return nn.Parameter(data, requires_grad=like.requires_grad)
    return data


def slice_tensors(module: nn.Module, names: tuple[str, ...], dim: int, index: slice) -> None:
    """Replace the named parameters/buffers of ``module`` by copies of their slice."""
    for name in names:
        old = module._parameters.get(name, module._buffers.get(name))
        if isinstance(old, torch.Tensor) and old.dim() > dim:
            if name in module._parameters:
                module._parameters[name] = fresh(old, take(old, dim, index))
            else:
                module._buffers[name] = take(old, dim, index).clone()


def _slice_mixing(
    layer: nn.Module, in_sl: slice | None, out_sl: slice | None, counts: tuple[str, str]
) -> None:
    """Keep inputs ``in_sl`` (weight dim 1) and outputs ``out_sl`` (weight and bias
    dim 0) of a channel-mixing layer copy; ``counts`` names its size attributes."""
    if in_sl is not None:
        slice_tensors(layer, ("weight",), 1, in_sl)
        setattr(layer, counts[0], layer.weight.shape[1])
    if out_sl is not None:
        slice_tensors(layer, ("weight", "bias"), 0, out_sl)
        setattr(layer, counts[1], layer.weight.shape[0])


def slice_conv(conv: nn.Conv2d, in_sl: slice | None, out_sl: slice | None) -> nn.Conv2d:
    """Keep input channels ``in_sl`` and output channels ``out_sl`` of a conv copy.

    Pre: ``conv`` is a private copy, ``groups == 1`` or depthwise
    (``groups == in == out``, then ``in_sl == out_sl``). Post: the same object,
    its weight/bias fresh Parameters, channel counts and groups updated.
    """
    if conv.groups > 1:  # depthwise: one slice for input, output and groups
        index = in_sl if in_sl is not None else out_sl
        if index is not None:
            slice_tensors(conv, ("weight", "bias"), 0, index)
            conv.in_channels = conv.out_channels = conv.groups = conv.weight.shape[0]
        return conv
    _slice_mixing(conv, in_sl, out_sl, ("in_channels", "out_channels"))
    return conv


def slice_linear(linear: nn.Linear, in_sl: slice | None, out_sl: slice | None) -> nn.Linear:
    """Keep input features ``in_sl`` and output features ``out_sl`` of a Linear copy.

    Pre: ``linear`` is a private copy. Post: the same object, features updated.
    """
    _slice_mixing(linear, in_sl, out_sl, ("in_features", "out_features"))
    return linear


def slice_batchnorm(bn: nn.Module, index: slice) -> nn.Module:
    """Keep channels ``index`` of a BatchNorm (or FrozenBatchNorm2d) copy: affine
    parameters and running statistics.

    Pre: ``bn`` is a private copy. Post: ``num_features`` updated where the
    class has it; ``num_batches_tracked``, momentum and eps kept.
    """
    slice_tensors(bn, ("weight", "bias", "running_mean", "running_var"), 0, index)
    if hasattr(bn, "num_features"):
        bn.num_features = kept_count(bn.num_features, index)
    return bn


def slice_groupnorm(gn: nn.GroupNorm, index: slice) -> nn.GroupNorm:
    """Keep channels ``index`` of a GroupNorm copy, with the groups covering them.

    Pre: ``index`` is a union of whole groups (an even group count and a half),
    or there is one group. Post: ``num_channels`` is the kept count; with
    several groups ``num_groups`` is scaled by the kept fraction, so every kept
    group normalizes exactly the channels it did before; one group stays one,
    normalizing over the kept channels (as LayerNorm over the channel axis).
    """
    kept = kept_count(gn.num_channels, index)
    gn.num_groups = kept_groups(gn.num_groups, gn.num_channels, index)
    slice_tensors(gn, ("weight", "bias"), 0, index)
    gn.num_channels = kept
    return gn


def kept_groups(groups: int, channels: int, index: slice) -> int:
    """The group count of a group norm of ``channels`` in ``groups`` that keeps ``index``.

    Raises PartitionError unless ``index`` is a union of whole groups or ``groups == 1``.
    """
    if groups == 1:
        return 1
    per_group = channels // groups
    kept = kept_count(channels, index)
    if kept % per_group or range(channels)[index].start % per_group:
        raise PartitionError("GroupNorm with odd group count")
    return kept // per_group


def slice_layernorm(ln: nn.LayerNorm, index: slice) -> nn.LayerNorm:
    """Keep channels ``index`` of a LayerNorm copy normalizing over the channel axis.

    Pre: ``len(ln.normalized_shape) == 1``. Post: statistics are taken over the
    kept channels only (the one op whose output changes beyond restriction).
    """
    slice_tensors(ln, ("weight", "bias"), 0, index)
    ln.normalized_shape = (kept_count(ln.normalized_shape[0], index),)
    return ln


def slice_prelu(prelu: nn.PReLU, index: slice) -> nn.PReLU:
    """Keep channels ``index`` of a per-channel PReLU copy."""
    slice_tensors(prelu, ("weight",), 0, index)
    prelu.num_parameters = prelu.weight.shape[0]
    return prelu
