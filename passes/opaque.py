"""Pass 3b: the residual blocks inside modules the trace keeps whole.

A module traced as one ``call_module`` node (its forward reads
``self.training``, or timm lists it as not traceable) hides the residual adds
inside it from ``find_residuals``: they are never converted. Rather than say
nothing, this pass traces each such module on its own and finds its blocks,
so the report lists them as kept, with the reason::

    >>> opaque = find_opaque_blocks(gm)
    >>> [(b.name, b.why) for b in opaque]
    [('blocks.0.add', 'its forward reads self.training')]

Each module is traced in the mode it is in (``trace_in_current_mode``:
``if self.training:`` is fine for counting adds); the sub-traces only read the
modules, and nothing is rewritten.
"""

from __future__ import annotations

from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.graph_utils import has_hooks
from revcompile.passes.ir import OpaqueBlock
from revcompile.passes.normalize import normalize
from revcompile.passes.ops import STOCHASTIC_DEPTH_CLASS_NAMES
from revcompile.passes.trace import (
    LEAF_CLASS_NAMES,
    configures_torch_layer,
    timm_notrace_registry,
    trace_in_current_mode,
)
from torch import nn
from torch.fx import GraphModule

from revcompile.errors import ConversionError

__all__ = ["find_opaque_blocks"]


def find_opaque_blocks(gm: GraphModule, prefix: str = "") -> list[OpaqueBlock]:
    """The residual blocks inside the user modules ``gm`` calls as single nodes.

    Preconditions: ``gm`` comes from ``revcompile.passes.trace.trace``.
    Postconditions: one ``OpaqueBlock`` per residual add found inside such a
    module (and, recursively, inside the modules it keeps whole), named by its
    qualified path, in graph order; a module that cannot be traced on its own
    contributes none. ``gm`` and its modules are unchanged.
    """
    found: list[OpaqueBlock] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        why = _why_whole(module)
        if why is None:
            continue
        path = f"{prefix}{node.target}"
        try:
            inner = trace_in_current_mode(module)
        except ConversionError:
            continue
        blocks, _ = find_residuals(normalize(inner))
        found += [OpaqueBlock(f"{path}.{b.name}", path, b.shortcut, why) for b in blocks]
        found += find_opaque_blocks(inner, f"{path}.")
    return found


def _why_whole(module: nn.Module) -> str | None:
    """Why the trace keeps ``module`` as one node, for a module that may hold
    residual blocks; None for torch's own layers and the other fixed leaves."""
    cls = type(module)
    if not isinstance(module, nn.Module):
        return None
    container = cls.__module__ == "torch.nn.modules.container"  # a leaf only when hooked
    if has_hooks(module) and (container or not cls.__module__.startswith(("torch.", "revcompile"))):
        return "it has hooks of its own (they run when it is called)"
    if (
        cls.__module__.startswith(("torch.", "revcompile"))
        or cls.__name__ in STOCHASTIC_DEPTH_CLASS_NAMES | LEAF_CLASS_NAMES
        or configures_torch_layer(cls)
    ):
        return None
    if isinstance(module, timm_notrace_registry()[0]):
        return "timm lists it as not traceable"
    return "its forward reads self.training"
