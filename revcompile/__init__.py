"""revcompile: make residual networks reversible.

``convert(model)`` returns a ``torch.fx.GraphModule`` in which consecutive
stride-1 residual blocks are RevNet additive couplings, so training stores
activations only at the inputs of non-reversible layers.

The runtime (``revcompile.nn``) is imported eagerly; the compiler API
(``analyze``, ``convert``, ``report``) is loaded on first use so that
the passes can import the runtime without an import cycle.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from revcompile.errors import ConversionError
from revcompile.inline import inline
from revcompile.nn import AdditiveCoupling, ReversibleSequence, reference_mode
from revcompile.optim import optim_in_backward

if TYPE_CHECKING:
    from revcompile.api import analyze, convert, report
    from revcompile.conversion_report import ConversionReport
    from revcompile.io import load, save

__version__ = "0.1.0"

_LAZY = {
    "analyze": "revcompile.api",
    "convert": "revcompile.api",
    "report": "revcompile.api",
    "ConversionReport": "revcompile.conversion_report",
    "memory": "revcompile.memory",
    "load": "revcompile.io",
    "save": "revcompile.io",
}

__all__ = [
    "AdditiveCoupling",
    "ConversionError",
    "ConversionReport",
    "ReversibleSequence",
    "analyze",
    "convert",
    "inline",
    "load",
    "memory",
    "optim_in_backward",
    "reference_mode",
    "report",
    "save",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'revcompile' has no attribute {name!r}")
    module = import_module(_LAZY[name])
    value = module if module.__name__.endswith(name) else getattr(module, name)
    globals()[name] = value
    return value
