"""Shared pytest setup: hypothesis profiles and torch threads.

Profiles (select with ``REVCOMPILE_HYPOTHESIS_PROFILE``): ``ci`` (default,
quick: 15 examples per property, derandomized so that every CI run checks the
same examples), ``long`` (200 random examples) and ``adversarial-long`` (1,000,
for the adversarial suite's long run, ``tests/adversarial/run_long.py``).
"""

import os

import torch
from hypothesis import HealthCheck, settings

_SLOW_OK = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=15, derandomize=True, **_SLOW_OK)
settings.register_profile("long", max_examples=200, **_SLOW_OK)
settings.register_profile("adversarial-long", max_examples=1000, **_SLOW_OK)
settings.load_profile(os.environ.get("REVCOMPILE_HYPOTHESIS_PROFILE", "ci"))

# Under pytest-xdist each of the workers gets one of the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
