"""Pass 2b: make in-place writes visible in the data flow; drop dead pure code.

fx records ``out.add_(x)`` as a node whose result nobody reads: later readers
of ``out`` read the node that computed ``out`` *before* the write, so the
write is invisible to the dominator analysis and looks like dead code. This
pass, run after tracing and shape propagation and before ``find_residuals``:

1. removes nodes with no users that have no side effect (``ops.has_side_effect``):
   ``unused = self.conv_unused(h)`` inside a block, which would otherwise be
   read from inside a region that ``emit`` erases;
2. for every in-place write (``ops.written_tensor``) of a tensor with no
   aliases, makes every node after the write that reads the written tensor read
   the write's result instead. The result *is* the written tensor (in-place ops
   return their argument), so the graph computes exactly what it computed
   before, and ``out.add_(x)`` / ``out += x`` statements become joins.

A write is exact when its storage was created by an op that always
allocates (``_allocates``: Conv, Linear, norms, pooling, out-of-place
arithmetic and activations), and the tensors that may view it (a ``view``,
slice, ``detach``, a pass-through layer such as ``Dropout`` or ``DropPath``)
are read by nothing after the write: ``drop(h).add_(x)`` with ``h`` used
nowhere else. A write that does not qualify (into a view read again later, a
parameter, a buffer, a model input, the output of a function or module from
outside torch; ``x[i] = y``) stays as it is, an impure statement: ``hidden_writes`` names it, and
``find_residuals`` rejects every add whose block contains it, straddles it or
touches a tensor it may write.
"""

from __future__ import annotations

import operator

from revcompile.passes.graph_utils import graph_position
from revcompile.passes.ops import (
    ACTIVATION_NAMES,
    SPATIAL_MODULES,
    STOCHASTIC_DEPTH_CLASS_NAMES,
    has_side_effect,
    reads_metadata_only,
    written_tensor,
)
from torch import nn
from torch.fx import GraphModule, Node

ALLOCATING_MODULES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *SPATIAL_MODULES,
)
"""Layers whose output is always a new tensor (never their input or a view of it)."""

ALLOCATING_CLASS_NAMES = frozenset({"FrozenBatchNorm2d"})
"""The same, outside torch.nn, by class name: torchvision's (and timm's) frozen
BatchNorm computes ``x * scale + bias``."""

ALLOCATING_NAMES = frozenset(
    {
        "add", "sub", "mul", "div", "truediv", "true_divide", "floordiv", "floor_divide",
        "remainder", "fmod", "mod", "pow", "neg", "matmul", "mm", "bmm", "addmm", "baddbmm",
        "addcmul", "addcdiv", "cat", "concat", "concatenate", "stack", "clone", "exp", "log",
        "log1p", "expm1", "sqrt", "rsqrt", "abs", "sin", "cos", "tanh", "sigmoid", "relu",
        "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
        "elu", "selu", "celu", "softplus", "softmax", "log_softmax", "softmin", "prelu", "glu",
        "logsigmoid", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
        "linear", "batch_norm", "layer_norm", "group_norm", "instance_norm", "normalize",
        "interpolate", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
        "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "sum", "mean", "amax", "amin", "var", "std", "zeros_like", "ones_like", "empty_like",
        "full_like", "rand_like", "randn_like", "zeros", "ones", "empty", "full", "where",
        "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor",
        "clamp", "clip", "masked_fill", "minimum", "maximum", "reciprocal", "square",
        "scaled_dot_product_attention",
    }
)  # fmt: skip
"""Out-of-place functions and methods that always return a new tensor."""


def normalize(gm: GraphModule) -> GraphModule:
    """Remove dead pure code and make exact in-place writes explicit; returns ``gm``.

    Preconditions: ``gm`` comes from ``revcompile.passes.trace.trace`` (shapes
    may be recorded; they stay valid).

    Postconditions: ``gm`` computes exactly what it computed before, bit for
    bit, with the same side effects in the same order; no node without users
    lacks a side effect; after every write of a tensor without aliases,
    nothing reads the pre-write node (``hidden_writes(gm)`` holds the other
    writes only); ``gm.code`` matches the graph. Modules, parameters and
    buffers are untouched.
    """
    graph = gm.graph
    graph.eliminate_dead_code(is_impure_node=lambda node: has_side_effect(node, gm))
    position = graph_position(graph)
    aliases = _AliasClasses(gm)
    for node in list(graph.nodes):
        written = written_tensor(node, gm)
        if written is None or not aliases.exact(node, written):
            continue
        for user in list(written.users):
            if user is not node and position(user) > position(node):
                user.replace_input_with(written, node)
    graph.lint()
    gm.recompile()
    return gm


def hidden_writes(gm: GraphModule) -> dict[Node, set[Node]]:
    """The in-place writes of ``gm`` that the data flow does not show, each with
    the nodes whose tensors it may write (its alias class).

    A write is hidden when the tensor it writes may have aliases (see the
    module docstring), when it returns nothing (``x[i] = y``), or when a node
    after it still reads the pre-write node (a graph ``normalize`` has not run
    on). Graph order.
    """
    position = graph_position(gm.graph)
    aliases = _AliasClasses(gm)
    hidden: dict[Node, set[Node]] = {}
    for node in gm.graph.nodes:
        written = _written(node, gm)
        if written is None:
            continue
        stale = any(position(user) > position(node) for user in written.users if user is not node)
        if stale or not aliases.exact(node, written):
            hidden[node] = aliases.members(node)
    return hidden


def _written(node: Node, gm: GraphModule) -> Node | None:
    if node.op == "call_function" and node.target is operator.setitem:
        first = node.args[0]
        return first if isinstance(first, Node) else None
    return written_tensor(node, gm)


class _AliasClasses:
    """May-alias classes of the graph's tensors (union-find over nodes).

    A node that allocates starts a class; a write joins the class of the tensor
    it writes; every other tensor-valued node may be a view of its inputs and
    joins all their classes. ``get_attr`` nodes of one target share a class.
    Values that are only shapes (``x.size(1)``, arithmetic on them) join none.

    A node is *external* when its storage may be seen outside the graph's data
    flow: a parameter or buffer (``get_attr``), a model input, a ``x[i] = y``
    write, or the result of a function or module from outside torch (which may
    return its own state). It has *views* when a torch op or a
    pass-through layer (``Dropout``, ``DropPath``: their input itself in eval)
    may return a tensor of it that is not a new allocation.
    """

    def __init__(self, gm: GraphModule) -> None:
        self.parent: dict[Node, Node] = {}
        self.position = graph_position(gm.graph)
        external: set[Node] = set()
        viewed: set[Node] = set()
        by_target: dict[str, Node] = {}
        scalars: set[Node] = set()
        for node in gm.graph.nodes:
            self.parent[node] = node
            if node.op == "output":
                continue
            written = _written(node, gm)
            if written is not None:
                self._union(node, written)
                if node.target is operator.setitem:  # returns None: no result to read
                    external.add(node)
            elif reads_metadata_only(node) or _is_shape_arithmetic(node, scalars):
                scalars.add(node)
            elif node.op in ("get_attr", "placeholder"):
                if node.op == "get_attr":
                    self._union(node, by_target.setdefault(str(node.target), node))
                external.add(node)
            elif not _allocates(node, gm):
                (viewed if _views_its_inputs_only(node, gm) else external).add(node)
                for arg in node.all_input_nodes:
                    if arg not in scalars:
                        self._union(node, arg)
        self.external = external
        self.viewed = {self._find(node) for node in viewed}

    def _find(self, node: Node) -> Node:
        while self.parent[node] is not node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def _union(self, a: Node, b: Node) -> None:
        root_a, root_b = self._find(a), self._find(b)
        if root_a is not root_b:
            self.parent[root_a] = root_b

    def exact(self, write: Node, written: Node) -> bool:
        """Whether making ``write`` data flow (later readers of ``written``, the
        node it writes, read the write) shows every reader of the write: no
        tensor of its class made before the write is external, and each of
        them other than the one written is read only before it (a view or
        pass-through output of one allocation, read by nothing else
        afterwards). External tensors made after the write (a user module
        reading the written value) see it through the data flow."""
        at = self.position(write)
        members = self.members(write)
        if any(m in self.external and self.position(m) <= at for m in members):
            return False
        if self._find(write) not in self.viewed:
            return True
        return all(
            self.position(user) <= at
            for member in members
            if member is not written and self.position(member) < at
            for user in member.users
        )

    def members(self, node: Node) -> set[Node]:
        root = self._find(node)
        return {other for other in self.parent if self._find(other) is root}


def _views_its_inputs_only(node: Node, gm: GraphModule) -> bool:
    """Whether a non-allocating ``node`` can return only its inputs, views of
    them or new tensors (torch ops, torch.nn layers, stochastic depth), never
    state of its own."""
    if node.op == "call_method":
        return True
    if node.op == "call_module":
        cls = type(gm.get_submodule(str(node.target)))
        return cls.__module__.startswith("torch.nn.") or cls.__name__ in (
            STOCHASTIC_DEPTH_CLASS_NAMES
        )
    module = getattr(node.target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator")


def _is_shape_arithmetic(node: Node, scalars: set[Node]) -> bool:
    """``x.size(2) // 2`` and the like: operator calls on shape values only."""
    return (
        node.op == "call_function"
        and getattr(node.target, "__module__", None) == "_operator"
        and bool(node.all_input_nodes)
        and all(arg in scalars for arg in node.all_input_nodes)
    )


def _allocates(node: Node, gm: GraphModule) -> bool:
    """Whether ``node``'s result is always a new tensor (see ALLOCATING_*)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module).__name__ in ALLOCATING_CLASS_NAMES:
            return True
        if getattr(module, "inplace", False) or type(module).__module__.split(".")[:2] != [
            "torch",
            "nn",
        ]:
            return False
        return (
            isinstance(module, ALLOCATING_MODULES)
            or type(module).__name__.lower() in ACTIVATION_NAMES
        )
    if node.op == "call_method":
        return str(node.target) in ALLOCATING_NAMES
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or "torch"
        name = getattr(node.target, "__name__", "")
        return module.split(".")[0] in ("torch", "_operator") and name in ALLOCATING_NAMES
    return False
