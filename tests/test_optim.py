"""``revcompile.optim_in_backward``: the optimizer step inside backward.

Two training steps of a converted CIFAR ResNet with the optimizer applied in
backward must leave parameters and buffers identical (``torch.equal``) to
the same optimizer run normally (``loss.backward(); opt.step()``), for SGD
with momentum and AdamW (optimizer state carried across steps), in float64
and float32; and the gradients must never all exist at once.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from models import cifar_resnet

import revcompile

OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
    (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
]
STEPS = 2


def _converted(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    gm = revcompile.convert(cifar_resnet(20).to(dtype), x)
    return gm, x


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("optimizer_class", "kwargs"), OPTIMIZERS, ids=["sgd", "adamw"])
def test_parameters_identical_to_the_optimizer_run_normally(
    dtype: torch.dtype, optimizer_class: type, kwargs: dict[str, Any]
) -> None:
    normal, x = _converted(dtype)
    fused = copy.deepcopy(normal)
    optimizer = optimizer_class(normal.parameters(), **kwargs)
    handle = revcompile.optim_in_backward(fused, optimizer_class, **kwargs)
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        _loss(normal, x).backward()
        optimizer.step()
        _loss(fused, x).backward()
    for (name, want), got in zip(normal.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(got, want), name
    assert all(p.grad is None for p in fused.parameters())
    assert set(handle.optimizers) == {name for name, _ in fused.named_parameters()}


def test_at_most_one_gradient_is_stored_at_a_time() -> None:
    gm, x = _converted(torch.float64)
    params = list(gm.parameters())
    most = 0

    def count(_: torch.Tensor) -> None:
        nonlocal most
        most = max(most, sum(p.grad is not None for p in params))

    for p in params:  # registered before the stepping hooks: runs before them
        p.register_post_accumulate_grad_hook(count)
    revcompile.optim_in_backward(gm, torch.optim.SGD, lr=0.1)
    _loss(gm, x).backward()
    # Each .grad is freed before the next parameter's is accumulated. (A reversible
    # stage's backward still returns its parameters' gradients together.)
    assert most == 1


def test_remove_restores_ordinary_gradients() -> None:
    gm, x = _converted(torch.float64)
    before = copy.deepcopy(gm.state_dict())
    handle = revcompile.optim_in_backward(gm, torch.optim.SGD, lr=0.1)
    handle.remove()
    _loss(gm, x).backward()
    assert all(p.grad is not None for p in gm.parameters())
    for name, p in gm.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_shared_and_frozen_parameters() -> None:
    shared = torch.nn.Linear(3, 3, dtype=torch.float64)
    frozen = torch.nn.Linear(3, 3, dtype=torch.float64).requires_grad_(False)
    model = torch.nn.Sequential(shared, frozen, shared)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    handle = revcompile.optim_in_backward(model, torch.optim.SGD, lr=0.5, momentum=0.9)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    for _ in range(STEPS):
        optimizer.zero_grad()
        reference(x).sum().backward()
        optimizer.step()
        model(x).sum().backward()
    assert sorted(handle.optimizers) == ["0.bias", "0.weight"]  # shared once, frozen never
    for want, got in zip(reference.parameters(), model.parameters()):
        assert torch.equal(got, want)
