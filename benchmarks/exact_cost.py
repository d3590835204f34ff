"""What exact mode costs: saved bytes and training step time, exact vs float mode.

Exact mode (DESIGN.md §10) carries a reversible stage's trunk in float64 on a
``2**-32`` grid, so a stage saves its two final streams in float64 instead of
its output in the input's dtype, and every coupling update rounds the branch
output and checks the trunk's range. Measured in one run:

* saved activation bytes (``revcompile.memory.saved_activation_bytes``) of a
  ``ReversibleSequence`` at several depths, and of the converted CIFAR
  ResNet at several depths, float vs ``exact=True``: bound (issue 15) at most
  2x the float stage's, and independent of depth;
* training step time (forward, sum loss, backward, SGD step) of the same
  stage and of the converted CIFAR ResNet, float vs exact, timed round-robin in
  one process (warm-up, then the median of the repeats): bound at most 1.10x.
  Wall-clock and CPU time (``time.process_time``, which does not count the time
  other jobs hold the core) are both reported.

    python -m benchmarks.exact_cost            # full run
    python -m benchmarks.exact_cost --quick    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import revcompile
from benchmarks.lib.cifar import CifarResNet
from benchmarks.lib.environment import machine_line
from benchmarks.lib.measure import interleaved_times, saved_bytes
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import Run, add_results_dir, fixed, mib, print_table, ratio, seconds
from revcompile import AdditiveCoupling, ReversibleSequence
from revcompile.memory.step import training_step
from tests.models import residual_function

SAVED_BOUND = 2.0
TIME_BOUND = 1.10


def stage(couplings: int, channels: int, exact: bool, seed: int = 0) -> nn.Module:
    """A stage of ``couplings`` couplings, F and G conv-bn-relu-conv-bn at half width."""
    torch.manual_seed(seed)
    half = channels // 2
    return ReversibleSequence(
        [
            AdditiveCoupling(residual_function(half, half), residual_function(half, half))
            for _ in range(couplings)
        ],
        name="bench",
        exact=exact,
    ).train()


def network(n: int, exact: bool, example: torch.Tensor, seed: int = 0) -> nn.Module:
    """The CIFAR ResNet of ``n`` blocks per stage, converted (same weights for both modes)."""
    torch.manual_seed(seed)
    return revcompile.convert(CifarResNet(n), example, exact=exact).train()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage-depths", type=int, nargs="+", default=[2, 8, 32, 128])
    parser.add_argument("--network-depths", type=int, nargs="+", default=[3, 9, 27])
    parser.add_argument("--couplings", type=int, default=16, help="timed stage's couplings")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--network-n", type=int, default=18, help="timed network's n")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="height and width")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="small smoke-test configuration")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.stage_depths, args.network_depths, args.couplings = [2, 8], [3, 5], 4
        args.network_n, args.batch, args.size, args.warmup, args.repeats = 3, 4, 16, 1, 3
    return args


def saved_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Saved bytes of float and exact mode, for stages and networks of each depth."""
    rows = []
    stage_shape = (args.batch, args.channels, args.size, args.size)
    for couplings in tqdm(args.stage_depths, desc="saved bytes: stage", unit="depth"):
        float_bytes, exact_bytes = (
            saved_bytes(stage(couplings, args.channels, exact), stage_shape, device)
            for exact in (False, True)
        )
        rows.append(_saved_row("stage", couplings, float_bytes, exact_bytes))
    net_shape = (args.batch, 3, args.size, args.size)
    example = torch.randn(2, 3, args.size, args.size)
    for n in tqdm(args.network_depths, desc="saved bytes: network", unit="depth"):
        float_bytes, exact_bytes = (
            saved_bytes(network(n, exact, example), net_shape, device) for exact in (False, True)
        )
        rows.append(_saved_row("network", n, float_bytes, exact_bytes))
    return rows


def _saved_row(what: str, depth: int, float_bytes: int, exact_bytes: int) -> dict[str, Any]:
    return {
        "measure": "saved_bytes",
        "what": what,
        "depth": depth,
        "float_bytes": float_bytes,
        "exact_bytes": exact_bytes,
        "ratio": exact_bytes / float_bytes,
    }


def time_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Step time of float and exact mode, timed round-robin, for the stage and the network."""
    example = torch.randn(2, 3, args.size, args.size)
    cases = {
        "stage": (
            lambda exact: stage(args.couplings, args.channels, exact),
            (args.batch, args.channels, args.size, args.size),
            args.couplings,
        ),
        "network": (
            lambda exact: network(args.network_n, exact, example),
            (args.batch, 3, args.size, args.size),
            args.network_n,
        ),
    }
    rows = []
    for what, (build, shape, depth) in cases.items():
        x = torch.randn(*shape, device=device)
        cpu: dict[str, list[float]] = {"float": [], "exact": []}
        steps = {
            mode: _cpu_timed(training_step(build(mode == "exact").to(device), x, "sum"), cpu[mode])
            for mode in ("float", "exact")
        }
        with tqdm(total=(args.warmup + args.repeats) * 2, desc=f"time: {what}") as bar:
            timings = interleaved_times(
                steps, device, args.warmup, args.repeats, progress=lambda _: bar.update()
            )
        float_times, exact_times = timings["float"]["times_s"], timings["exact"]["times_s"]
        float_cpu, exact_cpu = (cpu[mode][args.warmup :] for mode in ("float", "exact"))
        rows.append(
            {
                "measure": "step_time",
                "what": what,
                "depth": depth,
                "float_times_s": float_times,
                "exact_times_s": exact_times,
                "float_median_s": statistics.median(float_times),
                "exact_median_s": statistics.median(exact_times),
                "ratio": ratio(statistics.median(exact_times), statistics.median(float_times)),
                # Robustness on a shared machine: the median of the per-round ratios.
                "ratio_paired_median": statistics.median(
                    e / f for e, f in zip(exact_times, float_times, strict=True)
                ),
                # The process's CPU seconds (one thread): time spent waiting for a core
                # while other jobs run does not count, so this moves less with the load.
                "float_cpu_s": float_cpu,
                "exact_cpu_s": exact_cpu,
                "cpu_ratio": ratio(statistics.median(exact_cpu), statistics.median(float_cpu)),
            }
        )
    return rows


def _cpu_timed(step: Callable[[], None], record: list[float]) -> Callable[[], None]:
    """``step``, appending the CPU seconds of each call to ``record``."""

    def call() -> None:
        start = time.process_time()
        step()
        record.append(time.process_time() - start)

    return call


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The two bounds of issue 15, checked on the measured rows."""
    result: dict[str, Any] = {"saved_bound": SAVED_BOUND, "time_bound": TIME_BOUND}
    for what in ("stage", "network"):
        saved = [r for r in rows if r["measure"] == "saved_bytes" and r["what"] == what]
        ratios = [r["ratio"] for r in saved]
        extra = [r["exact_bytes"] - r["float_bytes"] for r in saved]
        result[f"{what}_saved_ratio_max"] = max(ratios)
        result[f"{what}_saved_bound_met"] = max(ratios) <= SAVED_BOUND
        # Independent of depth: the exact stage saves the same bytes at every depth.
        result[f"{what}_exact_bytes_constant"] = len({r["exact_bytes"] for r in saved}) == 1
        result[f"{what}_extra_bytes"] = sorted(set(extra))
        (timed,) = [r for r in rows if r["measure"] == "step_time" and r["what"] == what]
        result[f"{what}_time_ratio"] = timed["ratio"]
        result[f"{what}_time_bound_met"] = timed["ratio"] <= TIME_BOUND
        result[f"{what}_cpu_time_ratio"] = timed["cpu_ratio"]
    return result


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("exact_cost", parse_args, argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    keys = ("stage_depths", "network_depths", "couplings", "channels", "network_n")
    keys += ("batch", "size", "warmup", "repeats", "threads")
    run.meta["config"] = {key: getattr(args, key) for key in keys}
    rows = saved_rows(args, device)
    run.write_partial(rows)
    rows += time_rows(args, device)
    run.meta["summary"] = summary(rows)
    run.finish()
    run.write(rows)
    run.write_markdown(tables(rows, args, run.meta))
    plot(rows, run.stem)
    s = run.meta["summary"]
    for what in ("stage", "network"):
        print(
            f"{what}: saved ratio <= {fixed(s[f'{what}_saved_ratio_max'], 3)}, time ratio "
            f"{fixed(s[f'{what}_time_ratio'], 3)} (bound {TIME_BOUND}: "
            f"{'met' if s[f'{what}_time_bound_met'] else 'MISSED'}), CPU-time ratio "
            f"{fixed(s[f'{what}_cpu_time_ratio'], 3)}"
        )
    run.report()
    return 0


def tables(rows: list[dict[str, Any]], args: argparse.Namespace, meta: dict) -> list[str]:
    machine = machine_line(meta["machine"])
    saved = print_table(
        f"Saved activation bytes, batch {args.batch}, {args.size}x{args.size} — stage: "
        f"{args.channels} channels, depth = couplings; network: CIFAR ResNet, depth = n",
        ["what", "depth", "float MiB", "exact MiB", "exact / float"],
        [
            [
                r["what"],
                r["depth"],
                mib(r["float_bytes"]),
                mib(r["exact_bytes"]),
                fixed(r["ratio"], 3),
            ]
            for r in rows
            if r["measure"] == "saved_bytes"
        ],
    )
    timed = print_table(
        f"Training step time, median of {args.repeats} (float and exact alternating), "
        f"batch {args.batch} — {machine}",
        ["what", "depth", "float s", "exact s", "exact / float", "paired median", "CPU-time ratio"],
        [
            [
                r["what"],
                r["depth"],
                seconds(r["float_median_s"]),
                seconds(r["exact_median_s"]),
                fixed(r["ratio"], 3),
                fixed(r["ratio_paired_median"], 3),
                fixed(r["cpu_ratio"], 3),
            ]
            for r in rows
            if r["measure"] == "step_time"
        ],
    )
    return [saved, timed]


def plot(rows: list[dict[str, Any]], stem: Any) -> None:
    """Left: saved bytes vs depth per mode; right: step times of each mode."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for what, marker in (("stage", "o"), ("network", "s")):
        mine = [r for r in rows if r["measure"] == "saved_bytes" and r["what"] == what]
        for mode, style in (("float", "-"), ("exact", "--")):
            left.plot(
                [r["depth"] for r in mine],
                [r[f"{mode}_bytes"] / 2**20 for r in mine],
                style,
                marker=marker,
                label=f"{what}, {mode}",
            )
    left.set_xscale("log")
    left.set_xlabel("depth (stage: couplings; network: blocks per stage)")
    left.set_ylabel("saved activations (MiB)")
    left.legend(fontsize=8)
    timed = [r for r in rows if r["measure"] == "step_time"]
    for i, r in enumerate(timed):
        for offset, mode, colour in ((-0.2, "float", "tab:blue"), (0.2, "exact", "tab:orange")):
            times = r[f"{mode}_times_s"]
            right.scatter([i + offset] * len(times), times, s=12, color="gray", alpha=0.6)
            right.bar(i + offset, r[f"{mode}_median_s"], 0.35, color=colour, alpha=0.6)
    right.set_xticks(
        [i + o for i in range(len(timed)) for o in (-0.2, 0.2)],
        [f"{r['what']}\n{mode}" for r in timed for mode in ("float", "exact")],
    )
    right.set_ylabel("training step time (s)")
    right.set_title(
        ", ".join(f"{r['what']} x{fixed(r['ratio'], 2)}" for r in timed) + f" (bound {TIME_BOUND})",
        fontsize=9,
    )
    save_figure(fig, stem, "Exact mode vs float mode")


if __name__ == "__main__":
    raise SystemExit(main())
