"""The memory planner against the usual checkpointing methods, at the same budgets.

For each torchvision ResNet (default resnet50/101/152, 224x224, batch 8) and
each budget -- fractions 1.0, 0.5, 0.25, 0.1 of the original's saved
activation bytes, and ``min``, the smallest the planner reaches -- every
method is configured to fit the budget in its own way, and the configuration
that fits with the least recomputation is measured:

* ``planner``: ``revcompile.convert(model, x, memory_budget=B)``;
* ``planner_preserve``: the same with ``preserve_function=True`` (storing and
  checkpointing only);
* ``checkpoint_per_block``: ``torch.utils.checkpoint`` around the first k
  residual blocks (high resolution first), the smallest k that fits;
* ``checkpoint_sequential``: stem + blocks under ``checkpoint_sequential`` with
  s segments, the s in 1..blocks that fits with the most saved bytes;
* ``torch_compile``: ``torch.compile`` with ``activation_memory_budget = B``
  (0 for ``min``), in a fresh process (its first step compiles; no peak
  measurement, which would compile again in another process).

Selection uses the exact symbolic memory model
(``revcompile.memory.activation_memory_formula``, fake tensors); the table
reports what was measured for the chosen configuration: saved activation
bytes (``saved_activation_bytes``, real forward), the planner's prediction,
peak step memory (fresh process, RSS on CPU) and the median step time over
``--repeats`` round-robin steps (all methods of one model and budget
interleaved with the original, whose median is the ratio's denominator;
torch.compile is timed in its own process, its ratio against the original
timed at the same budget), and the best of them against the original's best
(noise on a shared machine only slows steps down). At budget 1.0 every method
but torch.compile runs the original network unchanged, so the spread of their
ratios is the run's noise; the table states it. A method that cannot
fit a budget gets a row with ``fits = False`` and no measurements.

``--quick`` runs a tiny configuration (resnet18 at 64x64, batch 2, budgets
1.0, 0.25 and min, one timed step, no peak and no torch.compile) for the smoke
test.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from benchmarks.lib.measure import interleaved_times
from benchmarks.lib.plots import pyplot, save_figure
from benchmarks.lib.results import Run, add_results_dir, error_text, fixed, mib, print_table
from benchmarks.lib.variants import Checkpointed
from revcompile import convert, report
from revcompile.errors import BudgetError
from revcompile.memory import activation_memory_formula, peak_step_memory, saved_activation_bytes
from revcompile.memory.fresh_process import FreshProcessError, run_in_fresh_process
from revcompile.memory.step import training_step

LOSS = "cross_entropy"
METHODS = (
    "planner",
    "planner_preserve",
    "checkpoint_per_block",
    "checkpoint_sequential",
    "torch_compile",
)
STAGES = ("layer1", "layer2", "layer3", "layer4")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,resnet101,resnet152")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--budgets", default="1.0,0.5,0.25,0.1,min")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peak", action="store_true", help="skip peak step memory")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    parser.add_argument("--compile-timeout", type=float, default=1200.0)
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.size, args.budgets = "resnet18", 2, 64, "1.0,0.25,min"
        args.warmup, args.repeats, args.no_peak, args.no_compile = 0, 1, True, True
    return args


# --------------------------------------------------------------------------- the methods


def base(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().train()


class SequentialCheckpointed(nn.Module):
    """A torchvision ResNet's stem and blocks under ``checkpoint_sequential`` (s segments)."""

    def __init__(self, model: nn.Module, segments: int) -> None:
        super().__init__()
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        self.body = nn.Sequential(stem, *blocks_of(model))
        self.segments = segments
        self.head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            x = checkpoint_sequential(self.body, self.segments, x, use_reentrant=False)
        else:
            x = self.body(x)
        return self.head(x)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    return [block for stage in STAGES for block in getattr(model, stage)]


def per_block(model: nn.Module, k: int) -> nn.Module:
    """The first ``k`` blocks under ``torch.utils.checkpoint``."""
    done = 0
    for stage in STAGES:
        blocks = list(getattr(model, stage))
        for i, block in enumerate(blocks):
            if done < k:
                blocks[i] = Checkpointed(block)
                done += 1
        setattr(model, stage, nn.Sequential(*blocks))
    return model


def build(name: str, method: str, setting: Any, shape: tuple[int, ...]) -> nn.Module:
    """``method`` with ``setting`` applied to a fresh ``name`` (picklable via partial)."""
    model = base(name)
    if method == "original":
        return model
    if method in ("planner", "planner_preserve"):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        return convert(
            model, x, memory_budget=setting, preserve_function=method == "planner_preserve"
        ).train()
    if method == "checkpoint_per_block":
        return per_block(model, setting)
    if method == "checkpoint_sequential":
        return SequentialCheckpointed(model, setting).train()
    if method == "torch_compile":
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = setting
        return torch.compile(model)
    raise ValueError(f"unknown method {method!r}")


@functools.cache
def modelled_bytes(name: str, method: str, setting: int, shape: tuple[int, ...]) -> int:
    """Saved bytes of a configuration from the exact symbolic model (fake tensors)."""
    model = build(name, method, setting, shape)
    return int(activation_memory_formula(model, torch.randn(shape), dynamic={}))


def smallest_fitting(count: int, fits: Callable[[int], bool]) -> int | None:
    """The smallest k in 0..count with ``fits(k)`` (fits is monotone), else None."""
    if not fits(count):
        return None
    low, high = -1, count  # not fits(low) (virtual), fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def choose(name: str, method: str, limit: int, fraction: float, shape: tuple[int, ...]) -> Any:
    """The setting of ``method`` that fits ``limit`` bytes with least recomputation
    (None: none fits); torch.compile's is the fraction itself."""
    if method in ("planner", "planner_preserve"):
        return limit
    if method == "torch_compile":
        return fraction
    n = len(blocks_of(base(name)))
    if method == "checkpoint_per_block":
        return smallest_fitting(n, lambda k: modelled_bytes(name, method, k, shape) <= limit)
    fitting = {
        s: saved
        for s in range(1, n + 1)
        if (saved := modelled_bytes(name, method, s, shape)) <= limit
    }
    return max(fitting, key=fitting.get) if fitting else None


def compiled_step(name: str, fraction: float, shape: tuple[int, ...], warmup: int, repeats: int):
    """In a fresh process: torch.compile's saved bytes and step times (first step compiles)."""
    model = build(name, "torch_compile", fraction, shape)
    x = torch.randn(shape)
    step = training_step(model, x, LOSS)
    times = interleaved_times({"c": step}, torch.device("cpu"), max(1, warmup), repeats)["c"]
    return {"saved_bytes": saved_activation_bytes(model, x), **times}


# --------------------------------------------------------------------------- the run


def measure_budget(
    args: argparse.Namespace, name: str, label: str, limit: int, original: int
) -> list[dict[str, Any]]:
    """One row per method at one budget of one model."""
    shape = (args.batch, 3, args.size, args.size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fraction = 0.0 if label == "min" else float(label)
    rows, steps = [], {}
    for method in METHODS:
        row: dict[str, Any] = {"model": name, "budget": label, "budget_bytes": limit}
        row["method"] = method
        rows.append(row)
        if method == "torch_compile" and args.no_compile:
            row["skipped"] = "--no-compile"
            continue
        try:
            setting = choose(name, method, limit, fraction, shape)
            row["setting"] = setting
            if setting is None:
                row["fits"] = False
                continue
            if method == "torch_compile":
                row.update(
                    run_in_fresh_process(
                        compiled_step,
                        timeout=args.compile_timeout,
                        name=name,
                        fraction=fraction,
                        shape=shape,
                        warmup=args.warmup,
                        repeats=args.repeats,
                    )
                )
            else:
                model = build(name, method, setting, shape)
                if method.startswith("planner"):
                    plan = report(model).budget
                    row["predicted_bytes"] = plan.predicted_bytes
                    row["recompute_flops"] = plan.recompute_flops
                    row["plan"] = " ".join(f"{s.name}:{s.choice}" for s in plan.segments)
                row["saved_bytes"] = saved_activation_bytes(model, x)
                steps[method] = training_step(model, x, LOSS)
            row["saved_fraction"] = row["saved_bytes"] / original
            row["fits"] = row["saved_bytes"] <= limit
            if not args.no_peak and method != "torch_compile":  # it would compile again
                factory = functools.partial(build, name, method, setting, shape)
                row["peak_bytes"] = peak_step_memory(factory, shape, loss=LOSS, timeout=1800)
        except (BudgetError, FreshProcessError, RuntimeError, ValueError) as error:
            row["error"] = error_text(error)
    # the original is timed with them, so that each ratio compares steps taken side by side
    steps["original"] = training_step(base(name), x, LOSS)
    times = interleaved_times(steps, torch.device("cpu"), args.warmup, args.repeats)
    original_s = times["original"]["median_s"]
    for row in rows:
        row.update(times.get(row["method"], {}))
        if "median_s" in row:
            row |= {"original_s": original_s, "step_ratio": row["median_s"] / original_s}
            row["best_ratio"] = row["best_s"] / times["original"]["best_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("planner", parse_args, argv)
    run.meta.update(vars(args) | {"results_dir": str(args.results_dir)})
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        shape = (args.batch, 3, args.size, args.size)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        original = base(name)
        original_bytes = saved_activation_bytes(original, x)
        baseline = {"model": name, "budget": "-", "method": "original", "fits": True}
        baseline |= {"saved_bytes": original_bytes, "saved_fraction": 1.0}
        if not args.no_peak:
            factory = functools.partial(build, name, "original", None, shape)
            baseline["peak_bytes"] = peak_step_memory(factory, shape, loss=LOSS, timeout=1800)
        rows.append(baseline)
        for label in args.budgets.split(","):
            if label == "min":
                try:
                    convert(original, x, memory_budget=1)
                except BudgetError as error:
                    limit = error.smallest
            else:
                limit = math.floor(float(label) * original_bytes)
            start = time.perf_counter()
            rows += measure_budget(args, name, label, limit, original_bytes)
            print(f"{name} budget {label}: {time.perf_counter() - start:.0f} s", flush=True)
            run.write_partial(rows)
    run.finish()
    run.write(rows)
    run.write_markdown([table(rows, name, run.meta) for name in args.models.split(",")])
    plot(rows, args.models.split(","), run)
    run.report()
    return 0


def table(rows: list[dict[str, Any]], name: str, meta: dict[str, Any]) -> str:
    header = (
        "budget",
        "method",
        "setting",
        "fits",
        "predicted MiB",
        "saved MiB",
        "saved / original",
        "peak MiB",
        "step s",
        "step / original",
        "best / original",
    )
    lines = [
        (
            r["budget"],
            r["method"],
            str(r.get("setting", "-")) if not r["method"].startswith("planner") else "plan",
            {True: "yes", False: "no"}.get(r.get("fits"), r.get("skipped") or r.get("error", "-")),
            mib(r.get("predicted_bytes")),
            mib(r.get("saved_bytes")),
            fixed(r.get("saved_fraction"), 3),
            mib(r.get("peak_bytes")),
            fixed(r.get("median_s"), 3),
            fixed(r.get("step_ratio")),
            fixed(r.get("best_ratio")),
        )
        for r in rows
        if r["model"] == name
    ]
    title = f"{name}, batch {meta['batch']}, {meta['size']}x{meta['size']}, CPU"
    return f"**{title}**\n\n" + print_table(title, header, lines) + noise(rows, name)


def noise(rows: list[dict[str, Any]], name: str) -> str:
    """The spread of the step ratios of the methods that run the unchanged network (budget 1.0)."""
    same = [
        r
        for r in rows
        if r["model"] == name and r["budget"] == "1.0" and r["method"] != "torch_compile"
    ]
    spreads = []
    for key, label in (("step_ratio", "median"), ("best_ratio", "best")):
        values = [r[key] for r in same if key in r]
        if values:
            spreads.append(f"{min(values):.2f} to {max(values):.2f} ({label})")
    if not spreads:
        return ""
    return (
        "\n\nNoise: at budget 1.0 the same unchanged network times "
        + " and ".join(spreads)
        + " of the original.\n"
    )


def plot(rows: list[dict[str, Any]], names: list[str], run: Run) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method in METHODS:
            points = sorted(
                (r["saved_fraction"], r["step_ratio"])
                for r in rows
                if r["model"] == name and r["method"] == method and "step_ratio" in r
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("saved activations / original's")
        ax.set_ylabel("step time / original's")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, run.stem, f"memory vs time at each budget (batch {run.meta['batch']}, CPU)")


if __name__ == "__main__":
    raise SystemExit(main())
