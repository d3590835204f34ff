"""The options of ``convert``, defined once: their types, their choices and their check.

The API validates with :func:`check`, the CLI takes its ``choices`` from
:func:`choices`, and the passes annotate with the same ``Literal`` types.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch

from revcompile.errors import OptionError
from revcompile.runtime import Split as RuntimeSplit

Policy = Literal["checkpoint", "store"]
"""How non-reversible segments between stages store activations."""

Leftover = Literal["store", "half", "single"]
"""What the odd last block of a chain becomes: an ordinary block (``"store"``), a
half-coupling ``y1 = x1 + F(x2), y2 = x2`` (``"half"``), or a coupling built from
that one block, F and G from complementary channel slices of its branch
(``"single"``)."""

DEFAULT_LEFTOVER: Leftover = "half"
"""The default of ``leftover`` (``convert``, ``analyze``, the CLI, the planning pass).

Chosen by ``benchmarks/leftover.py`` (README "Odd leftovers") among the choices
that make every identity block of a chain reversible: ``"half"`` and
``"single"`` save the same bytes and reach the same test accuracy within seed
noise, and ``"half"`` takes 14-21% less time per step with fewer parameters
(one half-width branch per original block, as in the pairs). ``"store"`` keeps
the leftover: where a network's only identity blocks are leftovers nothing
becomes reversible (2.8x the saved bytes); elsewhere, under
``policy="checkpoint"``, it saves fewer bytes (the rest of the network is one
checkpointed segment) at the same peak step memory."""


StageSplit = RuntimeSplit
"""How one stage turns its input into the two coupling streams (the runtime's choices)."""

Split = Literal[StageSplit, "auto"]
"""The ``split`` option of ``convert``: a StageSplit for every stage, or chosen per stage."""

DEFAULT_SPLIT: Split = "auto"
"""The default of ``split`` (``convert``, ``analyze``, the CLI, the planning pass).

``"auto"`` halves every chain whose branches all halve, as ``"halve"`` does, and
duplicates the others (attention, branches with ops the halving pass does not
know), which ``"halve"`` keeps as stored blocks. Chosen by ``benchmarks/split.py``
(README "Choosing the split"); over the coverage list (README "Coverage of
architectures") it makes 95% of the stride-1 identity blocks reversible against
66% for ``"halve"``."""


def choices(option: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` option type, in declaration order."""
    return get_args(option)


def check(name: str, value: object, option: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``option``'s choices."""
    allowed = choices(option)
    if value not in allowed:
        listed = ", ".join(repr(choice) for choice in allowed)
        raise ValueError(f"{name} must be one of {listed}, not {value!r}")


Compile = bool | Mapping[str, Any]
"""The ``compile`` option of ``convert``: False, True (``torch.compile``'s defaults)
or a mapping of ``torch.compile`` keywords (``backend``, ``mode``, ``options``, ...)."""

# fullgraph would fail on the converted module in training, where every stage
# is a graph break; model is what is being compiled.
_NOT_COMPILE_KEYWORDS = ("model", "fullgraph")


def compile_keywords(value: Compile) -> dict[str, Any] | None:
    """The ``torch.compile`` keywords that ``compile=value`` asks for; None for no compile.

    Raises ``OptionError`` for a value that is neither a bool nor a mapping of
    ``torch.compile`` keywords.
    """
    if isinstance(value, bool):
        return {} if value else None
    if not isinstance(value, Mapping):
        raise OptionError(
            f"compile must be True, False or a dict of torch.compile keywords, not {value!r}"
        )
    allowed = [
        k for k in inspect.signature(torch.compile).parameters if k not in _NOT_COMPILE_KEYWORDS
    ]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise OptionError(
            f"compile: {', '.join(map(repr, unknown))} not accepted; use torch.compile keywords "
            f"among {', '.join(allowed)} (for fullgraph, torch.compile the eval module yourself)"
        )
    return dict(value)


MemoryBudget = float | int | str
"""The ``memory_budget`` option of ``convert``: a fraction ``0 < B <= 1`` (a float) of
the original's saved activation bytes, or an absolute size: an int of bytes or a
string such as ``"8GiB"`` or ``"500MB"`` (see :func:`parse_size`)."""

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    **{f"{p}B": 1000 ** (i + 1) for i, p in enumerate("KMGT")},
    **{p: 1000 ** (i + 1) for i, p in enumerate("KMGT")},
    **{f"{p}IB": 1024 ** (i + 1) for i, p in enumerate("KMGT")},
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """``"24GB"`` -> 24e9 bytes, ``"24GiB"`` -> 24 * 2**30, a bare number is bytes.

    Raises ``ValueError`` for a malformed or non-positive size (the message does
    not repeat ``text``: callers say which option it was).
    """
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            "expected a size such as 24GB, 512MiB or 1000000000 "
            "(KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024)"
        )
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if value <= 0 or not math.isfinite(value):
        raise ValueError("the size must be positive")
    return int(value)


def budget_bytes(budget: MemoryBudget, original: int) -> int:
    """The byte limit ``budget`` stands for, given the original's saved bytes ``original``.

    A float is a fraction (``0 < budget <= 1``) of ``original``, rounded down; an
    int is bytes; a string is parsed by :func:`parse_size`. Raises ``ValueError``
    for anything else (a bool, a fraction outside (0, 1], a non-positive size).
    """
    if isinstance(budget, bool) or not isinstance(budget, float | int | str):
        raise ValueError(
            f"memory_budget must be a fraction such as 0.5, a number of bytes or a size "
            f"such as '8GiB', not {budget!r}"
        )
    if isinstance(budget, str):
        try:
            return parse_size(budget)
        except ValueError as error:
            raise ValueError(f"memory_budget={budget!r}: {error}") from None
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(
                f"memory_budget={budget!r}: a fraction must be in (0, 1]; give larger budgets "
                "as a size such as '8GiB' or an int of bytes"
            )
        return math.floor(budget * original)
    if budget <= 0:
        raise ValueError(f"memory_budget={budget!r} bytes must be positive")
    return budget


Frontend = Literal["auto", "fx", "shapes"]
"""How ``convert`` gets a graph of a model that is not already a ``GraphModule``:
``"fx"`` plain symbolic tracing only; ``"shapes"`` tracing that resolves Python
control flow on shapes against ``example_inputs`` (``passes.trace_shapes``);
``"auto"`` the first, and the second when plain tracing fails and
``example_inputs`` are given."""
