"""Gradient fidelity of reversible backprop: the angle to stored-activation gradients.

The RevNet paper's analysis (Gomez et al. 2017, section 5.3) reproduced on
scikit-learn's digits (8x8, upsampled bilinearly to ``--size``): a deep
CIFAR-style ResNet (n basic blocks per stage, widths 8/16/32) is converted with
``revcompile.convert`` and trained in float32 with its reversible (float mode)
gradients. Every ``--every`` steps, on that step's batch and the same
parameters and BatchNorm state, the gradient of the loss is computed several
ways and compared by the angle between the flattened gradient vectors:

* ``float``: revcompile's reversible gradient vs the same network in
  ``reference_mode()`` (stored activations, plain autograd);
* ``exact``: the network converted with ``exact=True`` (same weights), its
  reversible gradient vs its ``reference_mode()`` -- and whether they are
  ``torch.equal`` -- and vs the float network's stored-activation gradient;
* ``revlib``: revlib's ``ReversibleSequential`` over the very same F and G
  modules (default memory-saving mode) vs revlib with ``MemoryModes.no_savings``;
* ``float32 stored``: the float32 stored-activation gradient vs float64
  (the rounding floor of float32 training itself).

A second table gives, at initialisation, the relative gradient error
``|g - g_stored| / |g_stored|`` as a function of depth.

    python -m benchmarks.fidelity            # full run (minutes on 2 CPU cores)
    python -m benchmarks.fidelity --quick    # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import revcompile
from benchmarks.lib.cifar import CifarResNet
from benchmarks.lib.environment import machine_line
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import Run, add_results_dir, print_table
from revcompile.runtime import ReversibleSequence

WIDTHS = (8, 16, 32)

#: Columns of a comparison: (key, what is compared with what).
COMPARISONS = {
    "float": "revcompile reversible vs reference_mode",
    "exact": "revcompile exact=True reversible vs its reference_mode",
    "exact_vs_float_stored": "revcompile exact=True reversible vs float reference_mode",
    "revlib": "revlib ReversibleSequential vs revlib no_savings",
    "stored32": "float32 stored-activation vs float64 stored-activation",
}


@dataclass
class Digits:
    """The digits as float32 images in [0, 1] at ``size`` x ``size``, and labels."""

    images: Tensor
    labels: Tensor


def load_digits(size: int) -> Digits:
    """scikit-learn's 1,797 8x8 digits, upsampled bilinearly (as examples/train_digits.py)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return Digits(images, torch.tensor(digits.target, dtype=torch.long))


def batches(data: Digits, batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled mini-batches (a new permutation each epoch)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data.labels), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start : start + batch]
            yield data.images[index], data.labels[index]


@dataclass
class Networks:
    """One network converted twice: float mode (the one trained) and exact mode.

    Both come from the same original, so their parameters correspond one to
    one in ``parameters()`` order; :func:`compare` copies the float network's
    state into the exact one before every comparison.
    """

    floating: nn.Module
    exact: nn.Module


def convert_both(n: int, example: Tensor, seed: int) -> Networks:
    """The CIFAR ResNet of ``n`` blocks per stage, converted in float and in exact mode."""
    torch.manual_seed(seed)
    original = CifarResNet(n, widths=WIDTHS, in_channels=example.shape[1])
    floating = revcompile.convert(original, example)
    exact = revcompile.convert(original, example, exact=True)
    exact.load_state_dict(floating.state_dict())
    return Networks(floating.train(), exact.train())


def revlib_form(gm: nn.Module, no_savings: bool) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of ``gm`` whose reversible stages are revlib's, over the same F and G.

    Each ``ReversibleSequence`` becomes ``revlib.ReversibleSequential(F0, G0,
    F1, G1, ...)``: revlib computes ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``
    on the halves of its input, the same function (a half-coupling's missing G
    is ``_NoBranch``: ``y2 = x2 + 0 = x2``). Returns the copy and its parameters
    in the order of ``gm.parameters()``.
    """
    import revlib

    memo: dict[int, Any] = {}
    copied = copy.deepcopy(gm, memo)
    mode = revlib.MemoryModes.no_savings if no_savings else revlib.MemoryModes.autograd_function
    for name, stage in list(copied.named_children()):
        if isinstance(stage, ReversibleSequence):
            halves = [fn for c in stage.couplings for fn in (c.F, c.G or _NoBranch())]
            setattr(
                copied,
                name,
                revlib.ReversibleSequential(*halves, split_dim=stage.dim, memory_mode=mode),
            )
    return copied, [memo[id(p)] for p in gm.parameters()]


class _NoBranch(nn.Module):
    """A half-coupling's G for revlib, which needs one: zero, so ``x2 + G(y1)`` is ``x2``
    bit for bit, and still differentiable (revlib differentiates every branch)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0


def flat_gradient(
    model: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor, reference: bool = False
) -> Tensor:
    """The cross-entropy gradient over ``params``, flattened, in float64.

    The model's parameters, buffers (BatchNorm statistics) and the RNG are
    left as they were, so every form sees the same state.
    """
    state = copy.deepcopy(model.state_dict())
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        if reference:
            with revcompile.reference_mode():
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    grads = [torch.zeros(p.shape) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.detach().double().flatten() for g in grads])
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return flat


def angle_degrees(a: Tensor, b: Tensor) -> float:
    """The angle between ``a`` and ``b``, accurate for tiny angles (no arccos of ~1)."""
    u, v = a / a.norm(), b / b.norm()
    return math.degrees(2 * math.atan2((u - v).norm().item(), (u + v).norm().item()))


def relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def compare(nets: Networks, x: Tensor, y: Tensor, with_revlib: bool) -> dict[str, Any]:
    """Every comparison of :data:`COMPARISONS` on one batch: angles and relative errors."""
    params = list(nets.floating.parameters())
    exact_params = list(nets.exact.parameters())
    nets.exact.load_state_dict(nets.floating.state_dict())
    stored = flat_gradient(nets.floating, params, x, y, reference=True)
    exact_stored = flat_gradient(nets.exact, exact_params, x, y, reference=True)
    exact = flat_gradient(nets.exact, exact_params, x, y)
    wide = copy.deepcopy(nets.floating).double()
    pairs = {
        "float": (flat_gradient(nets.floating, params, x, y), stored),
        "exact": (exact, exact_stored),
        "exact_vs_float_stored": (exact, stored),
        "stored32": (stored, flat_gradient(wide, list(wide.parameters()), x.double(), y, True)),
    }
    if with_revlib:
        saving, saving_params = revlib_form(nets.floating, no_savings=False)
        plain, plain_params = revlib_form(nets.floating, no_savings=True)
        pairs["revlib"] = (
            flat_gradient(saving, saving_params, x, y),
            flat_gradient(plain, plain_params, x, y),
        )
    row: dict[str, Any] = {"exact_bitwise": bool(torch.equal(exact, exact_stored))}
    for key, (got, want) in pairs.items():
        row[f"{key}_angle_deg"] = angle_degrees(got, want)
        row[f"{key}_rel_err"] = relative_error(got, want)
    return row


def train(n: int, data: Digits, args: argparse.Namespace, with_revlib: bool) -> list[dict]:
    """Train the float network of ``n`` blocks per stage; compare gradients every k steps."""
    stream = batches(data, args.batch, args.seed)
    nets = convert_both(n, data.images[: args.batch], args.seed)
    optimizer = torch.optim.SGD(
        nets.floating.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4
    )
    rows: list[dict[str, Any]] = []
    for step in tqdm(range(args.steps + 1), desc=f"train n={n}", unit="step"):
        x, y = next(stream)
        if step % args.every == 0:
            row = {"table": "training", "n": n, "step": step}
            rows.append({**row, **compare(nets, x, y, with_revlib)})
        if step == args.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(nets.floating(x), y)
        loss.backward()
        optimizer.step()
        rows[-1].setdefault("train_loss", loss.item())
    nets.floating.eval()
    with torch.no_grad():
        predicted = nets.floating(data.images).argmax(1)
    rows[-1]["train_accuracy"] = (predicted == data.labels).double().mean().item()
    return rows


def depth_sweep(data: Digits, args: argparse.Namespace, with_revlib: bool) -> list[dict]:
    """The comparisons at initialisation, on one batch, for each depth of ``--sweep``."""
    x, y = data.images[: args.batch], data.labels[: args.batch]
    rows = []
    for n in tqdm(args.sweep, desc="depth sweep", unit="depth"):
        nets = convert_both(n, x, args.seed)
        rows.append({"table": "depth", "n": n, "step": 0, **compare(nets, x, y, with_revlib)})
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[18, 54], help="n to train")
    parser.add_argument("--sweep", type=int, nargs="+", default=[3, 9, 18, 36, 54, 100])
    parser.add_argument("--steps", type=int, default=200, help="training steps per depth")
    parser.add_argument("--every", type=int, default=20, help="compare every k steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a shared CPU stays fast)"
    )
    parser.add_argument("--quick", action="store_true", help="small smoke-test configuration")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.sweep, args.steps, args.every, args.batch = [3], [2, 4], 4, 2, 8
    return args


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("fidelity", parse_args, argv)
    torch.set_num_threads(args.threads)
    with_revlib = not run.meta["peers"]["revlib"].startswith("unavailable")
    config = ("depths", "sweep", "steps", "every", "batch", "size", "lr", "seed", "threads")
    run.meta["config"] = {key: getattr(args, key) for key in config} | {"widths": WIDTHS}
    run.meta["comparisons"] = COMPARISONS
    if not with_revlib:
        run.meta["notes"] = [f"revlib skipped: {run.meta['peers']['revlib']}"]
    data = load_digits(args.size)
    rows = [row for n in args.depths for row in train(n, data, args, with_revlib)]
    run.write_partial(rows)
    rows += depth_sweep(data, args, with_revlib)
    run.meta["summary"] = summary(rows)
    run.finish()
    run.write(rows)
    run.write_markdown(tables(rows, args, run.meta))
    plot(rows, run.stem, with_revlib)
    run.report()
    return 0


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per trained depth: the float/revlib angles (median, max), and exact's bitwise record."""
    result: dict[str, Any] = {}
    for n in sorted({r["n"] for r in rows if r["table"] == "training"}):
        mine = [r for r in rows if r["table"] == "training" and r["n"] == n]
        entry: dict[str, Any] = {"exact_bitwise_every_step": all(r["exact_bitwise"] for r in mine)}
        for key in ("float", "revlib", "exact_vs_float_stored", "stored32"):
            angles = [r[f"{key}_angle_deg"] for r in mine if f"{key}_angle_deg" in r]
            if angles:
                entry[f"{key}_angle_deg_median"] = statistics.median(angles)
                entry[f"{key}_angle_deg_max"] = max(angles)
        entry["train_accuracy"] = mine[-1].get("train_accuracy")
        result[f"n{n}"] = entry
    return result


def _angle(row: dict[str, Any], key: str) -> str:
    value = row.get(f"{key}_angle_deg")
    return "-" if value is None else f"{value:.2e}"


def tables(rows: list[dict[str, Any]], args: argparse.Namespace, meta: dict) -> list[str]:
    """Markdown: angles during training, and relative errors at initialisation by depth."""
    machine = machine_line(meta["machine"])
    training = print_table(
        f"Angle (degrees) to the stored-activation gradient while training, float32, "
        f"digits {args.size}x{args.size}, batch {args.batch} — {machine}",
        ["n", "step", "float", "exact", "exact bitwise", "revlib", "float32 vs float64"],
        [
            [
                r["n"],
                r["step"],
                _angle(r, "float"),
                _angle(r, "exact"),
                "yes" if r["exact_bitwise"] else "NO",
                _angle(r, "revlib"),
                _angle(r, "stored32"),
            ]
            for r in rows
            if r["table"] == "training"
        ],
    )
    depth = print_table(
        "Relative gradient error |g - g_stored| / |g_stored| at initialisation, float32",
        ["n (blocks per stage)", "float", "exact", "revlib", "float32 vs float64"],
        [
            [r["n"]]
            + [
                "-" if f"{key}_rel_err" not in r else f"{r[f'{key}_rel_err']:.2e}"
                for key in ("float", "exact", "revlib", "stored32")
            ]
            for r in rows
            if r["table"] == "depth"
        ],
    )
    return [training, depth]


#: Plot styles: (comparison key, label, colour, marker). revlib runs the same float
#: operations as revcompile's float mode, so its markers are drawn over the same points.
_LINES = (
    ("float", "revcompile float mode", "tab:blue", "o"),
    ("revlib", "revlib", "tab:orange", "x"),
    ("stored32", "float32 stored vs float64", "tab:gray", "s"),
)


def plot(rows: list[dict[str, Any]], stem: Any, with_revlib: bool) -> None:
    """Left: angle during training per depth; right: relative error at init vs depth."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = [line for line in _LINES if with_revlib or line[0] != "revlib"]
    for n, style in zip(sorted({r["n"] for r in rows if r["table"] == "training"}), "-:"):
        mine = [r for r in rows if r["table"] == "training" and r["n"] == n]
        for key, label, colour, marker in lines:
            left.plot(
                [r["step"] for r in mine],
                [r[f"{key}_angle_deg"] for r in mine],
                style,
                color=colour,
                marker=marker,
                ms=4,
                label=f"{label}, n={n}",
            )
    left.set_yscale("log")
    left.set_xlabel("training step")
    left.set_ylabel("angle to stored-activation gradient (degrees)")
    bitwise = all(r["exact_bitwise"] for r in rows)
    left.set_title(
        "exact mode: 0° (bitwise equal) at every step" if bitwise else "exact mode: NOT bitwise",
        fontsize=9,
    )
    left.legend(fontsize=7)
    sweep = [r for r in rows if r["table"] == "depth"]
    for key, label, colour, marker in lines:
        right.plot(
            [r["n"] for r in sweep],
            [r[f"{key}_rel_err"] for r in sweep],
            color=colour,
            marker=marker,
            label=label,
        )
    right.set_xscale("log")
    right.set_xticks([r["n"] for r in sweep], [str(r["n"]) for r in sweep])
    right.minorticks_off()
    right.set_yscale("log")
    right.set_xlabel("blocks per stage n (depth 6n + 2)")
    right.set_ylabel("relative gradient error at init")
    right.legend(fontsize=7)
    save_figure(fig, stem, "Reversible vs stored-activation gradients, float32, digits")


if __name__ == "__main__":
    raise SystemExit(main())
