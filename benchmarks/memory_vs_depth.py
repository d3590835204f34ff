"""Activation memory against depth: CIFAR ResNets with n = 3 ... 100 blocks per stage.

For each depth (batch 128, 3x32x32; depth 6n + 2) and each variant

* ``original`` -- the plain ResNet;
* ``checkpoint_per_block`` -- every block under non-reentrant
  ``torch.utils.checkpoint``;
* ``revcompile_store`` / ``revcompile_checkpoint`` -- ``revcompile.convert``
  with either policy for the non-reversible segments;
* ``memcnn_revnet`` -- memcnn's hand-written RevNet of the same depth
  (InvertibleModuleWrapper + AdditiveCoupling per identity block);
* ``momentumnet`` -- ``momentumnet.transform_to_momentumnet`` of the original;
* ``revlib_revnet`` -- revlib's ReversibleSequential, same RevNet layout;

the script measures the saved activation bytes of a training forward
(``revcompile.memory.saved_activation_bytes``) and the peak memory of one
training step in a fresh process (``revcompile.memory.peak_step_memory``).
Expected shape: the original and per-block checkpointing grow linearly in n,
the reversible variants stay (nearly) flat.

Caveat on saved bytes: memcnn keeps its coupling inputs/outputs as attributes
of the autograd context, which ``saved_tensors_hooks`` cannot see, so its
saved bytes undercount; peak step memory is the comparable number.

    python -m benchmarks.memory_vs_depth              # full run (CPU)
    python -m benchmarks.memory_vs_depth --quick      # smoke test
    python -m benchmarks.memory_vs_depth --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.lib.environment import machine_line
from benchmarks.lib.matrix import MatrixConfig, run_matrix
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import Run, add_results_dir, mib, print_table
from benchmarks.lib.specs import parse_spec

DEPTHS = (3, 9, 18, 54, 100)
VARIANTS = (
    "original",
    "checkpoint_per_block",
    "revcompile_store",
    "revcompile_checkpoint",
    "memcnn_revnet",
    "momentumnet",
    "revlib_revnet",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), metavar="N")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-peak", action="store_true", help="saved bytes only")
    parser.add_argument("--peak-timeout", type=float, default=600.0, help="seconds per peak run")
    parser.add_argument(
        "--render",
        action="store_true",
        help="write the table and plot from the saved results JSON (e.g. of a stopped run)",
    )
    parser.add_argument("--quick", action="store_true", help="n = 3, 9 at batch 16")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.batch = [3, 9], 16
    return args


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("memory_vs_depth", parse_args, argv)
    meta = run.meta
    meta["config"] = {
        "depths_n": args.depths,
        "batch": args.batch,
        "input": [3, 32, 32],
        "variants": args.variants,
        "peak": not args.no_peak,
    }
    meta["notes"] = [
        "saved_bytes: revcompile.memory.saved_activation_bytes (distinct saved storages, "
        "parameters excluded); memcnn stores coupling tensors on ctx attributes, invisible "
        "to saved_tensors_hooks, so its saved_bytes undercount; compare peak_step_bytes.",
        "peak_step_bytes: revcompile.memory.peak_step_memory (fresh process, warm-up step, "
        "then peak RSS growth of forward + cross-entropy backward + SGD step on CPU).",
        "memcnn_revnet / revlib_revnet: a RevNet of the same depth (identity blocks become "
        "couplings of two half-width residual functions, shape-changing blocks stay).",
    ]
    if args.render:
        return _render_saved(run.stem, args)
    config = MatrixConfig(
        specs=tuple(f"cifar-n{n}" for n in args.depths),
        variants=tuple(args.variants),
        batch=args.batch,
        device=args.device,
        peak=not args.no_peak,
        peak_timeout=args.peak_timeout,
        isolated_timeout=args.peak_timeout,
    )
    rows = run_matrix(config, on_spec_done=run.write_partial)
    _add_depth(rows)
    meta["summary"] = _growth(rows, args.depths)
    run.finish()

    run.write(rows)
    _write_table_and_plot(rows, args, run.stem, meta)
    run.report()
    return 0


def _add_depth(rows: list[dict[str, Any]]) -> None:
    """``n`` (blocks per stage) and ``depth`` (6n + 2) of every row."""
    for row in rows:
        row["n"] = parse_spec(row["model"])[1]
        row["depth"] = 6 * row["n"] + 2


def _write_table_and_plot(
    rows: list[dict[str, Any]], args: argparse.Namespace, stem: Path, meta: dict
) -> None:
    markdown = [
        _table(rows, args, "peak_step_bytes", "Peak step memory (MiB)", meta),
        _table(rows, args, "saved_bytes", "Saved activation bytes (MiB)", meta),
    ]
    stem.with_suffix(".md").write_text("\n\n".join(markdown) + "\n")
    _plot(rows, args, stem, meta)


def _render_saved(stem: Path, args: argparse.Namespace) -> int:
    """Table and plot of the depths whose every variant finished in the saved run."""
    saved = json.loads(stem.with_suffix(".json").read_text())
    rows = saved["rows"]
    _add_depth(rows)
    done = {v: {r["n"] for r in rows if r["variant"] == v} for v in args.variants}
    args.depths = [n for n in args.depths if all(n in ns for ns in done.values())]
    _write_table_and_plot(rows, args, stem, saved["meta"])
    print(f"rendered n = {args.depths} from {stem}.json; wrote {stem}.{{md,png}}")
    return 0


def _cell(row: dict[str, Any], key: str) -> str:
    if "skipped" in row:
        return "skipped"
    if "error" in row or (key == "peak_step_bytes" and "peak_error" in row):
        return "failed"
    return mib(row.get(key))


def _table(
    rows: list[dict[str, Any]], args: argparse.Namespace, key: str, title: str, meta: dict
) -> str:
    by = {(r["variant"], r["n"]): r for r in rows}
    return print_table(
        f"{title}, CIFAR ResNet batch {args.batch} — {machine_line(meta['machine'])}",
        ["variant"] + [f"n={n} (depth {6 * n + 2})" for n in args.depths],
        [[v] + [_cell(by[(v, n)], key) for n in args.depths] for v in args.variants],
    )


def _growth(rows: list[dict[str, Any]], depths: list[int]) -> dict[str, Any]:
    """Per variant: bytes per added block per stage (slope from the smallest to the largest n)."""
    summary: dict[str, Any] = {}
    lo, hi = min(depths), max(depths)
    for variant in {r["variant"] for r in rows}:
        by_n = {r["n"]: r for r in rows if r["variant"] == variant}
        entry = {}
        for key in ("saved_bytes", "peak_step_bytes"):
            a, b = by_n[lo].get(key), by_n[hi].get(key)
            if a is not None and b is not None and hi > lo:
                entry[f"{key}_per_n"] = (b - a) / (hi - lo)
                entry[f"{key}_ratio_n{hi}_over_n{lo}"] = b / a if a else None
        summary[variant] = entry
    return summary


def _plot(rows: list[dict[str, Any]], args: argparse.Namespace, stem: Path, meta: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in (
        (axes[0], "peak_step_bytes", "peak step memory (MiB)"),
        (axes[1], "saved_bytes", "saved activations (MiB)"),
    ):
        for variant in args.variants:
            points = [
                (r["depth"], r[key] / 2**20)
                for r in rows
                if r["variant"] == variant and r.get(key) is not None
            ]
            if points:
                style = "-o" if variant.startswith("revcompile") else "--s"
                ax.plot(*zip(*points, strict=True), style, label=variant, markersize=4)
        ax.set_xlabel("depth (6n + 2)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    # With --no-peak the left panel is empty: put the legend where the lines are.
    next((ax for ax in axes if ax.lines), axes[0]).legend(fontsize=8)
    machine = machine_line(meta["machine"])
    save_figure(fig, stem, f"CIFAR ResNets, batch {args.batch}, {args.device} — {machine}")


if __name__ == "__main__":
    raise SystemExit(main())
