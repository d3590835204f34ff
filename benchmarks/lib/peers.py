"""The peer libraries' forms of a benchmarked network (memcnn, revlib, momentumnet).

memcnn and revlib get a hand-written RevNet of the same depth in each
library's documented pattern; momentumnet transforms the original with its
documented drop-in call. Each library is imported only when its variant is
built (:func:`benchmarks.lib.variants.skip_reason` reports a missing one).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from benchmarks.lib.cifar import BasicBlock, CifarResNet
from benchmarks.lib.specs import parse_spec, stage_names
from tests.models import residual_function

#: A variant builder: (original network, its spec) -> the network in that form.
Builder = Callable[[nn.Module, str], nn.Module]


def _revnet_stage(
    couplings: Callable[[int, int], nn.Module],
) -> Callable[[int, int, int, int], nn.Module]:
    """Stage factory of a hand-written RevNet of the same depth.

    A stage keeps a first block that changes shape (stride 2 or a new width) as
    an ordinary :class:`BasicBlock`; every identity block becomes one additive
    coupling ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` with F and G half-width
    residual functions (Gomez et al. 2017; memcnn's ``RevBasicBlock``).
    ``couplings(channels, count)`` builds the reversible part.
    """

    def stage(in_planes: int, planes: int, stride: int, n: int) -> nn.Module:
        parts: list[nn.Module] = []
        count = n
        if stride != 1 or in_planes != planes:
            parts.append(BasicBlock(in_planes, planes, stride))
            count -= 1
        if count:
            parts.append(couplings(planes, count))
        return nn.Sequential(*parts)

    return stage


def _memcnn_couplings(channels: int, count: int) -> nn.Module:
    """memcnn's documented pattern: InvertibleModuleWrapper(AdditiveCoupling(Fm, Gm)).

    ``keep_input=False`` (memcnn frees each coupling's input and reconstructs
    it in backward) except for the first coupling of a stage: its input is the
    output of a ReLU that autograd saves, so freeing it would corrupt that
    saved tensor (memcnn documents ``keep_input=True`` for this case).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import memcnn

    half = channels // 2
    return nn.Sequential(
        *[
            memcnn.InvertibleModuleWrapper(
                fn=memcnn.AdditiveCoupling(
                    Fm=residual_function(half, half), Gm=residual_function(half, half)
                ),
                keep_input=index == 0,
                keep_input_inverse=False,
            )
            for index in range(count)
        ]
    )


def _revlib_couplings(channels: int, count: int) -> nn.Module:
    """revlib's documented ReversibleSequential: one module per half-residual (F, G, F, ...)."""
    import revlib

    half = channels // 2
    return revlib.ReversibleSequential(
        *[residual_function(half, half) for _ in range(2 * count)], split_dim=1
    )


def _hand_written_revnet(couplings: Callable[[int, int], nn.Module]) -> Builder:
    def build_revnet(model: nn.Module, spec: str) -> nn.Module:
        family, n = parse_spec(spec)
        if family != "cifar" or n is None:
            raise ValueError("the hand-written RevNets exist for the CIFAR ResNets only")
        return CifarResNet(n, _revnet_stage(couplings))

    return build_revnet


memcnn_revnet: Builder = _hand_written_revnet(_memcnn_couplings)
revlib_revnet: Builder = _hand_written_revnet(_revlib_couplings)


def momentumnet(model: nn.Module, spec: str) -> nn.Module:
    """``momentumnet.transform_to_momentumnet`` of the original's stages."""
    from momentumnet import transform_to_momentumnet

    # The documented drop-in call (README / docstring example), memory-saving mode.
    return transform_to_momentumnet(
        model, sub_layers=stage_names(model), gamma=0.9, use_backprop=False
    )
