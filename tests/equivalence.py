"""Reversible (or checkpointed) training step vs the same network in reference_mode().

Shared by the runtime and conversion tests: DESIGN.md §8's definition of
"exact" for float64 networks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from revcompile import reference_mode


@dataclass
class StepResult:
    output: torch.Tensor
    input_grad: torch.Tensor
    param_grads: list[torch.Tensor | None]
    buffers: list[torch.Tensor]


def training_step(module: nn.Module, x: torch.Tensor, *, reference: bool, seed: int = 0):
    """Forward, a loss that weights every output element differently, backward."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    if reference:
        with reference_mode():
            out = module(x)
    else:
        out = module(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return StepResult(
        output=out.detach(),
        input_grad=x.grad,
        param_grads=[None if p.grad is None else p.grad.clone() for p in module.parameters()],
        buffers=[b.clone() for b in module.buffers()],
    )


def assert_close_rel(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, floor: float = 0.0
) -> None:
    """Max error relative to max(largest entry of ``expected``, ``floor``)."""
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item() / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"


def compare_with_reference(module: nn.Module, x: torch.Tensor, rtol: float = 1e-10) -> None:
    """Reversible step vs reference_mode step on a deep copy: outputs, grads, buffers.

    Gradients that are zero in exact arithmetic (a conv bias before BatchNorm)
    come out as rounding noise of the other gradients' size (1e-15 of them) on
    both sides, so each gradient is compared relative to at least 1e-3 of the
    largest gradient entry of the step (1e-13 of it absolute at rtol=1e-10).
    """
    reference = copy.deepcopy(module)
    got = training_step(module, x, reference=False)
    want = training_step(reference, x, reference=True)
    assert_close_rel(got.output, want.output, rtol)
    assert_close_rel(got.input_grad, want.input_grad, rtol)
    trained = [(g, w) for g, w in zip(got.param_grads, want.param_grads) if w is not None]
    assert trained
    floor = 1e-3 * max(w.abs().max().item() for _, w in trained)
    for g, w in zip(got.param_grads, want.param_grads):
        assert (g is None) == (w is None)
        if w is not None:
            assert_close_rel(g, w, rtol, floor)
    for b, w in zip(got.buffers, want.buffers):
        assert torch.equal(b, w)
