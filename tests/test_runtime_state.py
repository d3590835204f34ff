"""Module state, parameter swapping and autograd semantics of the runtime (DESIGN.md §9).

Every test compares the reversible stage or checkpointed segment with the same
network under ``reference_mode()`` (float64, 1e-10) and, where a plain module
exists, with that unconverted module: outputs, gradients, and the module state
(buffers, counters) left after the step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from equivalence import compare_with_reference, training_step
from torch import nn
from torch.func import functional_call

from revcompile import AdditiveCoupling, ReversibleSequence, reference_mode
from revcompile.memory import saved_activation_bytes
from revcompile.runtime import CheckpointedSegment

C = 3  # channels per half


class Counting(nn.Module):
    """Output depends on a Python counter and a buffer counter, both advanced in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C, C)
        self.calls = 0
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.steps.add_(1)
        return torch.tanh(self.lin(x)) * (1 + 0.1 * self.calls + 0.01 * self.steps)


class RunningCentre(nn.Module):
    """Updates a running mean in forward and subtracts it: the output reads the new buffer.

    The update goes through ``F.batch_norm``'s kernel, which changes the buffer
    without bumping its version counter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C, C)
        self.register_buffer("mean", torch.zeros(C))
        self.register_buffer("var", torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        nn.functional.batch_norm(x, self.mean, self.var, training=True, momentum=0.3)
        return torch.tanh(x - self.mean)


def spectral_old() -> nn.Module:
    return nn.Sequential(nn.utils.spectral_norm(nn.Linear(C, C)), nn.Tanh())


def spectral_new() -> nn.Module:
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(C, C)), nn.Tanh())


STATEFUL = {
    "spectral_norm": spectral_old,
    "parametrizations.spectral_norm": spectral_new,
    "counters": Counting,
    "running_centre": RunningCentre,
    "bn_cumulative": lambda: nn.Sequential(nn.Linear(C, C), nn.BatchNorm1d(C, momentum=None)),
}


class Unconverted(nn.Module):
    """The couplings of a stage computed by hand, without the runtime."""

    def __init__(self, stage: ReversibleSequence) -> None:
        super().__init__()
        self.couplings = copy.deepcopy(stage.couplings)
        self.split = stage.split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1) if self.split == "halve" else (x, x)
        for c in self.couplings:
            x1 = x1 + c.F(x2)
            x2 = x2 if c.G is None else x2 + c.G(x1)
        return torch.cat([x1, x2], dim=1) if self.split == "halve" else (x1 + x2) / 2


def _state(module: nn.Module) -> list:
    """Buffers and Python counters of ``module``, comparable with ``==``."""
    counters = [m.calls for m in module.modules() if isinstance(m, Counting)]
    return [b.clone() for b in module.buffers()] + counters


def _assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    for x, y in zip(_state(a), _state(b), strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def _input(batch: int = 5, width: int = 2 * C) -> torch.Tensor:
    return torch.randn(batch, width, dtype=torch.float64, requires_grad=True)


def _check_against_original(module: nn.Module, original: nn.Module, x: torch.Tensor) -> None:
    """Output, gradients and state after one step equal those of the unconverted module."""
    got = training_step(module, x, reference=False)
    want = training_step(original, x, reference=False)
    torch.testing.assert_close(got.output, want.output, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.input_grad, want.input_grad, rtol=1e-10, atol=1e-13)
    for g, w in zip(got.param_grads, want.param_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    _assert_state_equal(module, original)


@pytest.mark.parametrize("split", ["halve", "duplicate"])
@pytest.mark.parametrize("kind", sorted(STATEFUL))
def test_stage_recomputation_sees_the_state_of_the_forward(kind: str, split: str) -> None:
    torch.manual_seed(0)
    make = STATEFUL[kind]
    couplings = [AdditiveCoupling(make(), make()) for _ in range(3)]
    stage = ReversibleSequence(couplings, split=split).double()
    original = Unconverted(stage)
    x = _input(width=2 * C if split == "halve" else C)
    compare_with_reference(copy.deepcopy(stage), x)
    _check_against_original(stage, original, x)
    # A second step starts from the state the first left, in all three.
    _check_against_original(stage, original, x)


@pytest.mark.parametrize("kind", sorted(STATEFUL))
def test_one_stateful_module_shared_by_every_coupling(kind: str) -> None:
    """Each call must see the state left by the previous call, not the final one."""
    torch.manual_seed(0)
    shared = STATEFUL[kind]()
    stage = ReversibleSequence([AdditiveCoupling(shared, shared) for _ in range(3)]).double()
    original = Unconverted(stage)
    x = _input()
    compare_with_reference(copy.deepcopy(stage), x)
    _check_against_original(stage, original, x)


@pytest.mark.parametrize("kind", sorted(STATEFUL))
def test_segment_recomputation_sees_the_state_of_the_forward(kind: str) -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(2 * C, C), STATEFUL[kind](), nn.Linear(C, 2)).double()
    segment = CheckpointedSegment(body)
    original = copy.deepcopy(body)
    x = _input()
    compare_with_reference(copy.deepcopy(segment), x)
    _check_against_original(segment, original, x)
    _check_against_original(segment, original, x)


def test_recorded_state_costs_only_the_state_a_call_changes() -> None:
    """Spectral norm keeps u and v (2 x C float64) per branch call; BatchNorm keeps nothing."""

    def saved(make, n: int) -> int:
        torch.manual_seed(0)
        stage = ReversibleSequence([AdditiveCoupling(make(), make()) for _ in range(n)]).double()
        return saved_activation_bytes(stage, _input(8))

    output = 8 * 2 * C * 8
    bn = lambda: nn.Sequential(nn.Linear(C, C), nn.BatchNorm1d(C))  # noqa: E731
    assert saved(bn, 1) == saved(bn, 6) == output
    assert saved(spectral_new, 1) == output + 2 * (2 * C * 8)
    assert saved(spectral_new, 6) == output + 6 * 2 * (2 * C * 8)


def _tanh(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer, nn.Tanh())


def _net() -> nn.Module:
    """A small float64 network with a segment, a stage and tied weights."""
    torch.manual_seed(0)
    stem = nn.Linear(2 * C, 2 * C)
    f, g = nn.Linear(C, C), nn.Linear(C, C)
    stage = ReversibleSequence(
        [
            AdditiveCoupling(_tanh(f), _tanh(g)),
            AdditiveCoupling(_tanh(g), _tanh(nn.Linear(C, C))),
        ]
    )
    return nn.Sequential(
        CheckpointedSegment(nn.Sequential(stem, nn.Tanh())),
        stage,
        CheckpointedSegment(nn.Sequential(nn.Linear(2 * C, 2), nn.Tanh())),
    ).double()


@pytest.mark.parametrize("part", ["segment", "stage", "network"])
def test_backward_twice_with_retain_graph_doubles_gradients(part: str) -> None:
    net = _net()
    module = {"segment": net[0], "stage": net[1], "network": net}[part]
    x = _input()
    loss = module(x).pow(2).sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in module.parameters()]
    loss.backward()
    for p, g in zip(module.parameters(), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=0)


def test_gradcheck_network_with_segments_stage_and_parameters() -> None:
    """Finite differences, input and every parameter, through functional_call."""
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(net, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (_input(3), *params))


def _noise(x: torch.Tensor) -> torch.Tensor:
    return 0.1 * torch.randn_like(x)


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)).detach()


def _frozen() -> nn.Module:
    branch = nn.Sequential(nn.Linear(C, C), nn.Tanh())
    return branch.requires_grad_(False)


@pytest.mark.parametrize("branch", ["noise", "detached", "frozen"])
def test_branch_without_gradient_path(branch: str) -> None:
    make = {"noise": lambda: Lambda(_noise), "detached": Detached, "frozen": _frozen}[branch]
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(C, C), nn.Tanh())
    stage = ReversibleSequence(
        [AdditiveCoupling(make(), trained), AdditiveCoupling(trained, make())]
    ).double()
    compare_with_reference(stage, _input())


def _swap_check(net: nn.Module, x: torch.Tensor, swap) -> None:
    """functional_call's gradients w.r.t. the passed tensors equal reference_mode's."""
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    own = {n: b.clone() for n, b in net.named_buffers()}

    def step(reference: bool):
        passed = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        state = {n: b.clone() for n, b in buffers.items()}
        torch.manual_seed(0)
        with reference_mode() if reference else torch.enable_grad():
            out = functional_call(net, {**passed, **state}, (x,))
            swap(net)
            grads = torch.autograd.grad(out.pow(2).sum(), list(passed.values()))
        return out, grads, state

    out, grads, state = step(reference=False)
    ref_out, ref_grads, ref_state = step(reference=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
    for n in buffers:
        assert torch.equal(state[n], ref_state[n]), n
        assert torch.equal(dict(net.named_buffers())[n], own[n]), n  # the module's own: untouched
    assert all(p.grad is None for p in net.parameters())


def _bn_net() -> nn.Module:
    torch.manual_seed(0)

    def branch() -> nn.Module:
        return nn.Sequential(nn.Linear(C, C), nn.BatchNorm1d(C), nn.Tanh())

    stage = ReversibleSequence([AdditiveCoupling(branch(), branch()) for _ in range(2)])
    head = CheckpointedSegment(nn.Sequential(nn.Linear(2 * C, 2 * C), nn.BatchNorm1d(2 * C)))
    return nn.Sequential(head, stage, CheckpointedSegment(nn.Linear(2 * C, 2))).double()


def test_functional_call_gradients_go_to_the_passed_tensors() -> None:
    _swap_check(_bn_net(), _input(6), swap=lambda net: None)


def test_parameters_swapped_between_forward_and_backward() -> None:
    """FSDP-like: the module's parameters are replaced before backward runs."""

    def swap(net: nn.Module) -> None:
        for module in net.modules():
            for name, p in list(module._parameters.items()):
                module._parameters[name] = nn.Parameter(torch.full_like(p, 7.0))

    _swap_check(_bn_net(), _input(6), swap=swap)


def test_weight_tying_between_branches_couplings_and_a_segment() -> None:
    torch.manual_seed(0)
    f = nn.Linear(C, C)
    g = nn.Linear(C, C)
    g.weight = f.weight  # F and G share a weight
    tied = nn.Sequential(nn.Linear(C, C), nn.Tanh())  # one module in two couplings
    stage = ReversibleSequence(
        [
            AdditiveCoupling(nn.Sequential(f, nn.Tanh()), nn.Sequential(g, nn.Tanh())),
            AdditiveCoupling(tied, tied),
            AdditiveCoupling(nn.Sequential(nn.Linear(C, C), nn.Tanh()), tied),
        ]
    )
    stem = nn.Linear(C, C)
    stem.weight = f.weight  # a segment shares it too
    net = nn.Sequential(
        CheckpointedSegment(nn.Sequential(Lambda(lambda x: x), nn.Identity())),
        stage,
        CheckpointedSegment(nn.Sequential(Split(stem), nn.Tanh())),
    ).double()
    compare_with_reference(net, _input())


class Split(nn.Module):
    """Applies ``layer`` to both halves (a segment that uses a tied weight)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.layer(h) for h in x.chunk(2, dim=1)], dim=1)


@pytest.mark.parametrize(
    "after", [lambda y: y.relu_(), nn.Dropout(0.5, inplace=True), lambda y: y[:, :1].mul_(2)]
)
def test_inplace_change_of_the_stage_output_names_the_stage(after) -> None:
    torch.manual_seed(0)
    branch = lambda: nn.Sequential(nn.Linear(C, C), nn.Tanh())  # noqa: E731
    stage = ReversibleSequence([AdditiveCoupling(branch(), branch())], name="layer1").double()
    out = stage(_input())
    out = after(out)
    with pytest.raises(RuntimeError, match=r"reversible stage layer1.*in place.*out-of-place"):
        out.sum().backward()
