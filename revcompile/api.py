"""Public entry points. The order of the compiler passes lives here only."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from revcompile.conversion_report import ConversionReport
from revcompile.errors import ConversionError
from revcompile.options import Leftover, Policy, Split
from revcompile.passes.cleanup import cleanup
from revcompile.passes.emit import emit
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.ir import Plan
from revcompile.passes.partition import partition
from revcompile.passes.plan import plan, report_from_plan
from revcompile.passes.shape_prop import propagate_guessed_shapes, propagate_shapes
from revcompile.passes.trace import trace

REPORT_ATTRIBUTE = "revcompile_report"

ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | None


class Analysis(NamedTuple):
    """What the analysis passes produce: the traced graph, the plan on its
    nodes, and the report (which ``convert`` extends)."""

    gm: GraphModule
    plan: Plan
    report: ConversionReport


def analyze(model: nn.Module, example_inputs: ExampleInputs = None) -> ConversionReport:
    """Find the residual blocks of ``model`` and say what conversion would do.

    ``example_inputs`` (a tensor or a sequence of tensors, one per ``forward``
    argument) give every node a shape (FakeTensors: no compute, the model's
    buffers are untouched), which enables the shape checks (broadcasting adds,
    odd channel counts). Without them revcompile guesses an input from the
    first Conv/Linear layer (see ``revcompile.passes.shape_prop.guess_example_inputs``);
    if the model rejects the guesses, shapes stay unchecked
    (``report.shapes_checked`` is False).

    ``model`` is not modified. Raises ``ConversionError`` when fx cannot trace
    ``model`` or it rejects the given ``example_inputs``.
    """
    return run_analysis(model, example_inputs).report


def run_analysis(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    leftover: Leftover = "store",
    split: Split = "halve",
) -> Analysis:
    """trace -> shape propagation -> find_residuals -> partition -> plan, and the report.

    ``leftover`` decides the odd last block of a chain: ``"store"`` keeps it an
    ordinary block, ``"half"`` makes it a half-coupling. ``split`` chooses how
    stages split their input (see ``convert``). ``gm`` shares its parameters
    and buffers with ``model``; ``model`` is not modified.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model, n_inputs=None if example_inputs is None else len(example_inputs))
    if example_inputs is None:
        propagate_guessed_shapes(gm)
    else:
        propagate_shapes(gm, tuple(example_inputs))
    blocks, rejected = find_residuals(gm)
    partitions = partition(gm, blocks)
    the_plan = plan(gm, blocks, rejected, partitions, leftover=leftover, split=split)
    report = report_from_plan(
        the_plan,
        params_before=sum(p.numel() for p in model.parameters()),
        leftover=leftover,
    )
    return Analysis(gm, the_plan, report)


def convert(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    policy: Policy = "checkpoint",
    leftover: Leftover = "store",
    split: Split = "halve",
) -> GraphModule:
    """Return a reversible ``GraphModule`` version of ``model``.

    Consecutive stride-1 identity residual blocks become RevNet additive
    couplings, one ``ReversibleSequence`` per chain. Every other block is kept
    with a reason; ``report(gm)`` tells which and why.

    ``split``: ``"halve"`` (default) splits the channels of a stage input in
    two halves and builds F and G at half width (weights sliced from the
    original branches); blocks whose branch cannot be halved are kept.
    ``"duplicate"`` runs F and G at full width with their original weights on
    two copies of the stage input and outputs ``(y1 + y2) / 2`` (as in
    reversible vision transformers): any identity block whose branch keeps
    its input's shape qualifies (attention, token MLPs, channels-last blocks).
    ``"auto"`` halves the stages whose blocks all can be halved and duplicates
    the others; ``report(gm).stages`` says which split each stage uses.

    ``policy``: ``"checkpoint"`` (default) recomputes the non-reversible
    segments between stages (stem, downsampling blocks, leftovers, head) in
    backward, so activations are stored only at segment inputs;
    ``"store"`` keeps those segments as ordinary autograd (less recompute).
    ``leftover``: the odd last block of a chain stays an ordinary block
    (``"store"``) or becomes a half-coupling ``y1 = x1 + F(x2), y2 = x2``
    (``"half"``).

    The result owns its parameters and buffers; ``model`` is never modified.
    The converted network computes a different function from ``model`` (a
    RevNet of the same layout), meant to be trained.
    """
    gm, the_plan, the_report = run_analysis(model, example_inputs, leftover=leftover, split=split)
    if the_plan.stages and not the_plan.shapes_known:
        raise ConversionError(
            f"could not infer the input shape of {type(model).__name__}; pass example_inputs "
            "to convert() so that channel counts and broadcasting can be checked"
        )
    changes = emit(gm, the_plan, policy=policy)
    cleanup(gm)
    _own_shared_state(gm, model)
    gm.train(model.training)
    the_report.changes += [change.describe() for change in changes]
    the_report.params_after = sum(p.numel() for p in gm.parameters())
    the_report.policy = policy
    attach_report(gm, the_report)
    return gm


def _own_shared_state(gm: GraphModule, model: nn.Module) -> None:
    """Give ``gm`` private copies of the layers and tensors it shares with ``model``.

    The stages are new, but the non-reversible layers (stem, downsampling
    blocks, head) and parameters read by ``get_attr`` are still ``model``'s.
    They are replaced where ``gm`` holds them (its containers are its own), with
    one memo so that modules and tensors shared within the model stay shared.
    """
    originals = {id(m) for m in model.modules()}
    originals.update(id(t) for t in (*model.parameters(), *model.buffers()))
    memo: dict[int, object] = {}
    for owner in list(gm.modules()):
        if id(owner) in originals:
            continue
        for name, child in list(owner.named_children()):
            if id(child) in originals:
                setattr(owner, name, copy.deepcopy(child, memo))
        for tensors in (owner._parameters, owner._buffers):
            for name, tensor in tensors.items():
                if tensor is not None and id(tensor) in originals:
                    tensors[name] = copy.deepcopy(tensor, memo)


def attach_report(gm: GraphModule, the_report: ConversionReport) -> None:
    """Store ``the_report`` on ``gm`` so that it survives pickling and deepcopy.

    fx keeps a plain attribute through ``torch.save``/``torch.load`` but drops
    it in ``copy.deepcopy``; the attributes listed in ``meta`` under
    ``_USER_PRESERVED_ATTRIBUTES_KEY`` are restored by deepcopy (the mechanism
    torch.ao.quantization uses for the same purpose).
    """
    setattr(gm, REPORT_ATTRIBUTE, the_report)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[REPORT_ATTRIBUTE] = the_report


def report(gm: nn.Module) -> ConversionReport:
    """The ConversionReport that ``convert`` attached to ``gm``."""
    found = getattr(gm, REPORT_ATTRIBUTE, None)
    if found is None:
        raise ValueError(
            f"{type(gm).__name__} was not made by revcompile.convert: it has no report"
        )
    return found
