"""Pass 1, second frontend: trace with the example inputs' shapes.

Plain ``torch.fx`` cannot enter code that looks at the values its Proxies
stand for: ``if x.shape[1] != self.num_channels: raise`` (transformers'
ResNet), ``b, n, c = x.shape`` or ``(*x.shape[:-1], -1, d)`` (attention
heads), ``x[:, 0] = y`` (item assignment), ``range(x.size(1))``. Here every
Proxy also carries the value it has for the example inputs: a FakeTensor (no
data, the model's tensors untouched) for tensors, a Python value for what is
read from their metadata (shapes, ``dim()``, dtypes), computed op by op as the
graph is recorded, as ``torch.fx.experimental.meta_tracer`` and
transformers 4.x's ``HFTracer`` do. Then:

- the graph stays symbolic: a shape used as data (``x.view(b, -1)``) is a
  node, never a constant, so other batch sizes still run;
- Python control flow on a metadata value (``bool``, ``len``, iteration,
  ``int``/``__index__``) takes the branch the example inputs take, and the
  graph asserts it. The inputs' sizes are symbols (``ShapeEnv``), so each
  decision is a condition on them (``Ne(s2, 32)``); it becomes one
  ``torch._assert`` on the inputs' sizes right after the placeholders (outside
  every residual block, which a check on a branch value would make unsafe to
  convert) that fails with a one-line message when an input would have taken
  another branch, instead of silently computing the example's branch. A
  decision on tensor *data* is still refused, as by fx;
- ``forward`` is called by its own signature: a ``functools.wraps`` decorator
  with ``(*args, **kwargs)`` (transformers' ``can_return_tuple``) no longer
  confuses fx's placeholders; ``**kwargs`` is empty.

Everything else is ``passes.trace``'s: leaves, mode-independent graphs,
fixed keyword defaults with their guards, refusals, the model untouched.
"""

from __future__ import annotations

import functools
import inspect
import operator
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sympy
import torch
from revcompile.passes.trace import ResidualTracer, trace
from revcompile.passes.trace_guards import current_module
from sympy.printing.pycode import pycode
from torch import nn
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Graph, GraphModule, Node, Proxy
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.node import map_aggregate
from torch.fx.proxy import Attribute, TraceError
from torch.utils._sympy.functions import FloorDiv, Max, Min, Mod, PowByNatural, PythonMod

__all__ = ["ShapeTracer", "trace_with_shapes"]

_NO_VALUE = object()
"""The value of a Proxy whose value could not be computed (data-dependent, unknown op)."""

_NOT_RUN = frozenset({torch._C._set_grad_enabled})
"""Recorded but never run for a value: they change global state (a grad-mode region)."""

# The real functions, for computing values while passes.trace_guards has
# replaced them with recording ones (grad-mode regions, training reads).
_REAL_ATTRIBUTES = [
    (torch._C, "_set_grad_enabled", torch._C._set_grad_enabled),
    (torch, "is_grad_enabled", torch.is_grad_enabled),
    (torch._C, "_InferenceMode", torch._C._InferenceMode),
]


def trace_with_shapes(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> GraphModule:
    """Trace ``model`` as ``passes.trace.trace`` does, resolving control flow on
    metadata against ``example_inputs`` (module docstring).

    Preconditions: ``example_inputs`` are tensors, one per leading ``forward``
    parameter (their values are not read, only shape, dtype and device).

    Postconditions: those of ``passes.trace.trace``, for inputs that take the
    example inputs' branches; the graph raises ``AssertionError`` (a
    ``torch._assert`` guard naming the source line) on one that does not.

    Raises ``ConversionError`` where ``trace`` does (fx still fails, e.g. on
    control flow on tensor data).
    """
    return trace(
        model,
        n_inputs=len(example_inputs),
        make_tracer=functools.partial(ShapeTracer, example_inputs=tuple(example_inputs)),
    )


class ShapeProxy(Proxy):
    """A Proxy whose Python conversions use its value (module docstring)."""

    def __getattr__(self, name: str) -> Any:
        return ShapeAttribute(self, name)

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __index__(self) -> int:
        return self.tracer.integer(self)

    def __int__(self) -> int:
        return self.tracer.integer(self)

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class ShapeAttribute(ShapeProxy, Attribute):
    """``x.shape``, ``x.dtype``: an attribute whose node (and value) exist once used."""


class ShapeTracer(ResidualTracer):
    """``ResidualTracer`` whose Proxies carry the example inputs' values."""

    def __init__(
        self, mode_dependent: frozenset[int] = frozenset(), *, example_inputs: tuple = ()
    ) -> None:
        super().__init__(mode_dependent)
        # Sizes of the inputs are symbols (no duck sizing: equal sizes stay distinct).
        self.shape_env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=self.shape_env)
        self.example_inputs = example_inputs
        self.values: dict[Node, Any] = {}
        self.input_names: dict[str, Any] = {}
        self.symbols: dict[sympy.Symbol, tuple[str, int, int]] = {}
        self.decisions: list[tuple[sympy.Basic, str]] = []
        self.computing = False

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> Graph:
        graph = super().trace(root, concrete_args)
        with self._untraced():  # sympy draws Python random numbers: not the model's
            _insert_guards(graph, self.decisions, self.symbols)
        return graph

    # -- the root's signature ------------------------------------------------

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None):
        """Placeholders from the signature of the undecorated ``forward``; the
        decorated one is called with them by that signature (``**kwargs`` empty)."""
        fn = inspect.unwrap(root_fn)
        signature = inspect.signature(fn)
        parameters = list(signature.parameters.values())[1 if is_module else 0 :]
        if any(p.kind is p.VAR_POSITIONAL for p in parameters):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        named = [p for p in parameters if p.kind is not p.VAR_KEYWORD]
        self.input_names = {
            p.name: self._symbolic(p.name, x) for p, x in zip(named, self.example_inputs)
        }
        # an example input is required, whatever its default (``pixel_values=None``)
        values = [
            self.create_proxy("placeholder", p.name, (), {})
            if p.name in self.input_names
            else self._proxy_placeholder(p.name, concrete_args, signature, fn)
            for p in named
        ]
        keyword_only = {p.name for p in named if p.kind is p.KEYWORD_ONLY}

        head = [self.root] if is_module else []

        def call(*args: Any) -> Any:
            bound = dict(zip((p.name for p in named), args[len(head) :]))
            positional = [bound[p.name] for p in named if p.name not in keyword_only]
            return root_fn(*args[: len(head)], *positional, **{k: bound[k] for k in keyword_only})

        return call, [*head, *values]

    # -- values ---------------------------------------------------------------

    def proxy(self, node: Node) -> Proxy:
        return ShapeProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest, **more):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if isinstance(proxy, Proxy) and proxy.node not in self.values:
            self.values[proxy.node] = self._compute(kind, target, args, kwargs)
        return proxy

    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.input_names.get(target, _NO_VALUE)
        if kind == "get_attr":
            return self._attribute(target)
        if target in _NOT_RUN:
            return _NO_VALUE
        try:
            args, kwargs = map_aggregate((args, kwargs), self._value_or_raise)
        except _Missing:
            return _NO_VALUE
        with self._untraced():
            try:
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module":
                    return self._run_module(self.root.get_submodule(target), args, kwargs)
            except Exception:  # data-dependent or not computable: fx's rules then apply
                return _NO_VALUE
        return _NO_VALUE

    def _symbolic(self, name: str, example: Any) -> Any:
        """A FakeTensor of ``example`` whose sizes are symbols (recorded by dimension)."""
        if not isinstance(example, torch.Tensor):
            return example
        with self._untraced():
            fake = self.fake_mode.from_tensor(
                example,
                source=ConstantSource(name),
                symbolic_context=StatelessSymbolicContext(
                    dynamic_sizes=[DimDynamic.DYNAMIC] * example.dim()
                ),
            )
        for dim, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                self.symbols[size.node.expr] = (name, dim, example.shape[dim])
        return fake

    def _run_module(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """``module(*args, **kwargs)`` on FakeTensor copies of its parameters and
        buffers: a BatchNorm's running statistics and counter stay untouched."""
        state = {
            name: self._fake(tensor)
            for name, tensor in (*module.named_parameters(), *module.named_buffers())
        }
        return torch.func.functional_call(module, state, args, kwargs)

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        """The FakeTensor standing for ``tensor`` (one per tensor: writes to it are seen)."""
        if isinstance(tensor, FakeTensor):
            return tensor
        return self.fake_mode.from_tensor(tensor, static_shapes=True)

    def _attribute(self, target: str) -> Any:
        value: Any = self.root
        with self._untraced():
            for part in target.split("."):
                value = getattr(value, part, _NO_VALUE)
                if value is _NO_VALUE:
                    return value
        return self._fake(value) if isinstance(value, torch.Tensor) else value

    def _value_or_raise(self, a: Any) -> Any:
        if isinstance(a, Proxy):
            value = self.value(a)
            if value is _NO_VALUE:
                raise _Missing
            return value
        return self._fake(a) if isinstance(a, torch.Tensor) else a

    def value(self, proxy: Proxy) -> Any:
        """The value ``proxy`` has for the example inputs, or ``_NO_VALUE``."""
        return self.values.get(proxy.node, _NO_VALUE)

    @contextmanager
    def _untraced(self) -> Iterator[None]:
        """Run model code for a value: modules called through, no nodes recorded,
        the real grad-mode functions, no randomness watch (that code runs at run
        time, not in the trace), FakeTensors only."""
        saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in _REAL_ATTRIBUTES]
        getattribute = nn.Module.__dict__.get("__getattribute__")
        profile = sys.getprofile()
        self.computing = True
        try:
            for owner, name, real in _REAL_ATTRIBUTES:
                setattr(owner, name, real)
            if getattribute is not None:
                del nn.Module.__getattribute__
            sys.setprofile(None)
            with self.fake_mode:
                yield
        finally:
            self.computing = False
            if profile is None or callable(profile):
                sys.setprofile(profile)
            if getattribute is not None:
                nn.Module.__getattribute__ = getattribute  # type: ignore[method-assign]
            for owner, name, value in saved:
                setattr(owner, name, value)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- Python conversions ---------------------------------------------------

    def to_bool(self, obj: Proxy) -> bool:
        value = self._known(obj)
        if value is _NO_VALUE:
            return super().to_bool(obj)  # fx's error: control flow on tensor data
        return self._decided(value, bool)

    def length(self, obj: Proxy) -> int:
        value = self._known(obj, tensor_ok=True)
        if value is _NO_VALUE:
            raise TraceError(f"len() of {obj.node.name}, whose value depends on tensor data")
        if isinstance(value, torch.Tensor):
            return self._decided(value.shape[0], int)
        return len(value)

    def integer(self, obj: Proxy) -> int:
        value = self._known(obj)
        if value is _NO_VALUE:
            raise TraceError(f"{obj.node.name} is used as an int but depends on tensor data")
        return self._decided(value, operator.index)

    def iter(self, obj: Proxy) -> Iterator:
        return iter([obj[i] for i in range(len(obj))])

    def keys(self, obj: Proxy) -> Any:
        value = self._known(obj)
        return super().keys(obj) if value is _NO_VALUE else value.keys()

    def _known(self, obj: Proxy, tensor_ok: bool = False) -> Any:
        """The value of ``obj`` when Python may use it: known, and not tensor data."""
        value = self.value(obj)
        return _NO_VALUE if isinstance(value, torch.Tensor) and not tensor_ok else value

    def _decided(self, value: Any, convert: Any) -> Any:
        """``convert(value)``, recording the condition on the input sizes it rests on."""
        if not isinstance(value, torch.SymBool | torch.SymInt):
            return convert(value)
        with self._untraced():
            expr = value.node.expr  # before deciding: deciding may turn sizes into constants
            result = convert(value)
            if isinstance(value, torch.SymInt):
                condition = sympy.Eq(expr, result)
            else:
                condition = expr if result else sympy.Not(expr)
        if condition.free_symbols:
            self.decisions.append((condition, f"in {current_module(self)} at {_user_line()}"))
        return result


class _Missing(Exception):
    """An argument's value is unknown."""


def _user_line() -> str:
    """``file.py:12``: the innermost frame outside torch and revcompile."""
    frame = sys._getframe(1)
    while frame is not None:
        package = frame.f_globals.get("__name__", "").split(".")[0]
        if package not in ("torch", "revcompile"):
            return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "unknown line"


def _insert_guards(
    graph: Graph,
    decisions: list[tuple[sympy.Basic, str]],
    symbols: dict[sympy.Symbol, tuple[str, int, int]],
) -> None:
    """After the placeholders: one ``torch._assert`` per distinct decision,
    computed from the inputs' sizes (outside every block), so an input that
    would take another branch fails instead of running the example's.

    A condition that ``_expression`` cannot write as fx nodes pins each size
    it reads to the example's (stricter, never looser)."""
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    sizes: dict[sympy.Symbol, Node] = {}

    def size(symbol: sympy.Symbol) -> Node:
        if symbol not in sizes:
            name, dim, _ = symbols[symbol]
            shape = graph.call_function(getattr, (placeholders[name], "shape"))
            sizes[symbol] = graph.call_function(operator.getitem, (shape, dim))
        return sizes[symbol]

    readable = {
        symbol: sympy.Symbol(f"{name}.shape[{dim}]") for symbol, (name, dim, _) in symbols.items()
    }
    first = next(n for n in graph.nodes if n.op != "placeholder")
    done: set[sympy.Basic] = set()
    with graph.inserting_before(first):
        for condition, where in decisions:
            if condition in done or not condition.free_symbols <= symbols.keys():
                continue
            done.add(condition)
            if _writable(condition):
                checks = [(_expression(graph, condition, size), condition)]
            else:
                checks = [
                    (
                        graph.call_function(operator.eq, (size(s), symbols[s][2])),
                        sympy.Eq(s, symbols[s][2]),
                    )
                    for s in sorted(condition.free_symbols, key=str)
                ]
            for check, shown in checks:
                message = (
                    f"revcompile traced this model for inputs where {pycode(shown.subs(readable))} "
                    f"({where}); this input differs: convert again with example_inputs like it"
                )
                graph.call_function(torch._assert, (check, message))


_OPERATORS: dict[type, Any] = {
    sympy.Eq: operator.eq,
    sympy.Ne: operator.ne,
    sympy.StrictLessThan: operator.lt,
    sympy.LessThan: operator.le,
    sympy.StrictGreaterThan: operator.gt,
    sympy.GreaterThan: operator.ge,
    sympy.Add: operator.add,
    sympy.Mul: operator.mul,
    sympy.And: operator.and_,
    sympy.Or: operator.or_,
    FloorDiv: operator.floordiv,
    PythonMod: operator.mod,
    sympy.Mod: operator.mod,
    Mod: operator.mod,  # torch's, for non-negative operands: Python's % on sizes
    PowByNatural: operator.pow,
    Max: max,
    Min: min,
}


def _writable(expr: sympy.Basic) -> bool:
    """Whether ``_expression`` can write ``expr`` as fx nodes."""
    if isinstance(expr, sympy.Symbol) or expr.is_Integer or expr in (sympy.true, sympy.false):
        return True
    if isinstance(expr, sympy.Pow):
        return expr.exp.is_Integer and expr.exp >= 0 and _writable(expr.base)
    known = isinstance(expr, sympy.Not) or type(expr) in _OPERATORS
    return known and all(_writable(arg) for arg in expr.args)


def _expression(graph: Graph, expr: sympy.Basic, size: Any) -> Any:
    """fx nodes (or a Python constant) computing the integer/boolean ``expr`` of
    sizes; ``size(symbol)`` is the node of one input size. Precondition: ``_writable(expr)``."""
    if isinstance(expr, sympy.Symbol):
        return size(expr)
    if expr.is_Integer:
        return int(expr)
    if expr in (sympy.true, sympy.false):
        return bool(expr)
    if isinstance(expr, sympy.Not):
        return graph.call_function(operator.not_, (_expression(graph, expr.args[0], size),))
    if isinstance(expr, sympy.Pow):
        return graph.call_function(
            operator.pow, (_expression(graph, expr.base, size), int(expr.exp))
        )
    function = _OPERATORS[type(expr)]
    operands = [_expression(graph, arg, size) for arg in expr.args]
    result = operands[0]
    for operand in operands[1:]:
        result = graph.call_function(function, (result, operand))
    return result
