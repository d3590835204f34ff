"""Pass 4: decide the fate of every residual block (DESIGN.md §4).

A block can become a coupling branch only when it has an identity shortcut, is
single-exit, contains no other block and adds a branch output of exactly the
shortcut's shape (when shapes are known). With ``split="halve"`` its branch
must also split into channel halves (the partition record: even channel
count, ops whose channel behaviour is known); ``split="duplicate"`` needs nothing
more (F and G keep full width on two copies of the stage input);
``split="auto"`` halves a stage when every block of it can be halved and
duplicates it otherwise. Candidate blocks form chains: block k+1 follows
block k when k's output (its add, or its post-op) is exactly k+1's fork and
nothing else reads it. A chain of n blocks gives n // 2 couplings ``(F, G) =
(blocks 2i, 2i+1)``; the post-op of the block before a branch moves to the
start of that branch (its pre-op). An odd last block is kept
(``leftover="store"``), becomes a half-coupling (``leftover="half"``), or a
coupling of its own (``leftover="single"``: F and G are the branch cut into
complementary channel slices, ``Coupling(f=block, g=block)``). Each chain with
at least one coupling is a Stage (two when a single-block coupling must halve
after full-width pairs).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

from revcompile.passes.graph_utils import (
    common_module_prefix,
    graph_position,
    has_hooks,
    stale_state_reads,
    tensor_shape,
    unique_name,
)
from revcompile.passes.ir import (
    BlockPlan,
    BranchPartition,
    Coupling,
    Plan,
    RejectedAdd,
    ResidualBlock,
    Stage,
)
from revcompile.passes.ops import grad_mode_set, reads_metadata_only, writes_in_place
from revcompile.passes.partition import channel_axes
from revcompile.passes.partition.sharing import sharing_conflicts
from torch.fx import GraphModule, Node

from revcompile import options
from revcompile.conversion_report import (
    KeptReason,
)
from revcompile.options import Leftover, Split


def plan(
    gm: GraphModule,
    blocks: list[ResidualBlock],
    rejected: list[RejectedAdd],
    partitions: Mapping[ResidualBlock, BranchPartition],
    *,
    leftover: Leftover = options.DEFAULT_LEFTOVER,
    split: Split = options.DEFAULT_SPLIT,
) -> Plan:
    """Classify, chain and pair the residual blocks of ``gm``.

    Preconditions: ``blocks`` and ``rejected`` come from
    ``revcompile.passes.find_residuals.find_residuals(gm)`` (graph order),
    ``partitions`` from ``revcompile.passes.partition.partition(gm, blocks)``;
    shapes from ``revcompile.passes.shape_prop`` are used when present
    (``meta["tensor_meta"]`` on the placeholders), skipped otherwise.

    Postconditions: ``Plan.blocks`` has exactly one BlockPlan per block, in the
    order of ``blocks``: fate ``F`` / ``G`` / ``half`` / ``single`` with its
    stage name, or ``kept`` with a KeptReason and its detail (``NOT_HALVABLE``
    when only the halving failed; ``ODD_NOT_SINGLE`` for an odd last block that
    cannot be cut into a single-block coupling; ``SHARES_WEIGHTS`` when its
    branch copy would untie a module or tensor it shares). With
    ``split="halve"`` a chain continues into a block only when that block
    halves with the previous block's post-op moved into it and along the same
    channel axis; otherwise a new chain starts there. With ``split="auto"`` a
    chain is cut where ``"halve"`` would cut it when all its blocks halve there
    (each piece a halve stage), and is one duplicate stage otherwise. Stages are
    in graph order with unique names that are valid attribute names not used by
    ``gm`` (``layer3_rev``), each with its split, channel axis and width, and
    every branch of a halve stage halves along that axis (what ``emit`` builds
    from ``Plan.partitions``); couplings follow their chain's order. ``gm`` is
    not modified.
    """
    options.check("leftover", leftover, Leftover)
    options.check("split", split, Split)
    shapes_known = _shapes_known(gm)
    grad_spans = _grad_mode_spans(gm)
    stale = stale_state_reads(gm)
    kept = {
        block: _grad_mode_reason(block, grad_spans)
        or _hook_reason(gm, block)
        or _stale_state_reason(block, stale)
        or _kept_reason(block, blocks, shapes_known, partitions[block], split)
        for block in blocks
    }
    # Keeping a block that would untie shared weights changes the chains: plan again.
    while True:
        block_plans, stages = _stages(gm, blocks, kept, partitions, split, leftover)
        conflicts = sharing_conflicts(gm, stages, partitions)
        if not conflicts:
            break
        kept.update({b: (KeptReason.SHARES_WEIGHTS, detail) for b, detail in conflicts.items()})
    return Plan(
        blocks=[block_plans[block] for block in blocks],
        stages=stages,
        rejected=list(rejected),
        shapes_known=shapes_known,
        partitions=dict(partitions),
    )


def _hook_reason(gm: GraphModule, block: ResidualBlock) -> tuple[KeptReason, str] | None:
    """A block whose branch calls a module with hooks of the user's: in a coupling the
    hooks would see the sliced copy's tensors and run again in recomputation."""
    for node in block.region:
        if node.op == "call_module" and has_hooks(gm.get_submodule(str(node.target))):
            return KeptReason.HOOKED, str(node.target)
    return None


def _stale_state_reason(
    block: ResidualBlock, stale: Mapping[Node, list[Node]]
) -> tuple[KeptReason, str] | None:
    """A block whose branch reads a parameter or buffer (directly, or through values
    computed from it outside the block: ``scale.clone()``) that the forward writes in
    place after the block, outside it: its recomputation would read the new value."""
    inside = set(block.region)
    seen: set[Node] = {block.fork}
    todo = [arg for node in block.region for arg in (node, *node.all_input_nodes)]
    while todo:
        read = todo.pop()
        if read in seen:
            continue
        seen.add(read)
        writes = [w for w in stale.get(read, []) if w not in inside]
        if writes:
            return KeptReason.STATE_WRITTEN_LATER, (
                f"{read.name} reads what {writes[0].name} writes in place after the block"
            )
        if read not in inside:
            todo += read.all_input_nodes
    return None


def _grad_mode_spans(gm: GraphModule) -> tuple[dict[Node, int], list[Node], set[Node]]:
    """Graph positions, the grad-mode switches, and the nodes that run with grad off."""
    position: dict[Node, int] = {}
    switches: list[Node] = []
    no_grad: set[Node] = set()
    enabled = True
    for i, node in enumerate(gm.graph.nodes):
        position[node] = i
        mode = grad_mode_set(node)
        if mode is not None:
            switches.append(node)
            enabled = mode
        elif not enabled:
            no_grad.add(node)
    return position, switches, no_grad


def _grad_mode_reason(
    block: ResidualBlock, spans: tuple[dict[Node, int], list[Node], set[Node]]
) -> tuple[KeptReason, str] | None:
    """A block whose fork..output span switches grad mode or runs without grad is
    kept: a coupling (or a stage boundary) would change which ops record grad.
    Stages hold only blocks outside such spans, so no stage or checkpointed
    segment boundary falls inside a span."""
    position, switches, no_grad = spans
    start, end = position[block.fork], position[block.output]
    inside = [n.name for n in switches if start < position[n] <= end]
    if inside:
        return KeptReason.GRAD_MODE, f"{', '.join(inside)} switches grad mode inside the block"
    quiet = [n.name for n in (*block.region, block.join) if n in no_grad]
    if quiet:
        return KeptReason.GRAD_MODE, f"{quiet[0]} runs with grad disabled"
    return None


def _stages(
    gm: GraphModule,
    blocks: list[ResidualBlock],
    kept: Mapping[ResidualBlock, tuple[KeptReason, str] | None],
    partitions: Mapping[ResidualBlock, BranchPartition],
    split: Split,
    leftover: Leftover,
) -> tuple[dict[ResidualBlock, BlockPlan], list[Stage]]:
    """Chain and pair the blocks not ``kept``: every block's BlockPlan and the stages."""
    block_plans = {
        block: BlockPlan(block, "kept", None, *(kept[block] or (None, ""))) for block in blocks
    }
    candidates = [block for block in blocks if kept[block] is None]
    stages: list[Stage] = []
    used_names = set(dict(gm.named_modules())) | set(dir(gm))
    chains = residual_chains(gm, candidates, _follows(partitions, split))
    if split == "auto":
        chains = [run for chain in chains for run in _halving_runs(chain, partitions) or [chain]]
    for chain in chains:
        chain_stages, refusal = _chain_stages(chain, partitions, split, leftover)
        for i, couplings in enumerate(filter(None, chain_stages)):
            # the chain names its stage; a single-block stage split off after it, its block
            named = chain if i == 0 else [b for c in couplings for b in c.blocks]
            name = _unique_stage_name(named, used_names)
            stages.append(_stage(name, couplings, partitions, split))
            for coupling in couplings:
                for block, fate in zip(coupling.blocks, coupling.fates):
                    block_plans[block] = BlockPlan(block, fate, stage=name)
        if refusal is not None:
            block_plans[chain[-1]].reason, block_plans[chain[-1]].detail = refusal
    return block_plans, stages


def _chain_stages(
    chain: list[ResidualBlock],
    partitions: Mapping[ResidualBlock, BranchPartition],
    split: Split,
    leftover: Leftover,
) -> tuple[list[list[Coupling]], tuple[KeptReason, str] | None]:
    """The couplings of each stage made from ``chain`` (an empty list makes no
    stage) and, when its odd last block stays an ordinary block, the reason and
    detail.

    Pairs form one stage. The odd last block joins it as a half-coupling
    (``"half"``) or as a single-block coupling (``"single"``), which cuts the
    branch into channel halves and so needs a halving stage: when the pairs run
    at full width (``split="auto"`` with a block that cannot halve) it becomes
    a halve stage of its own, its pre-op staying on the trunk between the two.
    """
    pairs = _pair(chain)
    if len(chain) % 2 == 0:
        return [pairs], None
    last = chain[-1]
    pre_op = chain[-2].post_op if len(chain) > 1 else None
    if leftover == "store":
        return [pairs], (KeptReason.ODD_LEFTOVER, "")
    if leftover == "half":
        return [[*pairs, Coupling(f=last, g=None, f_pre_op=pre_op)]], None
    if split == "duplicate":
        return [pairs], (
            KeptReason.ODD_NOT_SINGLE,
            "split='duplicate' stages have no channel halves; split='halve' or 'auto' cuts them",
        )
    joins = not pairs or _stage("", pairs, partitions, split).split == "halve"
    if joins and partitions[last].halving(pre_op)[0] is not None:
        return [[*pairs, Coupling(last, last, pre_op, pre_op)]], None
    roles, reason = partitions[last].halving(None)
    if roles is None:
        return [pairs], (KeptReason.ODD_NOT_SINGLE, reason or "")
    return [pairs, [Coupling(last, last)]], None


def _follows(
    partitions: Mapping[ResidualBlock, BranchPartition], split: Split
) -> Callable[[ResidualBlock, ResidualBlock], bool]:
    """Whether a chain may continue from ``before`` into ``after`` (already
    consecutive): with ``split="halve"`` ``after`` must halve with the post-op
    of ``before`` moved into it, along the axis ``before`` halves on."""

    def follows(before: ResidualBlock, after: ResidualBlock) -> bool:
        if split != "halve":
            return True
        roles, _ = partitions[after].halving(before.post_op)
        first = partitions[before].roles
        return roles is not None and first is not None and roles.axis == first.axis

    return follows


def _halving_runs(
    chain: list[ResidualBlock], partitions: Mapping[ResidualBlock, BranchPartition]
) -> list[list[ResidualBlock]] | None:
    """``chain`` cut where ``split="halve"`` cuts chains (a post-op that cannot move
    into the next branch, another channel axis), when every block of it halves
    there; None when one does not (``split="auto"`` then duplicates the chain)."""
    follows = _follows(partitions, "halve")
    if partitions[chain[0]].roles is None:
        return None
    runs = [[chain[0]]]
    for before, after in itertools.pairwise(chain):
        if follows(before, after):
            runs[-1].append(after)
        elif partitions[after].roles is not None:
            runs.append([after])
        else:
            return None
    return runs


def _stage(
    name: str,
    couplings: list[Coupling],
    partitions: Mapping[ResidualBlock, BranchPartition],
    split: Split,
) -> Stage:
    """The stage of ``couplings``: ``"auto"`` halves it only when every branch
    halves (with its pre-op) along one axis."""
    roles = [
        partitions[block].halving(pre_op)[0]
        for coupling in couplings
        for block, pre_op in ((coupling.f, coupling.f_pre_op), (coupling.g, coupling.g_pre_op))
        if block is not None
    ]
    axes = {r.axis for r in roles if r is not None}
    if split == "halve" or (split == "auto" and None not in roles and len(axes) == 1):
        first = roles[0]
        assert first is not None  # halve: every block of the chain halves (``_follows``)
        return Stage(name, couplings, "halve", dim=first.axis, channels=first.width)
    stage_input = couplings[0].f.fork
    dim = channel_axes(stage_input)[0]
    shape = tensor_shape(stage_input)
    channels = None if shape is None else shape[dim]
    return Stage(name, couplings, "duplicate", dim=dim, channels=channels)


def _shapes_known(gm: GraphModule) -> bool:
    # a forward parameter with a default (``scale=1.0``) is not an input to shape
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder" and not node.args]
    return bool(placeholders) and all("tensor_meta" in node.meta for node in placeholders)


def _kept_reason(
    block: ResidualBlock,
    blocks: list[ResidualBlock],
    shapes_known: bool,
    part: BranchPartition,
    split: Split,
) -> tuple[KeptReason, str] | None:
    """Why ``block`` must stay an ordinary residual block, with the detail;
    None for a candidate."""
    if block.kept is not None:
        return block.kept
    if block.shortcut == "projection":
        return KeptReason.PROJECTION, ""
    if block.tapped:
        inside = set(block.region) | {block.join}
        tapped = ", ".join(node.name for node in block.tapped)
        readers = ", ".join(
            sorted(
                {user.name for node in block.tapped for user in node.users}
                - {node.name for node in inside}
            )
        )
        return KeptReason.TAPPED, f"{tapped} read by {readers}"
    region = set(block.region)
    nested = [other.name for other in blocks if other.join in region and other.kept is None]
    if nested:
        return KeptReason.NESTED, ", ".join(nested)
    if shapes_known:
        branch_shape, shortcut_shape = (
            tensor_shape(block.branch_out),
            tensor_shape(block.shortcut_out),
        )
        if branch_shape is not None and branch_shape != shortcut_shape:
            return KeptReason.BROADCAST, (
                f"branch output shape {branch_shape} != shortcut shape {shortcut_shape} "
                "(broadcasting add)"
            )
    if part.outside is not None:
        return KeptReason.READS_OUTSIDE, part.outside
    if part.shape_read is not None:
        return KeptReason.SHAPE_READ, part.shape_read
    if split == "halve" and part.roles is None:
        return KeptReason.NOT_HALVABLE, part.reason or ""
    return None


def residual_chains(
    gm: GraphModule,
    candidates: list[ResidualBlock],
    follows: Callable[[ResidualBlock, ResidualBlock], bool],
) -> list[list[ResidualBlock]]:
    """Maximal runs of candidates where each block's output is exactly the
    next block's fork and is read by nothing else (shape checks aside: they
    can read the stage input, which has the same shape), no in-place write
    outside the next block lies between them in graph order (a stage runs its
    blocks together: a buffer update between two of them, which later blocks
    may read, would move before the first) and ``follows`` agrees; graph order."""
    position = graph_position(gm.graph)
    nodes = list(gm.graph.nodes)
    by_fork: dict[Node, list[ResidualBlock]] = {}
    for block in candidates:
        by_fork.setdefault(block.fork, []).append(block)
    successor: dict[ResidualBlock, ResidualBlock] = {}
    for block in candidates:
        following = by_fork.get(block.output, [])
        if len(following) != 1:
            continue
        (next_block,) = following
        inside_next = set(next_block.region) | {next_block.join}
        between = nodes[position(block.output) + 1 : position(next_block.output)]
        if (
            all(user in inside_next or reads_metadata_only(user) for user in block.output.users)
            and not any(writes_in_place(n, gm) for n in between if n not in inside_next)
            and follows(block, next_block)
        ):
            successor[block] = next_block
    has_predecessor = set(successor.values())
    chains = []
    for block in candidates:
        if block in has_predecessor:
            continue
        chain = [block]
        while chain[-1] in successor:
            chain.append(successor[chain[-1]])
        chains.append(chain)
    return chains


def _pair(chain: list[ResidualBlock]) -> list[Coupling]:
    """Couplings (blocks 2i, 2i+1) of a chain. Pre-ops are the post-ops of the
    preceding block in the chain."""

    def post_op_before(index: int) -> Node | None:
        return chain[index - 1].post_op if index > 0 else None

    return [
        Coupling(
            f=chain[i],
            g=chain[i + 1],
            f_pre_op=post_op_before(i),
            g_pre_op=post_op_before(i + 1),
        )
        for i in range(0, len(chain) - 1, 2)
    ]


def _unique_stage_name(chain: list[ResidualBlock], used_names: set[str]) -> str:
    prefix = common_module_prefix(block.name for block in chain).replace(".", "_")
    return unique_name(f"{prefix}_rev" if prefix else "rev", used_names)
