"""Pass 2 (optional): give every node of a traced graph its output shape.

The graph runs on tensors without data, never on the model's own tensors:
first on a copy of the model whose parameters and buffers are on the ``meta``
device (fast), and if that fails (e.g. the forward creates CPU tensors with
``torch.arange``) on a FakeTensor copy (``FakeTensorMode``, the mechanism of
``torch.fx.passes.shape_prop.ShapeProp`` with ``fake_mode``). No activation is
computed, and the model's parameters and buffers (BatchNorm running
statistics) are never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from revcompile.passes.graph_utils import drop_user_hooks
from torch import nn
from torch._dynamo.utils import deepcopy_to_fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from revcompile.errors import ConversionError, InputShapeError

GUESS_BATCH = 2
GUESS_SPATIAL_SIZES = (224, 32)
"""Resolutions tried, in order, when the input shape has to be guessed."""


def propagate_shapes(gm: GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record ``node.meta["tensor_meta"]`` for every tensor-valued node of ``gm``.

    Preconditions: ``gm`` comes from ``passes.trace.trace``; ``example_inputs``
    has one entry per placeholder (tensors are only read for shape, dtype and
    device; their values do not matter).

    Postconditions: every node producing a tensor (or a structure of tensors)
    has ``meta["tensor_meta"]``. Parameters and buffers of ``gm`` (and so of the
    traced model) are unchanged.

    Raises ``ConversionError`` naming the input shapes when the model rejects
    them.
    """
    try:
        meta_inputs = [_to_meta(value) for value in example_inputs]
        with torch.no_grad():  # shapes only: no autograd, no reversible stage machinery
            _ShapeRecorder(_meta_copy(gm), gm).run(*meta_inputs)
        return
    except Exception:  # retried with FakeTensors, which also handle device mixing
        pass
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = _ShapeRecorder(deepcopy_to_fake_tensor(gm, fake_mode), gm)
    try:
        fake_inputs = [
            fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
            for value in example_inputs
        ]
        with fake_mode, torch.no_grad():
            recorder.run(*fake_inputs)
    except Exception as error:
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        shapes = ", ".join(_describe_input(value) for value in example_inputs)
        message = str(error).split("\n\n")[0]  # fx appends the whole failing graph context
        raise InputShapeError(
            f"{gm.__class__.__name__} rejects example inputs of shape {shapes} at node "
            f"{recorder.current_node}: {type(error).__name__}: {message}"
        ) from error


class _ShapeRecorder(Interpreter):
    """Runs ``gm``'s graph with the modules of ``stand_in`` (a data-free copy of
    ``gm``) and records each result's TensorMetadata on ``gm``'s nodes.

    BatchNorm layers are not run (their meta kernels are slow and their output
    has the input's shape): the channel count is checked and an empty tensor of
    the input's shape is returned.
    """

    def __init__(self, stand_in: GraphModule, gm: GraphModule) -> None:
        drop_user_hooks(stand_in)
        super().__init__(stand_in, graph=gm.graph)
        self.current_node: Node | None = None

    def run_node(self, n: Node) -> Any:
        self.current_node = n
        result = super().run_node(n)
        tensors_found = False

        def tensor_meta(value: Any) -> Any:
            nonlocal tensors_found
            if isinstance(value, torch.Tensor):
                tensors_found = True
                return _extract_tensor_metadata(value)
            return value

        meta = map_aggregate(result, tensor_meta)
        if tensors_found:
            n.meta["tensor_meta"] = meta
        return result

    def call_module(self, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not kwargs:
            (x,) = args
            if x.dim() < 2 or x.shape[1] != module.num_features:
                raise ValueError(
                    f"{target} ({type(module).__name__}({module.num_features})) "
                    f"got input of shape {tuple(x.shape)}"
                )
            return torch.empty_like(x)
        return super().call_module(target, args, kwargs)


def _meta_copy(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` whose parameters and buffers are on the meta device."""
    memo: dict[int, Any] = {id(buffer): buffer.to("meta") for buffer in gm.buffers()}
    memo.update(
        (id(param), nn.Parameter(param.to("meta"), param.requires_grad))
        for param in gm.parameters()
    )
    return copy.deepcopy(gm, memo)


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def guess_example_inputs(gm: GraphModule) -> list[tuple[torch.Tensor, ...]]:
    """Candidate example inputs for a single-input model, most likely first.

    The first Conv1d/Conv2d/Conv3d/Linear layer in graph order fixes the input's
    feature count; the batch is ``GUESS_BATCH`` (2, so BatchNorm in training
    mode accepts it):

    - ``Conv2d(c, ...)``: ``(2, c, s, s)`` for each s in ``GUESS_SPATIAL_SIZES``
      (224 for ImageNet models, 32 for CIFAR models);
    - ``Conv1d(c, ...)``: ``(2, c, s)``; ``Conv3d(c, ...)``: ``(2, c, 16, s, s)``;
    - ``Linear(n, ...)``: ``(2, n)``.

    Returns an empty list when the model has more or fewer than one input
    without a default, or no such layer. The tensors are zeros on the CPU
    (small: only their shape is used).
    """
    # parameters with a default (``scale=1.0``, a fixed ``attn_mask=None``) need no guess
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder" and not node.args]
    if len(placeholders) != 1:
        return []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(node.target)
        shapes = _input_shapes_for(layer)
        if shapes:
            return [(torch.zeros(shape),) for shape in shapes]
    return []


def propagate_guessed_shapes(gm: GraphModule) -> bool:
    """Propagate shapes from the first guessed example input the model accepts.

    Preconditions: as ``propagate_shapes``, without example inputs.

    Postconditions: returns True and every tensor node has
    ``meta["tensor_meta"]`` when one guess from ``guess_example_inputs`` was
    accepted; otherwise returns False and no node has ``tensor_meta``. Never
    raises for a rejected guess.
    """
    for example_inputs in guess_example_inputs(gm):
        try:
            propagate_shapes(gm, example_inputs)
        except ConversionError:
            for node in gm.graph.nodes:
                node.meta.pop("tensor_meta", None)
            continue
        return True
    return False


def _input_shapes_for(layer: nn.Module) -> list[tuple[int, ...]]:
    if isinstance(layer, nn.Conv2d):
        return [(GUESS_BATCH, layer.in_channels, s, s) for s in GUESS_SPATIAL_SIZES]
    if isinstance(layer, nn.Conv1d):
        return [(GUESS_BATCH, layer.in_channels, s) for s in GUESS_SPATIAL_SIZES]
    if isinstance(layer, nn.Conv3d):
        return [(GUESS_BATCH, layer.in_channels, 16, s, s) for s in GUESS_SPATIAL_SIZES]
    if isinstance(layer, nn.Linear):
        return [(GUESS_BATCH, layer.in_features)]
    return []


def _describe_input(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} ({value.dtype})"
    return repr(value)
