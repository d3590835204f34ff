"""Pass 8: every ``state_dict`` key of the original outside the stages stays loadable.

fx keeps only what the traced graph uses, and under the first name it finds:
a submodule ``forward`` never calls (an auxiliary head kept for checkpoints)
is dropped, and a tensor tied under two names (``blocks.1.gamma is
blocks.0.gamma``) keeps one. Both would make ``gm.load_state_dict(original
checkpoint)`` fail outside the converted blocks, and they are no part of the
RevNet rewrite (shared/DESIGN.md §9). This pass puts them back under their
original names::

    >>> traced = traced_tensors(gm)          # right after tracing
    >>> ...                                  # the rewriting passes
    >>> restore_state_keys(gm, model, traced)  # before gm takes its own copies

The keys of converted blocks live in their stage,
``<stage>.couplings.<i>.<F|G>.<original key>`` (sliced under
``split="halve"``), and those of checkpointed segments under
``<segment>.body.<original key>``; they count as present.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn
from torch.fx import GraphModule

from revcompile.runtime import CheckpointedSegment, ReversibleSequence

__all__ = ["original_key", "restore_state_keys", "traced_tensors"]


def traced_tensors(gm: GraphModule) -> frozenset[int]:
    """The ``id`` of every parameter and buffer the traced graph can reach."""
    return frozenset(id(t) for t in chain(gm.parameters(), gm.buffers()))


def original_key(gm: nn.Module, key: str) -> str:
    """The name in the original model of the ``gm`` state_dict key ``key``: the
    ``<stage>.couplings.<i>.<F|G>.`` and ``<segment>.body.`` prefixes removed."""
    parts = key.split(".")
    module: nn.Module = gm
    for i, part in enumerate(parts[:-1]):
        module = module._modules.get(part)  # type: ignore[assignment]
        if module is None:
            break
        if isinstance(module, ReversibleSequence) and len(parts) > i + 4:
            return original_key(module.couplings[int(parts[i + 2])], ".".join(parts[i + 4 :]))
        if isinstance(module, CheckpointedSegment) and parts[i + 1] == "body":
            return original_key(module.body, ".".join(parts[i + 2 :]))
    return key


def restore_state_keys(gm: GraphModule, model: nn.Module, traced: frozenset[int]) -> list[str]:
    """Put back the original's state_dict keys that tracing or rewriting lost.

    Preconditions: ``gm`` was traced from ``model`` (it still holds ``model``'s
    own tensors, not copies); ``traced`` is ``traced_tensors`` of the traced
    graph.
    Postconditions: each key of ``model.state_dict()`` whose tensor the graph
    never reached, or reaches under another name, is a key of ``gm`` again
    (a whole unused submodule is attached as itself; a tied tensor's second
    name holds what its first name holds, the stage's copy if a stage took
    it); keys whose tensor a stage sliced stay only in the stage. Returns the
    keys restored.
    """
    present = {original_key(gm, k): t for k, t in gm.state_dict(keep_vars=True).items()}
    in_gm = {id(t) for t in present.values()}
    original = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for key, tensor in original.items():
        names.setdefault(id(tensor), []).append(key)
    restored = []
    for key, tensor in original.items():
        if key in present:
            continue
        counterpart: torch.Tensor | None = tensor
        if id(tensor) in traced and id(tensor) not in in_gm:
            # Rewritten: a tied name follows the copy its other name now has, unless sliced.
            counterpart = next(
                (
                    present[name]
                    for name in names[id(tensor)]
                    if name in present and present[name].shape == tensor.shape
                ),
                None,
            )
        if counterpart is not None and _place(gm, model, key, counterpart, traced):
            restored.append(key)
            present[key] = counterpart
    return restored


def _place(
    gm: GraphModule, model: nn.Module, key: str, tensor: torch.Tensor, traced: frozenset[int]
) -> bool:
    """Register ``tensor`` at ``key`` in ``gm``; a whole submodule of ``model``
    that the graph never reached is attached instead of its tensors one by one."""
    *path, field = key.split(".")
    owner: nn.Module = gm
    for i, part in enumerate(path):
        child = owner._modules.get(part)
        if child is None and hasattr(owner, part):
            return False
        if child is None:
            original = model.get_submodule(".".join(path[: i + 1]))
            if not any(id(t) in traced for t in original.state_dict(keep_vars=True).values()):
                owner.add_module(part, original)
                return True
            child = nn.Module()
            owner.add_module(part, child)
        if isinstance(child, (ReversibleSequence, CheckpointedSegment)):
            return False
        owner = child
    if hasattr(owner, field):
        return False
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(field, tensor)
    else:
        owner.register_buffer(field, tensor)
    return True
