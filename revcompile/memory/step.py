"""The training step whose memory and time are measured: defined once, used everywhere.

:func:`revcompile.memory.peak_step_memory` measures it in a fresh process; the
benchmarks time it and measure its peak through the same function, so the
numbers of a table describe one and the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

Loss = Literal["sum", "cross_entropy"]
LOSSES: tuple[Loss, ...] = ("sum", "cross_entropy")


def step_loss(out: object, loss: Loss) -> torch.Tensor:
    """The scalar loss of a model output.

    ``"sum"``: the sum of every floating tensor of the output that requires
    grad; ``"cross_entropy"``: cross-entropy of 2-D logits against class 0.

    Raises:
        ValueError: the output does not fit the loss (no tensor requiring
            grad, or logits that are not 2-D).
    """
    if loss == "cross_entropy":
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError("loss='cross_entropy' needs 2-D logits as the model output")
        target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        return F.cross_entropy(out, target)
    leaves = [
        t
        for t in pytree.tree_leaves(out)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]
    if not leaves:
        raise ValueError("the model output has no floating tensor requiring grad")
    return sum(t.sum() for t in leaves)  # type: ignore[return-value]


def training_step(
    model: nn.Module, x: torch.Tensor, loss: Loss = "sum", lr: float = 1e-3
) -> Callable[[], None]:
    """One training step of ``model`` on ``x``, as a zero-argument callable.

    The step: ``out = model(x)``; :func:`step_loss`; ``backward()``; one step
    of plain SGD (``lr``, no optimizer state) over the parameters that require
    grad; gradients freed (``zero_grad(set_to_none=True)``), so consecutive
    calls are identical steps and nothing outlives one beyond the parameters.
    The output and the loss are dropped as soon as they are used, so they do
    not raise the step's peak.

    Precondition: ``loss`` is one of :data:`LOSSES`.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        out = model(x)
        value = step_loss(out, loss)
        del out
        value.backward()
        del value
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
