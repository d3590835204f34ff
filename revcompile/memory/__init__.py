"""Memory model: measured and symbolic activation memory of a training step.

Three quantities, from cheapest to most expensive (DESIGN.md §7), one module each:

* :func:`saved_activation_bytes` (:mod:`.saved`) -- bytes of the distinct
  storages autograd keeps for backward after one training forward (parameters
  and buffers excluded). Deterministic; measured in this process.
* :func:`activation_memory_formula` (:mod:`.formula`) -- the same quantity as
  an exact ``sympy`` expression in named input dimensions (batch, height,
  width), obtained by running the forward once under a ``FakeTensorMode`` with
  symbolic sizes. :func:`max_batch_size` answers "what is the largest batch
  that fits".
* :func:`peak_step_memory` (:mod:`.peak`) -- peak memory of one full training
  step (:mod:`.step`: forward, backward, optimizer step) measured in a fresh
  process (:mod:`.fresh_process`, the runner the benchmarks reuse): RSS
  high-water-mark growth on CPU, ``torch.cuda.max_memory_allocated`` growth on
  CUDA. This is the headline number (it includes gradients, temporaries and the
  transient peak of recomputation); saved bytes are its deterministic companion.

This package is runtime-level: it imports only torch, sympy and the standard
library (never ``revcompile.passes``, ``revcompile.api`` or the CLI).
"""

from revcompile.memory.formula import DEFAULT_DYNAMIC, activation_memory_formula, max_batch_size
from revcompile.memory.peak import peak_step_memory
from revcompile.memory.saved import saved_activation_bytes

__all__ = [
    "DEFAULT_DYNAMIC",
    "activation_memory_formula",
    "max_batch_size",
    "peak_step_memory",
    "saved_activation_bytes",
]
