"""The op vocabulary of the passes: which fx nodes are adds, activations,
stochastic depth, shape reads and in-place writes.

``find_residuals``, ``plan``, ``partition`` and ``emit`` ask these questions
the same way by asking here; a new spelling of an op is added once.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import _get_qualified_name

from revcompile.errors import PartitionError

# ---------------------------------------------------------------- residual adds

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = frozenset({"add", "add_"})


def is_add(node: Node) -> bool:
    """True for the add-like nodes revcompile recognises as possible joins."""
    if node.op == "call_function":
        return any(node.target is add for add in ADD_FUNCTIONS)
    return node.op == "call_method" and node.target in ADD_METHODS


# ---------------------------------------------------------------- activations

ACTIVATION_NAMES = frozenset(
    {
        "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
        "hardtanh", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "prelu",
        "rrelu", "logsigmoid", "softsign", "tanhshrink", "threshold", "swish",
        "leakyrelu", "logsoftmax", "softmax", "log_softmax", "softmin", "glu",
    }
)  # fmt: skip
"""Nonlinearities, by function/method name or lower-cased module class name."""
NOT_ELEMENTWISE = frozenset({"softmax", "log_softmax", "logsoftmax", "softmin", "glu"})


def activation_name(gm: GraphModule, node: Node) -> str | None:
    """The nonlinearity ``node`` applies (e.g. ``"relu"``), or None."""
    if node.op == "call_module":
        name = type(gm.get_submodule(node.target)).__name__.lower()
        return name if name in ACTIVATION_NAMES else None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_method":
        name = node.target
    else:
        return None
    name = name.rstrip("_")
    return name if name in ACTIVATION_NAMES else None


# ---------------------------------------------------------------- stochastic depth

STOCHASTIC_DEPTH_CLASS_NAMES = frozenset({"DropPath", "StochasticDepth"})

"""Per-sample scaling modules of other libraries (timm, torchvision.ops), by class name."""

STOCHASTIC_DEPTH_FUNCTIONS = frozenset(
    {"torchvision.ops.stochastic_depth.stochastic_depth", "timm.layers.drop.drop_path"}
)
"""Their functional forms (fx leaf functions), by qualified name."""

# ---------------------------------------------------------------- metadata reads

SPATIAL_MODULES = (
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
)
"""Layers that act on each channel's spatial positions alone (pooling, resampling)."""

METADATA_METHODS = frozenset({"dim", "size", "ndimension", "numel", "nelement"})
METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})


def reads_metadata_only(node: Node) -> bool:
    """True for ops that read only the shape, dtype or device of their tensor
    argument (``x.dim()``, ``x.shape``), never its values."""
    if node.op == "call_method":
        return node.target in METADATA_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in METADATA_ATTRIBUTES
    )


# ---------------------------------------------------------------- in-place ops

OUT_OF_PLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def method_base(name: str) -> str:
    """``relu_`` -> ``relu``; other names unchanged."""
    if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
        return name[:-1]
    return name


@cache
def _inplace_position(fn: Callable[..., Any]) -> int | None:
    """Position of an ``inplace`` parameter in ``fn``'s signature, if it has one."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _out_of_place_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.relu_`` -> ``torch.relu``, ``F.relu_`` -> ``F.relu``, ``operator.iadd`` -> add."""
    if fn in OUT_OF_PLACE_OPERATORS:
        return OUT_OF_PLACE_OPERATORS[fn]
    name = getattr(fn, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        for namespace in (torch, F):
            if getattr(namespace, name, None) is fn and hasattr(namespace, name[:-1]):
                return getattr(namespace, name[:-1])
    return fn


def out_of_place(node: Node, gm: GraphModule) -> tuple[Any, tuple[Any, ...], dict[str, Any], bool]:
    """The target, args and kwargs of an out-of-place version of ``node``.

    Post: in-place variants (``relu_``, ``operator.iadd``, ``torch.sigmoid_``)
    are replaced by their out-of-place versions and an ``inplace`` argument
    (keyword or positional) is False; the flag says whether ``node`` wrote its
    first argument (for modules: has ``inplace=True``, reset on the copy).
    """
    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    if node.op == "call_module":
        return target, args, kwargs, getattr(gm.get_submodule(str(target)), "inplace", False)
    if node.op == "call_method":
        base = method_base(str(target))
        return base, args, kwargs, base != target
    if node.op != "call_function":
        return target, args, kwargs, False
    if target is operator.setitem:
        raise PartitionError("in-place op operator.setitem in branch")
    base = _out_of_place_function(target)
    position = _inplace_position(base)
    inplace = base is not target
    if "inplace" in kwargs:
        inplace |= bool(kwargs["inplace"])
        kwargs["inplace"] = False
    elif position is not None and position < len(args):
        inplace |= bool(args[position])
        args = (*args[:position], False, *args[position + 1 :])
    return base, args, kwargs, inplace


def writes_in_place(node: Node, gm: GraphModule) -> bool:
    """Whether ``node`` writes one of its arguments (``x.relu_()``, ``out += y``,
    ``x[:, :c] = y``, ``F.relu(x, inplace=True)``, ``ReLU(inplace=True)``).

    Such a node is a side effect: it must survive dead-code elimination even
    when its result is unused, and later readers of the argument see the write.
    """
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    return out_of_place(node, gm)[3]


# ---------------------------------------------------------------- naming


def op_name(node: Node) -> str:
    """How an op is named in a reason: ``torch.flatten``, ``Tensor.view``, ``Flatten``."""
    if node.op == "call_function":
        return _get_qualified_name(node.target).replace("_operator.", "operator.")
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    return node.op


# ---------------------------------------------------------------- side effects

INPLACE_OPERATORS = frozenset(
    {
        operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
        operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
        operator.ixor, operator.ilshift, operator.irshift,
    }
)  # fmt: skip


def _inplace_by_name(node: Node) -> bool:
    """PyTorch's naming rule: a public function or Tensor method whose name ends in
    one ``_`` writes its first argument (``x.copy_``, ``x.zero_``, ``nn.init.zeros_``).
    ``operator.and_`` and friends are excluded: their ``_`` only avoids a keyword."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name)
    name = getattr(node.target, "__name__", "")
    return (
        node.op == "call_function"
        and name.endswith("_")
        and not name.startswith("_")
        and getattr(operator, name, None) is not node.target
    )


def written_tensor(node: Node, gm: GraphModule) -> Node | None:
    """The graph value ``node`` writes in place, or None.

    Covers everything ``writes_in_place`` does plus the spellings it does not
    name: any in-place Tensor method (``copy_``, ``zero_``, ``fill_``), in-place
    functions (``nn.init.zeros_``), augmented-assignment operators and an
    ``out=`` argument (``torch.add(x, y, out=buf)`` writes ``buf``).
    """
    out = node.kwargs.get("out")
    if isinstance(out, Node):
        return out
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if not isinstance(first, Node):
        return None
    writes = (
        (node.op == "call_function" and node.target in INPLACE_OPERATORS)
        or _inplace_by_name(node)
        or writes_in_place(node, gm)
    )
    return first if writes else None


RANDOM_NAMES = frozenset(
    {
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_dropout",
        "feature_alpha_dropout", "rrelu", "gumbel_softmax", "fractional_max_pool2d",
        "fractional_max_pool3d", "bernoulli", "multinomial", "normal", "poisson", "rand",
        "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
    }
)  # fmt: skip
"""Functions and methods that draw from the torch RNG, by name."""

PURE_FUNCTION_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _module_has_effects(module: torch.nn.Module) -> bool:
    """A call of ``module`` may change state or draw random numbers: a class from
    outside ``torch.nn`` (unknown code), buffers (running statistics,
    power-iteration vectors), hooks, in-place layers, dropout."""
    for sub in module.modules():
        cls = type(sub)
        if not cls.__module__.startswith("torch.nn."):
            return True
        if sub._buffers or sub._forward_hooks or sub._forward_pre_hooks:
            return True
        if getattr(sub, "inplace", False) or "Dropout" in cls.__name__:
            return True
        if cls.__name__ in ("RReLU", "FractionalMaxPool2d", "FractionalMaxPool3d"):
            return True
        dropout = getattr(sub, "dropout", 0.0)
        if isinstance(dropout, float) and dropout > 0:
            return True
    return False


def has_side_effect(node: Node, gm: GraphModule) -> bool:
    """Whether running ``node`` matters beyond its result, so that dead-code
    elimination must keep it: placeholders and the output, in-place writes
    (``written_tensor``, ``x[i] = y``), fx's impure calls (``torch._assert``,
    ``torch._C._set_grad_enabled``, RNG draws), dropout and other random ops,
    modules that may change state (``_module_has_effects``), and calls of
    functions from outside torch (a ``torch.fx.wrap``-ed user function)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "get_attr":
        return False
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    if written_tensor(node, gm) is not None or node.is_impure():
        return True
    if node.op == "call_module":
        return _module_has_effects(gm.get_submodule(str(node.target)))
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in RANDOM_NAMES:
        return True
    if node.op == "call_function":  # stochastic depth functions come from outside torch
        module = getattr(node.target, "__module__", None) or "torch"
        return module.split(".")[0] not in PURE_FUNCTION_MODULES
    return False


# ---------------------------------------------------------------- grad mode


def grad_mode_set(node: Node) -> bool | None:
    """The grad mode ``node`` switches to (``torch._C._set_grad_enabled(b)``, as
    the tracer records ``torch.no_grad()`` regions), or None for other nodes."""
    if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
        return bool(node.args[0]) if node.args else None
    return None


# ---------------------------------------------------------------- scalings

SCALE_FUNCTIONS = (operator.mul, operator.imul, operator.truediv, torch.mul, torch.div)
SCALE_METHODS = frozenset({"mul", "mul_", "div", "div_"})


def is_scale(node: Node) -> bool:
    """True for a product or quotient node (``x * c``, ``torch.mul``, ``x.div(c)``):
    what scales a tensor by a constant or a gain, when one operand is one."""
    if node.op == "call_function":
        return any(node.target is scale for scale in SCALE_FUNCTIONS)
    return node.op == "call_method" and node.target in SCALE_METHODS
