"""Peak step memory with the optimizer step in backward (``revcompile.optim_in_backward``).

For torchvision resnet50 and resnet152 (batch 8, 3x224x224 by default), the
original and the converted model (``revcompile.convert``, default options),
each measured by ``revcompile.memory.peak_step_memory`` (fresh process,
warm-up step) in two ways:

* ``normal`` -- ``loss.backward()`` then the worker's ``SGD(lr=1e-3).step()``;
* ``in_backward`` -- the same optimizer (plain SGD, lr 1e-3) applied to each
  parameter by ``optim_in_backward`` as soon as its gradient is complete; the
  worker's own ``step()`` then finds no gradients and does nothing.

Once reversibility has made activations small, parameter gradients are a
large part of what is left of the peak; stepping in backward frees each one
at once.

    python -m benchmarks.optim_in_backward
    python -m benchmarks.optim_in_backward --quick      # resnet18, batch 2, 64x64
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch
from torch import nn

from benchmarks.lib.environment import machine_line
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import Run, add_results_dir, mib, print_table, ratio
from revcompile.memory import peak_step_memory

MODELS = ("resnet50", "resnet152")
VARIANTS = ("original", "revcompile")
MODES = ("normal", "in_backward")
#: The optimizer the peak worker runs; ``in_backward`` installs the same one.
SGD_KWARGS = {"lr": 1e-3}


def build(model_name: str, variant: str, mode: str, size: int) -> nn.Module:
    """The model to measure (a module-level factory: picklable for the worker)."""
    import torchvision

    import revcompile

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)()
    if variant == "revcompile":
        model = revcompile.convert(model, torch.randn(1, 3, size, size))
    if mode == "in_backward":
        # The hooks live on the parameters: nothing needs to keep the handle.
        revcompile.optim_in_backward(model, torch.optim.SGD, **SGD_KWARGS)
    return model


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 2, 64x64")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.size = ["resnet18"], 2, 64
    return args


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for model_name in args.models:
        for variant in VARIANTS:
            for mode in MODES:
                factory = functools.partial(build, model_name, variant, mode, args.size)
                params = sum(p.numel() * p.element_size() for p in factory().parameters())
                peak = peak_step_memory(
                    factory,
                    (args.batch, 3, args.size, args.size),
                    args.device,
                    timeout=args.timeout,
                )
                rows.append(
                    {
                        "model": model_name,
                        "variant": variant,
                        "mode": mode,
                        "peak_step_bytes": peak,
                        "param_bytes": params,
                    }
                )
                print(f"{model_name} {variant} {mode}: peak {mib(peak)} MiB", flush=True)
    return rows


def _peak(rows: list[dict[str, Any]], model: str, variant: str, mode: str) -> int:
    (row,) = (r for r in rows if (r["model"], r["variant"], r["mode"]) == (model, variant, mode))
    return row["peak_step_bytes"]


def summary(rows: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    """Per model and variant: peak in backward / peak normal (lower is better)."""
    return {
        model: {
            variant: ratio(
                _peak(rows, model, variant, "in_backward"), _peak(rows, model, variant, "normal")
            )
            for variant in VARIANTS
        }
        for model in models
    }


def table(rows: list[dict[str, Any]], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    lines = []
    for model in args.models:
        for variant in VARIANTS:
            normal = _peak(rows, model, variant, "normal")
            fused = _peak(rows, model, variant, "in_backward")
            params = next(r["param_bytes"] for r in rows if r["model"] == model)
            lines.append(
                [
                    model,
                    variant,
                    mib(params),
                    mib(normal),
                    mib(fused),
                    f"{ratio(fused, normal):.2f}",
                ]
            )
    title = (
        f"Peak step memory (MiB), SGD lr=1e-3, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.device} -- {machine_line(meta['machine'])}"
    )
    header = ["model", "variant", "parameters", "normal step", "in backward", "ratio"]
    return f"{title}\n\n" + print_table(title, header, lines)


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, stem: Any, meta: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups = [(m, v) for m in args.models for v in VARIANTS]
    width = 0.38
    for index, mode in enumerate(MODES):
        values = [_peak(rows, m, v, mode) / 2**20 for m, v in groups]
        xs = [g + (index - 0.5) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=mode, hatch="//" if mode == "in_backward" else None)
    ax.set_xticks(range(len(groups)), [f"{m}\n{v}" for m, v in groups])
    ax.set_ylabel("peak step memory (MiB)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(
        f"optimizer step in backward, batch {args.batch}, {args.size}x{args.size} -- "
        f"{machine_line(meta['machine'])}",
        fontsize=9,
    )
    save_figure(fig, stem)


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("optim_in_backward", parse_args, argv)
    meta = run.meta
    meta["config"] = {
        "models": args.models,
        "batch": args.batch,
        "input": [3, args.size, args.size],
        "optimizer": {"class": "SGD", **SGD_KWARGS},
    }
    meta["notes"] = [
        "peak_step_bytes: revcompile.memory.peak_step_memory (fresh process, warm-up step); "
        "normal = backward then SGD.step(); in_backward = revcompile.optim_in_backward with "
        "the same SGD. Ratios are from one run.",
    ]
    rows = measure(args)
    meta["summary"] = summary(rows, args.models)
    run.finish()
    run.write(rows)
    run.write_markdown([table(rows, args, meta)])
    plot(rows, args, run.stem, meta)
    run.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
