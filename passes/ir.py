"""Data that travels between the passes.

Every pass takes a ``torch.fx.GraphModule`` plus some of these records and
returns a GraphModule plus records; nothing else is passed around. Records refer
to nodes of the traced GraphModule they were computed on, so they are only
valid for that graph (``emit`` builds a new graph and consumes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch.fx import Node

from revcompile.conversion_report import KeptReason
from revcompile.options import StageSplit

ShortcutKind = Literal["identity", "projection"]
Fate = Literal["F", "G", "half", "kept"]


@dataclass(eq=False)
class ResidualBlock:
    """A single-entry single-exit region ``join = shortcut + branch(fork)``.

    ``fork`` dominates ``join`` and ``join`` post-dominates ``fork``. ``region``
    holds the nodes strictly between them (the branch, plus the shortcut path
    for projection blocks), in graph order. ``branch_out`` is the argument of
    ``join`` computed by the residual branch; ``shortcut_out`` the other one
    (``fork`` itself for an identity shortcut). ``tapped`` lists the region
    nodes also read outside the block (feature taps, auxiliary heads): such a
    block is not single-exit and planning keeps it.
    """

    name: str
    fork: Node
    join: Node
    branch_out: Node
    shortcut_out: Node
    region: list[Node]
    shortcut: ShortcutKind
    post_op: Node | None = None
    tapped: list[Node] = field(default_factory=list)

    @property
    def output(self) -> Node:
        """The node the rest of the network reads: the post-op, else the add."""
        return self.post_op if self.post_op is not None else self.join


@dataclass(eq=False)
class RejectedAdd:
    """An add-like node that is not a residual block, with the reason."""

    node: Node
    reason: str


@dataclass(eq=False)
class Coupling:
    """One planned coupling: ``f`` and ``g`` are consecutive identity blocks.

    ``g is None`` makes a half-coupling (y2 = x2). ``f_pre_op`` / ``g_pre_op``
    are the post-ops of the preceding block in the chain that move to the start
    of this branch (pre-activation form); None for the chain's first block.
    """

    f: ResidualBlock
    g: ResidualBlock | None
    f_pre_op: Node | None = None
    g_pre_op: Node | None = None


@dataclass(eq=False)
class Stage:
    """A chain of couplings that becomes one ReversibleSequence.

    ``input`` is the fork of the first block; ``last_block`` the last block
    absorbed into the stage, whose post-op (if any) stays after the stage.
    ``split`` says how the stage input becomes the two coupling streams:
    channel halves with half-width branches, or two copies with full-width
    branches.
    """

    name: str
    couplings: list[Coupling]
    split: StageSplit = "halve"

    @property
    def input(self) -> Node:
        return self.couplings[0].f.fork

    @property
    def last_block(self) -> ResidualBlock:
        last = self.couplings[-1]
        return last.g if last.g is not None else last.f


@dataclass(eq=False)
class BlockPlan:
    """The fate of one residual block: ``reason`` (a code) and ``detail`` (the
    specifics: which op, which reader, which shapes) say why a kept block is kept."""

    block: ResidualBlock
    fate: Fate
    stage: str | None = None
    reason: KeptReason | None = None
    detail: str = ""


@dataclass(eq=False)
class Plan:
    """Output of the planning pass: one BlockPlan per block, in graph order."""

    blocks: list[BlockPlan] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    rejected: list[RejectedAdd] = field(default_factory=list)
    shapes_known: bool = False
