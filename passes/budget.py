"""Pass 5: the memory planner -- the fastest plan whose saved activations fit (DESIGN.md §11).

The traced graph is cut into *units* at single-tensor boundaries: after the
input, at every residual block's fork and output, and before the output (a
cut is kept only where exactly one activation tensor crosses it). A plan
covers the units with *options*, each a run of consecutive units:

* ``store`` one unit: plain autograd, nothing recomputed;
* ``checkpoint`` any run of units: one ``CheckpointedSegment``, which saves
  only the run's input and recomputes the run's forward in backward;
* ``reversible`` the units of one planned stage: its ``ReversibleSequence``
  (plus the last block's post-op, applied after the stage), which saves its
  output and recomputes its couplings' forward.

The choice is exact, by dynamic programming over the units
(``revcompile.passes.budget_solver``). The budget bounds the saved activations,
not the transient memory of recomputation: a checkpointed run holds what
storing it would save while it is recomputed in backward, so among the plans
with the fewest recomputed FLOPs the one whose runs hold least is chosen (runs
as short as the budget allows).

Costs are measured on fake tensors (``revcompile.memory.segments``): one
attributed fake forward of the traced graph for storing and checkpointing,
one fake call per candidate stage for reversible coupling; FLOPs are
``torch.utils.flop_counter``'s. When two units share a saved storage other
than their boundary (a view across a cut), the cut between them is dropped
and the costs measured again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from revcompile.passes.budget_solver import (
    Option,
    Problem,
    contributions,
    min_bytes,
    plan_bytes,
    solve,
)
from revcompile.passes.emit import build_stage
from revcompile.passes.graph_utils import recomputation_needs, tensor_shape
from revcompile.passes.ir import CHECKPOINT_SPAN, BlockPlan, Plan, ResidualBlock, Stage
from revcompile.passes.partition.inplace import copy_out_of_place
from torch import nn
from torch.fx import Graph, GraphModule, Node

from revcompile import options
from revcompile.conversion_report import BudgetReport, KeptReason, SegmentPlanReport
from revcompile.errors import BudgetError, ConversionError
from revcompile.memory.segments import Attribution, attribute, measure_call
from revcompile.options import MemoryBudget


@dataclass
class _Units:
    """The cut positions (graph positions after which a cut falls, increasing), the
    boundary tensor of each cut (None when not exactly one), and each unit's nodes."""

    cuts: list[int]
    boundaries: list[Node | None]
    nodes: list[list[Node]]


def budget(
    gm: GraphModule,
    the_plan: Plan,
    inputs: Sequence[torch.Tensor],
    memory_budget: MemoryBudget,
    *,
    preserve_function: bool = False,
    exact: bool = False,
) -> Plan:
    """Choose storing, checkpointing or reversible coupling per unit of ``gm``.

    Preconditions: ``the_plan`` comes from ``revcompile.passes.plan.plan`` on
    ``gm`` with shapes from ``inputs`` (the example inputs; the planner counts
    bytes at their sizes and in ``gm``'s current train/eval mode).
    ``preserve_function=True`` offers no reversible option (the network keeps
    its function: the best activation-checkpointing plan).

    Postconditions: a new Plan whose stages are the chosen reversible ones (the
    blocks of the others are kept, code ``budget`` or ``preserve_function``);
    the nodes of every chosen checkpointed run carry ``meta[CHECKPOINT_SPAN]``
    (one number per run), which ``emit`` outlines; ``Plan.budget`` holds the
    plan table with the predicted saved bytes, at most the budget. Raises
    ``BudgetError`` (with the smallest achievable bytes) when no plan fits,
    ``ValueError`` for a malformed budget, ``ConversionError`` when the graph
    has no single-tensor input. ``gm``'s graph and modules are unchanged.
    """
    units, problem = _measured_problem(gm, the_plan, inputs, preserve_function, exact)
    original = plan_bytes(problem, [o for o in problem.options if o.choice == "store"])
    limit = options.budget_bytes(memory_budget, original)
    chosen = solve(problem, limit)
    if chosen is None:
        raise BudgetError(limit, min_bytes(problem), preserve_function)
    names = _unit_names(gm, the_plan, units)
    added = contributions(problem, chosen)
    rows = [
        SegmentPlanReport(
            name=option.stage or _span_name(names, option),
            choice=option.choice,
            blocks=_blocks_in(the_plan, units, option),
            predicted_bytes=bytes_,
            recompute_flops=option.flops,
        )
        for option, bytes_ in zip(chosen, added)
    ]
    for node in gm.graph.nodes:  # a plan made before on this graph
        node.meta.pop(CHECKPOINT_SPAN, None)
    for span, option in enumerate(o for o in chosen if o.choice == "checkpoint"):
        for unit in range(option.start, option.stop):
            for node in units.nodes[unit]:
                node.meta[CHECKPOINT_SPAN] = span
    reversible = {option.stage for option in chosen if option.choice == "reversible"}
    report = BudgetReport(
        budget_bytes=limit,
        original_bytes=original,
        predicted_bytes=sum(added),
        recompute_flops=sum(option.flops for option in chosen),
        preserve_function=preserve_function,
        segments=rows,
    )
    return _keep_stages(the_plan, reversible, preserve_function, report)


def _measured_problem(
    gm: GraphModule,
    the_plan: Plan,
    inputs: Sequence[torch.Tensor],
    preserve_function: bool,
    exact: bool,
) -> tuple[_Units, Problem]:
    """The units and their planning problem; cuts across
    which units share a saved storage are dropped until none do."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    cuts = _candidate_cuts(gm, the_plan, order)
    while True:
        units = _units(gm, cuts, order)
        segment_of = {node: u for u, nodes in enumerate(units.nodes) for node in nodes}
        attribution = attribute(gm, inputs, segment_of, units.boundaries, len(units.nodes))
        joined = _shared_storage_cuts(units, attribution)
        if not joined:
            break
        cuts = [cut for k, cut in enumerate(cuts) if k not in joined]
    stage_options = (
        []
        if preserve_function
        else [
            o
            for stage in the_plan.stages
            if (o := _reversible_option(gm, the_plan, stage, units, attribution, exact))
        ]
    )
    problem = Problem(
        boundary_bytes=tuple(attribution.boundary_bytes),
        options=(
            *_store_and_checkpoint(units, attribution, _checkpointable(gm, units)),
            *stage_options,
        ),
    )
    return units, problem


def _candidate_cuts(gm: GraphModule, the_plan: Plan, order: Mapping[Node, int]) -> list[int]:
    """Positions after the last input, at each block's fork and output, before the output;
    inner ones only where exactly one activation tensor crosses."""
    nodes = list(gm.graph.nodes)
    placeholders = [order[n] for n in nodes if n.op == "placeholder"]
    if not placeholders:
        raise ConversionError("memory_budget needs a model with an input")
    first, last = max(placeholders), len(nodes) - 2
    inner = {order[b.block.fork] for b in the_plan.blocks} | {
        order[b.block.output] for b in the_plan.blocks
    }
    return sorted(
        {first, last}
        | {p for p in inner if first < p < last and len(_crossing(nodes, order, p)) == 1}
    )


def _crossing(nodes: list[Node], order: Mapping[Node, int], position: int) -> list[Node]:
    """The activation tensors computed at or before ``position`` and read after it."""
    return [
        node
        for node in nodes[: position + 1]
        if node.op != "get_attr"
        and tensor_shape(node) is not None
        and any(order[user] > position for user in node.users)
    ]


def _units(gm: GraphModule, cuts: list[int], order: Mapping[Node, int]) -> _Units:
    nodes = list(gm.graph.nodes)
    boundaries = []
    for cut in cuts:
        crossing = _crossing(nodes, order, cut)
        boundaries.append(crossing[0] if len(crossing) == 1 else None)
    unit_nodes = [nodes[a + 1 : b + 1] for a, b in zip(cuts, cuts[1:])]
    return _Units(cuts, boundaries, unit_nodes)


def _shared_storage_cuts(units: _Units, attribution: Attribution) -> set[int]:
    """Indices of the cuts to drop: those strictly inside a pair of units that
    save one storage which is not the boundary between them."""
    boundary_of = {key: k for k, key in enumerate(attribution.boundary_keys) if key is not None}
    joined: set[int] = set()
    for key, (_, savers) in attribution.savers.items():
        savers = {s for s in savers if s >= 0}
        if len(savers) < 2:
            continue
        k = boundary_of.get(key)
        if k is not None and savers <= {k - 1, k}:
            continue
        joined.update(range(min(savers) + 1, max(savers) + 1))
    return joined


def _checkpointable(gm: GraphModule, units: _Units) -> Callable[[int, int], bool]:
    """Whether the run of units ``start..stop-1`` may be checkpointed: ``emit``
    stores a run whose recomputation would not repeat its forward
    (``graph_utils.recomputation_needs``: a hooked module, state written later
    outside the run), so the plan must not count it as checkpointed."""
    needs = recomputation_needs(gm)
    unit_of = {node: u for u, nodes in enumerate(units.nodes) for node in nodes}
    blocked: list[bool] = []
    reach: list[tuple[float, float]] = []  # units holding the writes a unit needs
    for nodes in units.nodes:
        found = [needs(node) for node in nodes]
        blocked.append(any(need is None for need in found))
        writes = [unit_of.get(w, -1) for need in found if need for w in need]
        reach.append((min(writes, default=math.inf), max(writes, default=-math.inf)))

    def checkpointable(start: int, stop: int) -> bool:
        return not any(blocked[start:stop]) and all(
            low >= start and high < stop for low, high in reach[start:stop]
        )

    return checkpointable


def _store_and_checkpoint(
    units: _Units, attribution: Attribution, checkpointable: Callable[[int, int], bool]
) -> list[Option]:
    """Store options (one per unit, as measured) and checkpoint options (every run
    of units that starts at a tensor boundary and is ``checkpointable``: it saves
    that input only, and holds what its units store internally and its inner
    boundaries while it is recomputed)."""
    n = len(units.nodes)
    boundary_of = {key: k for k, key in enumerate(attribution.boundary_keys) if key is not None}
    internal = [0] * n
    saves_input = [False] * n
    saves_output = [False] * n
    for key, (nbytes, savers) in attribution.savers.items():
        for unit in (s for s in savers if s >= 0):
            k = boundary_of.get(key)
            if k == unit:
                saves_input[unit] = True
            elif k == unit + 1:
                saves_output[unit] = True
            else:
                internal[unit] += nbytes
    found = [
        Option(u, u + 1, "store", internal[u], saves_input[u], saves_output[u], 0) for u in range(n)
    ]
    for start in range(n):
        if units.boundaries[start] is None:
            continue
        flops = held = 0
        for stop in range(start + 1, n + 1):
            flops += attribution.flops[stop - 1]
            held += internal[stop - 1] + (
                attribution.boundary_bytes[stop - 1] if stop > start + 1 else 0
            )
            if checkpointable(start, stop):
                found.append(Option(start, stop, "checkpoint", 0, True, False, flops, None, held))
    return found


def _reversible_option(
    gm: GraphModule,
    the_plan: Plan,
    stage: Stage,
    units: _Units,
    attribution: Attribution,
    exact: bool,
) -> Option | None:
    """The reversible option of ``stage``, measured on its built module and the
    post-op after it; None when the stage does not start and end at cuts."""
    last = stage.last_block.output
    try:
        start, stop = units.boundaries.index(stage.input), units.boundaries.index(last)
    except ValueError:
        return None
    spec = attribution.boundary_specs[start]
    assert spec is not None  # a boundary node is a tensor
    cost = measure_call(_stage_call(gm, the_plan, stage, exact), spec)
    if cost.output_bytes != attribution.boundary_bytes[stop]:
        return None  # its output would not be the boundary storage the others count
    return Option(
        start,
        stop,
        "reversible",
        cost.internal,
        cost.saves_input,
        cost.saves_output,
        cost.flops,
        stage=stage.name,
    )


def _stage_call(gm: GraphModule, the_plan: Plan, stage: Stage, exact: bool) -> GraphModule:
    """``stage``'s ReversibleSequence followed by its last block's post-op (out of
    place), as ``emit`` puts them in the graph."""
    call = GraphModule(nn.Module(), Graph(), class_name="StageCall")
    call.add_submodule("stage", build_stage(gm, stage, the_plan.partitions, {}, exact))
    post_op = stage.last_block.post_op
    if post_op is not None and post_op.op == "call_module":
        call.add_submodule(str(post_op.target), gm.get_submodule(str(post_op.target)))
    graph = call.graph
    result = graph.call_module("stage", (graph.placeholder("x"),))
    if post_op is not None:
        result = copy_out_of_place(call, post_op, result, "post_op")
    graph.output(result)
    call.recompile()
    return call


def _unit_names(gm: GraphModule, the_plan: Plan, units: _Units) -> list[str]:
    """Each unit's name: its blocks' (``layer1.0``, ``layer1.0..layer1.2``), else
    ``stem`` before the first block, ``head`` after the last."""
    names = []
    for u in range(len(units.nodes)):
        blocks = [b.name for b in _unit_blocks(the_plan, units, u)]
        if blocks:
            names.append(blocks[0] if len(blocks) == 1 else f"{blocks[0]}..{blocks[-1]}")
        else:
            names.append("stem" if u == 0 else "head" if u == len(units.nodes) - 1 else "segment")
    return names


def _unit_blocks(the_plan: Plan, units: _Units, unit: int) -> list[ResidualBlock]:
    inside = set(units.nodes[unit])
    return [bp.block for bp in the_plan.blocks if bp.block.join in inside]


def _blocks_in(the_plan: Plan, units: _Units, option: Option) -> list[str]:
    return [
        block.name
        for u in range(option.start, option.stop)
        for block in _unit_blocks(the_plan, units, u)
    ]


def _span_name(names: list[str], option: Option) -> str:
    """``layer1.0`` for one unit, ``layer1.0..layer2.1`` for a run of units."""
    first, last = names[option.start], names[option.stop - 1]
    if option.stop - option.start == 1:
        return first
    return f"{first.split('..')[0]}..{last.split('..')[-1]}"


def _keep_stages(
    the_plan: Plan, reversible: set[str | None], preserve_function: bool, report: BudgetReport
) -> Plan:
    """``the_plan`` with only the ``reversible`` stages; the others' blocks kept."""
    reason = KeptReason.PRESERVED if preserve_function else KeptReason.BUDGET
    dropped = {s.name for s in the_plan.stages if s.name not in reversible}
    blocks = [
        BlockPlan(bp.block, "kept", None, reason, f"stage {bp.stage}")
        if bp.stage in dropped
        else bp
        for bp in the_plan.blocks
    ]
    stages = [s for s in the_plan.stages if s.name in reversible]
    return replace(the_plan, blocks=blocks, stages=stages, budget=report)
