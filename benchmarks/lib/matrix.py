"""The measurement matrix shared by memory_vs_depth and torchvision_models.

Every (model spec, variant) pair of a :class:`MatrixConfig`: build time,
parameter count, saved activation bytes, peak step memory (fresh process) and
step time (round-robin), one result row per pair.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.lib.environment import peer_status
from benchmarks.lib.measure import interleaved_times, peak_bytes, saved_bytes
from benchmarks.lib.results import error_text
from benchmarks.lib.specs import input_chw
from benchmarks.lib.variants import ISOLATED_VARIANTS, build, skip_reason
from revcompile.memory.fresh_process import FreshProcessError, WorkerTimedOut, run_in_fresh_process
from revcompile.memory.step import training_step

#: The loss of every matrix step (all specs are classifiers with 2-D logits).
LOSS = "cross_entropy"


@dataclass(frozen=True)
class MatrixConfig:
    """What :func:`run_matrix` measures, and how.

    ``repeats = 0`` skips timing (``warmup`` then only matters for the
    isolated variants' first step); ``peak_timeout`` limits each peak
    measurement, ``isolated_timeout`` each isolated variant's process (its
    peak measurement included).
    """

    specs: tuple[str, ...]
    variants: tuple[str, ...]
    batch: int
    device: str = "cpu"
    warmup: int = 0
    repeats: int = 0
    peak: bool = True
    peak_timeout: float = 600.0
    isolated_timeout: float = 600.0

    def shape(self, spec: str) -> tuple[int, ...]:
        """The input shape of ``spec`` at the configured batch size."""
        return (self.batch, *input_chw(spec))


def _build_row(spec: str, variant: str, device: torch.device) -> tuple[dict[str, Any], nn.Module]:
    start = time.perf_counter()
    model = build(spec, variant).to(device)
    row: dict[str, Any] = {"build_s": time.perf_counter() - start}
    row["params"] = sum(p.numel() for p in model.parameters())
    return row, model


def measure_isolated(config: MatrixConfig, spec: str, variant: str) -> dict[str, Any]:
    """Build, time (``config.repeats`` may be 0) and count saved bytes of one variant.

    Runs in a fresh process (:func:`revcompile.memory.fresh_process.run_in_fresh_process`);
    the first step's time (``first_step_s``) includes torch.compile's compilation.
    """
    dev = torch.device(config.device)
    shape = config.shape(spec)
    row, model = _build_row(spec, variant, dev)
    step = training_step(model, torch.randn(*shape, device=dev), LOSS)
    row.update(
        interleaved_times({variant: step}, dev, max(1, config.warmup), config.repeats)[variant]
    )
    row["saved_bytes"] = saved_bytes(model, shape, dev)
    if not config.repeats:
        row.pop("times_s", None)
    return row


def run_matrix(
    config: MatrixConfig,
    on_spec_done: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Saved bytes, peak step memory and (``repeats > 0``) step time of every pair.

    Per spec: every available variant is built in this process (build time and
    parameter count recorded) and its saved bytes measured; then all of them
    are timed round-robin (:func:`~benchmarks.lib.measure.interleaved_times`);
    then each one's peak step memory is measured in a fresh process. Variants
    in :data:`~benchmarks.lib.variants.ISOLATED_VARIANTS` are built, timed and
    measured in their own process under ``isolated_timeout``; once one times
    out, it is skipped for the larger specs that follow. A failure is recorded
    in the row (``error``), never raised; an unavailable peer gives a
    ``skipped`` row. ``on_spec_done(rows so far)`` is called after each spec
    (partial results).
    """
    from tqdm import tqdm

    peers = peer_status()
    dev = torch.device(config.device)
    rows: list[dict[str, Any]] = []
    given_up: dict[str, str] = {}
    variants = config.variants
    per_spec = len(variants) * (1 + int(config.peak))
    per_spec += (config.warmup + config.repeats) * len(variants) * bool(config.repeats)
    bar = tqdm(total=len(config.specs) * per_spec, desc="measuring", unit="task")
    for spec in config.specs:
        shape = config.shape(spec)
        spec_rows: dict[str, dict[str, Any]] = {}
        models: dict[str, nn.Module] = {}
        for variant in variants:
            bar.set_postfix_str(f"{spec} {variant}: build + saved bytes")
            row: dict[str, Any] = {"model": spec, "variant": variant, "batch": config.batch}
            spec_rows[variant] = row
            reason = skip_reason(variant, peers) or given_up.get(variant)
            if reason:
                row["skipped"] = reason
            elif variant in ISOLATED_VARIANTS:
                try:
                    row.update(
                        run_in_fresh_process(
                            measure_isolated,
                            timeout=config.isolated_timeout,
                            config=config,
                            spec=spec,
                            variant=variant,
                        )
                    )
                except FreshProcessError as exc:
                    row["error"] = error_text(exc)
                    if isinstance(exc, WorkerTimedOut):
                        given_up[variant] = (
                            f"skipped: {spec} did not finish in {config.isolated_timeout:.0f} s"
                        )
            else:
                try:
                    built, model = _build_row(spec, variant, dev)
                    row.update(built)
                    row["saved_bytes"] = saved_bytes(model, shape, dev)
                    models[variant] = model
                except Exception as exc:
                    row["error"] = error_text(exc)
            bar.update(1)
        if config.repeats and models:
            x = torch.randn(*shape, device=dev)
            steps = {name: training_step(m, x, LOSS) for name, m in models.items()}
            bar.set_postfix_str(f"{spec}: timing {len(steps)} variants round-robin")
            timings = interleaved_times(
                steps, dev, config.warmup, config.repeats, progress=lambda _: bar.update()
            )
            for name, timing in timings.items():
                spec_rows[name].update(timing)
            del steps, x
        models.clear()
        for variant, row in spec_rows.items():
            if config.peak and "skipped" not in row and "error" not in row:
                bar.set_postfix_str(f"{spec} {variant}: peak step memory")
                isolated = variant in ISOLATED_VARIANTS
                limit = config.isolated_timeout if isolated else config.peak_timeout
                try:
                    row["peak_step_bytes"] = peak_bytes(spec, variant, shape, config.device, limit)
                except FreshProcessError as exc:
                    row["peak_error"] = error_text(exc)
            bar.update(1)
        rows += spec_rows.values()
        if on_spec_done is not None:
            on_spec_done(rows)
        bar.n = len(rows) // len(variants) * per_spec
        bar.refresh()
    bar.close()
    return rows
