"""Sanity check of the benchmark variants: every one builds, and a training step trains it.

A comparison is only fair if every variant really trains. For one model spec
(default ``cifar-n3``, batch 4) each eager variant is built, takes one
training step (``revcompile.memory.step.training_step``: cross-entropy, SGD
with learning rate 0.1) and reports how many of its parameter tensors moved
and whether all stayed finite. A variant whose peer library is missing is
reported as skipped; one that fails, with its error. Isolated variants
(torch.compile) are left out: compiling is the slow part, not the check.

    python -m benchmarks.variant_check
    python -m benchmarks.variant_check --spec cifar-n9 --variants original momentumnet
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.lib.environment import machine_line, peer_status
from benchmarks.lib.results import Run, add_results_dir, error_text, print_table
from benchmarks.lib.specs import input_chw
from benchmarks.lib.variants import ISOLATED_VARIANTS, VARIANTS, build, skip_reason
from revcompile.memory.step import training_step

EAGER_VARIANTS = tuple(v for v in VARIANTS if v not in ISOLATED_VARIANTS)
LEARNING_RATE = 0.1


def check_variant(spec: str, variant: str, batch: int) -> dict[str, Any]:
    """Build ``variant`` of ``spec``, take one step, count the parameter tensors that moved."""
    torch.manual_seed(0)
    model = build(spec, variant)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(batch, *input_chw(spec))
    training_step(model, x, "cross_entropy", lr=LEARNING_RATE)()
    unchanged = [
        name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])
    ]
    return {
        "parameters": len(before),
        "moved": len(before) - len(unchanged),
        "moved_fraction": (len(before) - len(unchanged)) / len(before),
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "unchanged": unchanged,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="cifar-n3")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--variants", nargs="+", default=list(EAGER_VARIANTS), choices=EAGER_VARIANTS
    )
    add_results_dir(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, run = Run.from_command_line("variant_check", parse_args, argv)
    run.meta["config"] = {"spec": args.spec, "batch": args.batch, "lr": LEARNING_RATE}
    peers = peer_status()
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        row: dict[str, Any] = {"model": args.spec, "variant": variant}
        reason = skip_reason(variant, peers)
        if reason:
            row["skipped"] = reason
        else:
            try:
                row.update(check_variant(args.spec, variant, args.batch))
            except Exception as exc:
                row["error"] = error_text(exc)
        rows.append(row)
    run.finish()
    run.write(rows)
    markdown = print_table(
        f"{args.spec}, one training step per variant — {machine_line(run.meta['machine'])}",
        ["variant", "parameter tensors moved", "finite", "note"],
        [
            [
                r["variant"],
                f"{r['moved']} / {r['parameters']}" if "moved" in r else "-",
                str(r.get("finite", "-")),
                r.get("skipped") or r.get("error") or "",
            ]
            for r in rows
        ],
    )
    run.write_markdown([markdown])
    print(f"wrote {run.stem}.{{csv,json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
