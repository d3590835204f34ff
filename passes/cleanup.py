"""Pass 7: leave a valid, readable GraphModule behind.

Runs last. Dead nodes (left by the rewrites) and the submodules nothing calls
any more are removed, the graph is linted and the code regenerated.
"""

from __future__ import annotations

from torch.fx import GraphModule


def cleanup(gm: GraphModule) -> GraphModule:
    """Remove dead code and unused submodules, lint, recompile; returns ``gm``.

    Preconditions: the graph's nodes are in topological order.
    Postconditions: ``gm.graph.lint()`` passes; ``gm.code`` matches the graph;
    ``gm`` holds only the submodules and attributes its graph uses.
    """
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
