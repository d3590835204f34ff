"""The digits recipe of the option benchmarks: variants of small networks, trained and measured.

``benchmarks/leftover.py`` and ``benchmarks/split.py`` each compare the
*variants* of a ``convert`` option (plus the unconverted network) on a few
*networks*, all trained with the recipe of ``examples/train_digits.py`` (SGD
with Nesterov momentum, warm-up then cosine decay, random shifts and
rotations; the same batches for every variant of a seed) on scikit-learn's
digits at 16x16 instead of 32x32 (the digits are 8x8: nothing is lost, and a
run fits in minutes on a shared CPU). A :class:`Comparison` says what is
compared; :func:`run_comparison` is the whole script.

Per variant: saved activation bytes of a training batch under both storage
policies (``revcompile.memory.saved_activation_bytes``), the peak memory of a
training step at ``--peak-batch`` (``revcompile.memory.peak_step_memory``, a
fresh process; a checkpointed segment's recomputation holds its activations
during backward, which saved bytes do not show), the unique parameter count,
the median step time (forward, backward, optimizer step; variants
interleaved round-robin, one thread) and the final test accuracy over
``--seeds`` seeds.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import revcompile
from benchmarks.lib.environment import machine_line
from benchmarks.lib.measure import interleaved_times
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import Run, add_results_dir, fixed, mib, print_table
from examples.train_digits import DigitsSplit, Recipe, load_digits_split, train
from revcompile.memory import peak_step_memory, saved_activation_bytes
from revcompile.report_builder import count_parameters

#: Side of the (upsampled) digit images.
SIZE = 16
#: Training images of a ``--quick`` run.
QUICK_TRAIN_IMAGES = 256

#: ``build(variant, network, seed, example, policy)``: the network of ``variant``,
#: from the same initialisation for every variant of ``seed``. A module-level
#: function: the peak-memory worker gets it pickled.
Builder = Callable[[str, str, int, Tensor, str], nn.Module]

#: Row keys measured per seed; the others are measured once, on seed 0.
PER_SEED = ("seed", "test_accuracy", "final_train_loss", "train_seconds")

#: ``(summary key, y label)`` of the default figure panels.
PANELS = (
    ("saved_bytes_checkpoint", "saved KiB (policy=checkpoint)"),
    ("step_s", "step ms (median)"),
    ("accuracy_mean", "test accuracy % (mean)"),
)

#: Table units of the panels' summary keys (KiB, MiB, ms); others are plotted as they are.
SCALES = {
    "saved_bytes_checkpoint": 1 / 1024,
    "saved_bytes_store": 1 / 1024,
    "peak_bytes": 1 / 2**20,
    "step_s": 1000.0,
}


def reversible_share(model: nn.Module) -> str:
    """``converted/identity`` blocks of the conversion report (``-`` for the original)."""
    try:
        blocks = revcompile.report(model).blocks
    except ValueError:
        return "-"
    identity = [b for b in blocks if b.shortcut == "identity"]
    return f"{sum(b.fate != 'kept' for b in identity)}/{len(identity)}"


def describe_reversible(model: nn.Module) -> dict[str, str]:
    """The default description column of a variant: its reversible identity blocks."""
    return {"reversible": reversible_share(model)}


@dataclass(frozen=True)
class RecipeChange:
    """How one network's training departs from the digits recipe (say why in ``why``):
    another learning rate, ``epochs_times`` times the epochs."""

    why: str
    lr: float | None = None
    epochs_times: int = 1

    def apply(self, recipe: Recipe) -> Recipe:
        """``recipe`` with this change."""
        lr = recipe.lr if self.lr is None else self.lr
        return replace(recipe, lr=lr, epochs=self.epochs_times * recipe.epochs)

    def text(self, recipe: Recipe) -> str:
        """``lr 0.03, 30 epochs``: the changed recipe's values, for titles."""
        changed = self.apply(recipe)
        return f"lr {changed.lr:g}, {changed.epochs} epochs"


@dataclass(frozen=True)
class Comparison:
    """What one benchmark compares.

    ``axis`` names the network column of the results (``layout``, ``network``)
    and the option that picks networks (``--layouts``, ``--networks``);
    ``describe(model)`` gives the per-variant columns read from the conversion
    report (seed 0, policy checkpoint); ``columns`` are the ``(header, key)``
    pairs of the table before the shared measurement columns; ``title`` starts
    the table's title; ``config`` is added to the run's recorded config;
    ``recipe_changes`` says which networks train with another recipe.
    """

    title: str
    plot_title: str
    axis: str
    networks: tuple[str, ...]
    variants: tuple[str, ...]
    build: Builder
    columns: tuple[tuple[str, str], ...]
    describe: Callable[[nn.Module], dict[str, str]] = describe_reversible
    panels: tuple[tuple[str, str], ...] = PANELS
    config: dict[str, Any] = field(default_factory=dict)
    recipe_changes: dict[str, RecipeChange] = field(default_factory=dict)

    def recipe(self, network: str, recipe: Recipe) -> Recipe:
        """The recipe ``network`` trains with."""
        change = self.recipe_changes.get(network)
        return recipe if change is None else change.apply(recipe)


def digits_recipe(epochs: int, batch_size: int) -> Recipe:
    """``examples/train_digits.py``'s recipe, its shifts scaled to 16x16 images."""
    return Recipe(
        epochs=epochs,
        batch_size=batch_size,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_fraction=0.2,
        max_shift_px=1.0,  # 2 px at 32x32
        max_degrees=10.0,
    )


def load_data(quick: bool) -> DigitsSplit:
    """The fixed 75/25 digits split at ``SIZE``x``SIZE`` (``quick``: 256 training images)."""
    data = load_digits_split(test_fraction=0.25)
    data.train_images, data.test_images = (
        F.interpolate(images, size=SIZE, mode="bilinear", align_corners=False)
        for images in (data.train_images, data.test_images)
    )
    if quick:
        data.train_images = data.train_images[:QUICK_TRAIN_IMAGES]
        data.train_labels = data.train_labels[:QUICK_TRAIN_IMAGES]
    return data


def step_times(
    comparison: Comparison, network: str, data: DigitsSplit, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Median seconds of one training step per variant (interleaved, seed 0)."""
    x = data.train_images[: args.batch]
    y = data.train_labels[: args.batch]
    steps: dict[str, Callable[[], None]] = {}
    for variant in comparison.variants:
        model = comparison.build(variant, network, 0, x, "checkpoint").train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps[variant] = step
    return interleaved_times(steps, torch.device("cpu"), args.warmup, args.repeats)


def measure(
    comparison: Comparison,
    network: str,
    data: DigitsSplit,
    recipe: Recipe,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """One row per variant and seed: bytes, parameters, accuracy; the description,
    step time and peak memory (None under ``--no-peak``) on seed 0's row."""
    example = data.train_images[: args.batch]
    times = step_times(comparison, network, data, args)
    rows = []
    for seed in range(args.seeds):
        for variant in comparison.variants:
            model = comparison.build(variant, network, seed, example, "checkpoint")
            stored = comparison.build(variant, network, seed, example, "store")
            row: dict[str, Any] = {comparison.axis: network, "variant": variant, "seed": seed}
            if seed == 0:
                row |= comparison.describe(model)
            row["parameters"] = count_parameters(model)
            row["saved_bytes_checkpoint"] = saved_activation_bytes(model.train(), example)
            row["saved_bytes_store"] = saved_activation_bytes(stored.train(), example)
            if seed == 0:
                row["step_s"] = times[variant].get("median_s")
                factory = functools.partial(
                    comparison.build, variant, network, 0, example, "checkpoint"
                )
                shape = (args.peak_batch, *example.shape[1:])
                row["peak_bytes"] = (
                    None if args.no_peak else peak_step_memory(factory, shape, loss="cross_entropy")
                )
            result = train(
                model, variant, seed, data, comparison.recipe(network, recipe), show_progress=False
            )
            row["test_accuracy"] = result.final_test_accuracy
            row["final_train_loss"] = result.train_loss[-1]
            row["train_seconds"] = result.wall_seconds
            rows.append(row)
            print(f"{network} {variant} seed {seed}: {result.final_test_accuracy:.2f}%")
    return rows


def summarize(comparison: Comparison, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (network, variant): the seed-0 measurements, accuracy mean/min/max over seeds."""
    summary = []
    for network in dict.fromkeys(r[comparison.axis] for r in rows):
        for variant in comparison.variants:
            mine = [r for r in rows if (r[comparison.axis], r["variant"]) == (network, variant)]
            first = next(r for r in mine if r["seed"] == 0)
            accuracy = [r["test_accuracy"] for r in mine]
            loss = [r["final_train_loss"] for r in mine]
            summary.append(
                {k: v for k, v in first.items() if k not in PER_SEED}
                | {
                    "accuracy_mean": statistics.mean(accuracy),
                    "accuracy_min": min(accuracy),
                    "accuracy_max": max(accuracy),
                    "train_loss_mean": statistics.mean(loss),
                    "seeds": len(accuracy),
                }
            )
    return summary


def table(
    comparison: Comparison, summary: list[dict[str, Any]], args: argparse.Namespace, meta: dict
) -> str:
    """Print the summary table and return it as Markdown."""
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    recipe = digits_recipe(args.epochs, args.batch)
    changes = "".join(
        f" ({network}: {change.text(recipe)})"
        for network, change in comparison.recipe_changes.items()
        if network in args.networks
    )
    return print_table(
        f"{comparison.title}, batch {args.batch}, {args.epochs} epochs{changes}, {args.seeds} "
        f"seeds, {threads}; peak at batch {args.peak_batch} — {machine_line(meta['machine'])}",
        [header for header, _ in comparison.columns]
        + [
            "params",
            "saved KiB (checkpoint)",
            "saved KiB (store)",
            "peak step MiB (checkpoint)",
            "step ms (median)",
            "test acc % mean [min, max]",
            "final train loss (mean)",
        ],
        [
            [str(s[key]) for _, key in comparison.columns]
            + [
                f"{s['parameters']:,}",
                f"{s['saved_bytes_checkpoint'] / 1024:,.0f}",
                f"{s['saved_bytes_store'] / 1024:,.0f}",
                mib(s["peak_bytes"]),
                "-" if s["step_s"] is None else fixed(1000 * s["step_s"], 1),
                f"{s['accuracy_mean']:.2f} [{s['accuracy_min']:.2f}, {s['accuracy_max']:.2f}]",
                fixed(s["train_loss_mean"], 4),
            ]
            for s in summary
        ],
    )


def plot(comparison: Comparison, summary: list[dict[str, Any]], stem: Any) -> None:
    """``<stem>.png``: one bar panel per ``comparison.panels`` entry, networks on x."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(comparison.panels), figsize=(4.3 * len(comparison.panels), 4))
    networks = list(dict.fromkeys(s[comparison.axis] for s in summary))
    width = 0.8 / len(comparison.variants)
    for ax, (key, label) in zip(axes, comparison.panels):
        scale = SCALES.get(key, 1.0)
        for offset, variant in enumerate(comparison.variants):
            values = [
                next(s[key] for s in summary if (s[comparison.axis], s["variant"]) == (n, variant))
                for n in networks
            ]
            ax.bar(
                [i + width * offset for i in range(len(networks))],
                [scale * (v or 0) for v in values],
                width=width,
                label=variant,
            )
        ax.set_xticks(
            [i + width * (len(comparison.variants) - 1) / 2 for i in range(len(networks))],
            networks,
        )
        ax.set_ylabel(label)
        if key == "accuracy_mean":
            ax.set_ylim(bottom=min(s["accuracy_min"] for s in summary) - 2)
    axes[0].legend(fontsize=8)
    save_figure(fig, stem, comparison.plot_title)


def parse_args(comparison: Comparison, description: str, argv: list[str]) -> argparse.Namespace:
    """The options every comparison has; ``--quick`` is a small smoke-test configuration
    (the first network, 1 seed, 1 epoch, 256 training images, few timing rounds)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        f"--{comparison.axis}s",
        dest="networks",
        nargs="+",
        choices=comparison.networks,
        default=None,
        help=f"default: all ({comparison.networks[0]} with --quick)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--peak-batch", type=int, default=256, help="batch of the peak memory step")
    parser.add_argument(
        "--no-peak",
        action="store_true",
        help="skip the peak memory (a fresh process per variant: seconds each)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured timing rounds")
    parser.add_argument("--repeats", type=int, default=15, help="measured timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small smoke-test configuration")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.networks is None:
        args.networks = list(comparison.networks[:1] if args.quick else comparison.networks)
    if args.quick:
        args.seeds, args.epochs, args.warmup, args.repeats = 1, 1, 1, 2
        args.peak_batch = args.batch
    return args


def run_comparison(
    comparison: Comparison, script: str, description: str, argv: list[str] | None
) -> int:
    """The benchmark script ``benchmarks.<script>``: measure, write CSV/JSON/MD/PNG, report."""
    args, run = Run.from_command_line(
        script, functools.partial(parse_args, comparison, description), argv
    )
    torch.set_num_threads(args.threads)
    recipe = digits_recipe(args.epochs, args.batch)
    config = ("seeds", "epochs", "batch", "peak_batch", "no_peak", "warmup", "repeats", "threads")
    run.meta["config"] = (
        {f"{comparison.axis}s": args.networks}
        | {k: getattr(args, k) for k in config}
        | comparison.config
    )
    run.meta["recipe"] = vars(recipe)
    if comparison.recipe_changes:
        run.meta["recipe_changes"] = {
            network: asdict(change) | {"recipe": vars(change.apply(recipe))}
            for network, change in comparison.recipe_changes.items()
        }
    data = load_data(args.quick)
    rows: list[dict[str, Any]] = []
    for network in args.networks:
        rows += measure(comparison, network, data, recipe, args)
        run.write_partial(rows)
    summary = summarize(comparison, rows)
    run.meta["summary"] = summary
    run.finish()
    run.write(rows)
    run.write_markdown([table(comparison, summary, args, run.meta)])
    plot(comparison, summary, run.stem)
    run.report()
    return 0
