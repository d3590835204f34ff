"""Reversible runtime: additive couplings and the stage that backpropagates through them.

``ReversibleSequence`` runs a chain of ``AdditiveCoupling`` blocks on two
streams made from its input. In training it uses one autograd Function that
stores only the stage output and, in backward, reconstructs every coupling's
input from its output (Gomez et al. 2017, Algorithm 1) while computing the
gradients. ``CheckpointedSegment`` recomputes a non-reversible part. See
DESIGN.md §1 and §6.

Modules: ``coupling`` (the coupling math, once), ``function`` (the reversible
autograd Function), ``sequence`` (the stage), ``segment`` (checkpointed
parts), ``state`` (module state and RNG recorded in forward, replayed in
recomputation), ``modes`` (``reference_mode``), ``debug``
(``check_inverse``), ``compiling`` (``torch.compile`` inside the stages:
``compile_parts``), ``trunk_update`` (exact mode's trunk update, fused by
``torch.compile`` where it can be: ``use_fused_update``). The runtime imports
only torch and the standard library; it never imports the compiler passes.
"""

from revcompile.runtime.compiling import compile_parts
from revcompile.runtime.coupling import AdditiveCoupling
from revcompile.runtime.debug import check_inverse
from revcompile.runtime.modes import in_reference_mode, reference_mode
from revcompile.runtime.segment import CheckpointedSegment
from revcompile.runtime.sequence import ReversibleSequence, Split
from revcompile.runtime.trunk_update import use_fused_update

__all__ = [
    "AdditiveCoupling",
    "CheckpointedSegment",
    "ReversibleSequence",
    "Split",
    "check_inverse",
    "compile_parts",
    "in_reference_mode",
    "reference_mode",
    "use_fused_update",
]
