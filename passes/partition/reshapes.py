"""Rules for shape reads and reshapes of branch tensors (registered in ``rules``).

timm's ECA gate is ``x.mean((2, 3)).view(x.shape[0], 1, -1)``, a one-channel
Conv1d along the channels, then ``.view(x.shape[0], -1, 1, 1)``. Reading a
size other than the channel count (``x.shape[0]``) gives the same number at
any width; a reshape that keeps the channel dim whole, written ``-1`` (the
other sizes fixed or read that way), is valid at half width too. Reading the
channel count itself is refused: what the branch computes from it (a head
size, a scale) would silently change with halving.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from revcompile.passes.ops import op_name
from revcompile.passes.partition.rules import FUNCTIONS, METHODS, Size, Value, bind, register
from torch.fx import Node

from revcompile.errors import PartitionError

if TYPE_CHECKING:
    from revcompile.passes.partition.analysis import Analysis


@register(FUNCTIONS, getattr)
def _getattr(a: Analysis, node: Node, _: None) -> Size | None:
    if len(node.args) != 2 or node.args[1] != "shape" or not isinstance(node.args[0], Node):
        return None
    return Size(a.tensor(node.args[0], node))


@register(METHODS, "size")
def _size(a: Analysis, node: Node, _: None) -> Size | None:
    dim = bind(node, ("input", "dim")).get("dim")
    if dim is not None and not isinstance(dim, int):
        return None
    return Size(a.source(node), dim)


@register(FUNCTIONS, operator.getitem)
def _getitem(a: Analysis, node: Node, _: None) -> Size | None:
    """One size of a shape read (``x.shape[0]``); indexing tensors is not supported."""
    seq, index = node.args
    shape = a.values.get(seq) if isinstance(seq, Node) else None
    if not isinstance(shape, Size) or shape.index is not None or not isinstance(index, int):
        return None
    return Size(shape.of, index)


@register(METHODS, "view", "reshape")
def _view(a: Analysis, node: Node, _: None) -> Value | None:
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
        sizes = sizes[0]
    return _reshape(a, node, sizes)


@register(FUNCTIONS, torch.reshape)
def _reshape_function(a: Analysis, node: Node, _: None) -> Value | None:
    return _reshape(a, node, node.args[1] if len(node.args) == 2 else None)


def _reshape(a: Analysis, node: Node, sizes: Any) -> Value | None:
    """A reshape of a tensor with channels that keeps the channel dim whole, given as
    the one ``-1`` of ``sizes``; the other sizes are ints or non-channel shape reads.

    Pre (for the check): ShapeProp metadata on the input and the output. Post: the
    channel axis is where the ``-1`` is, and the sizes other than 1 before and
    after it are those before and after the input's channel axis.
    """
    inp = node.args[0]
    if not isinstance(inp, Node) or node.kwargs or not isinstance(sizes, list | tuple):
        return None
    x = a.tensor(inp, node)
    if x.channelless:
        return None
    minus = [i for i, n in enumerate(sizes) if isinstance(n, int) and n == -1]
    if len(minus) != 1:
        return None
    for size in sizes:
        if isinstance(size, Node):
            read = a.values.get(size)
            if not isinstance(read, Size) or read.index is None:
                return None
            if read.may_be_channel_count():
                raise PartitionError(f"{op_name(node)} reads the channel count in branch")
        elif not isinstance(size, int):
            return None
    in_shape = getattr(inp.meta.get("tensor_meta"), "shape", None)
    out_shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if in_shape is None or out_shape is None:
        raise PartitionError(f"shape of {node.name} is unknown")
    (new,), old = minus, x.axis % len(in_shape)
    if out_shape[new] != in_shape[old] or _around(in_shape, old) != _around(out_shape, new):
        raise PartitionError(f"{op_name(node)} does not keep the channel dim whole")
    return Value(x.space, new, len(out_shape))


def _around(shape: Any, dim: int) -> tuple[list[int], list[int]]:
    """The sizes other than 1 before and after ``dim``."""
    return [n for n in shape[:dim] if n != 1], [n for n in shape[dim + 1 :] if n != 1]
