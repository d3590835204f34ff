"""Measurements of one converted model for the coverage table: exactness and saved bytes.

* :func:`max_relative_error` -- a float64 training step of the converted
  network against the same network under ``reference_mode()`` (DESIGN.md §8),
  as ``tests/equivalence.py`` compares them, but returning the largest relative
  error instead of asserting, and accepting any output pytree (dicts of
  segmentation heads and FPN taps, transformers' ``ModelOutput``).
* :func:`fake_saved_bytes` -- the bytes autograd saves in one training forward
  (``revcompile.memory.saved_activation_bytes``'s count) at a given input
  size, on fake tensors: no real memory, no compute, so 224x224 is cheap for
  every model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from revcompile import reference_mode
from revcompile.memory.formula import recording_saved
from revcompile.memory.saved import SavedStorageRecorder, storage_keys


@dataclass
class StepError:
    """Largest relative errors of one step against ``reference_mode()``.

    ``output``, ``input_grad`` and ``param_grad`` are relative to the largest
    entry of the reference tensor (each parameter gradient to at least 1e-3 of
    the step's largest gradient entry: gradients that are zero in exact
    arithmetic are rounding noise on both sides); ``buffers_equal`` says
    whether every buffer (BatchNorm statistics) is bitwise equal after the step.
    """

    output: float
    input_grad: float
    param_grad: float
    buffers_equal: bool

    @property
    def worst(self) -> float:
        return max(self.output, self.input_grad, self.param_grad)


def _step(module: nn.Module, x: torch.Tensor, *, reference: bool) -> tuple:
    """Forward, a loss weighting every output element differently, backward."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    if reference:
        with reference_mode():
            out = module(x)
    else:
        out = module(x)
    leaves = [
        t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, dtype=t.dtype, generator=generator) for t in leaves]
    sum((t * w).sum() for t, w in zip(leaves, weights)).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    return leaves, x.grad, grads, [b.clone() for b in module.buffers()]


def _relative(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    scale = max(expected.abs().max().item(), floor)
    return (actual - expected).abs().max().item() / scale if scale > 0 else 0.0


def max_relative_error(module: nn.Module, x: torch.Tensor) -> StepError:
    """One training step of ``module`` against a deep copy under ``reference_mode()``.

    Precondition: ``module`` and ``x`` are float64 and ``module`` is in train
    mode. Both steps start from the same RNG seed. A parameter that gets a
    gradient on one side only counts as an infinite error.
    """
    reference = copy.deepcopy(module)
    outs, x_grad, grads, buffers = _step(module, x, reference=False)
    want_outs, want_x_grad, want_grads, want_buffers = _step(reference, x, reference=True)
    output = max(_relative(a, b) for a, b in zip(outs, want_outs))
    input_grad = 0.0 if want_x_grad is None else _relative(x_grad, want_x_grad)
    trained = [w for w in want_grads if w is not None]
    floor = 1e-3 * max((w.abs().max().item() for w in trained), default=0.0)
    param_grad = 0.0
    for got, want in zip(grads, want_grads):
        if (got is None) != (want is None):
            param_grad = float("inf")
        elif want is not None:
            param_grad = max(param_grad, _relative(got, want, floor))
    equal = all(torch.equal(a, b) for a, b in zip(buffers, want_buffers))
    return StepError(output, input_grad, param_grad, equal)


def fake_saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Saved activation bytes of one training forward of ``model`` at ``x``'s shape.

    Runs on fake tensors (static shapes) with the recorder of
    ``revcompile.memory.saved_activation_bytes``: parameters and buffers are
    fakified and swapped in with ``torch.func.functional_call``, so ``model``
    is untouched and nothing is computed.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_x = mode.from_tensor(x)
        state = {
            name: mode.from_tensor(t, static_shapes=True)
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        }
        recorder = SavedStorageRecorder(storage_keys(state.values()))
        with recording_saved(recorder):
            output = torch.func.functional_call(model, state, (fake_x,))
        total = sum(int(n) for n in recorder.live_nbytes())
        del output
    return total


def rounding_sensitivity(module: nn.Module, x: torch.Tensor, trials: int = 3) -> float:
    """How far one rounding of the stage inputs moves the ``reference_mode()`` step.

    Every ``ReversibleSequence`` input is multiplied by ``1 + 2**-52 * N(0, 1)``
    (about one float64 rounding, what reversible reconstruction does to it) and
    the largest relative change of a parameter gradient (normalised as in
    :func:`max_relative_error`) over ``trials`` draws is returned. No
    reversible backward can be closer to the reference than this: an error of
    its order is the network's conditioning, not a defect.
    """
    from revcompile import ReversibleSequence

    want = _step(copy.deepcopy(module), x, reference=True)[2]
    floor = 1e-3 * max((w.abs().max().item() for w in want if w is not None), default=0.0)
    moved = 0.0
    for trial in range(trials):
        noisy = copy.deepcopy(module)
        draws = torch.Generator().manual_seed(trial)

        def perturb(_stage: nn.Module, args: tuple, draws: torch.Generator = draws) -> tuple:
            noise = torch.randn(args[0].shape, dtype=args[0].dtype, generator=draws)
            return (args[0] * (1 + 2.0**-52 * noise), *args[1:])

        for stage in noisy.modules():
            if isinstance(stage, ReversibleSequence):
                stage.register_forward_pre_hook(perturb)
        got = _step(noisy, x, reference=True)[2]
        for g, w in zip(got, want):
            if g is not None and w is not None:
                moved = max(moved, _relative(g, w, floor))
    return moved


def bitwise_in_exact_mode(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the step of an ``exact=True`` conversion equals ``reference_mode()``'s
    bit for bit (outputs, input gradient, parameter gradients, buffers)."""
    got = _step(copy.deepcopy(module), x, reference=False)
    want = _step(copy.deepcopy(module), x, reference=True)
    pairs = [*zip(got[0], want[0]), (got[1], want[1]), *zip(got[2], want[2]), *zip(got[3], want[3])]
    return all((a is None and b is None) or torch.equal(a, b) for a, b in pairs)
