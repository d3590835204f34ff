"""Public entry points. The order of the compiler passes lives here only."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule

from revcompile.conversion_report import ConversionReport
from revcompile.errors import ConversionError, OptionError, UntraceableError
from revcompile.memory import saved_activation_bytes
from revcompile.options import (
    DEFAULT_LEFTOVER,
    DEFAULT_SPLIT,
    Compile,
    Frontend,
    Leftover,
    MemoryBudget,
    Policy,
    Split,
    check,
    compile_keywords,
)
from revcompile.passes.budget import budget
from revcompile.passes.cleanup import cleanup
from revcompile.passes.emit import emit
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.graph_utils import deep_copy
from revcompile.passes.ir import Plan
from revcompile.passes.normalize import normalize
from revcompile.passes.opaque import find_opaque_blocks
from revcompile.passes.partition import partition
from revcompile.passes.plan import plan
from revcompile.passes.shape_prop import propagate_guessed_shapes, propagate_shapes
from revcompile.passes.state_keys import restore_state_keys, traced_tensors
from revcompile.passes.trace import TracedGraphModule, trace
from revcompile.passes.trace_shapes import trace_with_shapes
from revcompile.report_builder import (
    Rewrite,
    attach_report,
    build_report,
    count_parameters,
    report,
    storage_address,
)
from revcompile.runtime import compile_parts

__all__ = ["Analysis", "analyze", "attach_report", "convert", "pipeline", "report"]

ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | None


class Analysis(NamedTuple):
    """What the pipeline produces: the traced (and, when converting, rewritten)
    graph, the plan on its nodes, and the report."""

    gm: GraphModule
    plan: Plan
    report: ConversionReport


def analyze(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    leftover: Leftover = DEFAULT_LEFTOVER,
    split: Split = DEFAULT_SPLIT,
    frontend: Frontend = "auto",
) -> ConversionReport:
    """Find the residual blocks of ``model`` and say what conversion would do.

    ``example_inputs`` (a tensor or a sequence of tensors, one per ``forward``
    argument) give every node a shape (FakeTensors: no compute, the model's
    buffers are untouched), which enables the shape checks (broadcasting adds,
    odd channel counts). Without them revcompile guesses an input from the
    first Conv/Linear layer (see ``revcompile.passes.shape_prop.guess_example_inputs``);
    if the model rejects the guesses, shapes stay unchecked
    (``report.shapes_checked`` is False).

    ``leftover``, ``split`` and ``frontend`` as in ``convert``. ``model`` is not
    modified. Raises ``ConversionError`` when fx cannot trace ``model`` or it
    rejects the given ``example_inputs``.
    """
    return pipeline(
        model, example_inputs, rewrite=False, leftover=leftover, split=split, frontend=frontend
    ).report


def convert(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    policy: Policy = "checkpoint",
    leftover: Leftover = DEFAULT_LEFTOVER,
    split: Split = DEFAULT_SPLIT,
    exact: bool = False,
    exact_bits: int = 32,
    compile: Compile = False,
    memory_budget: MemoryBudget | None = None,
    preserve_function: bool = False,
    budget_batch_size: int | None = None,
    frontend: Frontend = "auto",
) -> GraphModule:
    """Return a reversible ``GraphModule`` version of ``model``.

    Consecutive stride-1 identity residual blocks become RevNet additive
    couplings, one ``ReversibleSequence`` per chain. Every other block is kept
    with a reason; ``report(gm)`` tells which and why.

    ``split``: ``"halve"`` splits the channels of a stage input in
    two halves and builds F and G at half width (weights sliced from the
    original branches); blocks whose branch cannot be halved are kept.
    ``"duplicate"`` runs F and G at full width with their original weights on
    two copies of the stage input and outputs ``(y1 + y2) / 2`` (as in
    reversible vision transformers): any identity block whose branch keeps
    its input's shape qualifies (attention, token MLPs, channels-last blocks).
    ``"auto"`` (default, ``revcompile.options.DEFAULT_SPLIT``) halves each
    chain whose blocks all can be halved (cut where ``"halve"`` would cut it)
    and duplicates the others; ``report(gm).stages`` says which split each
    stage uses.

    ``policy``: ``"checkpoint"`` (default) recomputes the non-reversible
    segments between stages (stem, downsampling blocks, leftovers, head) in
    backward, so activations are stored only at segment inputs;
    ``"store"`` keeps those segments as ordinary autograd (less recompute).
    ``leftover``: the odd last block of a chain becomes a half-coupling
    ``y1 = x1 + F(x2), y2 = x2`` (``"half"``, default: the same saved bytes
    and accuracy as ``"single"``, a faster step; ``revcompile.options.DEFAULT_LEFTOVER``),
    a coupling of its own (``"single"``: F and G are its branch cut into
    complementary channel slices, ``y1 = x1 + F(x2), y2 = x2 + G(y1)``; it
    needs a branch and a stage that halve), or stays an ordinary block
    (``"store"``).
    ``exact=True`` carries each stage's trunk in fixed point (float64 on a
    ``2**-exact_bits`` grid, branch outputs rounded onto it; DESIGN.md §10), so
    the reversible backward reconstructs the forward's inputs bit for bit and
    its gradients equal ``reference_mode()``'s exactly. ``exact_bits`` (1 to 52,
    default 32) trades resolution for range: a trunk value outside
    ``+-2**(53 - exact_bits)`` raises ``ExactRangeError`` (an ``OverflowError``)
    naming an ``exact_bits`` that holds it.
    ``compile``: True, or a dict of ``torch.compile`` keywords (``backend``,
    ``mode``, ``options``, ...), compiles the result's parts with
    ``revcompile.runtime.compile_parts``: each F and G (in the forward and the
    backward's recomputation) and each checkpointed segment's body, and the
    module itself, whose eval/no-grad forward is then one graph.

    ``memory_budget`` plans the fastest training step that fits (DESIGN.md §11;
    ``policy`` is then not used): a float ``0 < B <= 1`` is a fraction of the
    original's saved activation bytes, an int is bytes, a string a size such as
    ``"8GiB"`` or ``"500MB"``, all at the size of ``example_inputs`` (required)
    and in ``model``'s train/eval mode. Every run of the network (each stage,
    each kept block, stem, head) is stored, checkpointed or made reversible so
    that the recomputed FLOPs are fewest and the saved bytes fit, exactly;
    ``report(gm).budget`` is the plan, with predicted and measured bytes.
    ``BudgetError`` (a ``ConversionError``; ``.smallest`` is the smallest
    achievable size) says when no plan fits. ``preserve_function=True`` plans
    with storing and checkpointing only: the network keeps its function (no
    coupling), the best activation-checkpointing plan for the budget (1.0 when
    none is given). ``budget_batch_size=N`` plans for batches of N instead of
    the example's (the costs are counted on meta tensors, so no activation of
    that size is allocated; ``report(gm).budget.measured_bytes`` stays None).

    ``frontend``: how ``model`` becomes a graph. ``"auto"`` (default) traces
    with ``torch.fx``; when fx fails inside the model's code (Python control
    flow on a shape, iterating or assigning into a traced tensor, a decorated
    ``forward``, as in Hugging Face models) and ``example_inputs`` are given,
    it traces again carrying their shapes (``passes.trace_shapes``): control
    flow takes the example inputs' branches and the graph asserts them, so an
    input that would take another branch raises ``AssertionError``.
    ``"fx"`` and ``"shapes"`` use one of the two only. A
    ``torch.fx.GraphModule`` (one you traced yourself) is taken with its graph
    as it is, whatever ``frontend`` says.

    The result owns its parameters and buffers; ``model`` is never modified.
    The converted network computes a different function from ``model`` (a
    RevNet of the same layout), meant to be trained.
    """
    compile_kwargs = compile_keywords(compile)
    gm, _, the_report = pipeline(
        model,
        example_inputs,
        rewrite=True,
        policy=policy,
        leftover=leftover,
        split=split,
        exact=exact,
        exact_bits=exact_bits,
        memory_budget=1.0 if preserve_function and memory_budget is None else memory_budget,
        preserve_function=preserve_function,
        budget_batch_size=budget_batch_size,
        frontend=frontend,
    )
    attach_report(gm, the_report)
    if compile_kwargs is not None:
        compile_parts(gm, **compile_kwargs)
    return gm


def pipeline(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    rewrite: bool,
    policy: Policy = "checkpoint",
    leftover: Leftover = DEFAULT_LEFTOVER,
    split: Split = DEFAULT_SPLIT,
    exact: bool = False,
    exact_bits: int = 32,
    memory_budget: MemoryBudget | None = None,
    preserve_function: bool = False,
    budget_batch_size: int | None = None,
    frontend: Frontend = "auto",
) -> Analysis:
    """Every pass, in order; ``rewrite=False`` (``analyze``) stops after planning
    (the memory plan included, when ``memory_budget`` is given).

    Options as in ``convert``. ``model`` is not modified: without ``rewrite``,
    ``gm`` shares its parameters and buffers with ``model``; with it, ``gm``
    owns them.
    """
    if isinstance(exact_bits, bool) or not isinstance(exact_bits, int) or not 0 < exact_bits < 53:
        raise ConversionError(
            f"exact_bits must be an integer from 1 to 52 (the float64 trunk's fraction bits), "
            f"not {exact_bits!r}"
        )
    inputs = _as_tuple(example_inputs)
    gm = _graph(model, inputs, frontend)
    traced = traced_tensors(gm)
    _propagate_shapes(gm, inputs)
    normalize(gm)
    blocks, rejected = find_residuals(gm)
    opaque = find_opaque_blocks(gm)
    partitions = partition(gm, blocks)
    the_plan = plan(gm, blocks, rejected, partitions, leftover=leftover, split=split)
    rewrites: list[Rewrite] = []
    if budget_batch_size is not None and memory_budget is None:
        raise OptionError("budget_batch_size is the batch memory_budget plans for: give both")
    if memory_budget is not None:
        the_plan = budget(
            gm, the_plan, _planned_inputs(model, inputs, budget_batch_size), memory_budget,
            preserve_function=preserve_function, exact=exact,
        )  # fmt: skip
    if rewrite:
        _require_shapes(model, gm, the_plan, inputs)
        rewrites = emit(gm, the_plan, policy=policy, exact=exact, exact_bits=exact_bits)
        cleanup(gm)
        restore_state_keys(gm, model, traced)
        _set_new_modules_mode(gm, model)
        _own_shared_state(gm, model)
        if the_plan.budget is not None and inputs is not None and budget_batch_size is None:
            the_plan.budget.measured_bytes = saved_activation_bytes(gm, *inputs)
    the_report = build_report(
        the_plan,
        rewrites,
        opaque=opaque,
        params_before=count_parameters(model),
        params_after=count_parameters(gm) if rewrite else None,
        policy=("memory_budget" if the_plan.budget else policy) if rewrite else None,
        leftover=leftover,
    )
    return Analysis(gm, the_plan, the_report)


def _as_tuple(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...] | None:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return None if example_inputs is None else tuple(example_inputs)


def _graph(
    model: nn.Module, inputs: tuple[torch.Tensor, ...] | None, frontend: Frontend
) -> GraphModule:
    """The traced graph of ``model`` by ``frontend`` (see ``convert``); a
    GraphModule keeps its own graph (a copy, sharing its submodules)."""
    check("frontend", frontend, Frontend)
    if isinstance(model, GraphModule):
        return TracedGraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    if frontend == "shapes":
        return trace_with_shapes(model, _shape_inputs(model, inputs))
    try:
        return trace(model, n_inputs=None if inputs is None else len(inputs))
    except UntraceableError as error:
        if frontend == "fx":
            raise
        if inputs is None:
            raise UntraceableError(
                f"{error} Or pass example_inputs: revcompile then traces with their shapes"
            ) from error
        try:
            return trace_with_shapes(model, _shape_inputs(model, inputs))
        except UntraceableError as shaped:
            raise UntraceableError(
                f"{shaped} (tracing with the example inputs' shapes; plain fx failed first)"
            ) from error


def _shape_inputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...] | None
) -> tuple[torch.Tensor, ...]:
    if inputs is None or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ConversionError(
            f"tracing {type(model).__name__} with shapes (frontend='shapes', or plain fx failed) "
            "needs example_inputs: pass them to convert(), one tensor per forward argument"
        )
    return inputs


def _planned_inputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...] | None, batch_size: int | None
) -> tuple[torch.Tensor, ...]:
    """The inputs the memory planner costs: the example inputs, or meta tensors of
    their shapes with dim 0 set to ``batch_size``."""
    if inputs is None:
        raise ConversionError(
            f"memory_budget plans at the size of example_inputs; pass example_inputs to "
            f"convert() for {type(model).__name__}"
        )
    if batch_size is None:
        return inputs
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"budget_batch_size must be a positive int, not {batch_size!r}")
    if any(not isinstance(t, torch.Tensor) or t.dim() == 0 for t in inputs):
        raise OptionError("budget_batch_size needs example inputs: tensors with a batch dim")
    return tuple(
        torch.empty((batch_size, *t.shape[1:]), dtype=t.dtype, device="meta") for t in inputs
    )


def _propagate_shapes(gm: GraphModule, inputs: tuple[torch.Tensor, ...] | None) -> None:
    """Shapes from ``inputs``, or from a guessed input when there are none."""
    if inputs is None:
        propagate_guessed_shapes(gm)
    else:
        propagate_shapes(gm, inputs)


def _require_shapes(
    model: nn.Module, gm: GraphModule, the_plan: Plan, inputs: tuple[torch.Tensor, ...] | None
) -> None:
    """Stages need shapes (channel counts, broadcasting checks); say which are unknown."""
    if not the_plan.stages or the_plan.shapes_known:
        return
    name = type(model).__name__
    if inputs is None:
        raise ConversionError(
            f"could not infer the input shape of {name}; pass example_inputs to convert() so "
            "that channel counts and broadcasting can be checked"
        )
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    unknown = ", ".join(
        f"{node.name} (given a {type(value).__name__})"
        for node, value in zip(placeholders, inputs)
        if "tensor_meta" not in node.meta
    )
    raise ConversionError(
        f"the shapes of the inputs {unknown} of {name} are unknown, so channel counts and "
        "broadcasting cannot be checked; give every forward argument as a tensor in "
        "example_inputs, or bind the others in a wrapper module"
    )


def _set_new_modules_mode(gm: GraphModule, model: nn.Module) -> None:
    """Give the modules conversion made (stages, segments, containers) ``model``'s
    training flag; the user's layers keep their own (a BatchNorm kept in eval()
    inside a model in train() stays so)."""
    originals = {id(m) for m in model.modules()}
    for module in gm.modules():
        if id(module) not in originals:
            module.training = model.training


def _own_shared_state(gm: GraphModule, model: nn.Module) -> None:
    """Give ``gm`` private copies of the layers and tensors it shares with ``model``.

    The stages are new, but the non-reversible layers (stem, downsampling
    blocks, head) and parameters read by ``get_attr`` are still ``model``'s.
    They are replaced where ``gm`` holds them (its containers are its own), with
    one memo so that modules and tensors shared within the model stay shared,
    seeded with copies that keep distinct tensors viewing one memory tied.
    """
    tensors = [*model.parameters(), *model.buffers()]
    originals = {id(m) for m in model.modules()} | {id(t) for t in tensors}
    memo: dict[int, object] = _tied_copies(tensors)
    for owner in list(gm.modules()):
        if id(owner) in originals:
            continue
        for name, child in list(owner.named_children()):
            if id(child) in originals:
                setattr(owner, name, deep_copy(child, memo))
        for tensors in (owner._parameters, owner._buffers):
            for name, tensor in tensors.items():
                if tensor is not None and id(tensor) in originals:
                    tensors[name] = copy.deepcopy(tensor, memo)


def _tied_copies(tensors: list[torch.Tensor]) -> dict[int, object]:
    """Copies, by ``id`` of the original, of the tensors that share memory with another.

    ``Parameter.__deepcopy__`` clones each Parameter on its own, which would
    untie ``b.weight = nn.Parameter(a.weight)``; these copies view one cloned
    storage, as the originals do.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for tensor in {id(t): t for t in tensors}.values():
        address = storage_address(tensor)
        if address:
            groups.setdefault(address, []).append(tensor)
    copies: dict[int, object] = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        storage = group[0].untyped_storage().clone()
        for tensor in group:
            data = (
                tensor.detach()
                .new_empty(0)
                .set_(storage, tensor.storage_offset(), tensor.size(), tensor.stride())
            )
            copies[id(tensor)] = (
                nn.Parameter(data, tensor.requires_grad)
                if isinstance(tensor, nn.Parameter)
                else data.requires_grad_(tensor.requires_grad)
            )
    return copies
