"""The options of ``convert``, defined once: their types, their choices and their check.

The API validates with :func:`check`, the CLI takes its ``choices`` from
:func:`choices`, and the passes annotate with the same ``Literal`` types.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

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
