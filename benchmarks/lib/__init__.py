"""The pieces the benchmark scripts share, one concern per module.

* :mod:`.environment` -- the machine and the peer libraries a run saw;
* :mod:`.cifar`, :mod:`.specs` -- the benchmarked networks (model specs);
* :mod:`.peers`, :mod:`.variants` -- the peer libraries' RevNets and the
  registry of variants (the forms in which a network is benchmarked);
* :mod:`.measure` -- timing, saved bytes and peak step memory of one network;
* :mod:`.matrix` -- every (model, variant) pair of a run, from a
  :class:`~benchmarks.lib.matrix.MatrixConfig`;
* :mod:`.results`, :mod:`.plots` -- CSV/JSON/Markdown results and figures.

The training step and the fresh-process runner come from
:mod:`revcompile.memory` (one definition each, shared with
:func:`revcompile.memory.peak_step_memory`).
"""
