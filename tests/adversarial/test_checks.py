"""Every check of checks.py catches a planted defect (a check that cannot fail is a defect),
and finds nothing on a plain network that revcompile converts correctly."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import checks
import generator
import pytest
import replay
import torch
from generator import BlockSpec, NetSpec, Op, Truth
from hypothesis import given, settings
from torch import nn

import revcompile
from revcompile import AdditiveCoupling, ReversibleSequence
from revcompile.runtime import in_reference_mode

_CONV = Op("conv", (3, 1, 1, "zeros", True))
_BN = Op("norm", ("bn",))
_RELU = Op("act", ("relu",))


def _block(shortcut: str = "identity", width: int = 4) -> BlockSpec:
    return BlockSpec(
        (_CONV, _BN, _RELU, _CONV, _BN),
        shortcut,
        "plus",
        "none",
        "none",
        "relu",
        False,
        False,
        width,
    )


def _spec(*blocks: BlockSpec, policy: str = "checkpoint") -> NetSpec:
    return NetSpec(
        dim=2,
        in_channels=3,
        width=4,
        size=8,
        batch=2,
        stem="plain",
        stem_norm="bn",
        blocks=blocks,
        head="pooled",
        kwarg=False,
        state="none",
        train_at_convert=True,
        options=generator.ConvertOptions(policy=policy),
    )


STAGED = _spec(_block(), _block(), _block("down", 8), _block(width=8), _block(width=8))
"""Two reversible stages and a kept projection block."""
UNSTAGED = _spec(_block("projection"))
"""No stage: the converted module must be the original function."""


def _case(spec: NetSpec = STAGED) -> checks.Case:
    subject = generator.subject(spec)
    original = subject.build()
    before = checks.snapshot(original)
    converted = revcompile.convert(original, subject.example_inputs, **subject.options)
    return checks.Case(subject, original, converted, before)


def _stage(module: nn.Module) -> ReversibleSequence:
    return next(m for m in module.modules() if isinstance(m, ReversibleSequence))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.scale * grad, None


class WrongBackward(nn.Module):
    """``inner`` with its input gradient scaled by ``scale``: outside reference_mode() only,
    or always (then reference_mode() agrees and only finite differences can tell)."""

    def __init__(self, inner: nn.Module, always: bool, scale: float = 1.5) -> None:
        super().__init__()
        self.inner, self.always, self.scale = inner, always, scale

    def forward(self, x):
        out = self.inner(x)
        if self.always or not in_reference_mode():
            return _ScaleGrad.apply(out, self.scale)
        return out


class Wrapped(nn.Module):
    """The converted module with its output changed by ``kind``; keeps the report."""

    def __init__(self, converted: nn.Module, kind: str) -> None:
        super().__init__()
        self.converted, self.kind = converted, kind
        self.revcompile_report = revcompile.report(converted)

    def forward(self, *args, **kwargs):
        out = self.converted(*args, **kwargs)
        if self.kind == "list":
            return [out]
        return out * (1 + 1e-3 * torch.rand(()))  # "noise": random in eval too


class BadInverse(AdditiveCoupling):
    def inverse(self, y1, y2):
        x1, x2 = super().inverse(y1, y2)
        return x1 * 1.001, x2


def _plant_output_structure(case):
    case.converted = Wrapped(case.converted, "list")


def _plant_reference(case):
    coupling = _stage(case.converted).couplings[0]
    coupling.F = WrongBackward(coupling.F, always=False)


def _plant_finite_differences(case):
    coupling = _stage(case.converted).couplings[0]
    coupling.F = WrongBackward(coupling.F, always=True)


def _plant_coupling_inverse(case):
    _stage(case.converted).couplings[0].__class__ = BadInverse


def _plant_sharing(case):
    case.report.params_after += 1


def _plant_gradient_support(case):
    next(iter(case.converted.parameters())).requires_grad_(False)


def _plant_determinism(case):
    case.converted = Wrapped(case.converted, "noise")


def _plant_report_agreement(case):
    case.report.stages[0].couplings += 1


def _plant_ground_truth(case):
    truth = case.subject.truth
    case.subject = dataclasses.replace(
        case.subject, truth=Truth(truth.adds + 1, truth.identity + 1, truth.projection)
    )


def _plant_module_state(case):
    canonical = checks.canonical_name(case.converted)
    norm = next(m for n, m in case.converted.named_modules() if canonical(n) == "stem_norm")
    norm.num_batches_tracked += 1  # as if a recomputation updated it again


def _plant_original_unchanged(case):
    # The converted module trains a tensor of the original.
    original = case.original.stem_conv.weight
    owner = next(
        m for m in case.converted.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3
    )
    owner.weight = original


PLANTS = {
    "output_structure": (STAGED, _plant_output_structure),
    "reference": (STAGED, _plant_reference),
    "finite_differences": (STAGED, _plant_finite_differences),
    "coupling_inverse": (STAGED, _plant_coupling_inverse),
    "sharing": (STAGED, _plant_sharing),
    "gradient_support": (STAGED, _plant_gradient_support),
    "determinism": (STAGED, _plant_determinism),
    "report_agreement": (STAGED, _plant_report_agreement),
    "ground_truth": (STAGED, _plant_ground_truth),
    "module_state": (STAGED, _plant_module_state),
    "original_unchanged": (STAGED, _plant_original_unchanged),
}


def test_every_check_has_a_plant():
    assert set(PLANTS) | {"no_stage_exact"} == set(checks.CHECKS)


@pytest.mark.parametrize("spec", [STAGED, UNSTAGED], ids=["staged", "unstaged"])
def test_checks_pass_on_a_correct_conversion(spec):
    case = _case(spec)
    assert checks.run_checks(case) == []


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_check_catches_planted_defect(name):
    spec, plant = PLANTS[name]
    case = _case(spec)
    case.converted = copy.deepcopy(case.converted)  # the report copy is the module's own
    plant(case)
    found = checks.CHECKS[name](case)
    assert found, f"check {name} missed its planted defect"


def test_reference_check_is_blind_to_a_backward_wrong_in_both_modes():
    """Why finite differences exist: reference_mode() shares a wrong backward."""
    case = _case()
    _plant_finite_differences(case)
    assert checks.check_reference(case) == []
    assert checks.check_finite_differences(case)


def test_no_stage_exact_catches_a_changed_parameter():
    case = _case(UNSTAGED)
    assert not case.report.stages
    with torch.no_grad():
        next(iter(case.converted.parameters())).mul_(1 + 1e-12)
    assert checks.check_no_stage_exact(case)


def test_sharing_catches_untied_weights():
    """fx calls a shared module by its first name; untie the second call by hand."""
    spec = _spec(
        dataclasses.replace(_block("projection"), post="prelu_shared"),
        dataclasses.replace(_block("projection"), post="prelu_shared"),
        policy="store",
    )
    case = _case(spec)
    assert checks.check_sharing(case) == []
    gm = case.converted
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "blocks.0.post"]
    assert len(calls) == 2
    gm.add_submodule("blocks.1.post", copy.deepcopy(gm.get_submodule("blocks.0.post")))
    calls[1].target = "blocks.1.post"
    gm.recompile()
    assert checks.check_sharing(case)


def test_original_unchanged_catches_a_modified_original():
    case = _case()
    with torch.no_grad():
        case.original.stem_conv.weight.add_(1e-3)
    assert checks.check_original_unchanged(case)


def test_errors_check_catches_other_exceptions_and_allows_conversion_error():
    subject = generator.subject(STAGED)

    def crashing(*args, **kwargs):
        raise TypeError("planted")

    def refusing(*args, **kwargs):
        raise revcompile.ConversionError("planted refusal")

    crashed = checks.run_subject(subject, convert=crashing)
    assert crashed.status == "crashed"
    assert [d.check for d in crashed.defects] == ["errors"]
    refused = checks.run_subject(subject, convert=refusing)
    assert refused.status == "refused" and refused.defects == []


# --------------------------------------------------------------------------- replay, regressions

REGRESSIONS = replay.models_in((Path(__file__).parent / "regressions.txt").read_text())


@settings(max_examples=30, deadline=None)
@given(generator.networks())
def test_replay_parses_what_describe_prints(spec):
    assert replay.parse(spec.describe()) == spec


@pytest.mark.parametrize(
    "text", REGRESSIONS, ids=[f"regression{i}" for i in range(len(REGRESSIONS))]
)
def test_long_run_regression_has_no_defect(text):
    outcome = checks.run_subject(generator.subject(replay.parse(text)))
    assert outcome.status == "converted", outcome.message
    assert not outcome.defects, "\n".join(map(str, outcome.defects))


def _ill_conditioned_case() -> checks.Case:
    """Regression 2: one rounding of the stage inputs moves the reference's gradients 1e-7."""
    subject = generator.subject(replay.parse(REGRESSIONS[2]))
    original = subject.build()
    converted = revcompile.convert(original, subject.example_inputs, **subject.options)
    return checks.Case(subject, original, converted, checks.snapshot(original))


def test_reference_check_allows_rounding_only_where_the_reference_itself_moves():
    case = _ill_conditioned_case()
    got = checks.training_step(checks._copy(case.converted), case.subject)
    want = checks.training_step(checks._copy(case.converted), case.subject, reference=True)
    floor = 1e-6 * want.largest_grad()
    errors = {
        what: checks._rel_error(g, w, floor)
        for what, g, w in checks._step_tensors(got, want)
        if what.startswith("gradient") and g is not None
    }
    assert max(errors.values()) > checks.TOLERANCE  # the case is ill-conditioned
    moved = checks._rounding_sensitivity(case.converted, case.subject, want, floor)
    worst = max(errors, key=errors.get)
    assert moved[worst] > errors[worst] / checks.ROUNDING_MARGIN
    assert checks.check_reference(case) == []


@pytest.mark.parametrize("scale", [1.5, 1 + 1e-4])
def test_reference_check_catches_a_wrong_backward_in_an_ill_conditioned_network(scale):
    case = _ill_conditioned_case()
    coupling = _stage(case.converted).couplings[0]
    coupling.F = WrongBackward(coupling.F, always=False, scale=scale)
    assert checks.check_reference(case)


def test_exact_mode_arbiter_catches_a_defect_shared_by_both_conversions(monkeypatch):
    """The exact conversion is made afresh: a defect of revcompile shows in it too."""
    case = _ill_conditioned_case()
    real_convert = revcompile.convert

    def planted_convert(*args, **kwargs):
        converted = real_convert(*args, **kwargs)
        coupling = _stage(converted).couplings[0]
        coupling.F = WrongBackward(coupling.F, always=False, scale=1 + 1e-12)
        return converted

    monkeypatch.setattr(revcompile, "convert", planted_convert)
    found = checks._exact_mode_differences(case)
    assert found and all(message.startswith("exact mode:") for message in found)


class _SpectralNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1))
        self.old_style = nn.utils.spectral_norm(nn.Conv2d(4, 4, 3, padding=1))

    def forward(self, x):
        return self.old_style(torch.tanh(self.conv(x)))


def test_finite_differences_hold_spectral_norm_power_iterations():
    """In train mode the power iteration makes the forward depend on the weight through a
    no_grad path: central differences then disagree with PyTorch's own backward."""
    torch.manual_seed(0)
    subject = checks.Subject("spectral", lambda: _SpectralNet().double(), (_input(),))
    model = subject.build()
    assert checks._fd_errors(model, subject) == []
    assert model.conv.training  # held on the checks' copies only
    # The check still catches a wrong backward in such a model.
    wrong = copy.deepcopy(model)
    wrong.conv = WrongBackward(wrong.conv, always=True, scale=1 + 1e-3)
    assert checks._fd_errors(wrong, subject)


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
