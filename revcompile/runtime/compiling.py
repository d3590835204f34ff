"""``torch.compile`` inside the reversible stages and the checkpointed segments.

Under ``torch.compile(gm)`` the training path of every ``ReversibleSequence``
and ``CheckpointedSegment`` runs eagerly (a graph break): its autograd Function
and its checkpoint are what save the memory, and dynamo cannot trace their RNG
and module-state bookkeeping. What they *call* can be compiled, though:
:func:`compile_parts` compiles each coupling's F and G and each segment's body
(``nn.Module.compile``), so the stage's forward and its backward recomputation
call compiled code, and the root module, whose eval/no-grad forward (the plain
path of every stage) is then one graph.

``nn.Module.compile`` keeps the module, its class and its ``state_dict`` keys;
a deep copy or a pickled copy of a compiled module is an uncompiled one (torch
drops the compiled call), so ``copy.deepcopy(gm)`` and ``revcompile.save``
behave as for any compiled module.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from revcompile.runtime.coupling import AdditiveCoupling
from revcompile.runtime.segment import CheckpointedSegment

__all__ = ["compile_parts", "compiled_parts"]


def compiled_parts(root: nn.Module) -> list[nn.Module]:
    """The modules :func:`compile_parts` compiles, each once, in module order.

    Every F and G of every coupling under ``root``, every checkpointed
    segment's body, and ``root`` last.
    """
    parts: dict[int, nn.Module] = {}
    for module in root.modules():
        if isinstance(module, AdditiveCoupling):
            for branch in (module.F, module.G):
                if branch is not None:
                    parts.setdefault(id(branch), branch)
        elif isinstance(module, CheckpointedSegment):
            parts.setdefault(id(module.body), module.body)
    parts.setdefault(id(root), root)
    return list(parts.values())


def compile_parts(root: nn.Module, **compile_kwargs: Any) -> list[nn.Module]:
    """Compile ``root`` and the modules its stages and segments call in training.

    Precondition: ``compile_kwargs`` are keywords of ``torch.compile``
    (``backend``, ``mode``, ``options``, ``dynamic``, ...); ``fullgraph`` would
    fail on the root in training (the stages are graph breaks there), so pass
    it to your own ``torch.compile`` of the eval module instead.
    Postcondition: each of :func:`compiled_parts` runs compiled on its next
    call: in training, the reversible forward, the reversible backward's
    recomputation and each checkpointed recomputation run the compiled F, G and
    segment bodies; in eval mode or under ``torch.no_grad()`` the root's forward
    is one graph. Compilation happens lazily, on those first calls. Returns the
    compiled modules.
    """
    parts = compiled_parts(root)
    for module in parts:
        module.compile(**compile_kwargs)
    return parts
