"""The optimizer step inside backward: each parameter is updated once its gradient is complete.

``optim_in_backward(model, torch.optim.SGD, lr=0.1)`` gives every trainable
parameter its own optimizer and registers a
``Tensor.register_post_accumulate_grad_hook`` that steps it and frees its
gradient. Autograd fires that hook once per backward, after every
contribution to the parameter's gradient has been accumulated, so the update
is the one the same optimizer would make after ``loss.backward()``; but
gradients never all exist at once. With activations made small by
reversibility, the parameter gradients are what is left of a step's peak.

A reversible stage returns the gradients of all its parameters at once (its
backward computes them together), so within a stage they coexist; across
stages and segments they do not.

What an ordinary training loop does differently: no ``optimizer.step()`` or
``zero_grad()`` (the hooks do both), no gradient clipping or accumulation over
several backwards (each backward updates the parameters), and a learning-rate
scheduler must be stepped for every optimizer in ``handle.optimizers``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["OptimInBackward", "optim_in_backward"]


@dataclass
class OptimInBackward:
    """What ``optim_in_backward`` installed: one optimizer and one hook per parameter.

    ``optimizers`` maps parameter names (as in ``model.named_parameters()``)
    to their optimizer, for schedulers and ``state_dict``. ``remove()`` takes
    the hooks off; the parameters keep their values and the optimizers their
    state.
    """

    optimizers: dict[str, torch.optim.Optimizer]
    hooks: list[RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def optim_in_backward(
    model: nn.Module, optimizer_class: Callable[..., torch.optim.Optimizer], **kwargs: Any
) -> OptimInBackward:
    """Step ``optimizer_class(**kwargs)`` on each parameter of ``model`` inside backward.

    Pre: ``optimizer_class`` takes a list of parameters as its first argument
    and updates each parameter from its own gradient and state only (SGD, Adam,
    AdamW, RMSprop, ...: not LBFGS, nor optimizers that look at all gradients
    together). Post: every parameter of ``model`` with ``requires_grad``
    (shared parameters once) has an optimizer of its own; after a backward each
    has been updated exactly as ``optimizer_class(model.parameters(),
    **kwargs).step()`` would update it, and its ``.grad`` is None.
    """
    handle = OptimInBackward(optimizers={})
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        optimizer = optimizer_class([param], **kwargs)
        handle.optimizers[name] = optimizer
        handle.hooks.append(param.register_post_accumulate_grad_hook(_stepper(optimizer)))
    return handle


def _stepper(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    def step(param: torch.Tensor) -> None:
        optimizer.step()
        # Freed at once: this is where the memory is saved.
        optimizer.zero_grad(set_to_none=True)

    return step
