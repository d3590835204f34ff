"""revcompile: make residual networks reversible.

``convert(model)`` returns a ``torch.fx.GraphModule`` in which consecutive
stride-1 residual blocks are RevNet additive couplings, so training stores
activations only at the inputs of non-reversible layers.

The imports follow the layers: the runtime (``revcompile.runtime``) imports only
torch, the passes import the runtime, errors, options and report modules, and
``revcompile.api`` imports the passes; nothing below ``api`` imports it.
"""

from __future__ import annotations

from revcompile import memory
from revcompile._version import __version__
from revcompile.api import analyze, convert, report
from revcompile.conversion_report import ConversionReport
from revcompile.errors import ConversionError, RevcompileError
from revcompile.inline import inline
from revcompile.io import load, save
from revcompile.optim import optim_in_backward
from revcompile.runtime import AdditiveCoupling, ReversibleSequence, reference_mode

__all__ = [
    "__version__",
    "AdditiveCoupling",
    "ConversionError",
    "ConversionReport",
    "ReversibleSequence",
    "RevcompileError",
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
