"""Independent checks of one conversion: each returns a list of ``Defect`` records.

A ``Subject`` is what a case is made of (a factory for the original model, the
call inputs, the ``convert`` options, the ground truth when known);
``run_subject`` converts it and runs every check on the resulting ``Case``
(original, converted, inputs). ``convert`` either succeeds or raises
``ConversionError``; any other exception is an ``errors`` defect, and an
exception inside a check (the converted model crashing in forward or backward)
is a defect of that check. A check never trusts ``reference_mode()`` alone:
finite differences test the converted module's own backward, and the
original model is the reference for structure, gradients' support, sharing,
state and determinism (DESIGN.md §9).
"""

from __future__ import annotations

import copy
import random
import re
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

import revcompile
from revcompile import ConversionError, ReversibleSequence, reference_mode
from revcompile.options import DEFAULT_LEFTOVER, DEFAULT_SPLIT
from revcompile.runtime import CheckpointedSegment

TOLERANCE = 1e-9
"""Reversible vs reference: max error / max(max |ref|, 1e-6 x the step's largest gradient)."""
MAX_MESSAGES = 4
"""Messages kept per check and case (the rest are counted)."""
ROUNDING_MARGIN = 10.0
"""How many times one rounding's movement of the reference an ill-conditioned network's
reversible error may reach (``check_reference``)."""
ROUNDING_TRIALS = 3
ILL_CONDITIONED: list[tuple[float, float]] = []
"""(largest error, the reference's movement under one rounding there) of every step the
reference check judged by rounding sensitivity and exact mode (counted by run_long.py)."""
FD_TOLERANCE = 1e-5
"""Central differences (step 1e-6, float64) vs the analytic directional derivative."""


@dataclass(frozen=True)
class Defect:
    check: str
    model: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}\n    model: {self.model}"


@dataclass
class Subject:
    """A model to convert: ``build()`` returns a fresh original each call."""

    description: str
    build: Callable[[], nn.Module]
    args: tuple[torch.Tensor, ...]
    kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    pass_inputs: bool = True
    truth: object | None = None  # generator.Truth

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...] | None:
        return self.args if self.pass_inputs else None


@dataclass
class Case:
    subject: Subject
    original: nn.Module
    converted: nn.Module
    before: dict

    @property
    def report(self) -> revcompile.ConversionReport:
        return revcompile.report(self.converted)


# --------------------------------------------------------------------------- helpers


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for value in out.values() for t in _flatten(value)]
    if isinstance(out, (tuple, list)):
        return [t for value in out for t in _flatten(value)]
    return []


def _structure(out) -> object:
    if isinstance(out, torch.Tensor):
        return ("Tensor", tuple(out.shape), out.dtype)
    if isinstance(out, dict):
        return (type(out).__name__, tuple((k, _structure(v)) for k, v in out.items()))
    if isinstance(out, (tuple, list)):
        return (type(out).__name__, tuple(_structure(v) for v in out))
    return (type(out).__name__,)


def _loss(out) -> torch.Tensor:
    """A loss that weights every output element differently (fixed weights per position)."""
    total = 0
    for i, t in enumerate(_flatten(out)):
        if not t.is_floating_point():
            continue
        weights = torch.randn(
            t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(i + 1)
        )
        total = total + (t * weights).sum()
    return total


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def _call(module: nn.Module, subject: Subject, args, seed: int = 0, reference: bool = False):
    _seed(seed)
    if reference:
        with reference_mode():
            return module(*args, **subject.kwargs)
    return module(*args, **subject.kwargs)


@dataclass
class Step:
    outputs: list[torch.Tensor]
    structure: object
    loss: float
    input_grads: list[torch.Tensor | None]
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]

    def largest_grad(self) -> float:
        grads = [g for g in (*self.input_grads, *self.grads.values()) if g is not None]
        return max((g.abs().max().item() for g in grads if g.numel()), default=0.0)


def _copy(value):
    """A deep copy for the checks. A module whose forward computed a non-leaf tensor
    attribute (``weight`` of old-style ``weight_norm`` / ``prune``, recomputed before
    every call) cannot be deep-copied after a forward (pytorch#103001), the original
    as much as the converted one: such attributes are copied detached."""
    memo: dict = {}
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, nn.Module):
            for module in item.modules():
                for tensor in vars(module).values():
                    if isinstance(tensor, torch.Tensor) and not tensor.is_leaf:
                        memo.setdefault(id(tensor), tensor.detach().clone())
    return copy.deepcopy(value, memo)


def canonical_name(module: nn.Module) -> Callable[[str], str]:
    """Maps a name of ``module`` to the original's: the ``<segment>.body.`` prefix of a
    CheckpointedSegment (policy="checkpoint") is dropped; stage names are left as they are."""
    segments = [
        n + ".body." for n, m in module.named_modules() if isinstance(m, CheckpointedSegment)
    ]

    def canonical(name: str) -> str:
        for prefix in segments:
            if name.startswith(prefix):
                return name[len(prefix) :]
        return name

    return canonical


def _params(module: nn.Module) -> dict[str, nn.Parameter]:
    """Unique parameters by canonical name."""
    canonical = canonical_name(module)
    return {canonical(n): p for n, p in module.named_parameters()}


def _tensors(module: nn.Module, *, remove_duplicate: bool = True) -> dict[str, torch.Tensor]:
    """Parameters and buffers by canonical name."""
    canonical = canonical_name(module)
    named = (
        *module.named_parameters(remove_duplicate=remove_duplicate),
        *module.named_buffers(remove_duplicate=remove_duplicate),
    )
    return {canonical(n): t for n, t in named}


def training_step(module: nn.Module, subject: Subject, *, reference: bool = False, seed: int = 0):
    """One forward + backward in train mode; ``module``'s grads are set (pass a copy)."""
    module.train()
    module.zero_grad(set_to_none=True)
    args = tuple(a.detach().clone().requires_grad_(a.is_floating_point()) for a in subject.args)
    out = _call(module, subject, args, seed, reference)
    loss = _loss(out)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
    return Step(
        outputs=[t.detach() for t in _flatten(out)],
        structure=_structure(out),
        loss=float(loss),
        input_grads=[a.grad for a in args],
        grads={n: None if p.grad is None else p.grad.clone() for n, p in _params(module).items()},
        buffers={
            n: b.detach().clone()
            for n, b in _tensors(module).items()
            if not isinstance(b, nn.Parameter)
        },
    )


def _rel_error(actual: torch.Tensor, expected: torch.Tensor, floor: float) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    if not expected.numel():
        return 0.0
    scale = max(expected.abs().max().item(), floor, 1e-300)
    return (actual - expected).abs().max().item() / scale


def _owner(name: str, blocks: list[str]) -> str | None:
    """The longest block name that is a module-path prefix of ``name``."""
    owners = [b for b in blocks if name.startswith(b + ".")]
    return max(owners, key=len) if owners else None


def _converted_blocks(case: Case) -> list[str]:
    return [b.name for b in case.report.blocks if b.fate != "kept"]


def snapshot(model: nn.Module) -> dict:
    """Everything of ``model`` that convert and training the result must leave alone."""
    attributes = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") and key not in ("_forward_hooks", "_forward_pre_hooks"):
                continue
            simple = value if isinstance(value, (int, float, bool, str, type(None))) else None
            attributes[(name, key)] = (type(value).__name__, simple)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "attributes": attributes,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _diff_snapshots(before: dict, after: dict) -> list[str]:
    problems = []
    for key in sorted(set(before["state"]) | set(after["state"])):
        old, new = before["state"].get(key), after["state"].get(key)
        if old is None or new is None:
            problems.append(f"state_dict key {key} {'added' if old is None else 'removed'}")
        elif old.shape != new.shape or not torch.equal(old, new):
            problems.append(f"state_dict value {key} changed")
    for key in sorted(set(before["attributes"]) | set(after["attributes"]), key=str):
        old, new = before["attributes"].get(key), after["attributes"].get(key)
        if old != new:
            problems.append(f"attribute {'.'.join(filter(None, key))}: {old} -> {new}")
    if before["requires_grad"] != after["requires_grad"]:
        problems.append("requires_grad flags changed")
    return problems


# --------------------------------------------------------------------------- checks


def check_output_structure(case: Case) -> list[str]:
    """Output type (dict vs OrderedDict, tuple vs list), keys, shapes and dtypes, both modes."""
    problems = []
    for mode in (True, False):
        original, converted = _copy((case.original, case.converted))
        with torch.no_grad():
            want = _structure(_call(original.train(mode), case.subject, case.subject.args))
            got = _structure(_call(converted.train(mode), case.subject, case.subject.args))
        if got != want:
            problems.append(
                f"{'train' if mode else 'eval'} output structure {got} != original's {want}"
            )
    return problems


def check_reference(case: Case) -> list[str]:
    """Reversible training step vs the same module under reference_mode().

    Within ``TOLERANCE``; where a network is so ill-conditioned that one rounding of
    its stage inputs moves the reference's own gradients by more (an instance norm of
    few elements, a bias before a normalisation: analytically zero gradients), the
    error may reach ``ROUNDING_MARGIN`` times that movement, and the same conversion
    in exact mode must then agree with reference_mode() bit for bit: exact mode
    shares every part of the reversible backward (replay, state, order) except the
    trunk's float rounding.
    """
    got = training_step(_copy(case.converted), case.subject)
    want = training_step(_copy(case.converted), case.subject, reference=True)
    floor = 1e-6 * want.largest_grad()
    problems, errors = [], {}

    def compare(what: str, g, w, use_floor: bool = True) -> None:
        if (g is None) != (w is None):
            problems.append(
                f"{what}: {'no gradient' if g is None else 'gradient'} in reversible "
                f"mode, {'none' if w is None else 'one'} in reference_mode"
            )
        elif g is not None:
            if not w.is_floating_point():
                if not torch.equal(g, w):
                    problems.append(f"{what}: {g.tolist()} != reference {w.tolist()}")
                return
            err = _rel_error(g, w, floor if use_floor else 0.0)
            if err > TOLERANCE:
                errors[what] = err

    if len(got.outputs) != len(want.outputs):
        return [f"{len(got.outputs)} output tensors vs {len(want.outputs)} in reference_mode"]
    for what, g, w in _step_tensors(got, want):
        compare(what, g, w, not what.startswith("buffer"))
    if errors:
        moved = _rounding_sensitivity(case.converted, case.subject, want, floor)
        problems += [
            f"{what}: relative error {err:.2e} > {TOLERANCE:.0e} (one rounding of the stage "
            f"inputs moves the reference by {moved.get(what, 0.0):.2e})"
            for what, err in errors.items()
            if err > max(TOLERANCE, ROUNDING_MARGIN * moved.get(what, 0.0))
        ]
        problems += _exact_mode_differences(case)
        worst = max(errors, key=errors.get)
        ILL_CONDITIONED.append((errors[worst], moved.get(worst, 0.0)))
    return problems


def _step_tensors(got: Step, want: Step):
    """``(what, got, want)`` for every output, input gradient, parameter gradient, buffer."""
    for i, (g, w) in enumerate(zip(got.outputs, want.outputs)):
        yield f"output {i}", g, w
    for i, (g, w) in enumerate(zip(got.input_grads, want.input_grads)):
        yield f"input {i} gradient", g, w
    for name in want.grads:
        yield f"gradient of {name}", got.grads.get(name), want.grads[name]
    for name in want.buffers:
        yield f"buffer {name} after the step", got.buffers.get(name), want.buffers[name]


def _rounding_sensitivity(module: nn.Module, subject: Subject, want: Step, floor: float):
    """Per tensor of the step: the largest relative change of the reference_mode() step
    when every stage input is multiplied by ``1 + 2**-52 * N(0, 1)`` (about one rounding;
    ``ROUNDING_TRIALS`` draws). Reversible reconstruction rounds the stage inputs about
    that much, so no backward of these inputs can be closer to the reference than this."""
    moved: dict[str, float] = {}
    for trial in range(ROUNDING_TRIALS):
        noisy = _copy(module)
        draws = torch.Generator().manual_seed(trial)

        def perturb(_stage, args, draws=draws):
            x = args[0]
            noise = torch.randn(x.shape, dtype=x.dtype, generator=draws)
            return (x * (1 + 2.0**-52 * noise), *args[1:])

        for stage in noisy.modules():
            if isinstance(stage, ReversibleSequence):
                stage.register_forward_pre_hook(perturb)
        step = training_step(noisy, subject, reference=True)
        for what, g, w in _step_tensors(step, want):
            if g is not None and w is not None and w.is_floating_point():
                err = _rel_error(g, w, floor if not what.startswith("buffer") else 0.0)
                moved[what] = max(moved.get(what, 0.0), err)
    return moved


def _exact_mode_differences(case: Case) -> list[str]:
    """The same conversion with ``exact=True``: reversible vs reference_mode() bit for bit."""
    try:
        exact = revcompile.convert(
            case.subject.build(), case.subject.example_inputs, **case.subject.options, exact=True
        )
    except ConversionError:
        return []
    got = training_step(_copy(exact), case.subject)
    want = training_step(_copy(exact), case.subject, reference=True)
    return [
        f"exact mode: {what} differs from reference_mode()'s"
        for what, g, w in _step_tensors(got, want)
        if (g is None) != (w is None) or (g is not None and not torch.equal(g, w))
    ]


def _hold_power_iterations(module: nn.Module) -> nn.Module:
    """``module`` with every spectral norm's power iteration off, in train mode too.

    A spectral norm updates its vectors ``u, v`` from the weight under no_grad in every
    training forward, and its backward treats them as constants (by PyTorch's design):
    the forward then depends on the weight through a path the backward ignores, so
    central differences disagree with any correct backward. With the vectors held
    (the norm's eval behaviour) the forward is the function the backward differentiates.
    """
    for sub in module.modules():
        old_style = any(isinstance(h, SpectralNorm) for h in sub._forward_pre_hooks.values())
        if old_style or isinstance(sub, _SpectralNorm):
            sub.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), sub)
            sub.train()
    return module


def _fd_errors(module: nn.Module, subject: Subject, seed: int = 0) -> list[str]:
    """Central differences (steps 1e-5 and 1e-6; directions of unit norm) along a random
    input and a random parameter direction vs ``module``'s own backward; every evaluation on
    a fresh copy so that state advanced by a forward (BN statistics) is the same, with
    spectral norms' power iterations held (``_hold_power_iterations``)."""
    module = _hold_power_iterations(_copy(module))
    generator = torch.Generator().manual_seed(seed + 7)
    step = training_step(_copy(module), subject)
    params = {n: p for n, p in _params(module).items() if p.requires_grad}
    directions = _unit(
        {n: torch.randn(p.shape, dtype=p.dtype, generator=generator) for n, p in params.items()}
    )
    input_dirs = list(
        _unit(
            {
                i: torch.randn(a.shape, dtype=a.dtype, generator=generator)
                for i, a in enumerate(subject.args)
            }
        ).values()
    )

    def loss_at(t: float, along_inputs: bool) -> float:
        shifted = _copy(module).train()
        args = subject.args
        if along_inputs:
            args = tuple(a + t * d for a, d in zip(args, input_dirs))
        else:
            shifted_params = _params(shifted)
            with torch.no_grad():
                for name, d in directions.items():
                    shifted_params[name].add_(t * d)
        with torch.no_grad():
            return float(_loss(_call(shifted, subject, args)))

    def dot(grads, dirs) -> float:
        return sum(float((g * d).sum()) for g, d in zip(grads, dirs) if g is not None)

    def central(h: float, along_inputs: bool) -> float:
        return (loss_at(h, along_inputs) - loss_at(-h, along_inputs)) / (2 * h)

    problems = []
    for along_inputs in (True, False):
        if along_inputs:
            analytic = dot(step.input_grads, input_dirs)
        elif directions:
            analytic = dot([step.grads[n] for n in directions], directions.values())
        else:
            continue
        numeric, finer = central(1e-5, along_inputs), central(1e-6, along_inputs)
        scale = max(abs(numeric), abs(analytic), 1e-6 * abs(step.loss), 1e-8)
        if abs(numeric - finer) / scale > FD_TOLERANCE:
            continue  # a kink (ReLU, max) within the step: no derivative to compare with
        err = abs(numeric - analytic) / scale
        if err > FD_TOLERANCE:
            problems.append(
                f"directional derivative along random {'input' if along_inputs else 'parameter'}"
                f" direction: backward {analytic:.10e}, central difference {numeric:.10e} "
                f"(relative error {err:.1e})"
            )
    return problems


def _unit(directions: dict) -> dict:
    """The directions scaled to one joint unit norm (a small step moves few kinks)."""
    norm = sum(float((d * d).sum()) for d in directions.values()) ** 0.5 or 1.0
    return {k: d / norm for k, d in directions.items()}


def check_finite_differences(case: Case) -> list[str]:
    """The converted module's own backward is the derivative of its forward (central
    differences, independent of reference_mode), wherever the original's backward is the
    derivative of its forward (no detach / no_grad regions, no frozen randomness)."""
    if _fd_errors(case.original, case.subject):
        return []
    return _fd_errors(case.converted, case.subject)


class _Reseeded(nn.Module):
    """``inner``, with the torch and Python RNGs seeded with ``seed`` before each call."""

    def __init__(self, inner: nn.Module, seed: int) -> None:
        super().__init__()
        self.inner, self.seed = inner, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _seed(self.seed)
        return self.inner(x)


def check_coupling_inverse(case: Case) -> list[str]:
    """For every coupling of every stage: inverse(forward(x1, x2)) == (x1, x2) (eval mode).

    The stage inputs are captured by a pre-hook (the runtime runs its couplings'
    steps directly, not through their ``forward``), then each coupling is applied
    and inverted on the streams it sees in the stage.
    """
    module = _copy(case.converted).eval()
    seen: list[tuple[str, ReversibleSequence, torch.Tensor]] = []
    hooks = [
        stage.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, m, args[0])))
        for name, stage in module.named_modules()
        if isinstance(stage, ReversibleSequence)
    ]
    with torch.no_grad(), reference_mode():
        _call(module, case.subject, case.subject.args)
    for hook in hooks:
        hook.remove()
    problems = []
    with torch.no_grad():
        for name, stage, x in seen:
            x1, x2 = stage._streams(x)
            for index, coupling in enumerate(stage.couplings):
                # Each branch draws the same random numbers in forward and inverse (the
                # inverse calls G before F), as the runtime's replay gives them.
                coupling.F = _Reseeded(coupling.F, 1)
                if coupling.G is not None:
                    coupling.G = _Reseeded(coupling.G, 2)
                y1, y2 = coupling(x1, x2)
                r1, r2 = coupling.inverse(y1, y2)
                floor = max(x1.abs().max().item(), x2.abs().max().item())
                err = max(_rel_error(r1, x1, floor), _rel_error(r2, x2, floor))
                if err > TOLERANCE:
                    problems.append(
                        f"{name}.couplings.{index}: inverse(forward(x)) differs from x by {err:.2e}"
                    )
                x1, x2 = y1, y2
    return problems


def _shared_groups(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, tensor in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        by_id.setdefault(id(tensor), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _stage_aliases(module: nn.Module) -> bool:
    """Whether some parameter is used by more than one place inside the reversible stages."""
    ids: list[int] = []
    for stage in module.modules():
        if isinstance(stage, ReversibleSequence):
            ids += [id(p) for _, p in stage.named_parameters(remove_duplicate=False)]
    return len(ids) != len(set(ids))


def check_sharing(case: Case) -> list[str]:
    """Tensors shared in the original stay shared, or their blocks are kept; a block applied
    twice is kept or keeps its weights shared; params_after counts unique parameters."""
    problems = []
    converted = _tensors(case.converted, remove_duplicate=False)
    blocks = [b.name for b in case.report.blocks]
    moved = set(_converted_blocks(case))
    aliased = _stage_aliases(case.converted)
    for names in _shared_groups(case.original):
        surviving = [n for n in names if n in converted]
        if len({id(converted[n]) for n in surviving}) > 1:
            problems.append(
                f"{', '.join(surviving)} are one tensor in the original, several after conversion"
            )
        owners = {_owner(n, blocks) for n in names if n not in converted} & moved
        if owners and not aliased:
            problems.append(
                f"tensor shared by {', '.join(names)} is used in block(s) "
                f"{', '.join(sorted(owners))} that became couplings without sharing"
            )
    counts: dict[str, int] = {}
    for block in case.report.blocks:
        counts[block.name] = counts.get(block.name, 0) + 1
    for name, count in counts.items():
        if count > 1 and name in moved and not aliased:
            problems.append(
                f"block {name} is applied {count} times but became couplings with "
                "independent copies of its weights"
            )
    unique = sum(p.numel() for p in case.converted.parameters())
    if case.report.params_after != unique:
        problems.append(
            f"report.params_after={case.report.params_after} but the module has "
            f"{unique} unique parameter elements"
        )
    return problems


def check_gradient_support(case: Case) -> list[str]:
    """The parameters that receive gradients are the original's: by name where names survive,
    by count (with / without gradient) for the parameters of converted blocks."""
    want = training_step(_copy(case.original), case.subject)
    got = training_step(_copy(case.converted), case.subject)
    problems = []
    for name in sorted(set(want.grads) & set(got.grads)):
        if (want.grads[name] is None) != (got.grads[name] is None):
            has = "has" if got.grads[name] is not None else "has no"
            problems.append(f"{name} {has} a gradient after conversion, unlike the original")
    for i, (w, g) in enumerate(zip(want.input_grads, got.input_grads)):
        if (w is None) != (g is None):
            problems.append(f"input {i}: gradient {'lost' if g is None else 'appeared'}")

    def counts(step: Step, other: Step) -> tuple[int, int]:
        rest = [g for n, g in step.grads.items() if n not in other.grads]
        return sum(g is not None for g in rest), sum(g is None for g in rest)

    want_counts, got_counts = counts(want, got), counts(got, want)
    if any(block.fate == "single" for block in case.report.blocks):
        # A single-block coupling's G has its own copy of the inner-width layers: more
        # parameters of each kind, never fewer, and none of a kind the original lacks.
        agree = all(g >= w and (g == 0) == (w == 0) for w, g in zip(want_counts, got_counts))
    else:
        agree = want_counts == got_counts
    if not agree:
        problems.append(
            "parameters of converted blocks with/without gradient: original "
            f"{want_counts[0]}/{want_counts[1]}, converted {got_counts[0]}/{got_counts[1]}"
        )
    return problems


def check_no_stage_exact(case: Case) -> list[str]:
    """A conversion that makes no stage reproduces the original exactly."""
    if case.report.stages:
        return []
    problems = []
    original, converted = _copy((case.original, case.converted))
    with torch.no_grad():
        want = _flatten(_call(original.eval(), case.subject, case.subject.args))
        got = _flatten(_call(converted.eval(), case.subject, case.subject.args))
    if len(got) != len(want) or not all(torch.equal(g, w) for g, w in zip(got, want)):
        problems.append("eval outputs differ from the original's")
    want_step = training_step(_copy(case.original), case.subject)
    got_step = training_step(_copy(case.converted), case.subject)
    if not all(torch.equal(g, w) for g, w in zip(got_step.outputs, want_step.outputs)):
        problems.append("train-mode outputs differ from the original's")
    for name, w in want_step.grads.items():
        g = got_step.grads.get(name)
        if (g is None) != (w is None) or (w is not None and not torch.equal(g, w)):
            problems.append(f"training-step gradient of {name} differs from the original's")
    if set(got_step.grads) != set(want_step.grads):
        problems.append("parameter names differ from the original's")
    return problems


def _deterministic(module: nn.Module, subject: Subject, training: bool) -> bool:
    module = _copy(module).train(training)
    with torch.no_grad():
        first = _flatten(_call(_copy(module), subject, subject.args, seed=0))
        second = _flatten(_call(_copy(module), subject, subject.args, seed=1))
    return all(torch.equal(a, b) for a, b in zip(first, second))


def check_determinism(case: Case) -> list[str]:
    """Eval (and train) deterministic iff the original's is: train/eval behaviour survives."""
    problems = []
    for training in (False, True):
        want = _deterministic(case.original, case.subject, training)
        got = _deterministic(case.converted, case.subject, training)
        if want != got:
            mode = "train" if training else "eval"
            problems.append(
                f"{mode} mode is {'' if got else 'not '}deterministic after conversion"
                f" but {'' if want else 'not '}in the original"
            )
    return problems


def check_report_agreement(case: Case) -> list[str]:
    """report(gm), analyze() and the module agree on stages, couplings and fates."""
    report = case.report
    problems = []
    modules = {n for n, m in case.converted.named_modules() if isinstance(m, ReversibleSequence)}
    for stage in report.stages:
        try:
            module = case.converted.get_submodule(stage.name)
        except AttributeError:
            problems.append(f"stage {stage.name} of the report is not a submodule")
            continue
        if not isinstance(module, ReversibleSequence):
            problems.append(f"stage {stage.name} is a {type(module).__name__}")
            continue
        expected = stage.couplings + stage.half
        if len(module.couplings) != expected:
            problems.append(
                f"stage {stage.name}: report says {expected} couplings, module has "
                f"{len(module.couplings)}"
            )
        if module.split != stage.split:
            problems.append(f"stage {stage.name}: split {module.split} != report {stage.split}")
    if modules != {s.name for s in report.stages}:
        problems.append(
            f"ReversibleSequence modules {sorted(modules)} != report stages "
            f"{[s.name for s in report.stages]}"
        )
    staged = {b.name for b in report.blocks if b.fate != "kept"}
    listed = {name for stage in report.stages for name in stage.blocks}
    if staged != listed:
        problems.append(
            f"blocks with a coupling fate {sorted(staged)} != blocks listed in stages "
            f"{sorted(listed)}"
        )
    options = case.subject.options
    analysis = revcompile.analyze(
        case.original,
        case.subject.example_inputs,
        leftover=options.get("leftover", DEFAULT_LEFTOVER),
        split=options.get("split", DEFAULT_SPLIT),
    )
    want = [(b.name, b.shortcut, b.fate, b.stage) for b in analysis.blocks]
    got = [(b.name, b.shortcut, b.fate, b.stage) for b in report.blocks]
    if want != got:
        problems.append(f"analyze() blocks {want} != report(gm) blocks {got}")
    return problems


def check_ground_truth(case: Case) -> list[str]:
    """The residual adds found are the ones the model has, with the right shortcut kinds."""
    truth = case.subject.truth
    if truth is None:
        return []
    blocks = case.report.blocks
    identity = sum(b.shortcut == "identity" for b in blocks)
    got = (len(blocks), identity, len(blocks) - identity)
    want = (truth.adds, truth.identity, truth.projection)
    if got != want:
        return [f"found (adds, identity, projection) = {got}, the model has {want}"]
    return []


def check_module_state(case: Case) -> list[str]:
    """After one train forward, buffers that exist under the same name in both have the same
    values (all of them without a stage; with stages the data-independent ones: counters,
    num_batches_tracked, spectral-norm vectors), so updates happen once; the keys of the
    original are all in the converted state_dict, under their own names or, for converted
    blocks, inside their stage."""
    problems = []
    original, converted = _copy((case.original, case.converted))
    with torch.no_grad():
        _call(original.train(), case.subject, case.subject.args)
        _call(converted.train(), case.subject, case.subject.args)
    want = dict(original.named_buffers())
    got = {n: b for n, b in _tensors(converted).items() if not isinstance(b, nn.Parameter)}
    staged = bool(case.report.stages)
    for name in sorted(set(want) & set(got)):
        w, g = want[name], got[name]
        # Past a stage the data differ (a RevNet computes another function): only buffers
        # that do not depend on the data (counters, spectral-norm vectors) must agree.
        data_dependent = w.is_floating_point() and not name.endswith(("_u", "_v"))
        if w.shape != g.shape or (staged and data_dependent):
            continue
        if (w.is_floating_point() and _rel_error(g, w, 1e-12) > TOLERANCE) or (
            not w.is_floating_point() and not torch.equal(g, w)
        ):
            problems.append(f"buffer {name} after one forward differs from the original's")
    canonical = canonical_name(case.converted)
    keys = {canonical(k): v for k, v in case.converted.state_dict().items()}
    # A converted block's tensors move into its stage under their own names (sliced
    # under split="halve"): <stage>.couplings.<i>.<F|G>.<original key>.
    in_stages = {
        match.group(1)
        for k in case.converted.state_dict()
        if (match := re.search(r"\.couplings\.\d+\.[FG]\.(.+)$", k))
    }
    missing = [
        key
        for key, value in case.original.state_dict().items()
        if key not in in_stages and (key not in keys or keys[key].shape != value.shape)
    ]
    if missing:
        problems.append(
            f"state_dict keys of the original are missing after conversion: {', '.join(missing)}"
        )
    return problems


def check_original_unchanged(case: Case) -> list[str]:
    """convert (and analyze), then a training step + SGD update of the converted module,
    leave the original identical. Runs on the case's own objects: run it last."""
    step = training_step(case.converted, case.subject)
    with torch.no_grad():
        for name, p in _params(case.converted).items():
            if step.grads.get(name) is not None:
                p.sub_(0.1 * step.grads[name])
    problems = _diff_snapshots(case.before, snapshot(case.original))
    problems += [
        f"original parameter {n} got a gradient"
        for n, p in case.original.named_parameters()
        if p.grad is not None
    ]
    return problems


CHECKS: dict[str, Callable[[Case], list[str]]] = {
    "output_structure": check_output_structure,
    "reference": check_reference,
    "finite_differences": check_finite_differences,
    "coupling_inverse": check_coupling_inverse,
    "sharing": check_sharing,
    "gradient_support": check_gradient_support,
    "no_stage_exact": check_no_stage_exact,
    "determinism": check_determinism,
    "report_agreement": check_report_agreement,
    "ground_truth": check_ground_truth,
    "module_state": check_module_state,
    "original_unchanged": check_original_unchanged,  # last: it trains the converted module
}


def run_checks(case: Case, checks: dict[str, Callable[[Case], list[str]]] = CHECKS) -> list[Defect]:
    """Every check on ``case``; an exception inside a check is a defect of that check."""
    defects = []
    for name, check in checks.items():
        try:
            messages = check(case)
        except Exception as error:  # the converted model crashed: a defect, reported
            messages = [f"raised {type(error).__name__}: {_short(error)}"]
        if len(messages) > MAX_MESSAGES:  # one defect of a check, many symptoms: keep it short
            extra = len(messages) - MAX_MESSAGES
            messages = messages[: MAX_MESSAGES - 1] + [f"{messages[-1]} (and {extra} more)"]
        defects += [Defect(name, case.subject.description, m) for m in messages]
    return defects


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" (at {where.filename.split('/')[-1]}:{where.lineno})" if where else ""
    return (text[0][:300] if text else "") + at


@dataclass
class Outcome:
    """What happened to one subject: ``status`` is converted | refused | crashed | invalid."""

    status: str
    defects: list[Defect]
    message: str = ""
    stages: int = 0


def run_subject(
    subject: Subject,
    checks: dict[str, Callable[[Case], list[str]]] = CHECKS,
    convert: Callable[..., nn.Module] | None = None,
) -> Outcome:
    """Convert ``subject`` (errors check), then run ``checks`` on the result.

    ``invalid`` means the original itself does not train (a bug of the generator, not of
    revcompile); ``refused`` a ConversionError (allowed; the message is kept).
    """
    convert = convert or revcompile.convert
    try:
        training_step(subject.build(), subject)
    except Exception as error:
        return Outcome("invalid", [], f"original fails: {type(error).__name__}: {_short(error)}")
    original = subject.build()
    before = snapshot(original)
    try:
        converted = convert(original, subject.example_inputs, **subject.options)
    except ConversionError as error:
        problems = _diff_snapshots(before, snapshot(original))
        defects = [Defect("original_unchanged", subject.description, p) for p in problems]
        return Outcome("refused", defects, str(error).splitlines()[0][:300])
    except Exception as error:
        message = f"convert raised {type(error).__name__} (not ConversionError): {_short(error)}"
        return Outcome("crashed", [Defect("errors", subject.description, message)], message)
    case = Case(subject, original, converted, before)
    return Outcome("converted", run_checks(case, checks), stages=len(case.report.stages))
