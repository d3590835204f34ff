"""What the odd last block of a chain should become: stored, half-coupling or single coupling.

In resnet18/34-style layouts the first block of a stage downsamples, so a
stage of two blocks leaves one identity block: a chain of odd length. This
script compares the ``leftover`` choices of ``revcompile.convert`` on two such
digits networks (16x16, widths 8/16/32, two basic blocks per stage): ``odd``,
whose three stages all start by downsampling (every stage has one identity
block), and ``resnet18``, the layout of torchvision's resnet18 (the first stage
is an identity pair, the others downsample and then have one identity block;
``examples/train_digits.py``'s CifarResNet). They are trained with the
recipe of ``examples/train_digits.py`` (SGD with Nesterov momentum, warm-up
then cosine decay, random shifts and rotations; same batches for every
variant of a seed), with the images at 16x16 instead of 32x32 (the digits are
8x8: nothing is lost, and a run fits in minutes on a shared CPU):

* ``store``: the leftover stays an ordinary block (stored or checkpointed);
* ``half``: a half-coupling ``y1 = x1 + F(x2), y2 = x2``;
* ``single``: a coupling made from the one block, F and G its branch cut into
  complementary channel slices, G with its own copy of the inner-width layers
  (what ``convert`` builds);
* ``single_tied``: the same with G's inner-width layers tied to F's (one
  parameter set, BatchNorm statistics shared: the block's own parameter
  count), to decide between tying and copying;
* ``original``: the unconverted ResNet (reference accuracy).

Per variant: saved activation bytes of a training batch under both storage
policies (``revcompile.memory.saved_activation_bytes``), the peak memory of a
training step at ``--peak-batch`` (``revcompile.memory.peak_step_memory``, a
fresh process; a checkpointed segment's recomputation holds its activations
during backward, which saved bytes do not show), the median step time
(forward, backward, optimizer step; variants interleaved round-robin, one
thread) and the final test accuracy over ``--seeds`` seeds.

    python -m benchmarks.leftover            # the committed run (minutes, 1 thread)
    python -m benchmarks.leftover --quick    # smoke test
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import revcompile
from benchmarks.lib.environment import machine_line
from benchmarks.lib.measure import interleaved_times
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import Run, add_results_dir, fixed, print_table
from examples.train_digits import (
    BasicBlock,
    CifarResNet,
    DigitsSplit,
    Recipe,
    load_digits_split,
    train,
)
from revcompile.memory import peak_step_memory, saved_activation_bytes
from revcompile.report_builder import count_parameters
from revcompile.runtime import ReversibleSequence

WIDTHS = (8, 16, 32)
SIZE = 16
STEM_WIDTH = 8
VARIANTS = ("original", "store", "half", "single", "single_tied")


class OddStages(nn.Module):
    """A digits ResNet whose every stage starts with a downsampling (projection)
    block: ``blocks - 1`` identity blocks follow it, an odd chain for even ``blocks``."""

    def __init__(self, blocks: int = 2, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, STEM_WIDTH, 3, 1, 1, bias=False), nn.BatchNorm2d(STEM_WIDTH), nn.ReLU()
        )
        stages, in_channels = [], STEM_WIDTH
        for width in widths:
            stage = [BasicBlock(in_channels, width, 2)]
            stage += [BasicBlock(width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], 10)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


def tie(gm: nn.Module, original: nn.Module) -> nn.Module:
    """``gm`` with the inner-width layers of every single-block coupling's G replaced
    by F's: the leaf modules whose tensors keep the original's shapes (cut layers
    lose half of a dimension)."""
    single = {b.stage for b in revcompile.report(gm).blocks if b.fate == "single"}
    for stage in gm.modules():
        if not (isinstance(stage, ReversibleSequence) and stage.name in single):
            continue
        coupling = stage.couplings[-1]  # a single-block coupling ends its stage
        for path, module in list(coupling.G.named_modules()):
            tensors = dict(module.named_parameters()) | dict(module.named_buffers())
            source = dict(original.named_modules()).get(path)
            if module._modules or not tensors or source is None:
                continue
            shapes = {k: v.shape for k, v in source.state_dict().items()}
            if shapes == {k: v.shape for k, v in module.state_dict().items()}:
                owner, _, name = path.rpartition(".")
                setattr(coupling.G.get_submodule(owner), name, coupling.F.get_submodule(path))
    return gm


LAYOUTS: dict[str, Callable[[], nn.Module]] = {
    "odd": OddStages,
    "resnet18": functools.partial(CifarResNet, WIDTHS, 2),
}


def build(variant: str, layout: str, seed: int, example: Tensor, policy: str) -> nn.Module:
    """The network of ``variant``, from the same initialisation for every variant of ``seed``."""
    torch.manual_seed(seed)
    original = LAYOUTS[layout]()
    if variant == "original":
        return original
    leftover = "single" if variant == "single_tied" else variant
    gm = revcompile.convert(original, example, leftover=leftover, policy=policy)
    return tie(gm, original) if variant == "single_tied" else gm


def reversible_share(model: nn.Module) -> str:
    """``converted/identity`` blocks of the conversion report (``-`` for the original)."""
    try:
        blocks = revcompile.report(model).blocks
    except ValueError:
        return "-"
    identity = [b for b in blocks if b.shortcut == "identity"]
    return f"{sum(b.fate != 'kept' for b in identity)}/{len(identity)}"


def step_times(
    layout: str, data: DigitsSplit, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Median seconds of one training step per variant (interleaved, seed 0)."""
    x = data.train_images[: args.batch]
    y = data.train_labels[: args.batch]
    steps: dict[str, Callable[[], None]] = {}
    for variant in VARIANTS:
        model = build(variant, layout, 0, x, "checkpoint").train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps[variant] = step
    return interleaved_times(steps, torch.device("cpu"), args.warmup, args.repeats)


def measure(layout: str, data: DigitsSplit, recipe: Recipe, args: argparse.Namespace) -> list:
    """One row per variant and seed: bytes, parameters, accuracy; step time and
    peak memory on seed 0's row."""
    example = data.train_images[: args.batch]
    times = step_times(layout, data, args)
    rows = []
    for seed in range(args.seeds):
        for variant in VARIANTS:
            model = build(variant, layout, seed, example, "checkpoint")
            stored = build(variant, layout, seed, example, "store")
            row: dict[str, Any] = {
                "layout": layout,
                "variant": variant,
                "seed": seed,
                "reversible": reversible_share(model),
                "parameters": count_parameters(model),
                "saved_bytes_checkpoint": saved_activation_bytes(model.train(), example),
                "saved_bytes_store": saved_activation_bytes(stored.train(), example),
            }
            if seed == 0:
                row["step_s"] = times[variant].get("median_s")
                factory = functools.partial(build, variant, layout, 0, example, "checkpoint")
                shape = (args.peak_batch, *example.shape[1:])
                row["peak_bytes"] = peak_step_memory(factory, shape, loss="cross_entropy")
            result = train(model, variant, seed, data, recipe, show_progress=False)
            row["test_accuracy"] = result.final_test_accuracy
            row["final_train_loss"] = result.train_loss[-1]
            row["train_seconds"] = result.wall_seconds
            rows.append(row)
            print(f"{layout} {variant} seed {seed}: {result.final_test_accuracy:.2f}%")
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layout, variant): the seed-0 measurements, accuracy mean/min/max over seeds."""
    summary = []
    for layout in dict.fromkeys(r["layout"] for r in rows):
        for variant in VARIANTS:
            mine = [r for r in rows if r["layout"] == layout and r["variant"] == variant]
            first = next(r for r in mine if r["seed"] == 0)
            accuracy = [r["test_accuracy"] for r in mine]
            loss = [r["final_train_loss"] for r in mine]
            summary.append(
                {
                    **{k: first[k] for k in ("layout", "variant", "reversible", "parameters")},
                    **{k: first[k] for k in ("saved_bytes_checkpoint", "saved_bytes_store")},
                    "peak_bytes": first["peak_bytes"],
                    "step_s": first.get("step_s"),
                    "accuracy_mean": statistics.mean(accuracy),
                    "accuracy_min": min(accuracy),
                    "accuracy_max": max(accuracy),
                    "train_loss_mean": statistics.mean(loss),
                    "seeds": len(accuracy),
                }
            )
    return summary


def table(summary: list[dict[str, Any]], args: argparse.Namespace, meta: dict) -> str:
    return print_table(
        f"Odd leftovers: digits {SIZE}x{SIZE}, widths {'/'.join(map(str, WIDTHS))}, "
        f"every stage's first block downsamples, batch {args.batch}, {args.epochs} epochs, "
        f"{args.seeds} seeds, 1 thread; peak at batch {args.peak_batch} — "
        f"{machine_line(meta['machine'])}",
        [
            "layout",
            "leftover",
            "reversible identity blocks",
            "params",
            "saved KiB (checkpoint)",
            "saved KiB (store)",
            "peak step MiB (checkpoint)",
            "step ms (median)",
            "test acc % mean [min, max]",
            "final train loss (mean)",
        ],
        [
            [
                s["layout"],
                s["variant"],
                s["reversible"],
                f"{s['parameters']:,}",
                f"{s['saved_bytes_checkpoint'] / 1024:,.0f}",
                f"{s['saved_bytes_store'] / 1024:,.0f}",
                fixed(s["peak_bytes"] / 2**20, 1),
                "-" if s["step_s"] is None else fixed(1000 * s["step_s"], 1),
                f"{s['accuracy_mean']:.2f} [{s['accuracy_min']:.2f}, {s['accuracy_max']:.2f}]",
                fixed(s["train_loss_mean"], 4),
            ]
            for s in summary
        ],
    )


def plot(summary: list[dict[str, Any]], stem: Any) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    layouts = list(dict.fromkeys(s["layout"] for s in summary))
    for ax, key, label in (
        (axes[0], "saved_bytes_checkpoint", "saved KiB (policy=checkpoint)"),
        (axes[1], "step_s", "step ms (median)"),
        (axes[2], "accuracy_mean", "test accuracy % (mean)"),
    ):
        for offset, variant in enumerate(VARIANTS):
            values = [
                next(s[key] for s in summary if (s["layout"], s["variant"]) == (layout, variant))
                for layout in layouts
            ]
            scale = 1 / 1024 if key.startswith("saved") else 1000 if key == "step_s" else 1
            ax.bar(
                [i + 0.16 * offset for i in range(len(layouts))],
                [scale * (v or 0) for v in values],
                width=0.16,
                label=variant,
            )
        ax.set_xticks([i + 0.32 for i in range(len(layouts))], layouts)
        ax.set_ylabel(label)
    axes[2].set_ylim(bottom=min(s["accuracy_min"] for s in summary) - 2)
    axes[0].legend(fontsize=8)
    save_figure(fig, stem, "leftover: store / half / single")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--peak-batch", type=int, default=256, help="batch of the peak memory step")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured timing rounds")
    parser.add_argument("--repeats", type=int, default=15, help="measured timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small smoke-test configuration")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.layouts, args.seeds, args.epochs, args.warmup, args.repeats = ["odd"], 1, 1, 1, 2
        args.peak_batch = args.batch
    return args


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("leftover", parse_args, argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_fraction=0.2,
        max_shift_px=1.0,  # 2 px at 32x32
        max_degrees=10.0,
    )
    config = ("layouts", "seeds", "epochs", "batch", "peak_batch", "warmup", "repeats", "threads")
    run.meta["config"] = {k: getattr(args, k) for k in config} | {"widths": WIDTHS}
    run.meta["recipe"] = vars(recipe)
    data = load_digits_split(test_fraction=0.25)
    data.train_images, data.test_images = (
        F.interpolate(images, size=SIZE, mode="bilinear", align_corners=False)
        for images in (data.train_images, data.test_images)
    )
    if args.quick:
        data.train_images, data.train_labels = data.train_images[:256], data.train_labels[:256]
    rows: list[dict[str, Any]] = []
    for layout in args.layouts:
        rows += measure(layout, data, recipe, args)
        run.write_partial(rows)
    summary = summarize(rows)
    run.meta["summary"] = summary
    run.finish()
    run.write(rows)
    run.write_markdown([table(summary, args, run.meta)])
    plot(summary, run.stem)
    run.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
