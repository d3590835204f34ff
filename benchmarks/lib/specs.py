"""Model specs: the names of the benchmarked networks, and their original form.

``"cifar-n<N>"`` is the CIFAR ResNet of He et al. (2016, §4.2) with N basic
blocks per stage (depth 6N + 2, option-A shortcuts), input 3x32x32;
``"resnet50"``, ``"resnet101"``, ``"resnet152"`` are torchvision's (random
weights), input 3x224x224.
"""

from __future__ import annotations

from torch import nn

from benchmarks.lib.cifar import CifarResNet


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``"cifar-n18"`` -> ``("cifar", 18)``; ``"resnet50"`` -> ``("resnet50", None)``."""
    if spec.startswith("cifar-n"):
        return "cifar", int(spec.removeprefix("cifar-n"))
    return spec, None


def input_chw(spec: str) -> tuple[int, int, int]:
    """Input channels, height and width of a model spec."""
    return (3, 32, 32) if parse_spec(spec)[0] == "cifar" else (3, 224, 224)


def stage_names(model: nn.Module) -> list[str]:
    """Names of the residual stages (``layer1``, ``layer2``...) of a ResNet."""
    return [name for name, _ in model.named_children() if name.startswith("layer")]


def base_model(spec: str) -> nn.Module:
    """The original network of a spec."""
    family, n = parse_spec(spec)
    if family == "cifar":
        assert n is not None
        return CifarResNet(n)
    import torchvision

    return getattr(torchvision.models, family)(weights=None)
