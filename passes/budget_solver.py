"""The memory planner's optimisation: the cheapest plan within a byte limit, exactly.

A problem is a chain of units between boundaries ``0 .. n`` and options, each
covering a run of units (``revcompile.passes.budget`` builds them from a
network). Saved bytes are additive over units except at boundaries, where the storage
of the boundary tensor is saved once if the option before it saves its
output or the option after it saves its input. So the saved bytes of a plan
are ``sum(internal) + sum(boundary bytes saved by a neighbour)``, exactly, and
the cheapest plan within a byte limit is found by dynamic programming over the
boundaries with state (boundary, already saved?), keeping per state the Pareto
frontier of (exact saved bytes, recomputed FLOPs). With ``n`` units, ``m <= n +
2`` options starting at a unit and ``P`` the largest frontier (at most the
number of distinct byte totals within the limit, ``limit + 1``), it takes
``O(n * m * P)`` time, ``O(n * P)`` memory -- on the ResNets, tens of
milliseconds. Among plans with the fewest recomputed FLOPs, the one that
recomputes the fewest units, then holds the fewest bytes while recomputing
(``Option.recompute_bytes``: shorter checkpointed runs, a lower transient peak
in backward) is chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

Choice = Literal["store", "checkpoint", "reversible"]


@dataclass(frozen=True)
class Option:
    """One way to run units ``start .. stop - 1``: what it saves and recomputes.

    ``internal`` is the bytes it saves other than its boundary tensors';
    ``saves_input`` / ``saves_output`` whether it saves the storage of boundary
    ``start`` / ``stop``; ``flops`` the FLOPs it recomputes in backward;
    ``stage`` the stage of a reversible option; ``recompute_bytes`` what a
    checkpointed run holds while it is recomputed (the bytes storing it would
    save inside it).
    """

    start: int
    stop: int
    choice: Choice
    internal: int
    saves_input: bool
    saves_output: bool
    flops: int
    stage: str | None = None
    recompute_bytes: int = 0


@dataclass(frozen=True)
class Problem:
    """Units ``0 .. n-1`` between boundaries ``0 .. n`` (``boundary_bytes``), and options."""

    boundary_bytes: tuple[int, ...]
    options: tuple[Option, ...]


class _Entry(NamedTuple):
    bytes: int
    cost: tuple[int, int, int]  # recomputed FLOPs, units, bytes held while recomputing
    option: Option | None
    previous: _Entry | None


def solve(problem: Problem, limit: int) -> list[Option] | None:
    """The options (in order, covering every unit once) of the plan with the fewest
    recomputed FLOPs whose saved bytes (:func:`plan_bytes`) are at most ``limit``;
    ties go to fewer recomputed units, then fewer bytes held while recomputing,
    then fewer saved bytes. None when no plan fits.

    Precondition: every unit is covered by at least one option starting at each
    boundary a plan can reach. Exact: integer bytes, no discretisation.
    """
    n = len(problem.boundary_bytes) - 1
    starting: dict[int, list[Option]] = {}
    for option in problem.options:
        starting.setdefault(option.start, []).append(option)
    fronts: list[dict[bool, list[_Entry]]] = [{} for _ in range(n + 1)]
    fronts[0][False] = [_Entry(0, (0, 0, 0), None, None)]
    for k in range(n):
        for counted, entries in fronts[k].items():
            entries = _pareto(entries)
            for option in starting.get(k, []):
                add = _added_bytes(problem, option, counted)
                recomputed = 0 if option.choice == "store" else option.stop - option.start
                for entry in entries:
                    total = entry.bytes + add
                    if total > limit:
                        break  # entries are sorted by bytes
                    cost = (
                        entry.cost[0] + option.flops,
                        entry.cost[1] + recomputed,
                        entry.cost[2] + option.recompute_bytes,
                    )
                    fronts[option.stop].setdefault(option.saves_output, []).append(
                        _Entry(total, cost, option, entry)
                    )
    finals = [entry for entries in fronts[n].values() for entry in entries]
    if not finals:
        return None
    best: _Entry | None = min(finals, key=lambda e: (e.cost, e.bytes))
    chosen: list[Option] = []
    while best is not None and best.option is not None:
        chosen.append(best.option)
        best = best.previous
    return chosen[::-1]


def _pareto(entries: list[_Entry]) -> list[_Entry]:
    """The entries no other entry beats in both bytes and cost, by increasing bytes."""
    kept: list[_Entry] = []
    for entry in sorted(entries, key=lambda e: (e.bytes, e.cost)):
        if not kept or entry.cost < kept[-1].cost:
            kept.append(entry)
    return kept


def _added_bytes(problem: Problem, option: Option, input_counted: bool) -> int:
    """What ``option`` adds to the saved bytes when its input boundary is (not) counted."""
    b = problem.boundary_bytes
    return (
        option.internal
        + (b[option.start] if option.saves_input and not input_counted else 0)
        + (b[option.stop] if option.saves_output else 0)
    )


def contributions(problem: Problem, chosen: Sequence[Option]) -> list[int]:
    """The bytes each option of a plan adds (a boundary saved by both neighbours
    counts for the first); their sum is the plan's saved bytes."""
    added, counted = [], False
    for option in chosen:
        added.append(_added_bytes(problem, option, counted))
        counted = option.saves_output
    return added


def plan_bytes(problem: Problem, chosen: Sequence[Option]) -> int:
    """The saved bytes of a plan."""
    return sum(contributions(problem, chosen))


def min_bytes(problem: Problem) -> int:
    """The smallest saved bytes any plan of ``problem`` reaches."""
    n = len(problem.boundary_bytes) - 1
    best: list[dict[bool, int]] = [{} for _ in range(n + 1)]
    best[0][False] = 0
    for k in range(n):
        for counted, so_far in best[k].items():
            for option in problem.options:
                if option.start == k:
                    total = so_far + _added_bytes(problem, option, counted)
                    slot = best[option.stop]
                    slot[option.saves_output] = min(slot.get(option.saves_output, total), total)
    return min(best[n].values())
