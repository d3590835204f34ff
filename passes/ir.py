"""Data that travels between the passes.

Every pass takes a ``torch.fx.GraphModule`` plus some of these records and
returns a GraphModule plus records; nothing else is passed around. Records refer
to nodes of the traced GraphModule they were computed on, so they are only
valid for that graph (``emit`` builds a new graph and consumes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch.fx import Node

from revcompile.conversion_report import BudgetReport, KeptReason
from revcompile.options import StageSplit

ShortcutKind = Literal["identity", "projection"]
Fate = Literal["F", "G", "half", "single", "kept"]
Side = Literal["in", "out"] | None
"""Which channels of a branch a tensor is indexed by: the branch input's
(``"in"``), the branch output's (``"out"``), or an inner width (None)."""


@dataclass(eq=False)
class ResidualBlock:
    """A single-entry single-exit region ``join = shortcut + branch(fork)``.

    ``fork`` dominates ``join`` and ``join`` post-dominates ``fork``. ``region``
    holds the nodes strictly between them (the branch, plus the shortcut path
    for projection blocks), in graph order. ``branch_out`` is the argument of
    ``join`` computed by the residual branch; ``shortcut_out`` the other one
    (``fork`` itself for an identity shortcut). ``tapped`` lists the region
    nodes also read outside the block (feature taps, auxiliary heads): such a
    block is not single-exit and planning keeps it. ``branch_scale`` is the
    constant ``alpha`` of ``torch.add(shortcut, branch, alpha=a)``.
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
    branch_scale: float = 1.0
    """``a`` of ``torch.add(x, f, alpha=a)``: a coupling adds ``a * f``."""
    kept: tuple[KeptReason, str] | None = None
    """Why the block must stay as it is, when its shape alone says so (a scaled
    shortcut, a partial-channel add, a block inside another): planning keeps it."""

    @property
    def output(self) -> Node:
        """The node the rest of the network reads: the post-op, else the add."""
        return self.post_op if self.post_op is not None else self.join


@dataclass(frozen=True)
class OpaqueBlock:
    """A residual block inside ``module``, a module the trace keeps as one node
    (``why``): it is never converted, and the report lists it as kept."""

    name: str
    module: str
    shortcut: ShortcutKind
    why: str


@dataclass(eq=False)
class RejectedAdd:
    """An add-like node that is not a residual block, with the reason."""

    node: Node
    reason: str


@dataclass(frozen=True)
class ChannelRoles:
    """How a branch halves along its channel axis (the partition pass's answer).

    ``axis`` is the trunk's channel axis (1 for NCHW, -1 for channels-last),
    ``width`` its channel count. ``modules`` maps each module the branch calls
    whose channels are sliced to the sides of its input and output channels;
    ``attrs`` maps each per-channel parameter read by ``get_attr`` to its side
    and the dim of the tensor that indexes channels; ``normalized`` maps the
    ``F.layer_norm`` and ``F.group_norm`` calls to the side of the channels they
    normalize (emit rewrites their size argument). A layer
    on side ``"in"`` keeps the channels the branch reads, one on ``"out"`` the
    channels it writes; inner layers (None) keep their width.
    """

    axis: int
    width: int
    modules: Mapping[str, tuple[Side, Side]]
    attrs: Mapping[str, tuple[Side, int]]
    normalized: Mapping[Node, Side]


@dataclass(frozen=True, eq=False)
class BranchPartition:
    """What the partition pass found for the branch of one block.

    ``nodes`` are the branch's nodes in graph order (what ``build_branch``
    copies). ``outside`` says why the branch is not a function of its input
    alone (it reads another value), else None. ``roles`` are the halving roles
    of the branch alone, or None with ``reason`` (the report's words). When the
    block's fork is the post-op of another block (``pre_op``), ``pre_op_roles``
    / ``pre_op_reason`` answer the same for the branch with that post-op moved
    to its start (the block inside a chain). ``shape_read`` says which op
    outside the branch reads the shape of a branch value (``torch._assert(h.shape[1]
    == 16)``): inside a coupling that value no longer exists, so the block must
    stay as it is.
    """

    block: ResidualBlock
    nodes: tuple[Node, ...]
    outside: str | None
    roles: ChannelRoles | None
    reason: str | None
    pre_op: Node | None = None
    pre_op_roles: ChannelRoles | None = None
    pre_op_reason: str | None = None
    shape_read: str | None = None

    def halving(self, pre_op: Node | None) -> tuple[ChannelRoles | None, str | None]:
        """The roles (or the reason there are none) with or without the pre-op."""
        if pre_op is None:
            return self.roles, self.reason
        if pre_op is not self.pre_op:
            raise ValueError(f"{pre_op.name} is not the recorded pre-op of {self.block.name}")
        return self.pre_op_roles, self.pre_op_reason


@dataclass(eq=False)
class Coupling:
    """One planned coupling: ``f`` and ``g`` are consecutive identity blocks.

    ``g is None`` makes a half-coupling (y2 = x2); ``g is f`` a single-block
    coupling (F and G the two complementary channel cuts of one branch, with the
    same pre-op). ``f_pre_op`` / ``g_pre_op`` are the post-ops of the preceding
    block in the chain that move to the start of this branch (pre-activation
    form); None for the chain's first block.
    """

    f: ResidualBlock
    g: ResidualBlock | None
    f_pre_op: Node | None = None
    g_pre_op: Node | None = None

    @property
    def blocks(self) -> tuple[ResidualBlock, ...]:
        """The distinct blocks of the coupling, F's first."""
        return tuple(dict.fromkeys(b for b in (self.f, self.g) if b is not None))

    @property
    def fates(self) -> tuple[Fate, ...]:
        """The fate of each of ``blocks``."""
        if self.g is None:
            return ("half",)
        return ("single",) if self.g is self.f else ("F", "G")


@dataclass(eq=False)
class Stage:
    """A chain of couplings that becomes one ReversibleSequence.

    ``input`` is the fork of the first block; ``last_block`` the last block
    absorbed into the stage, whose post-op (if any) stays after the stage.
    ``split`` says how the stage input becomes the two coupling streams:
    channel halves with half-width branches, or two copies with full-width
    branches. ``dim`` is the channel axis the stage splits (every branch of a
    halve stage halves along it) and ``channels`` the trunk's width along it
    (None for a duplicate stage when shapes do not say).
    """

    name: str
    couplings: list[Coupling]
    split: StageSplit = "halve"
    dim: int = 1
    channels: int | None = None

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
    partitions: Mapping[ResidualBlock, BranchPartition] = field(default_factory=dict)
    """The partition records planning used, by block; ``emit`` builds from them."""
    budget: BudgetReport | None = None
    """The memory planner's table (``revcompile.passes.budget``); with it, ``emit``
    checkpoints exactly the runs of nodes tagged ``meta[CHECKPOINT_SPAN]``."""


CHECKPOINT_SPAN = "revcompile_checkpoint_span"
"""``node.meta`` key: the memory planner's number of the checkpointed run holding the node."""


# --------------------------------------------------------------------------- rewrites
# What ``emit`` changed, one record per rewrite; ``describe()`` is the report's
# sentence, the record's ``SENTENCE`` filled with its fields.


class _Described:
    SENTENCE: ClassVar[str]

    def describe(self) -> str:
        return self.SENTENCE.format(**vars(self))


@dataclass(frozen=True)
class StageEmitted(_Described):
    """``nodes`` nodes of ``couplings`` couplings became the module ``stage``."""

    SENTENCE: ClassVar[str] = (
        "{nodes} nodes of {couplings} couplings became {stage} (split={split}, dim={dim})"
    )
    stage: str
    nodes: int
    couplings: int
    split: StageSplit
    dim: int


@dataclass(frozen=True)
class PostOpPlaced:
    """Where the post-op ``post_op`` of a block went: to the start of ``branch``
    (``"F"`` or ``"G"``) of block ``block`` in ``stage``, or, with ``branch=None``,
    after ``stage`` (the post-op of the stage's last block ``block``)."""

    post_op: str
    branch: Literal["F", "G"] | None
    block: str
    stage: str

    def describe(self) -> str:
        if self.branch is None:
            return f"post-op {self.post_op} of {self.block} stays after {self.stage}"
        return (
            f"post-op {self.post_op} moved to the start of {self.branch} "
            f"({self.block}) in {self.stage}"
        )


@dataclass(frozen=True)
class SegmentCheckpointed(_Described):
    """``nodes`` non-reversible nodes became the CheckpointedSegment ``name``."""

    SENTENCE: ClassVar[str] = "{nodes} nodes checkpointed as {name}"
    name: str
    nodes: int


@dataclass(frozen=True)
class MadeOutOfPlace(_Described):
    """The in-place op ``op`` became out-of-place: it wrote ``value``, which
    backward needs (a stage output or a checkpointed segment's input)."""

    SENTENCE: ClassVar[str] = (
        "in-place {op} made out-of-place (it wrote {value}, saved for backward)"
    )
    op: str
    value: str


Rewrite = StageEmitted | PostOpPlaced | SegmentCheckpointed | MadeOutOfPlace
