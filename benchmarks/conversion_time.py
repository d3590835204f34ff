"""How long revcompile.convert takes: analysis + rewrite of torchvision ResNets.

For each model (resnet152 is the one with a target: under 2 s, issue 4) the
script times, in one process after a warm-up call:

* ``convert``: ``revcompile.convert(model)`` (analysis + rewrite), with the
  input shape guessed (``example_inputs=None``, the default call) and with an
  explicit 2x3x224x224 example input;
* ``analyze``: ``revcompile.analyze(model)`` (the analysis passes only); the
  rewrite's share is ``convert - analyze``;

each as the median of the repeats. One extra, profiled ``convert`` call
(cProfile) splits the time over the functions that ``revcompile.api`` calls
directly (tracing, shape propagation, residual finding, planning, emit,
cleanup, deepcopy...), so the breakdown follows the pass order wherever it
changes. Profiling inflates times; the breakdown is reported as fractions.

    python -m benchmarks.conversion_time            # full run
    python -m benchmarks.conversion_time --quick    # smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.lib.environment import machine_line
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import Run, add_results_dir, print_table, seconds

TARGET_S = 2.0
TARGET_MODEL = "resnet152"
MODELS = ("resnet50", "resnet101", "resnet152")


def median_time(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``fn`` over ``repeats`` calls after ``warmup``."""
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if index >= warmup:
            times.append(elapsed)
    return statistics.median(times), times


def phase_breakdown(fn: Callable[[], Any]) -> dict[str, float]:
    """Seconds (under cProfile) of every call made directly by ``revcompile/api.py``.

    Keys are ``module:function`` of the callee; nested api calls
    (``convert`` -> ``pipeline``) are expanded, not double counted.
    """
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    api = str(Path("revcompile") / "api.py")
    phases: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, _tt, _ct, callers) in stats.items():
        if path.endswith(api):
            continue  # api functions themselves are expanded into their callees
        for (caller_path, _cl, _cn), edge in callers.items():
            if caller_path.endswith(api):
                key = f"{_short_module(path)}:{name}"
                phases[key] = phases.get(key, 0.0) + edge[3]
    return dict(sorted(phases.items(), key=lambda item: -item[1]))


def _short_module(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    for root in ("passes", "revcompile", "torch"):
        if root in parts:
            return ".".join(parts[parts.index(root) :])
    return Path(path).stem


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="resnet50 only, 2 repeats")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.repeats = ["resnet50"], 2
    return args


def main(argv: list[str] | None = None) -> int:
    import torchvision

    import revcompile

    args, run = Run.from_command_line("conversion_time", parse_args, argv)
    meta = run.meta
    meta["config"] = {"models": args.models, "warmup": args.warmup, "repeats": args.repeats}
    meta["target"] = f"{TARGET_MODEL} convert (analysis + rewrite) < {TARGET_S} s"

    rows: list[dict[str, Any]] = []
    example = torch.randn(2, 3, 224, 224)
    for name in tqdm(args.models, desc="models", unit="model"):
        model = getattr(torchvision.models, name)(weights=None)
        calls: dict[str, Callable[[], Any]] = {
            "convert_guessed": lambda m=model: revcompile.convert(m),
            "convert_example": lambda m=model: revcompile.convert(m, example),
            "analyze_guessed": lambda m=model: revcompile.analyze(m),
        }
        row: dict[str, Any] = {"model": name}
        for key, call in calls.items():
            median, times = median_time(call, args.warmup, args.repeats)
            row[f"{key}_s"] = median
            row[f"{key}_times_s"] = times
        row["rewrite_s"] = row["convert_guessed_s"] - row["analyze_guessed_s"]
        gm = revcompile.convert(model)
        report = revcompile.report(gm)
        row["stages"] = len(report.stages)
        row["params_before"] = report.params_before
        row["params_after"] = report.params_after
        phases = phase_breakdown(calls["convert_guessed"])
        total = sum(phases.values()) or 1.0
        row["profile_total_s"] = total
        row["phases_fraction"] = {k: round(v / total, 4) for k, v in phases.items()}
        rows.append(row)

    target_rows = [r for r in rows if r["model"] == TARGET_MODEL]
    meta["summary"] = {
        "target_s": TARGET_S,
        "resnet152_convert_s": target_rows[0]["convert_guessed_s"] if target_rows else None,
        "target_met": bool(target_rows) and target_rows[0]["convert_guessed_s"] < TARGET_S,
    }
    run.finish()
    run.write(rows)

    markdown = print_table(
        f"revcompile.convert time (median of {args.repeats}) — {machine_line(meta['machine'])}",
        [
            "model",
            "convert (s)",
            "convert w/ example (s)",
            "analyze (s)",
            "rewrite (s)",
            "top phase",
        ],
        [
            [
                r["model"],
                seconds(r["convert_guessed_s"]),
                seconds(r["convert_example_s"]),
                seconds(r["analyze_guessed_s"]),
                seconds(r["rewrite_s"]),
                _top_phases(r["phases_fraction"]),
            ]
            for r in rows
        ],
    )
    run.write_markdown([markdown])
    _plot(rows, run.stem)
    summary = meta["summary"]
    if summary["resnet152_convert_s"] is not None:
        verdict = "met" if summary["target_met"] else "MISSED"
        print(f"resnet152 convert {summary['resnet152_convert_s']:.2f} s (target < 2 s: {verdict})")
    run.report()
    return 0


def _top_phases(fractions: dict[str, float], count: int = 3) -> str:
    items = list(fractions.items())[:count]
    return ", ".join(f"{name.split(':')[-1]} {100 * share:.0f}%" for name, share in items)


def _plot(rows: list[dict[str, Any]], stem: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = sorted({phase for r in rows for phase in r["phases_fraction"]})
    bottoms = [0.0] * len(rows)
    for phase in names:
        heights = [r["convert_guessed_s"] * r["phases_fraction"].get(phase, 0.0) for r in rows]
        if max(heights) < 0.02 * max(r["convert_guessed_s"] for r in rows):
            continue  # tiny phases would only clutter the legend
        ax.bar(range(len(rows)), heights, bottom=bottoms, label=phase.split(":")[-1])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.scatter(
        range(len(rows)),
        [r["convert_guessed_s"] for r in rows],
        color="black",
        zorder=3,
        label="median convert",
    )
    ax.axhline(TARGET_S, color="red", linestyle="--", label=f"target ({TARGET_MODEL})")
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_ylabel("seconds")
    ax.set_title("revcompile.convert: analysis + rewrite (phases from cProfile, scaled)")
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, stem)


if __name__ == "__main__":
    raise SystemExit(main())
