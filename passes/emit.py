"""Pass 6: rewrite the planned stages into ReversibleSequence calls (DESIGN.md §4, §6).

Each Stage of the plan becomes one ``call_module`` of a ``ReversibleSequence``
whose couplings hold F and G branches built by
``revcompile.passes.partition.build_branch`` from the partition records the
plan holds: half-width along the stage's channel axis for a ``halve`` stage,
full-width copies for a ``duplicate`` stage (emit analyses nothing itself).
The nodes the stage absorbed are erased; the post-op of the stage's last
block is re-applied after the stage, out of place (the stage's output is saved
for backward and must not be written).

With ``policy="checkpoint"`` every non-reversible segment left between stages
(stem, downsampling blocks, odd leftovers, head) is then wrapped in a
``CheckpointedSegment``, so that training stores activations only at segment
inputs. A plan from the memory planner (``Plan.budget``) says instead which
runs of nodes to checkpoint (``meta[CHECKPOINT_SPAN]``), and the policy is
not used.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

from revcompile.passes.graph_utils import (
    common_module_prefix,
    graph_position,
    recomputation_needs,
    unique_name,
)
from revcompile.passes.ir import (
    CHECKPOINT_SPAN,
    BranchPartition,
    Coupling,
    MadeOutOfPlace,
    Plan,
    PostOpPlaced,
    ResidualBlock,
    Rewrite,
    SegmentCheckpointed,
    Stage,
    StageEmitted,
)
from revcompile.passes.ops import has_side_effect, reads_metadata_only, writes_in_place
from revcompile.passes.partition import build_branch
from revcompile.passes.partition.analysis import fetch_attr
from revcompile.passes.partition.branch import Copies, copy_key
from revcompile.passes.partition.inplace import copy_out_of_place, replace_out_of_place
from torch import nn
from torch.fx import Graph, GraphModule, Node

from revcompile import options
from revcompile.errors import ConversionError
from revcompile.options import Policy
from revcompile.runtime import AdditiveCoupling, CheckpointedSegment, ReversibleSequence

Partitions = Mapping[ResidualBlock, BranchPartition]


def emit(
    gm: GraphModule,
    plan: Plan,
    *,
    policy: Policy = "checkpoint",
    exact: bool = False,
    exact_bits: int = 32,
) -> list[Rewrite]:
    """Replace every stage of ``plan`` in ``gm`` by a ReversibleSequence, in place.

    Preconditions: ``plan`` was computed on ``gm``'s current graph with shapes
    known. ``gm`` may share modules with the user's model: no module reachable
    from ``gm`` is changed; new modules (stages, segments, out-of-place
    post-ops) are added, and the non-reversible layers are reused as they are.

    Postconditions: one ``call_module`` node per stage, named after the stage;
    the absorbed blocks' nodes are erased; with ``policy="checkpoint"`` and at
    least one stage, every other compute node sits inside a
    ``CheckpointedSegment``; with ``plan.budget``, exactly the tagged runs do.
    ``gm`` still needs ``cleanup`` (dead submodules, lint, recompile). Returns
    the rewrites made, one record each (``describe()`` gives the report's
    sentence). ``exact`` makes every stage carry its trunk in fixed point
    (``ReversibleSequence(exact=True, exact_bits=exact_bits)``).
    """
    options.check("policy", policy, Policy)
    # Every stage is built from the original graph before any of it is rewritten,
    # with one memo of copies: what the original shared, the copies share.
    copies: Copies = {}
    built = [
        build_stage(gm, stage, plan.partitions, copies, exact, exact_bits) for stage in plan.stages
    ]
    read_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    replaced: dict[Node, Node] = {}
    changes: list[Rewrite] = []
    for stage, module in zip(plan.stages, built):
        changes += _emit_stage(gm, stage, module, replaced)
    _erase_dead_constants(gm)
    _use_shared_copies(gm, copies)
    _drop_unread_attrs(gm, read_attrs)
    stage_names = {stage.name for stage in plan.stages}

    def is_stage(node: Node) -> bool:
        return node.op == "call_module" and node.target in stage_names

    def segments() -> list[list[Node]]:
        """The runs to checkpoint, found again after each rewrite of the graph."""
        if plan.budget is not None:
            return _recomputable(gm, _tagged_runs(gm))
        if policy == "checkpoint" and plan.stages:
            return _recomputable(gm, _runs(gm, is_stage))
        return []

    _read_state_where_used(gm, is_stage)
    changes += _protect_saved_values(gm, is_stage, segments())
    changes += _checkpoint_segments(gm, is_stage, segments())
    return changes


def _read_state_where_used(gm: GraphModule, is_stage: Callable[[Node], bool]) -> None:
    """Give every non-stage reader of a parameter or buffer its own ``get_attr``, just
    before it.

    A ``get_attr`` read before a stage and written in place after it
    (``self.scale.mul_(0.5)`` between two stages) would otherwise become an input of
    the segment that writes it: segments save their inputs, and the write would be
    made out of place, losing the update. Read inside the segment, the tensor is the
    segment's own module state, which the segment's recomputation restores.
    """
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        for user in list(node.users):
            if not user.op.startswith("call_") or is_stage(user):
                continue
            with gm.graph.inserting_before(user):
                # create_node, not get_attr: the target exists (the old node reads it),
                # but fx warns for tensor attributes that are not registered buffers.
                local = gm.graph.create_node("get_attr", node.target)
            local.meta = dict(node.meta)
            if CHECKPOINT_SPAN in user.meta:
                local.meta[CHECKPOINT_SPAN] = user.meta[CHECKPOINT_SPAN]
            user.replace_input_with(node, local)
        if not node.users:
            gm.graph.erase_node(node)


def _recomputable(gm: GraphModule, runs: list[list[Node]]) -> list[list[Node]]:
    """The runs whose recomputation repeats exactly what their forward did
    (``graph_utils.recomputation_needs``: no call of a hooked module, no read of
    state that a write outside the run changes later). The others are stored."""
    needs = recomputation_needs(gm)

    def replays(run: list[Node]) -> bool:
        inside = set(run)
        return all((need := needs(node)) is not None and need <= inside for node in run)

    return [run for run in runs if replays(run)]


def _tagged_runs(gm: GraphModule) -> list[list[Node]]:
    """The memory planner's checkpointed runs: for each ``meta[CHECKPOINT_SPAN]``
    number, the nodes from its first to its last tagged node, in graph order."""
    nodes = list(gm.graph.nodes)
    bounds: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        span = node.meta.get(CHECKPOINT_SPAN)
        if span is not None:
            bounds.setdefault(span, [i, i])[1] = i
    return [nodes[first : last + 1] for first, last in sorted(bounds.values())]


def _protect_saved_values(
    gm: GraphModule, is_stage: Callable[[Node], bool], segments: list[list[Node]]
) -> list[Rewrite]:
    """Make the in-place writers of values backward needs out-of-place.

    A stage saves its output for backward, a checkpointed segment its inputs
    (and recomputes from them): a later in-place write of either
    (``Dropout2d(inplace=True)`` after a chain, ``x.relu_()`` on the model
    input) would corrupt backward. Each such writer is replaced by its
    out-of-place version (in-place modules are copied, never changed), and
    every later reader reads the written value as before.
    """
    saved = {node for node in gm.graph.nodes if is_stage(node)}
    for run in segments:
        members = set(run)
        saved.update(a for n in run for a in n.all_input_nodes if a not in members)
    used_names = set(dict(gm.named_modules())) | set(dir(gm))
    changes: list[Rewrite] = []
    for node in list(gm.graph.nodes):
        written = node.args[0] if node.args and node.op.startswith("call_") else None
        if written not in saved or not writes_in_place(node, gm):
            continue
        if node.op == "call_function" and node.target is operator.setitem:
            raise ConversionError(
                f"{node.name} assigns into {written.name} in place, which backward needs; "
                "assign into a clone instead"
            )
        described = _describe(node)
        span = node.meta.get(CHECKPOINT_SPAN)
        new = replace_out_of_place(gm, node, unique_name(f"{node.name}_out_of_place", used_names))
        if span is not None:
            new.meta[CHECKPOINT_SPAN] = span
        changes.append(MadeOutOfPlace(described, written.name))
    return changes


def _runs(gm: GraphModule, is_stage: Callable[[Node], bool]) -> list[list[Node]]:
    """The maximal runs of non-stage compute nodes, in graph order."""
    runs: list[list[Node]] = [[]]
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or is_stage(node):
            runs.append([])
        else:
            runs[-1].append(node)
    return [run for run in runs if any(n.op.startswith("call_") for n in run)]


def build_stage(
    gm: GraphModule,
    stage: Stage,
    partitions: Partitions,
    copies: Copies,
    exact: bool,
    exact_bits: int = 32,
) -> ReversibleSequence:
    """The ReversibleSequence of ``stage``: half-width branches along the stage's
    channel axis, or full-width copies for a duplicate stage."""
    halves = None
    if stage.split == "halve":
        channels = stage.channels
        assert channels is not None  # a halve stage's width comes from its partition records
        halves = slice(0, channels // 2), slice(channels // 2, channels)
    couplings = [
        _coupling(gm, coupling, halves, partitions, copies) for coupling in stage.couplings
    ]
    return ReversibleSequence(
        couplings,
        dim=stage.dim,
        name=stage.name,
        split=stage.split,
        exact=exact,
        exact_bits=exact_bits,
    )


def _emit_stage(
    gm: GraphModule, stage: Stage, module: ReversibleSequence, replaced: dict[Node, Node]
) -> list[Rewrite]:
    """Put ``module`` in place of ``stage``'s nodes. ``replaced`` maps the
    outputs of stages emitted before to the nodes now computing them (a stage
    may start where the previous one ends); it is extended with this one's."""
    gm.add_submodule(stage.name, module)
    stage_input = replaced.get(stage.input, stage.input)
    last = stage.last_block
    absorbed = [
        node
        for coupling in stage.couplings
        for block in (coupling.f, coupling.g)
        if block is not None
        for node in (*block.region, block.join)
    ]
    absorbed += [c.f_pre_op for c in stage.couplings if c.f_pre_op is not None]
    absorbed += [c.g_pre_op for c in stage.couplings if c.g_pre_op is not None]
    # Unused parts of a block's results (the weights MultiheadAttention returns) go too.
    inside = set(absorbed)
    absorbed += [
        user
        for n in inside
        for user in n.users
        if user not in inside and user.op != "output" and not user.users and not user.is_impure()
    ]
    # Shape checks on the trunk inside the chain (ViT's ``torch._assert(x.dim() == 3)``)
    # read the stage input instead: every trunk value of a chain has its shape.
    for node in inside:
        for user in list(node.users):
            if user not in inside and reads_metadata_only(user):
                user.replace_input_with(node, stage_input)
    changes: list[Rewrite] = [
        StageEmitted(stage.name, len(absorbed), len(module.couplings), stage.split, module.dim)
    ]

    graph = gm.graph
    with graph.inserting_after(last.output):
        stage_node = graph.call_module(stage.name, (stage_input,))
    result = stage_node
    if last.post_op is not None:
        with graph.inserting_after(stage_node):
            result = copy_out_of_place(gm, last.post_op, stage_node, f"{stage.name}_post_op")
        changes.append(PostOpPlaced(_describe(last.post_op), None, last.name, stage.name))
    last.output.replace_all_uses_with(result)
    replaced[last.output] = result
    if last.post_op is not None:
        absorbed.append(last.post_op)
    for node in sorted(set(absorbed), key=graph_position(graph), reverse=True):
        graph.erase_node(node)

    for coupling in stage.couplings:
        for block, pre_op, which in (
            (coupling.f, coupling.f_pre_op, "F"),
            (coupling.g, coupling.g_pre_op, "G"),
        ):
            if block is not None and pre_op is not None:
                changes.append(PostOpPlaced(_describe(pre_op), which, block.name, stage.name))
    return changes


def _use_shared_copies(gm: GraphModule, copies: Copies) -> None:
    """Where the rest of the network uses a module or tensor that branches use
    unsliced, use the branches' copy instead: the use stays shared.

    Planning allowed such sharing only for direct uses (``call_module`` of the
    module, ``get_attr`` of the tensor). The copy is put at the original's path
    when the containers on it are gm's own (fx makes plain ``Module``
    containers), so state_dict keys stay; otherwise under a new root name.
    """
    used_names = set(dict(gm.named_modules())) | set(dir(gm))
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        original = fetch_attr(gm, str(node.target))
        copy = copies.get(copy_key(original, None, None))
        if copy is None or copy is original:
            continue
        owner_path, _, field = str(node.target).rpartition(".")
        owner = gm.get_submodule(owner_path)
        if not (owner is gm or type(owner) is nn.Module):  # the user's module: do not touch
            owner, field = gm, unique_name(str(node.target).replace(".", "_"), used_names)
            node.target = field
        if isinstance(copy, nn.Module):
            owner.add_module(field, copy)
        elif isinstance(copy, nn.Parameter):
            owner._parameters[field] = copy
        else:
            owner._buffers[field] = copy


def _drop_unread_attrs(gm: GraphModule, read_attrs: set[str]) -> None:
    """Delete the tensors only absorbed branches read by ``get_attr`` (a layer
    scale on the root), so no dead original stays in the state_dict; only from
    gm's own containers, never from the user's modules."""
    still_read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for target in sorted(read_attrs - still_read):
        owner_path, _, field = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if owner is gm or type(owner) is nn.Module:
            delattr(owner, field)


def _erase_dead_constants(gm: GraphModule) -> None:
    """Erase the parameter reads (and values computed from parameters alone) that
    only the absorbed blocks used, so no segment outlined later holds them; a
    write to module state (``self.calls.add_(1)``) is a side effect and stays."""
    graph = gm.graph
    constants: set[Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method")
            and node.all_input_nodes
            and all(arg in constants for arg in node.all_input_nodes)
        ):
            constants.add(node)
    for node in reversed(list(graph.nodes)):
        if node in constants and not node.users and not has_side_effect(node, gm):
            graph.erase_node(node)


def _coupling(
    gm: GraphModule,
    coupling: Coupling,
    halves: tuple[slice, slice] | None,
    partitions: Partitions,
    copies: Copies,
) -> AdditiveCoupling:
    """With ``halves = (low, high)``, F reads x2 (high half) and writes into y1
    (low half), G the other way round; with None both keep full width. G of a
    single-block coupling gets copies of its own, the inner-width layers too:
    tied to F's, they cost accuracy (``benchmarks/leftover.py``)."""
    low, high = halves if halves is not None else (None, None)
    f = build_branch(
        gm, partitions[coupling.f], pre_op=coupling.f_pre_op, reads=high, writes=low, copies=copies
    )
    g = None
    if coupling.g is not None:
        g = build_branch(
            gm,
            partitions[coupling.g],
            pre_op=coupling.g_pre_op,
            reads=low,
            writes=high,
            copies={} if coupling.g is coupling.f else copies,
        )
    return AdditiveCoupling(f, g)


def _describe(node: Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _checkpoint_segments(
    gm: GraphModule, is_stage: Callable[[Node], bool], segments: list[list[Node]]
) -> list[Rewrite]:
    """Wrap each of ``segments`` (runs of consecutive non-stage nodes) in a
    CheckpointedSegment; those before every stage are ``stem``, after every
    stage ``head`` (when there are stages)."""
    stages = [n for n in gm.graph.nodes if is_stage(n)]
    order = graph_position(gm.graph)
    used_names = set(dict(gm.named_modules())) | set(dir(gm))
    changes: list[Rewrite] = []
    for segment in segments:
        if stages and order(segment[-1]) < order(stages[0]):
            base = "stem"
        elif stages and order(segment[0]) > order(stages[-1]):
            base = "head"
        else:
            base = _span_name(gm, segment)
        name = unique_name(base, used_names)
        _outline(gm, segment, name)
        changes.append(SegmentCheckpointed(name, len(segment)))
    return changes


def _span_name(gm: GraphModule, segment: list[Node]) -> str:
    """``layer2_0`` for one block, ``layer2_3_to_layer3_0`` for a span of blocks.

    Named after the layers with weights: a lone post-op or pooling says little.
    """
    owners = [
        str(n.target).rpartition(".")[0] or str(n.target)  # a top-level layer: its own name
        for n in segment
        if n.op == "call_module" and any(True for _ in gm.get_submodule(str(n.target)).parameters())
    ]
    if not owners:
        return "segment"
    prefix = common_module_prefix(owners)
    if not prefix:
        depth = owners[0].count(".") + 1
        prefix = f"{owners[0]}_to_{'.'.join(owners[-1].split('.')[:depth])}"
    return prefix.replace(".", "_")


def _outline(gm: GraphModule, segment: list[Node], name: str) -> None:
    """Move ``segment`` (consecutive nodes of ``gm.graph``) into a checkpointed submodule."""
    members = set(segment)
    inputs: list[Node] = []
    for node in segment:
        for arg in node.all_input_nodes:
            if arg not in members and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in segment if any(user not in members for user in n.users)]

    body = Graph()
    env = {arg: body.placeholder(arg.name) for arg in inputs}
    for node in segment:
        env[node] = body.node_copy(node, env.__getitem__)
    body.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    gm.add_submodule(name, CheckpointedSegment(GraphModule(gm, body, class_name="Segment")))

    graph = gm.graph
    outside = members.__contains__
    with graph.inserting_before(segment[0]):
        call = graph.call_module(name, tuple(inputs))
        if len(outputs) == 1:
            outputs[0].replace_all_uses_with(call, delete_user_cb=lambda user: not outside(user))
        else:
            for i, out in enumerate(outputs):
                item = graph.call_function(operator.getitem, (call, i))
                out.replace_all_uses_with(item, delete_user_cb=lambda user: not outside(user))
    for node in reversed(segment):
        graph.erase_node(node)
