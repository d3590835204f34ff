"""Measurements of one network: step time, saved activation bytes, peak step memory.

The step is :func:`revcompile.memory.step.training_step` (the one
:func:`revcompile.memory.peak_step_memory` measures), so the time and the
peak of a table row describe the same step.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.lib.results import error_text
from benchmarks.lib.variants import build
from revcompile.memory import peak_step_memory, saved_activation_bytes


def sync(device: torch.device) -> None:
    """Wait for queued kernels (CUDA) so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``step``."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def interleaved_times(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several steps round-robin: ``warmup`` unmeasured rounds, then ``repeats``.

    Interleaving spreads slow periods of a shared machine over all variants,
    so that ratios between variants of one run stay meaningful. A step that
    raises is dropped from later rounds and reported with its error.
    """
    results: dict[str, dict[str, Any]] = {name: {"times_s": []} for name in steps}
    active = dict(steps)
    for round_index in range(warmup + repeats):
        for name, step in list(active.items()):
            try:
                seconds = timed(step, device)
            except Exception as exc:
                results[name]["error"] = error_text(exc)
                del active[name]
                continue
            if round_index == 0:
                results[name]["first_step_s"] = seconds
            if round_index >= warmup:
                results[name]["times_s"].append(seconds)
            if progress:
                progress(name)
    for entry in results.values():
        if entry["times_s"]:
            entry["median_s"] = statistics.median(entry["times_s"])
            # a shared machine only ever slows a step down, so the fastest is the least disturbed
            entry["best_s"] = min(entry["times_s"])
    return results


def saved_bytes(model: nn.Module, shape: Sequence[int], device: torch.device) -> int:
    """``revcompile.memory.saved_activation_bytes`` of a training forward at ``shape``."""
    torch.manual_seed(1)
    x = torch.randn(*shape, device=device)
    return saved_activation_bytes(model.train(), x)


def peak_bytes(
    spec: str,
    variant: str,
    shape: Sequence[int],
    device: str,
    timeout: float | None,
) -> int:
    """Peak memory of one training step (cross-entropy) of ``build(spec, variant)``.

    Measured in a fresh process by :func:`revcompile.memory.peak_step_memory`.
    """
    return peak_step_memory(
        functools.partial(build, spec, variant),
        list(shape),
        device,
        loss="cross_entropy",
        timeout=timeout,
    )
