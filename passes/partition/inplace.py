"""In-place rewriting outside branches: out-of-place copies of in-place ops.

``build_branch`` makes every op of a branch out-of-place while copying it;
``emit`` needs the same for single ops of the main graph: the post-op applied
after a stage, and in-place writers of values backward still needs (a stage's
output, a checkpointed segment's input). ``gm`` may share modules with the
user's model, so an in-place module is copied rather than changed.
"""

from __future__ import annotations

from revcompile.passes.graph_utils import deep_copy, graph_position
from revcompile.passes.ops import out_of_place
from torch.fx import GraphModule, Node


def copy_out_of_place(gm: GraphModule, node: Node, new_input: Node, name: str) -> Node:
    """``node`` applied to ``new_input`` instead of its first argument, never in place.

    Inserted at the graph's current insertion point. An in-place module
    (``ReLU(inplace=True)``) is copied under ``name`` rather than changed.
    """
    target, args, kwargs, _ = out_of_place(node, gm)
    if node.op == "call_module" and getattr(gm.get_submodule(str(target)), "inplace", False):
        module = deep_copy(gm.get_submodule(str(target)))
        module.inplace = False
        gm.add_submodule(name, module)
        target = name
    return gm.graph.create_node(node.op, target, (new_input, *args[1:]), kwargs)


def replace_out_of_place(gm: GraphModule, node: Node, name: str) -> Node:
    """Replace the in-place ``node`` by an out-of-place copy; return the copy.

    Pre: ``node`` writes its first argument ``x`` in place. Post: the copy
    computes the written value; ``node``'s users and every later reader of
    ``x`` (graph order) read the copy, so they see what they saw before;
    ``x`` itself is no longer written.
    """
    written = node.args[0]
    assert isinstance(written, Node)
    with gm.graph.inserting_before(node):
        new = copy_out_of_place(gm, node, written, name)
    node.replace_all_uses_with(new)
    order = graph_position(gm.graph)
    for user in list(written.users):
        if user is not new and order(user) > order(node):
            user.replace_input_with(written, new)
    gm.graph.erase_node(node)
    return new
