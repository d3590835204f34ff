"""Weight sharing across branches: which tensors the planned branches read, and how.

A module or tensor used in several places must stay shared after conversion
(DESIGN.md §9). ``build_branch`` gives every branch private copies; with one
memo per conversion, branches that cut the same tensor the same way get the
same copy, and an unsliced copy can replace the original where the rest of the
network uses it directly. Everything else would silently untie weights:
``sharing_conflicts`` names the blocks that must stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from revcompile.passes.ir import BranchPartition, ChannelRoles, ResidualBlock, Stage
from torch import nn
from torch.fx import GraphModule, Node

Half = str | None
"""``"low"`` / ``"high"``: the half of the stage's channels a layer side keeps."""

# F reads x2 (the high half) and writes y1 (the low half); G the other way round.
BRANCH_HALVES: dict[str, dict[str | None, Half]] = {
    "F": {"in": "high", "out": "low", None: None},
    "G": {"in": "low", "out": "high", None: None},
}


@dataclass(frozen=True)
class Site:
    """One use of a tensor: through ``owner`` (the module called, or the tensor
    read by ``get_attr``), by the branch of ``block`` (None: the rest of the
    network), cut as ``cut`` (the halves a module keeps of its input and output,
    or a tensor of its channel dim, twice; (None, None) when not cut)."""

    owner: int
    name: str
    block: ResidualBlock | None
    cut: tuple[Half, Half]
    own_copy: bool = False
    """The use gets a copy of its own: G of a single-block coupling (``emit``)."""


def branch_sites(
    gm: GraphModule,
    stages: list[Stage],
    partitions: Mapping[ResidualBlock, BranchPartition],
) -> tuple[list[tuple[torch.Tensor, Site]], set[Node]]:
    """The tensor uses of every planned branch, and the nodes the stages absorb."""
    sites: list[tuple[torch.Tensor, Site]] = []
    absorbed: set[Node] = set()
    for stage in stages:
        for coupling in stage.couplings:
            for block, pre_op, which in (
                (coupling.f, coupling.f_pre_op, "F"),
                (coupling.g, coupling.g_pre_op, "G"),
            ):
                if block is None:
                    continue
                part = partitions[block]
                roles = part.halving(pre_op)[0] if stage.split == "halve" else None
                nodes = [*part.nodes, *([pre_op] if pre_op is not None else [])]
                absorbed.update(block.region, (block.join,), nodes)
                own_copy = which == "G" and coupling.g is coupling.f
                for node in nodes:
                    for used in _reads(node):
                        sites += _node_sites(gm, used, block, roles, BRANCH_HALVES[which], own_copy)
    return sites, absorbed


def _reads(node: Node) -> list[Node]:
    """The nodes whose module or tensor ``node`` uses: itself, its ``get_attr`` inputs."""
    return [node, *(arg for arg in node.all_input_nodes if arg.op == "get_attr")]


def _node_sites(
    gm: GraphModule,
    node: Node,
    block: ResidualBlock | None,
    roles: ChannelRoles | None,
    halves: Mapping[str | None, Half],
    own_copy: bool = False,
) -> Iterator[tuple[torch.Tensor, Site]]:
    target = str(node.target)
    if node.op == "call_module":
        mod = gm.get_submodule(target)
        sides = roles.modules.get(target) if roles is not None else None
        cut = (None, None) if sides is None else (halves[sides[0]], halves[sides[1]])
        for name, tensor in _tensors(mod):
            yield (
                tensor,
                Site(id(mod), f"{target}.{name}" if name else target, block, cut, own_copy),
            )
    elif node.op == "get_attr":
        value = gm
        for part in target.split("."):
            value = getattr(value, part)
        if isinstance(value, torch.Tensor):
            side = roles.attrs.get(target) if roles is not None else None
            cut = (None, None) if side is None else (halves[side[0]], halves[side[0]])
            yield value, Site(id(value), target, block, cut, own_copy)
        elif isinstance(value, nn.Module):
            for name, tensor in _tensors(value):
                yield tensor, Site(id(value), f"{target}.{name}", block, (None, None), own_copy)


def _tensors(mod: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from mod.named_parameters(remove_duplicate=False)
    yield from mod.named_buffers(remove_duplicate=False)


def sharing_conflicts(
    gm: GraphModule,
    stages: list[Stage],
    partitions: Mapping[ResidualBlock, BranchPartition],
) -> dict[ResidualBlock, str]:
    """The planned blocks whose branch copies would untie a shared tensor, with
    the detail (``"shares blocks.0.gamma with blocks.1"``).

    A tensor may be shared by several branches when every branch reaches it
    through the same module or attribute cut the same way (one copy then
    serves them all), and with the rest of the network only when that use is
    direct and no branch cuts it (the unsliced copy replaces the original there
    too). The one block of a single-block coupling reaches its layers twice,
    for F and for G's own copies; that is not sharing, but any other use of
    those layers is. ``gm`` is not modified.
    """
    sites, absorbed = branch_sites(gm, stages, partitions)
    for node in gm.graph.nodes:
        if node not in absorbed:
            for used in _reads(node):
                if node.op == "call_module" or used is not node:
                    sites += _node_sites(gm, used, None, None, BRANCH_HALVES["F"])
    by_tensor: dict[int, list[Site]] = {}
    for tensor, site in sites:
        by_tensor.setdefault(id(tensor), []).append(site)
    conflicts: dict[ResidualBlock, str] = {}
    for uses in by_tensor.values():
        in_branches = [site for site in uses if site.block is not None]
        outside = [site for site in uses if site.block is None]
        ways = {(site.owner, site.cut, site.own_copy) for site in in_branches}
        one_owner = len({site.owner for site in uses}) == 1
        if not in_branches or (
            len(ways) == 1 and one_owner and (not outside or in_branches[0].cut == (None, None))
        ):
            continue
        # A single-block coupling's F and G copy one block's layers (cut into
        # complementary halves, or whole): nothing the original shared is untied.
        if one_owner and not outside and len({site.block for site in in_branches}) == 1:
            continue
        for site in in_branches:
            others = {
                "the rest of the network" if other.block is None else other.block.name
                for other in uses
                if other.block is not site.block
            } or {"itself"}
            conflicts.setdefault(site.block, f"shares {site.name} with {', '.join(sorted(others))}")
    return conflicts
