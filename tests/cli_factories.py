"""Importable model factories for the CLI tests (``tests/`` is put on PYTHONPATH
of the subprocess, so SRC is ``cli_factories:NAME``)."""

from __future__ import annotations

from models import DataDependentNet, cifar_resnet
from torch import nn


def small_resnet(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 with projection shortcuts (option B; 0.27 M parameters):
    converts in about a second, with a reversible stage in each stage. (Option A's
    zero-padding shortcut makes the symbolic memory formula specialize the batch.)"""
    model = cifar_resnet(20, "B")
    if num_classes != 10:
        model.linear = nn.Linear(model.linear.in_features, num_classes)
    return model


def untraceable() -> nn.Module:
    """Python control flow on tensor values: torch.fx cannot trace it."""
    return DataDependentNet()


def broken() -> nn.Module:
    """A factory that raises."""
    raise RuntimeError("simulated failure inside the factory")


def not_a_module() -> dict[str, int]:
    """A factory that returns something other than an nn.Module."""
    return {"answer": 42}


NOT_CALLABLE = 3
