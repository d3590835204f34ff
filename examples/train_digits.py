"""Accuracy parity on real data: a ResNet and its revcompile conversion, same recipe.

Trains a CIFAR-style ResNet (3 stages of basic blocks, BatchNorm, widths
16/32/64) and ``revcompile.convert`` of it on scikit-learn's ``load_digits``
(1,797 real 8x8 handwritten digits, upsampled to 32x32; nothing is downloaded),
with the same recipe: SGD with Nesterov momentum, linear warm-up then cosine
learning-rate decay, random shifts and small rotations, the same batches in the same order.
Prints per-epoch loss and accuracy for both networks, the final test accuracy,
the activation bytes autograd saves per training batch and the wall time, and
writes a plot of the learning curves and a JSON of the results.

The converted network is a RevNet with the layout of the ResNet (weights sliced
from the freshly initialised ResNet), trained from scratch like the original.

    python examples/train_digits.py             # one seed
    python examples/train_digits.py --seeds 3   # the committed result
    python examples/train_digits.py --quick     # smoke test: 1 epoch, tiny network
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import os

# On a shared machine with more busy threads than cores, OpenMP threads that
# spin while waiting slow training down several times; let them sleep instead.
# (Read once, when torch loads its OpenMP runtime: set before importing torch.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

import revcompile
from revcompile.memory import saved_activation_bytes

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMAGE_SIZE = 32
SPLIT_SEED = 0
QUICK_TRAIN_IMAGES = 256


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@dataclass
class DigitsSplit:
    """The fixed stratified train/test split, images in [0, 1] at 32x32."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_digits_split(test_fraction: float) -> DigitsSplit:
    """Load the 8x8 digits, upsample them bilinearly to 32x32 and split them.

    The split is stratified by class and fixed (``random_state=SPLIT_SEED``),
    independent of the training seed, so every run is evaluated on the same
    images.
    """
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=test_fraction,
        stratify=digits.target,
        random_state=SPLIT_SEED,
    )
    return DigitsSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def random_shift_rotate(
    images: Tensor, max_shift_px: float, max_degrees: float, generator: torch.Generator
) -> Tensor:
    """Light augmentation: shift each image by up to ``max_shift_px`` pixels and
    rotate it by up to ``max_degrees`` (zero background, bilinear)."""
    n, _, height, width = images.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * max_shift_px / width)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al. 2016).

    The shortcut is the identity when stride and width are unchanged (such
    blocks become reversible couplings), else a 1x1 convolution with BatchNorm.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.projection: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.projection is None else self.projection(x)
        return F.relu(branch + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stem, three stages of ``blocks_per_stage``
    basic blocks (the first block of stages 2 and 3 halves the resolution), global
    average pooling and a linear classifier."""

    def __init__(
        self, widths: tuple[int, int, int], blocks_per_stage: int, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(in_channels, width, stride)]
            blocks += [BasicBlock(width, width, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


@dataclass
class Recipe:
    """Everything both networks are trained with."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_fraction: float
    max_shift_px: float
    max_degrees: float


@dataclass
class RunResult:
    """One network trained with one seed."""

    network: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    final_test_accuracy: float = 0.0
    saved_activation_bytes: int = 0
    parameters: int = 0
    wall_seconds: float = 0.0


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine decay to zero."""
    warmup_steps = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Test accuracy in percent (eval mode: BatchNorm running statistics)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return 100.0 * correct / len(labels)


def train(
    model: nn.Module,
    network: str,
    seed: int,
    data: DigitsSplit,
    recipe: Recipe,
    show_progress: bool,
) -> RunResult:
    """Train ``model`` with ``recipe``; the batches and augmentations depend only on
    ``seed``, so two networks trained with the same seed see identical data."""
    result = RunResult(network=network, seed=seed)
    result.parameters = sum(p.numel() for p in model.parameters())
    model.train()
    result.saved_activation_bytes = saved_activation_bytes(
        model, data.train_images[: recipe.batch_size]
    )

    data_order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        nesterov=True,
    )
    total_steps = recipe.epochs * math.ceil(len(data.train_labels) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, recipe.warmup_fraction)
    )
    start = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(data.train_labels), generator=data_order)
        loss_sum, correct = 0.0, 0
        batches = tqdm(
            range(0, len(order), recipe.batch_size),
            desc=f"{network} seed {seed} epoch {epoch}/{recipe.epochs}",
            leave=False,
            disable=not show_progress,
        )
        for batch_start in batches:
            index = order[batch_start : batch_start + recipe.batch_size]
            images = random_shift_rotate(
                data.train_images[index], recipe.max_shift_px, recipe.max_degrees, data_order
            )
            labels = data.train_labels[index]
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            batch_loss = loss.item()
            loss_sum += batch_loss * len(index)
            correct += int((logits.argmax(1) == labels).sum())
            batches.set_postfix(loss=f"{batch_loss:.3f}")
        result.train_loss.append(loss_sum / len(order))
        result.train_accuracy.append(100.0 * correct / len(order))
        result.test_accuracy.append(evaluate(model, data.test_images, data.test_labels))
        tqdm.write(
            f"{network:>6} seed {seed} epoch {epoch:2d}/{recipe.epochs}: "
            f"train loss {result.train_loss[-1]:.4f}, train acc {result.train_accuracy[-1]:5.1f}%, "
            f"test acc {result.test_accuracy[-1]:5.1f}%"
        )
    result.wall_seconds = time.perf_counter() - start
    result.final_test_accuracy = result.test_accuracy[-1]
    return result


def build_networks(
    seed: int, widths: tuple[int, int, int], blocks_per_stage: int
) -> tuple[nn.Module, nn.Module]:
    """A freshly initialised ResNet and its conversion (made from an identical
    initialisation, so the two start from the same weights where they overlap)."""
    torch.manual_seed(seed)
    resnet = CifarResNet(widths, blocks_per_stage)
    torch.manual_seed(seed)
    revnet = revcompile.convert(
        CifarResNet(widths, blocks_per_stage), torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    )
    return resnet, revnet


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def plot_curves(runs: list[RunResult], path: Path) -> None:
    """Train loss and test accuracy per epoch, one line per network and seed."""
    import matplotlib

    matplotlib.use("Agg")  # headless: write the file, open no window
    import matplotlib.pyplot as plt

    colors = {"ResNet": "tab:blue", "RevNet": "tab:orange"}
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    labelled: set[str] = set()
    for run in runs:
        epochs = range(1, len(run.train_loss) + 1)
        label = run.network if run.network not in labelled else None
        labelled.add(run.network)
        style = {"color": colors[run.network], "alpha": 0.8, "label": label}
        loss_axes.plot(epochs, run.train_loss, **style)
        accuracy_axes.plot(epochs, run.test_accuracy, **style)
    loss_axes.set(xlabel="epoch", ylabel="train loss", yscale="log", title="Training loss")
    accuracy_axes.set(
        xlabel="epoch", ylabel="test accuracy (%)", ylim=(0, 100), title="Test accuracy"
    )
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    seeds = len({run.seed for run in runs})
    figure.suptitle(f"load_digits 32x32: ResNet vs revcompile RevNet, {seeds} seed(s)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarize(runs: list[RunResult]) -> dict[str, float]:
    """Mean final accuracies, mean and per-seed differences (ResNet - RevNet)."""
    by_seed: dict[int, dict[str, RunResult]] = {}
    for run in runs:
        by_seed.setdefault(run.seed, {})[run.network] = run
    differences = [
        pair["ResNet"].final_test_accuracy - pair["RevNet"].final_test_accuracy
        for pair in by_seed.values()
    ]
    resnet_runs = [run for run in runs if run.network == "ResNet"]
    revnet_runs = [run for run in runs if run.network == "RevNet"]
    return {
        "resnet_mean_accuracy": float(np.mean([r.final_test_accuracy for r in resnet_runs])),
        "revnet_mean_accuracy": float(np.mean([r.final_test_accuracy for r in revnet_runs])),
        "mean_difference_points": float(np.mean(differences)),
        "saved_bytes_ratio": revnet_runs[0].saved_activation_bytes
        / resnet_runs[0].saved_activation_bytes,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=1, help="train seeds 0..N-1 (default 1)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--width", type=int, default=8, help="channels of stage 1; stages 2 and 3 double it"
    )
    parser.add_argument("--blocks-per-stage", type=int, default=3)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 epoch on {QUICK_TRAIN_IMAGES} training images, tiny network",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=f"default {RESULTS_DIR}")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    total_start = time.perf_counter()
    load_at_start = os.getloadavg()
    torch.set_num_threads(2)
    if args.quick:
        widths, blocks_per_stage, epochs = (4, 8, 16), 2, 1
    else:
        widths = (args.width, 2 * args.width, 4 * args.width)
        blocks_per_stage, epochs = args.blocks_per_stage, args.epochs
    recipe = Recipe(
        epochs=epochs,
        batch_size=64,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_fraction=0.2,
        max_shift_px=2.0,
        max_degrees=10.0,
    )
    data = load_digits_split(test_fraction=0.25)
    if args.quick:
        data.train_images = data.train_images[:QUICK_TRAIN_IMAGES]
        data.train_labels = data.train_labels[:QUICK_TRAIN_IMAGES]
    print(
        f"load_digits: {len(data.train_labels)} train / {len(data.test_labels)} test images "
        f"at {IMAGE_SIZE}x{IMAGE_SIZE}; widths {widths}, {blocks_per_stage} blocks per stage; "
        f"load average at start {load_at_start[0]:.2f}"
    )

    runs: list[RunResult] = []
    for seed in range(args.seeds):
        resnet, revnet = build_networks(seed, widths, blocks_per_stage)
        if seed == 0:
            print(revcompile.report(revnet))
        for network, model in (("ResNet", resnet), ("RevNet", revnet)):
            run = train(model, network, seed, data, recipe, show_progress=not args.no_progress)
            runs.append(run)
            print(
                f"{network} seed {seed}: final test accuracy {run.final_test_accuracy:.2f}%, "
                f"saved activations {run.saved_activation_bytes / 2**20:.2f} MiB per batch of "
                f"{recipe.batch_size}, {run.parameters:,} parameters, {run.wall_seconds:.1f} s"
            )
    total_seconds = time.perf_counter() - total_start

    summary = summarize(runs)
    print(
        f"\nfinal test accuracy (mean of {args.seeds} seed(s)): "
        f"ResNet {summary['resnet_mean_accuracy']:.2f}%, "
        f"RevNet {summary['revnet_mean_accuracy']:.2f}%, "
        f"mean difference {summary['mean_difference_points']:+.2f} points"
    )
    print(
        f"saved activation bytes RevNet / ResNet: {summary['saved_bytes_ratio']:.3f}; "
        f"total wall time {total_seconds:.0f} s; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "digits_quick" if args.quick else "digits"
    plot_path = args.out_dir / f"{stem}_curves.png"
    json_path = args.out_dir / f"{stem}_results.json"
    plot_curves(runs, plot_path)
    results = {
        "command": " ".join(["python", "examples/train_digits.py", *sys.argv[1:]]),
        "recipe": asdict(recipe),
        "widths": widths,
        "blocks_per_stage": blocks_per_stage,
        "summary": {**summary, "total_wall_seconds": total_seconds},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "runs": [asdict(run) for run in runs],
    }
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {plot_path} and {json_path}")


if __name__ == "__main__":
    main()
