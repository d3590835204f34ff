"""Pass 4: channel partitioning of residual branches (DESIGN.md §5).

A coupling ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` feeds each branch one half
of the channels and adds its output to the other half. ``partition(gm,
blocks)`` analyses every block's branch once and returns frozen
``BranchPartition`` records (``revcompile.passes.ir``): the branch's nodes, the
channel axis and the side of every layer (``ChannelRoles``), or why it cannot
be halved. Planning decides with them; ``build_branch`` later copies a branch
at half width from the record alone.

Modules: ``analysis`` (channel spaces, union-find), ``rules`` (one rule per
layer type: propagate + cut, one registry; ``reshapes`` adds the rules for
shape reads and reshapes), ``slicing`` (per-layer cuts),
``branch`` (branch extraction and the standalone copy), ``inplace``
(out-of-place copies of in-place ops outside branches).

With ``reads``/``writes`` slices (F: ``reads = slice(C//2, C)``,
``writes = slice(0, C//2)``; G the other way round), the built branch satisfies
``half(x[:, reads]) == full'(x)[:, writes]`` where ``full'`` is the original
branch with the dropped input channels of its first mixing layers zeroed, in
both train and eval mode (BatchNorm and GroupNorm statistics are per channel or
per whole group). Where the branch input or output channels are reduced
together, the halved branch sees the kept half only: LayerNorm over the
channel axis, a GroupNorm of one group, and ``mean`` / ``amax`` / ``amin`` over
the channel axis change with halving, and so does a gate computed from the
output channels (squeeze-excitation at the end of a bottleneck); ``sum`` and
``norm`` over the input's channels equal those of the input with the dropped
channels zeroed (``analysis``).
"""

from __future__ import annotations

from revcompile.passes.ir import BranchPartition, ChannelRoles, ResidualBlock
from revcompile.passes.partition import reshapes  # noqa: F401 (registers its rules)
from revcompile.passes.partition.analysis import Analysis, add_pre_op, analyze
from revcompile.passes.partition.branch import (
    branch_nodes,
    build_branch,
    outside_read,
    outside_shape_read,
    pre_op_input,
)
from torch.fx import GraphModule, Node

from revcompile.errors import PartitionError

__all__ = [
    "PartitionError",
    "build_branch",
    "channel_axes",
    "partition",
    "partition_branch",
    "unsupported_reason",
]


def partition(gm: GraphModule, blocks: list[ResidualBlock]) -> dict[ResidualBlock, BranchPartition]:
    """The partition record of every block's branch, analysed once.

    Pre: ``blocks`` come from ``find_residuals(gm)``. A block whose fork is
    the post-op of another block of ``blocks`` also gets the answer with that
    post-op moved to its start (``pre_op_roles``). Projection blocks are
    recorded without analysis (``reason`` "projection shortcut"). ``gm`` is not
    modified.
    """
    post_ops = {block.post_op for block in blocks if block.post_op is not None}
    return {
        block: (
            partition_branch(gm, block, pre_op=block.fork if block.fork in post_ops else None)
            if block.shortcut == "identity"
            else BranchPartition(block, (), None, None, "projection shortcut")
        )
        for block in blocks
    }


def partition_branch(
    gm: GraphModule,
    block: ResidualBlock,
    *,
    pre_op: Node | None = None,
    axes: tuple[int, ...] | None = None,
) -> BranchPartition:
    """Analyse the branch of ``block`` (and with ``pre_op`` moved to its start).

    ``axes`` are the channel axes tried in order (default ``channel_axes``);
    the first that works is recorded. On failure the reason is that of the
    reading that got furthest through the branch (the first one on a tie).
    About 0.2 ms for a bottleneck block (parameter shapes are read, no tensor
    is touched).
    """
    nodes = branch_nodes(gm, block)
    outside = outside_read(block, nodes)
    if outside is not None:
        return BranchPartition(block, tuple(nodes), outside, None, outside, pre_op, None, outside)
    shape_read = outside_shape_read(block, nodes)
    if shape_read is not None:
        return BranchPartition(
            block, tuple(nodes), None, None, shape_read, pre_op, None, shape_read, shape_read
        )
    failures: list[PartitionError] = []
    for axis in axes or channel_axes(block.fork):
        try:
            analysis = analyze(gm, block.fork, block.branch_out, nodes, axis)
        except PartitionError as error:
            failures.append(error)
            continue
        roles = analysis.roles(axis)
        pre_roles, pre_reason = None, None
        if pre_op is not None:
            pre_roles, pre_reason = _with_pre_op(analysis, block.fork, pre_op, axis)
        return BranchPartition(
            block, tuple(nodes), None, roles, None, pre_op, pre_roles, pre_reason
        )
    reason = max(failures, key=lambda error: error.progress).reason
    return BranchPartition(block, tuple(nodes), None, None, reason, pre_op, None, reason)


def _with_pre_op(
    analysis: Analysis, fork: Node, pre_op: Node, axis: int
) -> tuple[ChannelRoles | None, str | None]:
    try:
        add_pre_op(analysis, fork, pre_op, pre_op_input(pre_op))
    except PartitionError as error:
        return None, error.reason
    return analysis.roles(axis), None


def unsupported_reason(gm: GraphModule, block: ResidualBlock) -> str | None:
    """Why the branch of ``block`` cannot become a C/2 -> C/2 function, or None
    (the report's words, after ``"kept: "``)."""
    return partition_branch(gm, block).reason


def channel_axes(fork: Node) -> tuple[int, ...]:
    """The channel axes of the trunk at ``fork`` to try, most likely first:
    tokens ``(B, T, C)`` try -1 then 1, 4-d and 5-d tensors 1 (NCHW) then -1
    (channels-last, as in Swin), others and unknown shapes 1."""
    shape = getattr(fork.meta.get("tensor_meta"), "shape", None)
    rank = None if shape is None else len(shape)
    if rank == 3:
        return (-1, 1)
    if rank is not None and rank >= 4:
        return (1, -1)
    return (1,)
