"""The memory planner on the command line: ``--memory-budget`` and ``--preserve-function``.

``revcompile convert --memory-budget 0.2`` converts with the plan (a fraction
of the original's saved activation bytes, or a size such as ``24GB``);
``revcompile inspect --memory-budget 24GB`` prints the plan table and the
largest batch for which some plan fits.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from revcompile import options
from revcompile.api import pipeline
from revcompile.errors import BudgetError
from revcompile.options import MemoryBudget
from revcompile.passes.budget import budget

#: The largest batch :func:`largest_batch` tries (a planner run per step of its search).
MAX_BATCH = 2**24


def parse_memory_budget(text: str) -> MemoryBudget:
    """``"0.2"`` (a number up to 1) is a fraction; ``"24GB"``, ``"512MiB"`` or a
    larger number is a size in bytes."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value <= 1:
        return value
    try:
        return options.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"malformed --memory-budget {text!r}: a fraction in (0, 1] such as 0.2, or {error}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--memory-budget`` and ``--preserve-function`` on a ``convert``/``inspect`` parser."""
    parser.add_argument(
        "--memory-budget",
        type=parse_memory_budget,
        metavar="B",
        help="plan the fastest step whose saved activations fit: a fraction of the "
        "original's (0.2) or a size (24GB, 512MiB); needs --input-shape",
    )
    parser.add_argument(
        "--preserve-function",
        action="store_true",
        help="with --memory-budget: store and checkpoint only, no reversible couplings "
        "(the network keeps its function)",
    )


def convert_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``convert`` the flags give."""
    return {
        "memory_budget": args.memory_budget,
        "preserve_function": args.preserve_function,
    }


def largest_batch(model: nn.Module, x: torch.Tensor, limit: int, preserve_function: bool) -> int:
    """The largest batch size (dim 0 of ``x``) at which some plan's saved
    activations fit in ``limit`` bytes; 0 if not even batch 1 fits.

    The model is traced and analysed once; the planner then runs on fake
    tensors at each batch size tried (doubling, then bisection), so no
    activation memory is used. ``MAX_BATCH`` when every size tried fits.
    """
    gm, the_plan, _ = pipeline(model, x, rewrite=False)

    def fits(batch: int) -> bool:
        inputs = (torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device="meta"),)
        try:
            budget(gm, the_plan, inputs, limit, preserve_function=preserve_function)
        except BudgetError:
            return False
        return True

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_BATCH and fits(high):
        low, high = high, high * 2
    if high > MAX_BATCH:
        return low
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
