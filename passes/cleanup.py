"""Pass 7: leave a valid, readable GraphModule behind.

Runs last. Dead nodes (left by the rewrites) and the submodules nothing calls
any more are removed, the graph is linted and the code regenerated. A node
whose result is unused but that has a side effect (an in-place write such as
``out.add_(x)`` or ``x.relu_()``, ``torch._assert``, ``torch._C._set_grad_enabled``,
a random op, a call of a function from outside torch) is not dead: see
``revcompile.passes.ops.has_side_effect``.
"""

from __future__ import annotations

from revcompile.passes.ops import has_side_effect
from torch.fx import GraphModule


def cleanup(gm: GraphModule) -> GraphModule:
    """Remove dead code and unused submodules, lint, recompile; returns ``gm``.

    Preconditions: the graph's nodes are in topological order.
    Postconditions: ``gm.graph.lint()`` passes; ``gm.code`` matches the graph;
    every node with a side effect is still there; ``gm`` holds only the
    submodules and attributes its graph uses.
    """
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: has_side_effect(node, gm))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
