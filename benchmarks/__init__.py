"""Benchmarks of revcompile against the alternatives users would pick instead.

Run each script from the repository root as a module, e.g.
``python -m benchmarks.memory_vs_depth``; results go to ``benchmarks/results/``.
"""
