"""The memory planner's dynamic programme against brute force, on generated problems.

A problem is a chain of units between boundaries with options over runs of
units (storing, checkpointing, reversible). Brute force enumerates every way
to cover the units with options and counts the saved bytes independently of
the planner: the set of distinct boundary storages any option saves, plus each
option's internal bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis.strategies as st
from hypothesis import given, settings
from revcompile.passes.budget import _shared_storage_cuts, _Units
from revcompile.passes.budget_solver import (
    Option,
    Problem,
    contributions,
    min_bytes,
    plan_bytes,
    solve,
)

from revcompile.memory.segments import Attribution


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    n = draw(st.integers(1, 6))
    sizes = st.integers(0, 50)
    boundary = tuple(draw(sizes) for _ in range(n + 1))
    options = [
        Option(u, u + 1, "store", draw(sizes), draw(st.booleans()), draw(st.booleans()), 0)
        for u in range(n)
    ]
    for start in range(n):
        for stop in range(start + 1, n + 1):
            kind = draw(st.sampled_from(["none", "checkpoint", "reversible", "both"]))
            flops = draw(st.integers(0, 40))
            if kind in ("checkpoint", "both"):
                held = draw(st.integers(0, 150))
                options.append(Option(start, stop, "checkpoint", 0, True, False, flops, None, held))
            if kind in ("reversible", "both"):
                options.append(
                    Option(
                        start,
                        stop,
                        "reversible",
                        draw(sizes),
                        draw(st.booleans()),
                        draw(st.booleans()),
                        draw(st.integers(0, 40)),
                        stage=f"s{start}_{stop}",
                    )
                )
    return Problem(boundary, tuple(options))


def plans(problem: Problem, start: int = 0) -> Iterator[list[Option]]:
    """Every sequence of options covering units ``start ..`` exactly once."""
    n = len(problem.boundary_bytes) - 1
    if start == n:
        yield []
        return
    for option in problem.options:
        if option.start == start:
            for rest in plans(problem, option.stop):
                yield [option, *rest]


def saved(problem: Problem, plan: list[Option]) -> int:
    """Bytes of a plan: internal bytes, plus each boundary once if anyone saves it."""
    boundaries = {o.start for o in plan if o.saves_input} | {o.stop for o in plan if o.saves_output}
    return sum(o.internal for o in plan) + sum(problem.boundary_bytes[k] for k in boundaries)


def cost(plan: list[Option]) -> tuple[int, int, int]:
    """Recomputed FLOPs, then recomputed units, then bytes held while recomputing."""
    return (
        sum(o.flops for o in plan),
        sum(o.stop - o.start for o in plan if o.choice != "store"),
        sum(o.recompute_bytes for o in plan),
    )


@settings(max_examples=100)
@given(problems(), st.integers(0, 400))
def test_dp_is_optimal_against_brute_force(problem: Problem, limit: int) -> None:
    every = list(plans(problem))
    fitting = [p for p in every if saved(problem, p) <= limit]
    chosen = solve(problem, limit)
    if not fitting:
        assert chosen is None
        return
    assert chosen is not None
    assert [o.start for o in chosen] == [0, *[o.stop for o in chosen[:-1]]]
    assert chosen[-1].stop == len(problem.boundary_bytes) - 1
    assert plan_bytes(problem, chosen) == saved(problem, chosen) <= limit
    assert cost(chosen) == min(cost(p) for p in fitting)


@given(problems())
def test_min_bytes_is_the_smallest_plan_and_the_boundary_of_feasibility(problem: Problem) -> None:
    smallest = min(saved(problem, p) for p in plans(problem))
    assert min_bytes(problem) == smallest
    assert solve(problem, smallest) is not None
    if smallest > 0:
        assert solve(problem, smallest - 1) is None


@given(problems())
def test_contributions_add_up_and_a_shared_boundary_counts_once(problem: Problem) -> None:
    for plan in plans(problem):
        parts = contributions(problem, plan)
        assert len(parts) == len(plan)
        assert sum(parts) == saved(problem, plan)


def test_unbounded_budget_stores_everything_when_storing_is_free() -> None:
    problem = Problem(
        (4, 4, 4),
        (
            Option(0, 1, "store", 10, True, True, 0),
            Option(1, 2, "store", 10, True, False, 0),
            Option(0, 2, "checkpoint", 0, True, False, 7, None, 14),
        ),
    )
    assert [o.choice for o in solve(problem, 10**9) or []] == ["store", "store"]
    # 10 + 4 (input) + 4 (boundary 1, saved by both) + 10 = 28 bytes stored
    assert plan_bytes(problem, solve(problem, 28) or []) == 28
    assert [o.choice for o in solve(problem, 27) or []] == ["checkpoint"]
    assert solve(problem, 3) is None and min_bytes(problem) == 4


def test_equal_flops_prefer_shorter_checkpointed_runs() -> None:
    """Two runs recompute what one long run does; they hold less while recomputing
    (the long one also holds boundary 1) and save boundary 1 (4 bytes) more."""
    problem = Problem(
        (4, 4, 4),
        (
            Option(0, 1, "checkpoint", 0, True, False, 5, None, 10),
            Option(1, 2, "checkpoint", 0, True, False, 5, None, 10),
            Option(0, 2, "checkpoint", 0, True, False, 10, None, 24),
        ),
    )
    assert [(o.start, o.stop) for o in solve(problem, 8) or []] == [(0, 1), (1, 2)]
    assert [(o.start, o.stop) for o in solve(problem, 7) or []] == [(0, 2)]


def test_cuts_between_units_sharing_a_storage_are_dropped() -> None:
    """A storage saved by units 0 and 2 that is no boundary between them (a view
    across a cut) joins units 0..2; one saved by the two sides of its boundary does not."""
    units = _Units(cuts=[0, 1, 2, 3, 4], boundaries=[None] * 5, nodes=[[]] * 4)
    attribution = Attribution(
        savers={10: (8, {0, 2}), 11: (8, {2, 3}), 12: (4, {1})},
        boundary_keys=[None, None, None, 11, None],
    )
    assert _shared_storage_cuts(units, attribution) == {1, 2}
