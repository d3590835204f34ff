"""torchvision ResNets: memory and step time of revcompile against the alternatives.

resnet50/101/152 at 224x224 (batch 8 on CPU, 64 on CUDA), random weights.
For each model and variant: saved activation bytes of a training forward,
peak memory of one training step in a fresh process (the headline: saved bytes
miss the transient peak of recomputation), and the training step time
(forward, cross-entropy, backward, SGD step; all eager variants of a model are
timed round-robin in one process: warm-up rounds, then the median of the
repeats). Variants:

* ``original``; ``checkpoint_per_block`` (non-reentrant checkpoint around
  every bottleneck block); ``checkpoint_sequential`` (sqrt(#blocks) segments);
* ``torch_compile_budget``: ``torch.compile`` with
  ``torch._functorch.config.activation_memory_budget = 0.1``, in its own
  process under ``--compile-timeout`` (compiling on a small CPU is slow; a
  timeout or failure is recorded, and a model that timed out skips the
  deeper ones);
* ``momentumnet``: ``momentumnet.transform_to_momentumnet`` (memory-saving mode);
* ``revcompile_checkpoint`` (the default), ``revcompile_store`` and
  ``revcompile_reference`` (the converted network under
  ``revcompile.reference_mode()``: same architecture, activations stored; it
  isolates the cost of reversibility).

Targets (issue 5): step time revcompile / its reference_mode <= 1.40; the
default conversion lowest in peak step memory of all variants.

    python -m benchmarks.torchvision_models              # full run (CPU)
    python -m benchmarks.torchvision_models --quick      # smoke test
    python -m benchmarks.torchvision_models --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.lib.environment import machine_line
from benchmarks.lib.matrix import MatrixConfig, run_matrix
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import (
    Run,
    add_results_dir,
    fixed,
    mib,
    print_table,
    ratio,
    seconds,
)
from benchmarks.lib.variants import COMPILE_ACTIVATION_BUDGET

MODELS = ("resnet50", "resnet101", "resnet152")
VARIANTS = (
    "original",
    "checkpoint_per_block",
    "checkpoint_sequential",
    "torch_compile_budget",
    "momentumnet",
    "revcompile_store",
    "revcompile_checkpoint",
    "revcompile_reference",
)
TARGET_TIME_RATIO = 1.40
DEFAULT = "revcompile_checkpoint"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=None, help="default 8 (CPU) / 64 (CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--no-peak", action="store_true", help="skip peak step memory")
    parser.add_argument("--peak-timeout", type=float, default=600.0)
    parser.add_argument("--compile-timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="resnet50, batch 2, 1 repeat")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 64 if args.device.startswith("cuda") else 8
    if args.quick:
        args.models, args.batch, args.repeats, args.compile_timeout = ["resnet50"], 2, 1, 240.0
    return args


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("torchvision_models", parse_args, argv)
    meta = run.meta
    meta["config"] = {
        "models": args.models,
        "variants": args.variants,
        "batch": args.batch,
        "input": [3, 224, 224],
        "warmup_rounds": args.warmup,
        "timed_rounds": args.repeats,
        "compile_timeout_s": args.compile_timeout,
        "compile_activation_memory_budget": COMPILE_ACTIVATION_BUDGET,
    }
    meta["notes"] = [
        "Step times: eager variants of one model timed round-robin in one process; "
        f"{args.warmup} warm-up round(s), median of {args.repeats} timed rounds "
        "(ratios are from one run).",
        "torch_compile_budget: built, timed and measured in its own process; "
        "first_step_s includes compilation.",
        "peak_step_bytes: revcompile.memory.peak_step_memory (fresh process, warm-up step).",
    ]
    config = MatrixConfig(
        specs=tuple(args.models),
        variants=tuple(args.variants),
        batch=args.batch,
        device=args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        peak=not args.no_peak,
        peak_timeout=args.peak_timeout,
        isolated_timeout=args.compile_timeout,
    )
    rows = run_matrix(config, on_spec_done=run.write_partial)
    meta["summary"] = _summary(rows, args.models)
    run.finish()

    run.write(rows)
    run.write_markdown([_table(rows, model, args, meta) for model in args.models])
    _plot(rows, args, run.stem, meta)
    for model, entry in meta["summary"].items():
        print(
            f"{model}: time revcompile/reference {fixed(entry.get('time_ratio_vs_reference'))} "
            f"(target <= {TARGET_TIME_RATIO}); default lowest peak: "
            f"{entry.get('default_lowest_peak')} (lowest other: {entry.get('lowest_other_peak')})"
        )
    run.report()
    return 0


def _summary(rows: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    """Per model: ratios to the original, the two targets."""
    summary: dict[str, Any] = {}
    for model in models:
        by = {r["variant"]: r for r in rows if r["model"] == model}
        base = by.get("original", {})
        default = by.get(DEFAULT, {})
        entry: dict[str, Any] = {}
        time_ratio = ratio(
            default.get("median_s"), by.get("revcompile_reference", {}).get("median_s")
        )
        entry["time_ratio_vs_reference"] = time_ratio
        entry["time_target_met"] = time_ratio is not None and time_ratio <= TARGET_TIME_RATIO
        others = {
            v: r["peak_step_bytes"]
            for v, r in by.items()
            if v != DEFAULT and r.get("peak_step_bytes") is not None
        }
        if default.get("peak_step_bytes") is not None and others:
            lowest = min(others, key=others.__getitem__)
            entry["lowest_other_peak"] = lowest
            entry["default_lowest_peak"] = default["peak_step_bytes"] < others[lowest]
        for r in by.values():
            r["saved_ratio_vs_original"] = ratio(r.get("saved_bytes"), base.get("saved_bytes"))
            r["peak_ratio_vs_original"] = ratio(
                r.get("peak_step_bytes"), base.get("peak_step_bytes")
            )
            r["time_ratio_vs_original"] = ratio(r.get("median_s"), base.get("median_s"))
        summary[model] = entry
    return summary


def _table(rows: list[dict[str, Any]], model: str, args: argparse.Namespace, meta: dict) -> str:
    lines = []
    for r in (r for r in rows if r["model"] == model):
        if "skipped" in r or "error" in r:
            status = r.get("skipped") or "failed: " + r["error"][:80]
            lines.append([r["variant"], "-", "-", "-", "-", "-", "-", status])
            continue
        lines.append(
            [
                r["variant"],
                mib(r.get("peak_step_bytes")),
                fixed(r.get("peak_ratio_vs_original")),
                mib(r.get("saved_bytes")),
                fixed(r.get("saved_ratio_vs_original"), 3),
                seconds(r.get("median_s")),
                fixed(r.get("time_ratio_vs_original")),
                ("peak failed: " + r["peak_error"][:60]) if "peak_error" in r else "",
            ]
        )
    return print_table(
        f"{model}, batch {args.batch}, 224x224 — {machine_line(meta['machine'])}",
        [
            "variant",
            "peak step MiB",
            "peak / orig",
            "saved MiB",
            "saved / orig",
            "step s (median)",
            "time / orig",
            "note",
        ],
        lines,
    )


def _plot(rows: list[dict[str, Any]], args: argparse.Namespace, stem: Path, meta: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    width = 0.8 / max(1, len(args.variants))
    for index, variant in enumerate(args.variants):
        by_model = {r["model"]: r for r in rows if r["variant"] == variant}
        xs = [m + (index - len(args.variants) / 2 + 0.5) * width for m in range(len(args.models))]
        for ax, key, scale in (
            (axes[0], "peak_step_bytes", 2**20),
            (axes[1], "saved_bytes", 2**20),
            (axes[2], "median_s", 1.0),
        ):
            values = [(by_model.get(m) or {}).get(key) for m in args.models]
            ax.bar(
                xs,
                [0 if v is None else v / scale for v in values],
                width,
                label=variant,
                hatch="//" if variant.startswith("revcompile") else None,
            )
    for ax, label in zip(
        axes, ("peak step memory (MiB)", "saved activations (MiB)", "step time (s)"), strict=True
    ):
        ax.set_xticks(range(len(args.models)), args.models)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    machine = machine_line(meta["machine"])
    save_figure(fig, stem, f"torchvision ResNets, batch {args.batch}, 224x224 — {machine}")


if __name__ == "__main__":
    raise SystemExit(main())
