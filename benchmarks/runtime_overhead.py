"""What reversibility costs: a reversible conv stage versus the same stage in reference_mode.

One training step (forward, sum loss, backward, SGD step) of a
``ReversibleSequence`` of 16 additive couplings on a 64-channel 32x32 input
(batch 32; F and G are 32-channel conv-bn-relu-conv-bn residual functions),
against the very same module (same parameters) under
``revcompile.reference_mode()``, where autograd stores every activation.
The two are timed round-robin in one process (warm-up, then the median of the
repeats), so the time ratio comes from one run on one machine state. Saved
activation bytes (deterministic) and peak step memory (fresh process each)
complete the picture. Target (issue 2): time ratio <= 1.40.

    python -m benchmarks.runtime_overhead            # full run
    python -m benchmarks.runtime_overhead --quick    # smoke test
"""

from __future__ import annotations

import argparse
import functools
import statistics
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from benchmarks.lib.environment import machine_line
from benchmarks.lib.measure import interleaved_times, saved_bytes
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import (
    Run,
    add_results_dir,
    error_text,
    fixed,
    mib,
    print_table,
    ratio,
    seconds,
)
from benchmarks.lib.variants import ReferenceMode
from revcompile.memory import peak_step_memory
from revcompile.memory.fresh_process import FreshProcessError
from revcompile.memory.step import training_step
from tests.models import residual_function

TARGET_TIME_RATIO = 1.40


def coupling_stage(couplings: int, channels: int, reference: bool, seed: int = 0) -> nn.Module:
    """The benchmarked stage (wrapped in reference_mode when ``reference``)."""
    from revcompile import AdditiveCoupling, ReversibleSequence

    torch.manual_seed(seed)
    half = channels // 2
    stage = ReversibleSequence(
        [
            AdditiveCoupling(residual_function(half, half), residual_function(half, half))
            for _ in range(couplings)
        ],
        name="bench",
    )
    return ReferenceMode(stage) if reference else stage


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--couplings", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="height and width")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-peak", action="store_true", help="skip peak step memory")
    parser.add_argument("--quick", action="store_true", help="small smoke-test configuration")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.couplings, args.batch, args.warmup, args.repeats = 4, 8, 1, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("runtime_overhead", parse_args, argv)
    meta = run.meta
    meta["notes"] = [
        f"{args.warmup} warm-up round(s), median of {args.repeats} timed rounds, the two "
        "variants alternating (few repeats: a step takes seconds on a 2-core CPU)."
    ]
    meta["config"] = {
        k: getattr(args, k) for k in ("couplings", "batch", "channels", "size", "warmup", "repeats")
    }
    device = torch.device(args.device)
    shape = (args.batch, args.channels, args.size, args.size)

    stage = coupling_stage(args.couplings, args.channels, reference=False).to(device).train()
    variants = {"reversible": stage, "reference_mode": ReferenceMode(stage)}
    x = torch.randn(*shape, device=device)
    steps = {name: training_step(model, x, "sum") for name, model in variants.items()}
    rounds = args.warmup + args.repeats
    with tqdm(total=rounds * len(steps), desc="timing (interleaved)", unit="step") as bar:
        timings = interleaved_times(
            steps, device, args.warmup, args.repeats, progress=lambda _: bar.update()
        )

    rows: list[dict[str, Any]] = []
    for name, model in tqdm(variants.items(), desc="memory", unit="variant"):
        row: dict[str, Any] = {"variant": name, **timings[name]}
        row["saved_bytes"] = saved_bytes(model, shape, device)
        if not args.no_peak:
            factory = functools.partial(
                coupling_stage, args.couplings, args.channels, name == "reference_mode"
            )
            try:
                row["peak_step_bytes"] = peak_step_memory(factory, shape, args.device, timeout=600)
            except FreshProcessError as exc:
                row["peak_error"] = error_text(exc)
        rows.append(row)

    rev, ref = rows
    paired = [a / b for a, b in zip(rev["times_s"], ref["times_s"], strict=False) if b]
    summary = {
        "time_ratio": ratio(rev.get("median_s"), ref.get("median_s")),
        # Robustness checks on a shared machine: fastest step of each (least disturbed
        # by other processes) and the median of the per-round ratios.
        "time_ratio_of_minima": ratio(
            min(rev["times_s"], default=None), min(ref["times_s"], default=None)
        ),
        "time_ratio_paired_median": statistics.median(paired) if paired else None,
        "saved_bytes_ratio": ratio(rev["saved_bytes"], ref["saved_bytes"]),
        "peak_ratio": ratio(rev.get("peak_step_bytes"), ref.get("peak_step_bytes")),
        "target_time_ratio": TARGET_TIME_RATIO,
    }
    summary["time_target_met"] = (
        summary["time_ratio"] is not None and summary["time_ratio"] <= TARGET_TIME_RATIO
    )
    meta["summary"] = summary
    run.finish()

    run.write(rows)
    markdown = print_table(
        f"{args.couplings}-coupling stage, batch {args.batch}, {args.channels} ch, "
        f"{args.size}x{args.size} — {machine_line(meta['machine'])}",
        ["variant", "step time (median s)", "saved MiB", "peak step MiB"],
        [
            [
                r["variant"],
                seconds(r.get("median_s")),
                mib(r["saved_bytes"]),
                mib(r.get("peak_step_bytes")),
            ]
            for r in rows
        ]
        + [
            [
                "ratio reversible / reference",
                fixed(summary["time_ratio"], 3),
                fixed(summary["saved_bytes_ratio"], 3),
                fixed(summary["peak_ratio"], 3),
            ]
        ],
    )
    run.write_markdown([markdown])
    _plot(rows, summary, run.stem, args)
    verdict = "met" if summary["time_target_met"] else "MISSED"
    print(
        f"time ratio {fixed(summary['time_ratio'], 3)} (target <= {TARGET_TIME_RATIO}: {verdict})"
    )
    run.report()
    return 0


def _plot(rows: list[dict[str, Any]], summary: dict[str, Any], stem: Any, args: Any) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in rows]
    for i, r in enumerate(rows):
        left.scatter([i] * len(r["times_s"]), r["times_s"], alpha=0.5, color="gray", s=12)
        if "median_s" in r:
            left.bar(i, r["median_s"], alpha=0.6)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("training step time (s)")
    left.set_title(f"time ratio {fixed(summary['time_ratio'], 3)} (target <= 1.40)")
    width = 0.4
    saved = [r["saved_bytes"] / 2**20 for r in rows]
    peak = [r.get("peak_step_bytes", 0) / 2**20 for r in rows]
    right.bar([i - width / 2 for i in range(len(rows))], saved, width, label="saved activations")
    right.bar([i + width / 2 for i in range(len(rows))], peak, width, label="peak step memory")
    right.set_xticks(range(len(names)), names)
    right.set_ylabel("MiB")
    right.legend()
    right.set_title(f"{args.couplings} couplings, batch {args.batch}, {args.channels} ch")
    save_figure(fig, stem)


if __name__ == "__main__":
    raise SystemExit(main())
