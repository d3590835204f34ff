"""Checks against the ORIGINAL model (DESIGN.md §9): where conversion makes no
block reversible, the converted module must compute exactly what the original
computes, and converting must leave the original as it was.

- eval outputs bit for bit;
- one training step (on deep copies): output, input gradient and every
  parameter gradient bit for bit, matched by parameter name (a parameter the
  converted module no longer holds, e.g. of a dead layer, must have had no
  gradient in the original either);
- the original's state_dict unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} of the original changed"


def assert_same_eval(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    want = copy.deepcopy(original).eval()(x)
    got = copy.deepcopy(converted).eval()(x)
    assert torch.equal(got, want), f"eval outputs differ by {(got - want).abs().max().item():.3e}"


def _step(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    module = copy.deepcopy(module).train()
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    out = module(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out.detach(), x.grad, grads


def assert_same_training_step(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    want_out, want_dx, want_grads = _step(original, x)
    got_out, got_dx, got_grads = _step(converted, x)
    assert torch.equal(got_out, want_out)
    assert torch.equal(got_dx, want_dx)
    for name, want in want_grads.items():
        if name not in got_grads:
            assert want is None, f"{name} trained in the original but is gone"
            continue
        got = got_grads[name]
        assert (got is None) == (want is None), name
        if want is not None:
            assert torch.equal(got, want), f"gradient of {name} differs"
    assert got_grads.keys() <= want_grads.keys()


def assert_same_function(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """Eval outputs and a training step, bit for bit."""
    assert_same_eval(original, converted, x)
    assert_same_training_step(original, converted, x)
