"""The last pass: the ConversionReport of a plan and of the rewrites that carried it out.

The report is built here only, from the Plan (each block's fate, its
``KeptReason`` code and detail, the stages, the rejected adds) and from the
rewrite records ``emit`` returns; it is attached to the converted module and
looked up again (also by ``revcompile.io`` after loading a file) here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.fx import GraphModule, Node
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from revcompile.conversion_report import (
    BlockReport,
    ConversionReport,
    KeptReason,
    RejectedReport,
    StageReport,
)
from revcompile.passes.graph_utils import module_path
from revcompile.passes.ir import BlockPlan, OpaqueBlock, Plan, Stage

REPORT_ATTRIBUTE = "revcompile_report"

ODD_LEFTOVER_HINT = "leftover='half' makes it a half-coupling"
DUPLICATE_HINT = "split='auto' or 'duplicate' converts it at full width"


class DescribedRewrite(Protocol):
    """A typed rewrite record: says in one sentence what it changed."""

    def describe(self) -> str: ...


Rewrite = str | DescribedRewrite
"""What ``emit`` returns per rewrite: a sentence, or a record that describes itself."""


def build_report(
    plan: Plan,
    rewrites: Sequence[Rewrite] = (),
    *,
    opaque: Sequence[OpaqueBlock] = (),
    params_before: int | None = None,
    params_after: int | None = None,
    policy: str | None = None,
    leftover: str | None = None,
) -> ConversionReport:
    """The user-facing ConversionReport of ``plan`` and ``rewrites``.

    Preconditions: ``plan`` comes from ``revcompile.passes.plan.plan``;
    ``rewrites`` from ``revcompile.passes.emit.emit`` on the same plan (empty
    when nothing was converted).

    Postconditions: one BlockReport per BlockPlan, in order, with the fate, the
    stage, the ``KeptReason`` value as ``code``, its ``detail`` and the table's
    words as ``reason``, then one kept BlockReport per block of ``opaque``
    (``revcompile.passes.opaque``: inside modules traced as one call); one
    StageReport per Stage; ``changes`` holds one sentence per rewrite;
    ``budget`` is the memory planner's table (the plan's own record). The
    report holds names and strings only, no fx nodes.
    """
    return ConversionReport(
        blocks=[_block_report(bp) for bp in plan.blocks] + [_opaque_report(b) for b in opaque],
        stages=[_stage_report(stage) for stage in plan.stages],
        rejected=[RejectedReport(_describe_node(item.node), item.reason) for item in plan.rejected],
        changes=[describe_rewrite(rewrite) for rewrite in rewrites],
        params_before=params_before,
        params_after=params_after,
        shapes_checked=plan.shapes_known,
        policy=policy,
        leftover=leftover,
        budget=plan.budget,
    )


def describe_rewrite(rewrite: Rewrite) -> str:
    """The report sentence of one rewrite record (a string is its own sentence)."""
    return rewrite if isinstance(rewrite, str) else rewrite.describe()


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module``, each tensor counted once.

    ``module.parameters()`` already yields a shared Parameter once; distinct
    Parameters that view the same memory (``nn.Parameter(other.weight)``) are
    tied as well and counted once too. Tensors without storage (the meta
    device) are told apart by identity only.
    """
    seen: set[tuple[int, ...]] = set()
    total = 0
    for param in module.parameters():
        key = _memory_key(param)
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


def storage_address(tensor: torch.Tensor) -> int:
    """The address of ``tensor``'s storage; 0 for tensors without data (meta, fake)."""
    if tensor.device.type == "meta" or is_fake(tensor):
        return 0
    return tensor.untyped_storage().data_ptr()


def _memory_key(tensor: torch.Tensor) -> tuple[int, ...]:
    address = storage_address(tensor)
    if address == 0:
        return (id(tensor),)
    return (address, tensor.storage_offset(), *tensor.shape, *tensor.stride())


def kept_reason_text(reason: KeptReason, detail: str) -> str:
    """The table's words for a kept block: the code's words, the detail, a hint."""
    if reason is KeptReason.NOT_HALVABLE:
        return f"{detail}; {DUPLICATE_HINT}"
    if reason is KeptReason.ODD_LEFTOVER:
        return f"{reason.words} ({ODD_LEFTOVER_HINT})"
    if reason is KeptReason.BROADCAST:
        return detail
    return f"{reason.words} ({detail})" if detail else reason.words


def attach_report(gm: GraphModule, the_report: ConversionReport) -> None:
    """Store ``the_report`` on ``gm`` so that it survives pickling and deepcopy.

    fx keeps a plain attribute through ``torch.save``/``torch.load`` but drops
    it in ``copy.deepcopy``; the attributes listed in ``meta`` under
    ``_USER_PRESERVED_ATTRIBUTES_KEY`` are restored by deepcopy (the mechanism
    torch.ao.quantization uses for the same purpose).
    """
    setattr(gm, REPORT_ATTRIBUTE, the_report)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[REPORT_ATTRIBUTE] = the_report


def report(gm: nn.Module) -> ConversionReport:
    """The ConversionReport that ``convert`` (or ``load``) attached to ``gm``."""
    found = getattr(gm, REPORT_ATTRIBUTE, None)
    if found is None:
        raise ValueError(
            f"{type(gm).__name__} was not made by revcompile.convert: it has no report"
        )
    return found


def _block_report(bp: BlockPlan) -> BlockReport:
    return BlockReport(
        name=bp.block.name,
        shortcut=bp.block.shortcut,
        fate=bp.fate,
        stage=bp.stage,
        reason=None if bp.reason is None else kept_reason_text(bp.reason, bp.detail),
        code=None if bp.reason is None else bp.reason.value,
        detail=None if bp.reason is None else bp.detail,
    )


def _opaque_report(block: OpaqueBlock) -> BlockReport:
    reason = KeptReason.KEPT_WHOLE
    detail = f"{block.module}: {block.why}"
    return BlockReport(
        name=block.name,
        shortcut=block.shortcut,
        fate="kept",
        reason=kept_reason_text(reason, detail),
        code=reason.value,
        detail=detail,
    )


def _stage_report(stage: Stage) -> StageReport:
    return StageReport(
        name=stage.name,
        blocks=[block.name for coupling in stage.couplings for block in coupling.blocks],
        couplings=sum(coupling.g is not None for coupling in stage.couplings),
        half=any(coupling.g is None for coupling in stage.couplings),
        single=any(coupling.g is coupling.f for coupling in stage.couplings),
        split=stage.split,
    )


def _describe_node(node: Node) -> str:
    path = module_path(node)
    return f"{node.name} (in {path})" if path else node.name
