"""torch.compile and revcompile together: eager and compiled, original and converted.

A torchvision ResNet (resnet18, batch 8, 3x64x64 by default, random weights) in
four variants, measured in one process:

* ``original``: the network as it is; ``original_compiled``: the same with
  ``model.compile(backend=...)``;
* ``converted``: ``revcompile.convert(model, x)``; ``converted_compiled``:
  ``revcompile.convert(model, x, compile={"backend": ...})``, which compiles
  each F and G (forward and backward recomputation), each checkpointed
  segment's body and the module (its eval forward is one graph).

For each: the training step time (forward, cross-entropy, backward, SGD step),
the inference time (``eval()``, ``torch.no_grad()``), the first training and
inference step (which include compilation), the saved activation bytes of a
training forward (``revcompile.memory.saved_activation_bytes``; of them, the
weight copies a compiled graph saves, see ``_saved_weight_copies``) and, on CUDA,
the peak ``torch.cuda.max_memory_allocated`` of one training step after
warm-up. Training steps of the four variants are timed round-robin (warm-up
rounds, then the median of the repeats), then the inference steps. Each
compiled variant's inference output is compared with its eager twin (same
weights). Training and inference use separate model instances built from the
same seed.

    python -m benchmarks.compile                      # full run (CPU, inductor)
    python -m benchmarks.compile --quick              # smoke test
    python -m benchmarks.compile --device cuda --batch 64 --size 224
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

import revcompile
from benchmarks.lib.environment import machine_line
from benchmarks.lib.measure import interleaved_times, sync
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
from revcompile.memory import saved_activation_bytes
from revcompile.memory.step import training_step

VARIANTS = ("original", "original_compiled", "converted", "converted_compiled")


def build(variant: str, model_name: str, x: torch.Tensor, backend: str, seed: int = 0) -> nn.Module:
    """``variant`` of ``torchvision.models.<model_name>`` (10 classes), on ``x``'s device."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)(num_classes=10).to(x.device)
    if variant.startswith("converted"):
        compile_option = {"backend": backend} if variant.endswith("_compiled") else False
        return revcompile.convert(model, x, compile=compile_option)
    if variant.endswith("_compiled"):
        model.compile(backend=backend)
    return model


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision.models ResNet")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="height and width")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed training rounds (median)")
    parser.add_argument(
        "--inference-repeats", type=int, default=20, help="timed inference rounds (median)"
    )
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="use inductor's on-disk cache as it is (default: an empty one, so that the first "
        "steps include all code generation)",
    )
    parser.add_argument("--quick", action="store_true", help="batch 2, 32x32, 1 repeat")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.warmup, args.repeats, args.inference_repeats = 2, 32, 1, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("compile", parse_args, argv)
    meta = run.meta
    keys = ("model", "batch", "size", "backend", "warmup", "repeats", "inference_repeats")
    meta["config"] = {k: getattr(args, k) for k in keys}
    if not args.warm_cache:
        # Read by inductor when it first compiles; a fresh folder per run.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cache_")
    meta["config"]["inductor_cache"] = "warm" if args.warm_cache else "empty"
    meta["notes"] = [
        "Training steps of the four variants timed round-robin, then the inference steps; "
        f"{args.warmup} warm-up round(s), median of {args.repeats} (training) and "
        f"{args.inference_repeats} (inference) timed rounds.",
        "first_*_s: the first call, which includes compilation for the compiled variants "
        f"(inductor's on-disk cache {meta['config']['inductor_cache']} at the start).",
        "output_max_abs_diff: inference output of the compiled variant against its eager "
        "twin (same weights).",
    ]
    device = torch.device(args.device)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    trained = {v: build(v, args.model, x, args.backend).train() for v in VARIANTS}
    inferred = {v: build(v, args.model, x, args.backend).eval() for v in VARIANTS}
    train = interleaved_times(
        {v: training_step(m, x, "cross_entropy") for v, m in trained.items()},
        device,
        args.warmup,
        args.repeats,
    )
    infer = interleaved_times(
        {v: _inference_step(m, x) for v, m in inferred.items()},
        device,
        args.warmup,
        args.inference_repeats,
    )
    rows = [_row(v, trained[v], inferred, train[v], infer[v], x, device) for v in VARIANTS]
    meta["summary"] = _summary(rows)
    run.finish()

    run.write(rows)
    title = (
        f"{args.model}, batch {args.batch}, 3x{args.size}x{args.size}, backend {args.backend} "
        f"— {machine_line(meta['machine'])}"
    )
    run.write_markdown([_table(rows, title, device), _ratio_table(meta["summary"])])
    _plot(rows, run.stem, title)
    for kind in ("original", "converted"):
        entry = meta["summary"][kind]
        print(
            f"{kind}: compiled/eager training {fixed(entry['train_ratio'])} "
            f"(per round {fixed(entry['train_ratio_paired_median'])}), inference "
            f"{fixed(entry['inference_ratio'])} (per round "
            f"{fixed(entry['inference_ratio_paired_median'])})"
        )
    run.report()
    return 0


def _inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(x)

    return step


def _row(
    variant: str,
    model: nn.Module,
    inferred: dict[str, nn.Module],
    train: dict[str, Any],
    infer: dict[str, Any],
    x: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "variant": variant,
        "train_median_s": train.get("median_s"),
        "first_train_s": train.get("first_step_s"),
        "train_times_s": train["times_s"],
        "inference_median_s": infer.get("median_s"),
        "first_inference_s": infer.get("first_step_s"),
        "inference_times_s": infer["times_s"],
    }
    for key, entry in (("train_error", train), ("inference_error", infer)):
        if "error" in entry:
            row[key] = entry["error"]
    try:
        row["saved_bytes"] = saved_activation_bytes(model.train(), x)
        row["saved_weight_copy_bytes"] = _saved_weight_copies(model, x)
        if device.type == "cuda":
            row["peak_step_bytes"] = _cuda_peak(training_step(model, x, "cross_entropy"), device)
    except Exception as exc:  # a failed measurement is a result, not a crash
        row["memory_error"] = error_text(exc)
    if variant.endswith("_compiled"):
        with torch.no_grad():
            got = inferred[variant](x)
            want = inferred[variant.removesuffix("_compiled")](x)
        row["output_max_abs_diff"] = (got - want).abs().max().item()
    return row


def _saved_weight_copies(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages a training forward saves that hold a tensor shaped
    like a weight (a parameter of 2 or more dimensions) but are no parameter's storage.

    These are weight copies kept for backward (inductor saves conv weights in its
    own layout), counted by ``saved_activation_bytes`` as saved tensors. A
    heuristic: an activation shaped exactly like a weight would be counted too.
    """
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() > 1}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copies: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if tuple(tensor.shape) in shapes and storage.data_ptr() not in params:
            copies[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(copies.values())


def _cuda_peak(step: Callable[[], None], device: torch.device) -> int:
    """Bytes ``torch.cuda.max_memory_allocated`` grows by during one (warm) step."""
    step()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Compiled / eager time ratios of the original and of the converted network."""
    by = {r["variant"]: r for r in rows}
    summary: dict[str, Any] = {}
    for kind in ("original", "converted"):
        eager, compiled = by[kind], by[kind + "_compiled"]
        summary[kind] = {
            "train_ratio": ratio(compiled["train_median_s"], eager["train_median_s"]),
            "inference_ratio": ratio(compiled["inference_median_s"], eager["inference_median_s"]),
            # Robust to the load of a shared machine changing between rounds.
            "train_ratio_paired_median": _paired_median(compiled, eager, "train_times_s"),
            "inference_ratio_paired_median": _paired_median(compiled, eager, "inference_times_s"),
        }
    summary["converted_vs_original_saved_bytes"] = ratio(
        by["converted"].get("saved_bytes"), by["original"].get("saved_bytes")
    )
    return summary


def _paired_median(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """The median over timed rounds of ``a``'s time / ``b``'s time in the same round."""
    paired = [x / y for x, y in zip(a[key], b[key]) if y]
    return statistics.median(paired) if paired else None


def _table(rows: list[dict[str, Any]], title: str, device: torch.device) -> str:
    header = [
        "variant",
        "train step (median s)",
        "first train step (s)",
        "inference (median s)",
        "first inference (s)",
        "saved MiB",
        "of which weight copies",
    ]
    if device.type == "cuda":
        header.append("peak step MiB")
    lines = []
    for r in rows:
        line = [
            r["variant"],
            seconds(r["train_median_s"]),
            seconds(r["first_train_s"]),
            seconds(r["inference_median_s"]),
            seconds(r["first_inference_s"]),
            mib(r.get("saved_bytes")),
            mib(r.get("saved_weight_copy_bytes")),
        ]
        if device.type == "cuda":
            line.append(mib(r.get("peak_step_bytes")))
        lines.append(line)
    return print_table(title, header, lines)


def _ratio_table(summary: dict[str, Any]) -> str:
    lines = [
        [
            kind,
            fixed(summary[kind]["train_ratio"]),
            fixed(summary[kind]["train_ratio_paired_median"]),
            fixed(summary[kind]["inference_ratio"]),
            fixed(summary[kind]["inference_ratio_paired_median"]),
        ]
        for kind in ("original", "converted")
    ]
    header = [
        "compiled / eager",
        "training (medians)",
        "training (per round)",
        "inference (medians)",
        "inference (per round)",
    ]
    return print_table("compiled / eager time", header, lines)


def _plot(rows: list[dict[str, Any]], stem: Any, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [r["variant"] for r in rows]
    for ax, key, label in (
        (axes[0], "train_median_s", "training step (median s)"),
        (axes[1], "inference_median_s", "inference (median s)"),
        (axes[2], "saved_bytes", "saved activations (MiB)"),
    ):
        values = [r.get(key) or 0 for r in rows]
        if key == "saved_bytes":
            values = [v / 2**20 for v in values]
        ax.bar(range(len(rows)), values, color=["gray", "tab:blue", "tab:orange", "tab:green"])
        ax.set_xticks(range(len(rows)), names, rotation=20, fontsize=8)
        ax.set_ylabel(label)
    save_figure(fig, stem, title)


if __name__ == "__main__":
    raise SystemExit(main())
