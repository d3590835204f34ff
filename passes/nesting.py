"""Pass 3a: which level of nested residual blocks planning may convert.

A block inside the branch of another (ConvNeXt-V2's GRN ``x + gamma * ...``
inside the MLP, Res2Net's hierarchical adds inside a bottleneck, a chain of
blocks inside a global residual) cannot convert together with the block around
it: a coupling's branch is copied whole. ``find_residuals`` calls
``resolve_nesting`` on its blocks to choose, for each enclosing block, the
level that converts more:

- the enclosing block, when it is a candidate (identity shortcut, not tapped,
  not kept already) and either it chains with a neighbour (so it can pair) or
  no chain of two candidate blocks lies inside it: every block inside it is
  then part of its branch, kept as ``KeptReason.INSIDE_BLOCK``;
- otherwise the blocks inside it, which planning then sees as usual (and keeps
  the enclosing block as ``KeptReason.NESTED`` while one of them may convert).

Chains are found on the graph alone (``plan``'s chaining without its halving
test), before partitioning: an enclosing pair that later cannot
halve with ``split="halve"`` stays kept with its inner blocks.
"""

from __future__ import annotations

from revcompile.passes.ir import ResidualBlock
from revcompile.passes.plan import residual_chains

from revcompile.conversion_report import KeptReason


def resolve_nesting(blocks: list[ResidualBlock]) -> None:
    """Mark the blocks inside a preferred enclosing block (module docstring).

    Preconditions: ``blocks`` come from ``find_residuals`` (graph order, unique
    names, ``kept`` set for the reasons it found). Postconditions: each block
    whose ``join`` lies in the region of a preferred enclosing block, and that
    had no ``kept`` reason, has ``kept = (INSIDE_BLOCK, <enclosing name>)``;
    no other block changes. Outermost blocks are decided first, so a block
    inside a marked one is marked with the outermost name.
    """
    regions = {block: set(block.region) for block in blocks}
    around = {b: frozenset(o for o in blocks if b.join in regions[o]) for b in blocks}
    inside = {outer: [b for b in blocks if outer in around[b]] for outer in blocks}
    # Chains of one level: a block inside the next one's branch may share its fork.
    levels: dict[frozenset[ResidualBlock], list[ResidualBlock]] = {}
    for block in blocks:
        if _candidate(block):
            levels.setdefault(around[block], []).append(block)
    length = {
        block: len(chain)
        for level in levels.values()
        # plan's chains without its halving test (``follows``)
        for chain in residual_chains(level[0].join.graph.owning_module, level, lambda *_: True)
        for block in chain
    }
    for outer in sorted(blocks, key=lambda b: len(b.region), reverse=True):
        if not inside[outer] or not _candidate(outer):
            continue
        inner_chains = any(length.get(b, 0) >= 2 for b in inside[outer])
        if length[outer] >= 2 or not inner_chains:
            for block in inside[outer]:
                if block.kept is None:
                    block.kept = (KeptReason.INSIDE_BLOCK, f"part of the branch of {outer.name}")


def _candidate(block: ResidualBlock) -> bool:
    """Whether ``block`` may become a coupling branch, as far as its shape says."""
    return block.shortcut == "identity" and not block.tapped and block.kept is None
