"""The activation-memory model the ``inspect`` command prints: the saved-bytes
formula of a model, its value at the input shape, and the largest batch within
a budget (moved out of :mod:`revcompile.cli`, which stays under 500 lines)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from revcompile.memory import activation_memory_formula, max_batch_size


def one_line(error: BaseException) -> str:
    """An error message on one line (the CLI prints errors so)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def dynamic_dims(shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Symbols of the memory formula: B (dim 0), and H, W for NCHW / L for NCL inputs."""
    if len(shape) == 4:
        return {"B": (0, 0), "H": (0, 2), "W": (0, 3)}
    if len(shape) == 3:
        return {"B": (0, 0), "L": (0, 2)}
    return {"B": (0, 0)}


def memory_model(model: Any, shape: tuple[int, ...], x: Any, budget: int | None) -> dict[str, Any]:
    """Formula, bytes at ``shape`` and largest batch within ``budget`` for ``model``."""
    dynamic = dynamic_dims(shape)
    # Sizes 0 and 1 are special-cased by symbolic shapes: trace the formula at >= 2.
    traced_shape = list(shape)
    for _, dim in dynamic.values():
        traced_shape[dim] = max(2, traced_shape[dim])
    example = x if tuple(traced_shape) == tuple(shape) else torch.randn(traced_shape, dtype=x.dtype)
    was_training = model.training
    model.train()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            formula = activation_memory_formula(model, example, dynamic=dynamic)
    except (ValueError, RuntimeError) as error:
        return {"formula": None, "error": one_line(error), "bytes": None, "max_batch": None}
    finally:
        model.train(was_training)
    symbols = {s.name: s for s in formula.free_symbols}
    at_shape = {name: shape[dim] for name, (_, dim) in dynamic.items()}
    value = formula.subs({symbols[n]: v for n, v in at_shape.items() if n in symbols})
    result: dict[str, Any] = {
        "formula": str(formula),
        "bytes": int(value),
        "max_batch": None,
        "notes": [str(w.message).splitlines()[0] for w in caught],
    }
    if budget is not None:
        fixed = {n: v for n, v in at_shape.items() if n != "B" and n in symbols}
        try:
            result["max_batch"] = max_batch_size(formula, budget, **fixed)
        except ValueError as error:
            result["error"] = one_line(error)
    return result
