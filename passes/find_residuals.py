"""Pass 3: find the residual blocks of a traced graph with dominator analysis.

For every add-like node ``join`` (``operator.add``, ``operator.iadd``,
``torch.add``, ``Tensor.add``, ``Tensor.add_``, either argument order):

1. ``fork = idom(join)`` in the graph rooted at a virtual source feeding the
   placeholders. ``get_attr`` nodes (and anything computed only from them) are
   constants: they are not connected to the source, so ``x + self.gamma * f(x)``
   keeps ``x`` as its dominator.
2. ``region`` = nodes reachable from ``fork`` that reach ``join``, both
   excluded. The block is single-exit when ``join`` post-dominates every region
   node (post-dominators: dominators of the reversed graph from a virtual sink
   fed by the output). Region nodes read outside the block (feature taps,
   auxiliary heads) are recorded in ``ResidualBlock.tapped``; planning keeps
   such blocks. A fork that is also read elsewhere does not disqualify the
   block (only chaining, which planning checks).
3. Identity shortcut iff ``fork`` is an operand of ``join``, or ``0 + fork``
   is (Python's ``sum([x, f(x)])``; the ``0 +`` lies in the region, so a
   converted block drops it with the rest of the block). Gains of the branch
   (``x + gamma * f(x)``, NF-nets' ``f(act(x) * beta) * alpha + x``, skip-init
   ``out.mul_(gain)``) are region nodes: a coupling keeps them in its branch.
   An identity block whose shortcut is added to a channel slice of a wider
   branch output (ReXNet) is kept (``ResidualBlock.kept``: partial channels).
   An operand ``fork * c`` (``c`` a number or a gain computed from parameters)
   is a scaled shortcut, kept: ``y1 = c * x1 + F(x2)`` is no additive
   coupling. Otherwise the operand whose exclusive path has no nonlinearity (an activation, or a
   norm-activation module such as timm's BatchNormAct2d) is a projection
   shortcut (1x1 conv + norm, subsample + zero-pad, pooling); when both or neither
   operand has one, the add joins parallel branches (Inception-style) and is
   rejected.
4. A single element-wise activation that is ``join``'s only user is the
   block's ``post_op``.

Adds of a constant, adds whose operands come from different model inputs and
adds whose result is unused are rejected with the reason, and so are adds with
``out=``, a tensor ``alpha=`` or one that scales the shortcut (a constant
``alpha`` on the branch is the block's ``branch_scale``) and adds whose block
contains, straddles or touches an in-place write the data flow does not show
(``revcompile.passes.normalize.hidden_writes``: a write into a view, a
parameter or an input). A side effect nobody reads (an in-place
statement, ``torch._assert``) counts as an output of the graph, so a block
whose branch feeds one is tapped. ``0 + x`` (Python's ``sum([x, f(x)])``
starts at 0) is transparent: ``sum([x, f(x)])`` is an identity block.

Run ``revcompile.passes.normalize.normalize`` first: it makes in-place
statements such as ``out.add_(x)`` joins of the data flow.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import networkx as nx
import torch
from revcompile.passes.graph_utils import common_module_prefix, graph_position, module_path
from revcompile.passes.ir import RejectedAdd, ResidualBlock
from revcompile.passes.nesting import resolve_nesting
from revcompile.passes.normalize import hidden_writes
from revcompile.passes.ops import (
    ACTIVATION_NAMES,
    NOT_ELEMENTWISE,
    activation_name,
    has_side_effect,
    is_add,
    is_scale,
    op_name,
)
from torch.fx import GraphModule, Node

from revcompile.conversion_report import KeptReason


class _Virtual:
    """The virtual source / sink of the dominator graphs."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SOURCE = _Virtual("<source>")
SINK = _Virtual("<sink>")


def find_residuals(gm: GraphModule) -> tuple[list[ResidualBlock], list[RejectedAdd]]:
    """Find the residual blocks (``join = shortcut + branch(fork)``) of ``gm``.

    Preconditions: ``gm`` comes from ``revcompile.passes.trace.trace`` (module-level graph,
    ``meta["nn_module_stack"]`` on the nodes). Shapes are not needed.

    Postconditions: every add-like node of ``gm`` appears exactly once, either
    as the ``join`` of a ResidualBlock or as a RejectedAdd; both lists are in
    graph order. Block names are unique: the innermost module whose forward
    holds the add (``layer3.4``), else the common module prefix of the region,
    else the add node's name. Of nested blocks, those inside an enclosing block
    that converts as a whole are kept (``passes.nesting``). ``gm`` is not modified.
    """
    flow = _dataflow_graph(gm)
    graph = _Graph(
        gm,
        dominator=_immediate_dominators(flow, SOURCE),
        post_dominates=_PostDominance(flow),
        hidden=hidden_writes(gm),
        position=graph_position(gm.graph),
    )
    blocks: list[ResidualBlock] = []
    rejected: list[RejectedAdd] = []
    for node in gm.graph.nodes:
        if not is_add(node):
            continue
        found = _analyse_add(graph, node)
        (blocks if isinstance(found, ResidualBlock) else rejected).append(found)
    _make_names_unique(blocks)
    resolve_nesting(blocks)
    return blocks, rejected


def _dataflow_graph(gm: GraphModule) -> nx.DiGraph:
    """Edges from each node to its users; the source feeds the placeholders; the
    output and every side effect whose result nobody reads feed the sink."""
    flow = nx.DiGraph()
    flow.add_nodes_from((SOURCE, SINK))
    for node in gm.graph.nodes:
        flow.add_node(node)
        if node.op == "placeholder":
            flow.add_edge(SOURCE, node)
        elif node.op == "output" or (not node.users and has_side_effect(node, gm)):
            flow.add_edge(node, SINK)
        flow.add_edges_from((node, user) for user in node.users)
    return flow


def _immediate_dominators(graph: nx.DiGraph, start: object) -> dict:
    """``nx.immediate_dominators`` without ``start`` (some releases map it to itself)."""
    dominator = dict(nx.immediate_dominators(graph, start))
    dominator.pop(start, None)
    return dominator


class _PostDominance:
    """``post_dominates(a, n)``: every path from ``n`` to the output passes ``a``.

    Built once from the post-dominator tree (dominators of the reversed graph
    from the sink) with DFS entry/exit numbers, so each query is O(1). Nodes
    that do not reach the output (dead code) are not in the tree.
    """

    def __init__(self, flow: nx.DiGraph) -> None:
        parent = _immediate_dominators(flow.reverse(copy=False), SINK)
        children: dict[object, list[object]] = {}
        for node, dominator in parent.items():
            children.setdefault(dominator, []).append(node)
        self.entry: dict[object, int] = {}
        self.exit: dict[object, int] = {}
        counter = 0
        stack: list[tuple[object, bool]] = [(SINK, False)]
        while stack:
            node, finished = stack.pop()
            counter += 1
            if finished:
                self.exit[node] = counter
                continue
            self.entry[node] = counter
            stack.append((node, True))
            stack.extend((child, False) for child in children.get(node, ()))

    def reaches_output(self, node: object) -> bool:
        return node in self.entry

    def __call__(self, a: object, node: object) -> bool:
        if not (self.reaches_output(a) and self.reaches_output(node)):
            return False
        return self.entry[a] <= self.entry[node] and self.exit[node] <= self.exit[a]


@dataclass
class _Graph:
    """What the analysis of one add needs to know about the whole graph."""

    gm: GraphModule
    dominator: dict
    post_dominates: _PostDominance
    hidden: dict[Node, set[Node]]
    position: Callable[[Node], int]


def _add_operands(node: Node) -> tuple[object, object]:
    """The two summands, whether passed by position or by keyword."""
    names = ("self", "other") if node.op == "call_method" else ("input", "other")
    operands = list(node.args[:2])
    operands += [node.kwargs.get(name) for name in names[len(operands) :]]
    return operands[0], operands[1]


def _is_zero(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _zero_add_input(node: object) -> Node | None:
    """``n`` when ``node`` is ``0 + n`` or ``n + 0`` (a Python zero, no alpha), else None."""
    if not isinstance(node, Node) or not is_add(node) or set(node.kwargs) - {"input", "other"}:
        return None
    first, second = _add_operands(node)
    if _is_zero(first) and isinstance(second, Node):
        return second
    if _is_zero(second) and isinstance(first, Node):
        return first
    return None


def _out_reason(join: Node) -> str | None:
    """Why an ``out=`` argument forbids a coupling (which returns a new tensor), or None."""
    out = join.kwargs.get("out")
    if out is not None:
        shown = out.name if isinstance(out, Node) else repr(out)
        return f"writes its result into out={shown}: kept as it is"
    return None


def _branch_scale(join: Node, branch_out: Node) -> float | str:
    """The constant ``alpha`` of ``torch.add(x, f, alpha=a)`` / ``x.add(f, alpha=a)``
    (1.0 without one), or why it forbids a coupling: a tensor alpha, or one that
    scales the shortcut. A coupling adds ``a * F(x)``; a kept block keeps its fused
    multiply-add as it is."""
    alpha = join.kwargs.get("alpha", 1)
    if isinstance(alpha, Node):
        return f"scales its second operand by a tensor (alpha={alpha.name}): kept as it is"
    if alpha != 1 and _add_operands(join)[1] is not branch_out:
        return f"scales its shortcut (alpha={alpha!r}), not its branch: kept as it is"
    return float(alpha)


def _hidden_write_reason(graph: _Graph, join: Node, fork: Node, region: set[Node]) -> str | None:
    """Why an in-place write the data flow does not show forbids the block: it
    may write a tensor of the block (through a view, a parameter, an input), or
    it runs after some of the block's nodes and before its join (a layer of the
    block may read the state it writes: converting would reorder the two). A
    write after the fork but before the block computes anything (a counter
    ``self.calls.add_(1)`` between the stem and the blocks) keeps its order."""
    block = {fork, join, *region}
    start = min(graph.position(node) for node in (join, *region))
    end = graph.position(join)
    for write, aliases in graph.hidden.items():
        if start < graph.position(write) <= end or aliases & block:
            return (
                f"{write.name} ({op_name(write)}) writes in place into a tensor that may share "
                "memory with others (a view, a parameter or an input), so the data flow does "
                "not show the write; the block is kept as it is"
            )
    return None


def _analyse_add(graph: _Graph, join: Node) -> ResidualBlock | RejectedAdd:
    gm, dominator, post_dominates = graph.gm, graph.dominator, graph.post_dominates
    operands = _add_operands(join)
    constants = [op for op in operands if not isinstance(op, Node) or op not in dominator]
    if _zero_add_input(join) is not None:
        return RejectedAdd(
            join,
            "adds zero (Python's sum() starts at 0); the add that reads it sees the other operand",
        )
    if constants:
        described = ", ".join(
            f"{op.op} {op.target}" if isinstance(op, Node) else repr(op) for op in constants
        )
        return RejectedAdd(join, f"adds a constant ({described}), not a residual branch")
    out_reason = _out_reason(join)
    if out_reason is not None:
        return RejectedAdd(join, out_reason)
    if not join.users:
        return RejectedAdd(join, "result of the add is never used")
    if not post_dominates.reaches_output(join):
        return RejectedAdd(join, "result of the add reaches neither the output nor a side effect")
    fork = dominator[join]
    if fork is SOURCE:
        return RejectedAdd(join, "operands come from different model inputs: no single fork")
    first, second = operands
    if first is second:
        return RejectedAdd(join, f"adds {first.name} to itself, not a residual branch")

    region = _region(fork, join, dominator)
    hidden_reason = _hidden_write_reason(graph, join, fork, region)
    if hidden_reason is not None:
        return RejectedAdd(join, hidden_reason)
    tapped = [
        node
        for node in region
        if not post_dominates(join, node)
        and any(
            user is not join and user not in region and post_dominates.reaches_output(user)
            for user in node.users
        )
    ]
    zero_added = [op for op in operands if _zero_add_input(op) is fork]
    kept = None
    if fork in operands or zero_added:
        shortcut_out = fork if fork in operands else zero_added[0]
        branch_out = second if first is shortcut_out else first
        shortcut = "identity"
        kept = _partial_channels(branch_out, tapped)
    elif (scaled := _scaled_shortcut(fork, operands, dominator)) is not None:
        shortcut_out, kept = scaled
        branch_out = second if first is shortcut_out else first
        shortcut = "projection"
    else:
        projection = _projection_operand(gm, fork, first, second, dominator)
        if projection is None:
            return RejectedAdd(
                join,
                f"joins parallel branches from {fork.name} ({first.name}, {second.name}); "
                "neither is a shortcut (multi-branch / Inception-style add)",
            )
        shortcut_out = projection
        branch_out = second if projection is first else first
        shortcut = "projection"
    scale = _branch_scale(join, branch_out)
    if isinstance(scale, str):
        return RejectedAdd(join, scale)
    ordered_region = [node for node in gm.graph.nodes if node in region]
    return ResidualBlock(
        name=_block_name(join, ordered_region),
        fork=fork,
        join=join,
        branch_out=branch_out,
        shortcut_out=shortcut_out,
        region=ordered_region,
        shortcut=shortcut,
        post_op=_post_op(gm, join),
        tapped=tapped,
        branch_scale=scale,
        kept=kept,
    )


def _scaled_shortcut(
    fork: Node, operands: tuple[Node, Node], dominator: dict
) -> tuple[Node, tuple[KeptReason, str]] | None:
    """The operand ``fork * c`` / ``fork / c`` (``c`` a number or a value computed
    from parameters alone: a gain), when exactly one operand is one, with the
    reason the block is kept: ``y1 = c * x1 + F(x2)`` is no additive coupling."""
    found = []
    for operand in operands:
        if not (is_scale(operand) and not operand.kwargs and len(operand.args) == 2):
            continue
        divides = operand.target in (operator.truediv, torch.div, "div", "div_")
        # c * x scales x as x * c does; c / x does not
        tensor, gain = operand.args if divides or operand.args[0] is fork else operand.args[::-1]
        if tensor is fork and not (isinstance(gain, Node) and gain in dominator):
            shown = gain.name if isinstance(gain, Node) else repr(gain)
            found.append((operand, shown))
    if len(found) != 1:
        return None
    ((operand, shown),) = found
    detail = (
        f"{operand.name} ({op_name(operand)} by {shown}) scales its shortcut: an additive "
        "coupling adds its branch to an unscaled trunk"
    )
    return operand, (KeptReason.SCALED_SHORTCUT, detail)


def _partial_channels(branch_out: Node, tapped: list[Node]) -> tuple[KeptReason, str] | None:
    """Why a block whose shortcut is added to a channel slice of a wider branch
    output (ReXNet: ``torch.cat([h[:, :C] + x, h[:, C:]], 1)``) is kept, or None:
    the other channels of ``h`` bypass the add, so the block's output is wider
    than its input and is no coupling."""
    if not (branch_out.op == "call_function" and branch_out.target is operator.getitem):
        return None
    sliced, index = branch_out.args
    if sliced not in tapped or not isinstance(index, tuple):
        return None
    bounded = [
        (dim, part)
        for dim, part in enumerate(index)
        if not (isinstance(part, slice) and part == slice(None))
    ]
    if len(bounded) != 1 or not isinstance(bounded[0][1], slice):
        return None
    dim, part = bounded[0]
    start = 0 if part.start is None else part.start
    return KeptReason.PARTIAL_CHANNELS, (
        f"the shortcut is added to {sliced.name}[{start}:{part.stop}] along dim {dim}; "
        "its other channels bypass the add"
    )


def _region(fork: Node, join: Node, dominator: dict) -> set[Node]:
    """Nodes on paths fork -> join, both excluded.

    Walking backwards from ``join`` and stopping at ``fork`` visits exactly
    these nodes plus constants (nodes unreachable from the source, absent from
    ``dominator``): ``fork`` dominates ``join``, so no other path reaches it.
    """
    return _backward_closure(join.all_input_nodes, stop=fork, dominator=dominator)


def _backward_closure(starts: Iterable[Node], stop: Node, dominator: dict) -> set[Node]:
    seen: set[Node] = set()
    pending = [node for node in starts if node is not stop and node in dominator]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        pending.extend(inp for inp in node.all_input_nodes if inp is not stop and inp in dominator)
    return seen


def _projection_operand(
    gm: GraphModule, fork: Node, first: Node, second: Node, dominator: dict
) -> Node | None:
    """The operand computed from ``fork`` without a nonlinearity, when exactly
    one of the two is (the projection shortcut); else None."""
    first_path = _backward_closure([first], stop=fork, dominator=dominator)
    second_path = _backward_closure([second], stop=fork, dominator=dominator)
    first_nonlinear = any(_is_nonlinear(gm, node) for node in first_path - second_path)
    second_nonlinear = any(_is_nonlinear(gm, node) for node in second_path - first_path)
    if first_nonlinear == second_nonlinear:
        return None
    return second if first_nonlinear else first


def _is_nonlinear(gm: GraphModule, node: Node) -> bool:
    """An activation, or a leaf module that applies one as its ``act`` (timm's
    BatchNormAct2d, kept whole by timm's no-trace registry)."""
    if activation_name(gm, node):
        return True
    if node.op != "call_module":
        return False
    act = getattr(gm.get_submodule(node.target), "act", None)
    return isinstance(act, torch.nn.Module) and type(act).__name__.lower() in ACTIVATION_NAMES


def _post_op(gm: GraphModule, join: Node) -> Node | None:
    if len(join.users) != 1:
        return None
    (user,) = join.users
    name = activation_name(gm, user)
    if name is None or name in NOT_ELEMENTWISE or user.all_input_nodes != [join]:
        return None
    return user


def _block_name(join: Node, region: list[Node]) -> str:
    add_path = module_path(join)
    region_paths = [module_path(node) for node in region]
    if add_path and all(_within(path, add_path) for path in region_paths):
        return add_path
    return common_module_prefix(region_paths) or join.name


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _make_names_unique(blocks: list[ResidualBlock]) -> None:
    """Blocks that share a name (several adds in one module forward) fall back
    to the common module prefix of their region, then to the add node's name
    within the module holding the add (``encoder.layers.encoder_layer_0.add_1``
    for ViT's attention and MLP blocks)."""

    def within_module(block: ResidualBlock) -> str:
        path = module_path(block.join)
        return f"{path}.{block.join.name}" if path else block.join.name

    for fallback in (
        lambda block: common_module_prefix(module_path(node) for node in block.region),
        within_module,
    ):
        counts: dict[str, int] = {}
        for block in blocks:
            counts[block.name] = counts.get(block.name, 0) + 1
        for block in blocks:
            if counts[block.name] > 1:
                block.name = fallback(block) or block.join.name
