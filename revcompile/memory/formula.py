"""Symbolic saved activation bytes: an exact ``sympy`` formula in named input dimensions.

:func:`activation_memory_formula` runs the forward once under a
``FakeTensorMode`` with symbolic sizes and counts what
:func:`revcompile.memory.saved.saved_activation_bytes` counts (the same pack
hook); :func:`max_batch_size` answers "what is the largest batch that fits".
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import sympy
import torch
import torch._refs
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from revcompile.memory.saved import SavedStorageRecorder, storage_keys

#: Default symbolic dimensions: batch, height and width of input 0 (NCHW).
DEFAULT_DYNAMIC: dict[str, tuple[int, int]] = {"B": (0, 0), "H": (0, 2), "W": (0, 3)}


class _RealWorldMode(TorchDispatchMode):
    """Pushed inside ``FakeTensorMode``: keeps real-tensor logic real.

    * An op whose tensor arguments are all real (no FakeTensor, no SymInt) runs
      for real, as in an unfaked forward: e.g. ``torch.equal`` of two RNG states
      taken with ``torch.get_rng_state()`` (FakeTensorMode would refuse it as
      data-dependent), so code that branches on such values takes the same path.
    * A random op on fake tensors also advances the real generator of its device
      by one draw, so code that checks "did this call consume randomness?" by
      comparing RNG states (revcompile's ReversibleSequence saves the RNG state
      only then) sees what it sees in a real forward.
    * Ops whose C++ kernel reads concrete sizes (``constant_pad_nd``, i.e.
      ``F.pad``, which would specialize every dimension of its input) run
      through their Python reference, which keeps sizes symbolic. Dispatch modes
      sit below autograd, so this changes no saved tensor.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        from torch._subclasses.fake_tensor import FakeTensor

        kwargs = kwargs or {}
        leaves = pytree.arg_tree_leaves(*args, **kwargs)
        tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
        symbolic = any(isinstance(a, torch.SymInt | torch.SymFloat | torch.SymBool) for a in leaves)
        if tensors and not symbolic and not any(isinstance(t, FakeTensor) for t in tensors):
            with _disable_current_modes():
                return func(*args, **kwargs)
        if func is torch.ops.aten.constant_pad_nd.default:
            return torch._refs.constant_pad_nd(*args, **kwargs)
        out = func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded in func.tags:
            devices = {t.device for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
            with _disable_current_modes():
                for device in devices or {torch.device("cpu")}:
                    if device.type == "cpu" or (
                        device.type == "cuda" and torch.cuda.is_available()
                    ):
                        torch.rand((), device=device)
        return out


@contextlib.contextmanager
def recording_saved(recorder: SavedStorageRecorder) -> Iterator[None]:
    """Run a forward on fake tensors with ``recorder`` noting what autograd saves:
    grad enabled, the RNG state restored afterwards, ``_RealWorldMode`` on."""
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with (
        torch.random.fork_rng(devices=cuda_devices),
        _RealWorldMode(),
        torch.enable_grad(),
        recorder.hooks(),
    ):
        yield


def _torch_sympy_to_plain(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite torch's sympy function classes (``FloorDiv``...) as plain sympy."""
    from torch.utils._sympy import functions as tsf

    rules: list[tuple[str, Callable[..., sympy.Expr]]] = [
        ("FloorDiv", lambda a, b: sympy.floor(a / b)),
        ("CleanDiv", lambda a, b: a / b),
        ("CeilDiv", lambda a, b: sympy.ceiling(a / b)),
        ("IntTrueDiv", lambda a, b: a / b),
        ("FloatTrueDiv", lambda a, b: a / b),
        ("PythonMod", lambda a, b: sympy.Mod(a, b)),
        ("Mod", lambda a, b: sympy.Mod(a, b)),
        ("ModularIndexing", lambda a, b, c: sympy.Mod(sympy.floor(a / b), c)),
        ("FloorToInt", lambda a: sympy.floor(a)),
        ("CeilToInt", lambda a: sympy.ceiling(a)),
        ("PowByNatural", lambda a, b: a**b),
        ("FloatPow", lambda a, b: a**b),
        ("Identity", lambda a: a),
        ("ToFloat", lambda a: a),
        ("Max", lambda *a: sympy.Max(*a)),
        ("Min", lambda *a: sympy.Min(*a)),
        ("Where", lambda c, p, q: sympy.Piecewise((p, c), (q, True))),
    ]
    for name, fn in rules:
        cls = getattr(tsf, name, None)
        if cls is not None and expr.has(cls):
            expr = expr.replace(cls, fn)
    return expr


def _as_sympy(value: Any) -> sympy.Expr:
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return sympy.Integer(int(value))


def activation_memory_formula(
    model: nn.Module,
    example_inputs: Any,
    dynamic: Mapping[str, tuple[int, int]] | None = None,
) -> sympy.Expr:
    """Saved activation bytes as an exact ``sympy`` expression of input dimensions.

    The forward is run once, like :func:`saved_activation_bytes` (same hook,
    same deduplication by storage, parameters and buffers excluded), but under a
    ``FakeTensorMode`` whose ``ShapeEnv`` gives the named input dimensions
    symbolic sizes; no real memory is used and no real compute is done. Every
    saved storage then has a symbolic ``nbytes`` (a ``SymInt``) whose sympy
    expression contains the exact shape arithmetic of the kernels' meta
    functions -- convolution and pooling output sizes keep their floor
    divisions. Symbols are renamed to the keys of ``dynamic`` (positive
    integers) and torch's sympy helpers (``FloorDiv``...) are rewritten as plain
    ``sympy.floor``/``Mod``, so ``formula.subs({B: 8, H: 224, W: 224})`` gives an
    ``Integer``.

    The model's parameters and buffers are fakified (static shapes) and swapped
    in with ``torch.func.functional_call``, so the model itself is untouched
    (BatchNorm statistics updates go to the fake buffers). Custom autograd
    Functions (``ctx.save_for_backward``) and non-reentrant checkpoint work
    unchanged. Real tensors created inside the forward (e.g. RNG states saved by
    ``torch.get_rng_state()``) contribute their concrete size, as they do in the
    real measurement; ops on real tensors only (``torch.equal`` of two RNG
    states) run for real, and random ops on fake tensors advance the real
    generator, so code that saves RNG states only when randomness was consumed
    (ReversibleSequence) saves the same number of them. The global RNG is
    forked: computing the formula has no side effect.

    The formula equals :func:`saved_activation_bytes` for freshly allocated
    contiguous inputs of any size at which the model runs and at which the same
    control flow is taken. Guards recorded while tracing (e.g. ``H >= 7``,
    ``B*H*W != 1`` for BatchNorm) define that validity domain; a dimension the
    model specializes (compares to a constant) raises ``ValueError``; an
    equality between named dimensions (e.g. the model asserts ``H == W``) is
    reported with a warning, the formula then uses the surviving symbol.

    Args:
        model: the network, in the mode to model (``train()`` for training).
        example_inputs: a tensor or a tuple/list of positional inputs; the named
            dimensions must be at least 2 in the example (sizes 0 and 1 are
            special-cased by PyTorch's shape reasoning).
        dynamic: symbol name -> (input index, dimension). Default
            ``{"B": (0, 0), "H": (0, 2), "W": (0, 3)}`` (NCHW input 0).

    Returns:
        A sympy expression in ``Symbol(name, integer=True, positive=True)``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = list(example_inputs)
    dynamic = dict(DEFAULT_DYNAMIC if dynamic is None else dynamic)
    per_input = _named_dimensions(inputs, dynamic)

    shape_env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    fake_mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    with fake_mode:
        fake_inputs, named_symbols = _symbolic_inputs(fake_mode, inputs, per_input)
        params = {
            name: fake_mode.from_tensor(p, static_shapes=True)
            for name, p in model.named_parameters()
        }
        buffers = {
            name: fake_mode.from_tensor(b, static_shapes=True) for name, b in model.named_buffers()
        }
        recorder = SavedStorageRecorder(storage_keys([*params.values(), *buffers.values()]))
        with recording_saved(recorder):
            output = torch.func.functional_call(model, {**params, **buffers}, tuple(fake_inputs))
        sizes = recorder.live_nbytes()
        del output

    total = sympy.Add(*[shape_env.replace(_as_sympy(n)) for n in sizes])
    return _in_named_symbols(total, shape_env, named_symbols)


def _named_dimensions(
    inputs: list[Any], dynamic: dict[str, tuple[int, int]]
) -> dict[int, dict[int, str]]:
    """``dynamic`` checked against the example inputs, as input index -> dim -> name.

    Raises:
        ValueError: a named input is not a tensor, has no such dim, has an
            example size below 2, or a dim is named twice.
    """
    per_input: dict[int, dict[int, str]] = {}
    for name, (index, dim) in dynamic.items():
        if not (0 <= index < len(inputs)) or not isinstance(inputs[index], torch.Tensor):
            raise ValueError(f"dynamic[{name!r}]: input {index} is not a tensor input")
        tensor = inputs[index]
        if not (-tensor.dim() <= dim < tensor.dim()):
            raise ValueError(
                f"dynamic[{name!r}]: input {index} has {tensor.dim()} dims, no dim {dim}"
            )
        dim %= tensor.dim()
        if tensor.shape[dim] < 2:
            raise ValueError(
                f"dynamic[{name!r}]: example size {tensor.shape[dim]} must be >= 2 "
                "(sizes 0 and 1 are specialized by PyTorch's symbolic shapes)"
            )
        if dim in per_input.setdefault(index, {}):
            raise ValueError(f"dynamic[{name!r}]: dim {dim} of input {index} named twice")
        per_input[index][dim] = name
    return per_input


def _symbolic_inputs(
    fake_mode: Any, inputs: list[Any], per_input: dict[int, dict[int, str]]
) -> tuple[list[Any], dict[str, sympy.Symbol]]:
    """Fake copies of the inputs with the named dims symbolic, and each name's symbol.

    Precondition: called inside ``fake_mode``. Non-tensor inputs pass unchanged.
    """
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    named_symbols: dict[str, sympy.Symbol] = {}
    fake_inputs: list[Any] = []
    for index, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            fake_inputs.append(value)
            continue
        dims = per_input.get(index, {})
        context = StatelessSymbolicContext(
            dynamic_sizes=[
                DimDynamic.DYNAMIC if d in dims else DimDynamic.STATIC for d in range(value.dim())
            ]
        )
        fake = fake_mode.from_tensor(value, symbolic_context=context)
        # A fresh storage: nbytes of a fakified real tensor is memoized from
        # the real storage (concrete); a clone's is symbolic, like a freshly
        # allocated input of another size.
        with torch.no_grad():
            fake = fake.clone()
        fake.requires_grad_(value.requires_grad)
        for d, name in dims.items():
            size = fake.shape[d]
            if not isinstance(size, torch.SymInt):
                raise RuntimeError(f"dimension {name!r} did not become symbolic")
            named_symbols[name] = size.node.expr
        fake_inputs.append(fake)
    return fake_inputs, named_symbols


def _in_named_symbols(
    total: sympy.Expr, shape_env: Any, named_symbols: dict[str, sympy.Symbol]
) -> sympy.Expr:
    """``total`` in plain sympy over ``Symbol(name, integer=True, positive=True)``.

    Raises:
        ValueError: the model specialized a named dimension to a constant.
        RuntimeError: ``total`` depends on symbols other than the named ones.
    """
    # Named dimensions must stay free symbols.
    rename: dict[sympy.Symbol, sympy.Symbol] = {}
    for name, sym in named_symbols.items():
        value = shape_env.replace(sym)
        if value.is_number:
            raise ValueError(
                f"the model specializes dimension {name!r} to {value}; it cannot be symbolic"
            )
        rename[sym] = sympy.Symbol(name, integer=True, positive=True)
    constraints = sorted(
        {
            str(_torch_sympy_to_plain(g.expr.xreplace(rename)))
            for g in shape_env.guards
            if isinstance(g.expr, sympy.Eq) and g.expr.free_symbols & set(rename)
        }
    )
    if constraints:
        warnings.warn(
            "the model constrains the named dimensions (the formula is only valid where "
            "these hold): "
            + "; ".join(constraints[:5])
            + ("; ..." if len(constraints) > 5 else ""),
            stacklevel=3,  # the caller of activation_memory_formula
        )
    total = total.xreplace(rename)
    total = sympy.expand(_torch_sympy_to_plain(total))
    extra = total.free_symbols - set(rename.values())
    if extra:
        raise RuntimeError(
            f"saved bytes depend on symbols other than {sorted(named_symbols)}: "
            f"{sorted(map(str, extra))}"
        )
    return total


def max_batch_size(
    formula: sympy.Expr,
    budget_bytes: float,
    batch: str = "B",
    **fixed: int,
) -> int:
    """Largest integer batch ``b >= 1`` with ``formula(b, **fixed) <= budget_bytes``.

    ``fixed`` gives every other symbol of the formula by name (``H=224,
    W=224``). The formula is evaluated exactly (sympy integers, floor terms
    included) and assumed non-decreasing in the batch size (true for saved
    bytes); the answer is found by doubling then integer bisection, so
    ``formula(result) <= budget < formula(result + 1)``.

    Args:
        formula: an expression from :func:`activation_memory_formula`.
        budget_bytes: the memory budget in bytes.
        batch: the name of the batch symbol.
        **fixed: values of the other symbols.

    Returns:
        The largest fitting batch size, or 0 if even batch size 1 does not fit.

    Raises:
        ValueError: a symbol other than ``batch`` is left unset, or the formula
            does not grow with the batch size (any batch would fit).
    """
    symbols = {s.name: s for s in formula.free_symbols}
    unknown = set(fixed) - set(symbols)
    if unknown:
        raise ValueError(f"formula has no symbol(s) {sorted(unknown)}")
    expr = formula.subs({symbols[name]: sympy.Integer(v) for name, v in fixed.items()})
    left = {s.name for s in expr.free_symbols} - {batch}
    if left:
        raise ValueError(f"give a value for {sorted(left)}")
    b_sym = symbols.get(batch, sympy.Symbol(batch, integer=True, positive=True))
    budget = sympy.nsimplify(budget_bytes, rational=True)

    def fits(b: int) -> bool:
        value = expr.subs(b_sym, b)
        if not value.is_number:
            raise ValueError(f"formula did not evaluate to a number at {batch}={b}: {value}")
        return bool(value <= budget)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2**62:
            raise ValueError("formula does not grow with the batch size; every batch fits")
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
