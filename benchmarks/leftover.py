"""What the odd last block of a chain should become: stored, half-coupling or single coupling.

In resnet18/34-style layouts the first block of a stage downsamples, so a
stage of two blocks leaves one identity block: a chain of odd length. This
script compares the ``leftover`` choices of ``revcompile.convert`` on two such
digits networks (16x16, widths 8/16/32, two basic blocks per stage): ``odd``,
whose three stages all start by downsampling (every stage has one identity
block), and ``resnet18``, the layout of torchvision's resnet18 (the first stage
is an identity pair, the others downsample and then have one identity block;
``examples/train_digits.py``'s CifarResNet). They are trained and
measured with the digits recipe of :mod:`benchmarks.lib.digits`:

* ``store``: the leftover stays an ordinary block (stored or checkpointed);
* ``half``: a half-coupling ``y1 = x1 + F(x2), y2 = x2``;
* ``single``: a coupling made from the one block, F and G its branch cut into
  complementary channel slices, G with its own copy of the inner-width layers
  (what ``convert`` builds);
* ``single_tied``: the same with G's inner-width layers tied to F's (one
  parameter set, BatchNorm statistics shared: the block's own parameter
  count), to decide between tying and copying;
* ``original``: the unconverted ResNet (reference accuracy).

Per variant: saved bytes under both policies, peak step memory, parameters,
median step time and test accuracy over ``--seeds`` seeds (see
:mod:`benchmarks.lib.digits`).

    python -m benchmarks.leftover            # the committed run (minutes, 1 thread)
    python -m benchmarks.leftover --quick    # smoke test
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import revcompile
from benchmarks.lib.digits import SIZE, Comparison, run_comparison
from examples.train_digits import BasicBlock, CifarResNet
from revcompile.runtime import ReversibleSequence

WIDTHS = (8, 16, 32)
STEM_WIDTH = 8
VARIANTS = ("original", "store", "half", "single", "single_tied")


class OddStages(nn.Module):
    """A digits ResNet whose every stage starts with a downsampling (projection)
    block: ``blocks - 1`` identity blocks follow it, an odd chain for even ``blocks``."""

    def __init__(self, blocks: int = 2, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, STEM_WIDTH, 3, 1, 1, bias=False), nn.BatchNorm2d(STEM_WIDTH), nn.ReLU()
        )
        stages, in_channels = [], STEM_WIDTH
        for width in widths:
            stage = [BasicBlock(in_channels, width, 2)]
            stage += [BasicBlock(width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], 10)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


def tie(gm: nn.Module, original: nn.Module) -> nn.Module:
    """``gm`` with the inner-width layers of every single-block coupling's G replaced
    by F's: the leaf modules whose tensors keep the original's shapes (cut layers
    lose half of a dimension)."""
    single = {b.stage for b in revcompile.report(gm).blocks if b.fate == "single"}
    for stage in gm.modules():
        if not (isinstance(stage, ReversibleSequence) and stage.name in single):
            continue
        coupling = stage.couplings[-1]  # a single-block coupling ends its stage
        for path, module in list(coupling.G.named_modules()):
            tensors = dict(module.named_parameters()) | dict(module.named_buffers())
            source = dict(original.named_modules()).get(path)
            if module._modules or not tensors or source is None:
                continue
            shapes = {k: v.shape for k, v in source.state_dict().items()}
            if shapes == {k: v.shape for k, v in module.state_dict().items()}:
                owner, _, name = path.rpartition(".")
                setattr(coupling.G.get_submodule(owner), name, coupling.F.get_submodule(path))
    return gm


LAYOUTS: dict[str, Callable[[], nn.Module]] = {
    "odd": OddStages,
    "resnet18": functools.partial(CifarResNet, WIDTHS, 2),
}


def build(variant: str, layout: str, seed: int, example: Tensor, policy: str) -> nn.Module:
    """The network of ``variant``, from the same initialisation for every variant of ``seed``."""
    torch.manual_seed(seed)
    original = LAYOUTS[layout]()
    if variant == "original":
        return original
    leftover = "single" if variant == "single_tied" else variant
    gm = revcompile.convert(original, example, leftover=leftover, policy=policy)
    return tie(gm, original) if variant == "single_tied" else gm


LEFTOVER = Comparison(
    title=f"Odd leftovers: digits {SIZE}x{SIZE}, widths {'/'.join(map(str, WIDTHS))}, "
    "every stage's first block downsamples",
    plot_title="leftover: store / half / single",
    axis="layout",
    networks=tuple(LAYOUTS),
    variants=VARIANTS,
    build=build,
    columns=(
        ("layout", "layout"),
        ("leftover", "variant"),
        ("reversible identity blocks", "reversible"),
    ),
    config={"widths": WIDTHS},
)


def main(argv: list[str] | None = None) -> int:
    return run_comparison(LEFTOVER, "leftover", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
