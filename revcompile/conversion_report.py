"""The conversion report: what revcompile found in a model and what it does with it.

Plain dataclasses with no dependency on torch or the passes, so a report can be
printed, serialised (``to_dict`` is JSON-serialisable) and read back
(``ConversionReport.from_dict``) anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class KeptReason(Enum):
    """Why a residual block stays an ordinary (stored) block: a stable code.

    The value is the code written to JSON and asserted by tests; ``words`` is
    what the report table shows. A ``BlockReport.detail`` adds the specifics
    (which op, which node, which layer is shared).
    """

    PROJECTION = "projection"
    TAPPED = "tapped"
    NESTED = "nested"
    BROADCAST = "broadcast"
    ODD_LEFTOVER = "odd_leftover"
    NOT_HALVABLE = "not_halvable"
    READS_OUTSIDE = "reads_outside"
    SHAPE_READ = "shape_read"
    SHARES_WEIGHTS = "shares_weights"
    GRAD_MODE = "grad_mode"
    KEPT_WHOLE = "kept_whole"
    BUDGET = "budget"
    PRESERVED = "preserve_function"
    STATE_WRITTEN_LATER = "state_written_later"
    HOOKED = "hooked"
    SCALED_SHORTCUT = "scaled_shortcut"
    PARTIAL_CHANNELS = "partial_channels"
    INSIDE_BLOCK = "inside_block"
    ODD_NOT_SINGLE = "odd_leftover_not_single"

    @property
    def words(self) -> str:
        return _KEPT_WORDS[self]


_KEPT_WORDS = {
    KeptReason.PROJECTION: "projection shortcut",
    KeptReason.TAPPED: "branch output used outside the block",
    KeptReason.NESTED: "contains nested residual blocks",
    KeptReason.BROADCAST: "branch output shape differs from the shortcut's (broadcasting add)",
    KeptReason.ODD_LEFTOVER: "odd leftover",
    KeptReason.NOT_HALVABLE: "branch cannot be split into channel halves",
    KeptReason.READS_OUTSIDE: "branch reads a value from outside the block",
    KeptReason.SHAPE_READ: "the shape of a branch value is read outside the branch",
    KeptReason.SHARES_WEIGHTS: "shares weights with another part of the network",
    KeptReason.GRAD_MODE: "runs with grad disabled, or switches grad mode",
    KeptReason.KEPT_WHOLE: "inside a module traced as one call",
    KeptReason.BUDGET: "the memory plan stores or checkpoints it instead",
    KeptReason.PRESERVED: "preserve_function=True keeps the network's function",
    KeptReason.STATE_WRITTEN_LATER: (
        "reads a parameter or buffer that the forward writes in place later"
    ),
    KeptReason.HOOKED: "a layer of its branch has hooks (kept so that they run as before)",
    KeptReason.SCALED_SHORTCUT: "the shortcut is scaled (an additive coupling cannot scale it)",
    KeptReason.PARTIAL_CHANNELS: "partial-channel residual: the shortcut is added to some "
    "channels of a wider branch output",
    KeptReason.INSIDE_BLOCK: "inside the branch of an enclosing identity block, "
    "planned as part of it",
    KeptReason.ODD_NOT_SINGLE: "odd leftover that cannot be cut into a single-block coupling",
}


@dataclass
class BlockReport:
    """One residual block (one residual add), in graph order.

    ``fate`` is ``"F"`` / ``"G"`` (a branch of a coupling of stage ``stage``),
    ``"half"`` (a half-coupling), ``"single"`` (both branches of a coupling, cut
    from this one block's branch: ``leftover="single"``) or ``"kept"`` (stays an ordinary residual
    block; ``reason`` says why in words, e.g. ``"projection shortcut"``,
    ``code`` is the stable ``KeptReason`` value, e.g. ``"projection"``, and
    ``detail`` the specifics: which op, which reader, which shapes). Reports
    written before ``code`` and ``detail`` existed load with both None.
    """

    name: str
    shortcut: str
    fate: str
    stage: str | None = None
    reason: str | None = None
    code: str | None = None
    detail: str | None = None


@dataclass
class StageReport:
    """One planned reversible stage: a chain of consecutive identity blocks."""

    name: str
    blocks: list[str]
    couplings: int
    half: bool = False
    split: str = "halve"
    single: bool = False
    """Whether the stage ends with a coupling made from one block (``leftover="single"``)."""


@dataclass
class SegmentPlanReport:
    """One row of the memory plan: a run of the network and how it is trained.

    ``choice`` is ``store`` (plain autograd), ``checkpoint`` (recomputed in
    backward from its input) or ``reversible`` (a stage of couplings);
    ``predicted_bytes`` what it adds to the saved activations (a boundary tensor
    saved by two neighbours counts for the first), ``recompute_flops`` the FLOPs
    it recomputes in backward.
    """

    name: str
    choice: str
    blocks: list[str]
    predicted_bytes: int
    recompute_flops: int


@dataclass
class BudgetReport:
    """The memory planner's plan: the rows in graph order and the totals.

    ``budget_bytes`` is the limit (a fraction resolved against
    ``original_bytes``, the unconverted network's saved bytes at the example
    input); ``predicted_bytes`` the plan's saved bytes, ``measured_bytes``
    those of the converted module (``revcompile.memory.saved_activation_bytes``,
    None until measured).
    """

    budget_bytes: int
    original_bytes: int
    predicted_bytes: int
    recompute_flops: int
    preserve_function: bool
    segments: list[SegmentPlanReport] = field(default_factory=list)
    measured_bytes: int | None = None

    def table(self) -> list[str]:
        """The plan as text lines: one row per segment, then the totals."""
        rows = [
            (s.name, s.choice, f"{s.predicted_bytes:,}", f"{s.recompute_flops:,}")
            for s in self.segments
        ]
        measured = "-" if self.measured_bytes is None else f"{self.measured_bytes:,}"
        return [
            *_table(("segment", "choice", "predicted bytes", "recompute FLOPs"), rows),
            f"saved activations: {self.predicted_bytes:,} bytes predicted, {measured} measured, "
            f"budget {self.budget_bytes:,} ({self.budget_bytes / max(self.original_bytes, 1):.3f} "
            f"of the original's {self.original_bytes:,}); "
            f"{self.recompute_flops:,} FLOPs recomputed",
        ]


@dataclass
class RejectedReport:
    """An add that is not a residual block, and why."""

    node: str
    reason: str


@dataclass
class ConversionReport:
    """Everything analysis (and conversion) decided about a model.

    ``changes`` lists the rewrites conversion made (empty after ``analyze``);
    ``params_before`` / ``params_after`` count parameters of the original and
    the converted model (None when not known); ``shapes_checked`` says whether
    shapes were propagated, so that shape-based checks (broadcasting adds, odd
    channel counts) ran; ``policy`` is the storage policy of the
    non-reversible segments and ``leftover`` what happens to an odd block of a
    chain (``"store"``, ``"half"`` or ``"single"``).
    """

    blocks: list[BlockReport] = field(default_factory=list)
    stages: list[StageReport] = field(default_factory=list)
    rejected: list[RejectedReport] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    params_before: int | None = None
    params_after: int | None = None
    shapes_checked: bool = False
    policy: str | None = None
    leftover: str | None = None
    budget: BudgetReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists, strings, numbers, booleans, None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionReport:
        """Inverse of ``to_dict``: ``from_dict(r.to_dict()) == r``."""
        fields = dict(data)
        fields["blocks"] = [BlockReport(**block) for block in data.get("blocks", [])]
        fields["stages"] = [StageReport(**stage) for stage in data.get("stages", [])]
        fields["rejected"] = [RejectedReport(**item) for item in data.get("rejected", [])]
        fields["changes"] = list(data.get("changes", []))
        plan = data.get("budget")
        if plan is not None:
            segments = [SegmentPlanReport(**row) for row in plan.get("segments", [])]
            fields["budget"] = BudgetReport(**{**plan, "segments": segments})
        return cls(**fields)

    @property
    def kept(self) -> list[BlockReport]:
        """The blocks that stay ordinary residual blocks."""
        return [block for block in self.blocks if block.fate == "kept"]

    def __str__(self) -> str:
        couplings = sum(stage.couplings for stage in self.stages)
        lines = [
            f"revcompile: {len(self.blocks)} residual blocks, {len(self.stages)} reversible "
            f"stages, {couplings} couplings, {len(self.kept)} kept; shapes "
            + ("checked" if self.shapes_checked else "not checked (no example input)")
        ]
        if self.blocks:
            lines.append("")
            lines += _table(
                ("block", "shortcut", "fate", "stage", "reason"),
                [
                    (b.name, b.shortcut, b.fate, b.stage or "-", b.reason or "-")
                    for b in self.blocks
                ],
            )
        if self.stages:
            lines += ["", "stages:"]
            for stage in self.stages:
                extra = " + half-coupling" if stage.half else ""
                extra += " incl. a single-block coupling" if stage.single else ""
                lines.append(
                    f"  {stage.name}: {stage.blocks[0]} .. {stage.blocks[-1]} "
                    f"({len(stage.blocks)} blocks, {stage.couplings} couplings{extra}, "
                    f"split={stage.split})"
                )
        if self.rejected:
            lines += ["", "adds that are not residual blocks:"]
            lines += [f"  {item.node}: {item.reason}" for item in self.rejected]
        if self.budget is not None:
            lines += ["", "memory plan:"]
            lines += [f"  {line}" for line in self.budget.table()]
        if self.changes:
            lines += ["", "changes:"]
            lines += [f"  {change}" for change in self.changes]
        settings = [
            f"{name}={value}"
            for name, value in (
                ("params before", self.params_before),
                ("params after", self.params_after),
                ("policy", self.policy),
                ("leftover", self.leftover),
            )
            if value is not None
        ]
        if settings:
            lines += ["", ", ".join(settings)]
        return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    return [line(header), *map(line, rows)]
