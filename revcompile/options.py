"""The options of ``convert``, defined once: their types, their choices and their check.

The API validates with :func:`check`, the CLI takes its ``choices`` from
:func:`choices`, and the passes annotate with the same ``Literal`` types.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch

from revcompile.errors import OptionError
from revcompile.runtime import Split as RuntimeSplit

Policy = Literal["checkpoint", "store"]
"""How non-reversible segments between stages store activations."""

Leftover = Literal["store", "half"]
"""What the odd last block of a chain becomes: an ordinary block or a half-coupling."""

StageSplit = RuntimeSplit
"""How one stage turns its input into the two coupling streams (the runtime's choices)."""

Split = Literal[StageSplit, "auto"]
"""The ``split`` option of ``convert``: a StageSplit for every stage, or chosen per stage."""


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
