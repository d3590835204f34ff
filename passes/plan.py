"""Pass 4: decide the fate of every residual block (DESIGN.md §4).

A block can become a coupling branch only when it has an identity shortcut, is
single-exit, contains no other block and adds a branch output of exactly the
shortcut's shape (when shapes are known). With ``split="halve"`` its branch
must also split into channel halves (``branch_check``: even channel count,
ops whose channel behaviour is known); ``split="duplicate"`` needs nothing
more (F and G keep full width on two copies of the stage input);
``split="auto"`` halves a stage when every block of it can be halved and
duplicates it otherwise. Candidate blocks form chains: block k+1 follows
block k when k's output (its add, or its post-op) is exactly k+1's fork and
nothing else reads it. A chain of n blocks gives n // 2 couplings ``(F, G) =
(blocks 2i, 2i+1)``; the post-op of the block before a branch moves to the
start of that branch (its pre-op). An odd last block is kept
(``leftover="store"``) or becomes a half-coupling (``leftover="half"``). Each
chain with at least one coupling is a Stage.
"""

from __future__ import annotations

from collections.abc import Callable

from revcompile.passes.graph_utils import (
    common_module_prefix,
    module_path,
    tensor_shape,
    unique_name,
)
from revcompile.passes.ir import (
    BlockPlan,
    Coupling,
    Plan,
    RejectedAdd,
    ResidualBlock,
    Stage,
    StageSplit,
)
from revcompile.passes.ops import reads_metadata_only
from torch.fx import GraphModule, Node

from revcompile import options
from revcompile.conversion_report import (
    BlockReport,
    ConversionReport,
    KeptReason,
    RejectedReport,
    StageReport,
)
from revcompile.options import Leftover, Split

BranchCheck = Callable[[GraphModule, ResidualBlock], "str | None"]
"""``branch_check(gm, block)`` returns why the branch cannot be split into
channel halves (report wording, e.g. ``"unsupported op torch.flatten in
branch"``), or None when it can."""

ODD_LEFTOVER_HINT = "leftover='half' makes it a half-coupling"
DUPLICATE_HINT = "split='auto' or 'duplicate' converts it at full width"


def plan(
    gm: GraphModule,
    blocks: list[ResidualBlock],
    rejected: list[RejectedAdd],
    *,
    branch_check: BranchCheck,
    leftover: Leftover = "store",
    split: Split = "halve",
) -> Plan:
    """Classify, chain and pair the residual blocks of ``gm``.

    Preconditions: ``blocks`` and ``rejected`` come from
    ``revcompile.passes.find_residuals.find_residuals(gm)`` (graph order); shapes from
    ``revcompile.passes.shape_prop`` are used when present (``meta["tensor_meta"]`` on the
    placeholders), skipped otherwise.

    Postconditions: ``Plan.blocks`` has exactly one BlockPlan per block, in the
    order of ``blocks``: fate ``F`` / ``G`` / ``half`` with its stage name, or
    ``kept`` with a KeptReason and its detail (``NOT_HALVABLE`` when only the
    halving check failed). Stages are in graph order with unique names that are valid
    attribute names not used by ``gm`` (``layer3_rev``), each with its split;
    couplings follow their chain's order. ``branch_check`` is not called
    with ``split="duplicate"``. ``gm`` is not modified.
    """
    options.check("leftover", leftover, Leftover)
    options.check("split", split, Split)
    shapes_known = _shapes_known(gm)
    fates = {block: _kept_reason(block, blocks, shapes_known) for block in blocks}
    halving = {
        block: branch_check(gm, block)
        for block in blocks
        if fates[block] is None and split != "duplicate"
    }
    block_plans = {
        block: BlockPlan(block, "kept", None, *(fates[block] or (None, ""))) for block in blocks
    }
    if split == "halve":
        for block, reason in halving.items():
            if reason is not None:
                block_plans[block] = BlockPlan(block, "kept", None, KeptReason.NOT_HALVABLE, reason)
    candidates = [block for block in blocks if block_plans[block].reason is None]
    stages: list[Stage] = []
    used_names = set(dict(gm.named_modules())) | set(dir(gm))
    for chain in _chains(candidates):
        couplings = _pair(chain, leftover)
        if not couplings:
            block_plans[chain[0]].reason = KeptReason.ODD_LEFTOVER
            continue
        name = _unique_stage_name(chain, used_names)
        stages.append(
            Stage(name=name, couplings=couplings, split=_stage_split(split, couplings, halving))
        )
        for coupling in couplings:
            if coupling.g is None:
                block_plans[coupling.f] = BlockPlan(coupling.f, "half", stage=name)
            else:
                block_plans[coupling.f] = BlockPlan(coupling.f, "F", stage=name)
                block_plans[coupling.g] = BlockPlan(coupling.g, "G", stage=name)
        if len(chain) % 2 and leftover == "store":
            block_plans[chain[-1]].reason = KeptReason.ODD_LEFTOVER
    return Plan(
        blocks=[block_plans[block] for block in blocks],
        stages=stages,
        rejected=list(rejected),
        shapes_known=shapes_known,
    )


def _stage_split(
    split: Split, couplings: list[Coupling], halving: dict[ResidualBlock, str | None]
) -> StageSplit:
    """``"auto"`` halves a stage only when every one of its branches can be halved."""
    if split != "auto":
        return split
    stage_blocks = [b for coupling in couplings for b in (coupling.f, coupling.g) if b is not None]
    return "halve" if all(halving[block] is None for block in stage_blocks) else "duplicate"


def report_from_plan(
    plan: Plan,
    *,
    params_before: int | None = None,
    params_after: int | None = None,
    policy: str | None = None,
    leftover: str | None = None,
) -> ConversionReport:
    """The user-facing ConversionReport of ``plan`` (names and reasons only,
    no fx nodes); ``changes`` starts empty."""
    return ConversionReport(
        blocks=[
            BlockReport(
                name=bp.block.name,
                shortcut=bp.block.shortcut,
                fate=bp.fate,
                stage=bp.stage,
                reason=_reason_text(bp),
                code=None if bp.reason is None else bp.reason.value,
            )
            for bp in plan.blocks
        ],
        stages=[
            StageReport(
                name=stage.name,
                blocks=[
                    block.name
                    for coupling in stage.couplings
                    for block in (coupling.f, coupling.g)
                    if block is not None
                ],
                couplings=sum(coupling.g is not None for coupling in stage.couplings),
                half=any(coupling.g is None for coupling in stage.couplings),
                split=stage.split,
            )
            for stage in plan.stages
        ],
        rejected=[RejectedReport(_describe_node(item.node), item.reason) for item in plan.rejected],
        params_before=params_before,
        params_after=params_after,
        shapes_checked=plan.shapes_known,
        policy=policy,
        leftover=leftover,
    )


def _shapes_known(gm: GraphModule) -> bool:
    # a forward parameter with a default (``scale=1.0``) is not an input to shape
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder" and not node.args]
    return bool(placeholders) and all("tensor_meta" in node.meta for node in placeholders)


def _reason_text(bp: BlockPlan) -> str | None:
    """The report's words for why ``bp`` is kept."""
    if bp.reason is None:
        return None
    if bp.reason is KeptReason.NOT_HALVABLE:
        return f"{bp.detail}; {DUPLICATE_HINT}"
    if bp.reason is KeptReason.ODD_LEFTOVER:
        return f"{bp.reason.words} ({ODD_LEFTOVER_HINT})"
    if bp.reason is KeptReason.BROADCAST:
        return bp.detail
    return f"{bp.reason.words} ({bp.detail})" if bp.detail else bp.reason.words


def _kept_reason(
    block: ResidualBlock, blocks: list[ResidualBlock], shapes_known: bool
) -> tuple[KeptReason, str] | None:
    """Why ``block`` must stay an ordinary residual block whatever the split,
    with the detail; None for a candidate."""
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
    nested = [other.name for other in blocks if other.join in region]
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
    return None


def _chains(candidates: list[ResidualBlock]) -> list[list[ResidualBlock]]:
    """Maximal runs of candidates where each block's output is exactly the
    next block's fork and is read by nothing else (shape checks aside: they
    can read the stage input, which has the same shape); graph order."""
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
        if all(user in inside_next or reads_metadata_only(user) for user in block.output.users):
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


def _pair(chain: list[ResidualBlock], leftover: Leftover) -> list[Coupling]:
    """Couplings (blocks 2i, 2i+1) of a chain; an odd last block becomes a
    half-coupling with ``leftover="half"``. Pre-ops are the post-ops of the
    preceding block in the chain."""

    def post_op_before(index: int) -> Node | None:
        return chain[index - 1].post_op if index > 0 else None

    couplings = [
        Coupling(
            f=chain[i],
            g=chain[i + 1],
            f_pre_op=post_op_before(i),
            g_pre_op=post_op_before(i + 1),
        )
        for i in range(0, len(chain) - 1, 2)
    ]
    if len(chain) % 2 and leftover == "half":
        last = len(chain) - 1
        couplings.append(Coupling(f=chain[last], g=None, f_pre_op=post_op_before(last)))
    return couplings


def _unique_stage_name(chain: list[ResidualBlock], used_names: set[str]) -> str:
    prefix = common_module_prefix(block.name for block in chain).replace(".", "_")
    return unique_name(f"{prefix}_rev" if prefix else "rev", used_names)


def _describe_node(node: Node) -> str:
    path = module_path(node)
    return f"{node.name} (in {path})" if path else node.name
