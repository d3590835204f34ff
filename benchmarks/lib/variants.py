"""The variants: the forms in which a benchmarked network is measured.

The original network, the usual alternatives (activation checkpointing,
torch.compile with a memory budget), the peer libraries (:mod:`.peers`; each
skipped with a reason when it is not installed) and revcompile's conversions.
:func:`build` is a module-level function, so that
``functools.partial(build, spec, variant)`` is a picklable factory for
:func:`revcompile.memory.peak_step_memory`, which measures in a fresh process.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from benchmarks.lib import peers
from benchmarks.lib.specs import base_model, input_chw, stage_names

#: torch.compile's activation budget used by the ``torch_compile_budget`` variant.
COMPILE_ACTIVATION_BUDGET = 0.1


class Checkpointed(nn.Module):
    """Runs ``body`` under non-reentrant ``torch.utils.checkpoint``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=False)


class SequentialCheckpointed(nn.Module):
    """A ResNet run as one sequence (stem + blocks) with ``checkpoint_sequential``.

    ``segments = round(sqrt(number of blocks))`` (Chen et al. 2016); the head
    (pooling, classifier) runs normally.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        stem = [model.conv1, model.bn1, model.relu]
        if hasattr(model, "maxpool"):
            stem.append(model.maxpool)
        blocks = [block for name in stage_names(model) for block in getattr(model, name)]
        self.body = nn.Sequential(nn.Sequential(*stem), *blocks)
        self.segments = max(1, round(math.sqrt(len(blocks))))
        self.head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            x = checkpoint_sequential(self.body, self.segments, x, use_reentrant=False)
        else:
            x = self.body(x)
        return self.head(x)


class ReferenceMode(nn.Module):
    """Runs a converted network under ``revcompile.reference_mode()``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import revcompile

        with revcompile.reference_mode():
            return self.body(x)


def _checkpoint_per_block(model: nn.Module, spec: str) -> nn.Module:
    for name in stage_names(model):
        stage = getattr(model, name)
        setattr(model, name, nn.Sequential(*[Checkpointed(block) for block in stage]))
    return model


def _revcompile(policy: str) -> peers.Builder:
    def convert(model: nn.Module, spec: str) -> nn.Module:
        import revcompile

        return revcompile.convert(model, torch.randn(2, *input_chw(spec)), policy=policy)

    return convert


def _revcompile_reference(model: nn.Module, spec: str) -> nn.Module:
    return ReferenceMode(_revcompile("checkpoint")(model, spec))


def _torch_compile_budget(model: nn.Module, spec: str) -> nn.Module:
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = COMPILE_ACTIVATION_BUDGET
    return torch.compile(model)


class Variant(NamedTuple):
    """How to build a variant, and the peer library it needs (None: none)."""

    builder: peers.Builder
    peer: str | None = None


VARIANTS: dict[str, Variant] = {
    "original": Variant(lambda model, spec: model),
    "checkpoint_per_block": Variant(_checkpoint_per_block),
    "checkpoint_sequential": Variant(lambda model, spec: SequentialCheckpointed(model)),
    "torch_compile_budget": Variant(_torch_compile_budget),
    "memcnn_revnet": Variant(peers.memcnn_revnet, "memcnn"),
    "revlib_revnet": Variant(peers.revlib_revnet, "revlib"),
    "momentumnet": Variant(peers.momentumnet, "momentumnet"),
    "revcompile_store": Variant(_revcompile("store")),
    "revcompile_checkpoint": Variant(_revcompile("checkpoint")),
    "revcompile_reference": Variant(_revcompile_reference),
}

#: Variants measured in their own process with a time limit (slow or fragile).
ISOLATED_VARIANTS = frozenset({"torch_compile_budget"})


def build(spec: str, variant: str, seed: int = 0) -> nn.Module:
    """The network ``spec`` in form ``variant``, in train mode (picklable via partial)."""
    torch.manual_seed(seed)
    return VARIANTS[variant].builder(base_model(spec), spec).train()


def skip_reason(variant: str, peer_status: dict[str, str]) -> str | None:
    """Why ``variant`` cannot run here (its peer library is unavailable), else None."""
    peer = VARIANTS[variant].peer
    if peer is not None and peer_status[peer].startswith("unavailable"):
        return f"{peer} {peer_status[peer]}"
    return None
