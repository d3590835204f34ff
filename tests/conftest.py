"""Shared pytest setup: hypothesis profiles and torch threads.

Profiles (select with ``REVCOMPILE_HYPOTHESIS_PROFILE``): ``ci`` (default,
quick: 15 examples per property) and ``long`` (200 examples).
"""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("REVCOMPILE_HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(2)

# The adversarial suite's long profile (tests/adversarial): >= 1,000 generated networks.
settings.register_profile(
    "adversarial-long",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("REVCOMPILE_HYPOTHESIS_PROFILE", "ci"))
