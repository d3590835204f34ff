"""The exceptions revcompile raises: one hierarchy under ``RevcompileError``.

Callers (the CLI, the benchmarks, users) branch on the class, never on the
message text; messages are one line saying what is wrong and what to do.
"""

from __future__ import annotations

# The base class and the runtime's own error live with the runtime, which imports
# only torch; everything else is defined here, below them.
from revcompile.runtime.errors import ExactRangeError, RevcompileError

__all__ = [
    "BudgetError",
    "ConversionError",
    "ExactRangeError",
    "InputShapeError",
    "MeasurementTimeout",
    "OptionError",
    "PartitionError",
    "PythonRandomnessError",
    "RevcompileError",
    "RevcompileFileError",
    "SourceError",
    "UntraceableError",
]


class ConversionError(RevcompileError, RuntimeError):
    """The model cannot be traced or converted; the message says what to do."""


class InputShapeError(ConversionError):
    """The model rejects the example inputs (or the guessed ones) it was given."""


class PartitionError(ConversionError):
    """A branch cannot be split into channel halves; ``reason`` is the report text.

    ``progress`` counts the branch ops the analysis accepted before failing;
    among several readings of the channel axis, the one that got furthest
    gives the reason.
    """

    def __init__(self, reason: str, progress: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.progress = progress


class SourceError(RevcompileError, ValueError):
    """A model source (factory spec, pickled module, state_dict) cannot be loaded."""


class RevcompileFileError(RevcompileError, ValueError):
    """A file is not a module saved by ``revcompile.save``, or is damaged."""


class MeasurementTimeout(RevcompileError, TimeoutError):
    """A measurement in a fresh process did not finish in time."""


class PythonRandomnessError(ConversionError):
    """Traced code draws Python-level random numbers (``random``, ``numpy.random``)."""


class OptionError(RevcompileError, ValueError):
    """An option of ``convert`` has a value it cannot take; the message lists the allowed ones."""


class BudgetError(ConversionError):
    """No plan fits ``memory_budget``; ``smallest`` is the fewest saved bytes any plan reaches."""

    def __init__(self, budget: int, smallest: int, preserve_function: bool) -> None:
        how = "storing and checkpointing" if preserve_function else "any plan"
        super().__init__(
            f"memory_budget of {budget:,} bytes cannot be met: the smallest saved activations "
            f"{how} reaches at this input size are {smallest:,} bytes; give at least that, "
            "or a smaller input" + (" (or allow reversible couplings)" if preserve_function else "")
        )
        self.budget = budget
        self.smallest = smallest


class UntraceableError(ConversionError):
    """torch.fx fails inside the model's code (control flow on a Proxy, iterating it, ...)."""
