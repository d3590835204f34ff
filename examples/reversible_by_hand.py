"""Build a RevNet by hand with revcompile's reversible runtime.

For users who write reversible networks directly instead of converting a
ResNet: a ``ReversibleSequence`` of ``AdditiveCoupling(F, G)`` blocks with
custom F and G (any modules that map a half of the channels to a tensor of
the same shape). In training the stage stores only its output and
reconstructs every coupling's input in backward, so its activation memory
does not grow with depth; ``reference_mode()`` runs the same network with
ordinary autograd, which stores everything and gives the same gradients.

    python examples/reversible_by_hand.py
    python examples/reversible_by_hand.py --depths 1 4 16 --channels 64
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revcompile import AdditiveCoupling, ReversibleSequence, reference_mode
from revcompile.memory import saved_activation_bytes

MIB = 2**20


class PreActBranch(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 on ``channels`` channels: a coupling function
    (shape-preserving, as F and G must be)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def reversible_stage(channels: int, couplings: int) -> ReversibleSequence:
    """``couplings`` additive couplings on a ``channels``-wide input: F and G each
    see half of the channels (``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``)."""
    half = channels // 2
    return ReversibleSequence(
        [AdditiveCoupling(F=PreActBranch(half), G=PreActBranch(half)) for _ in range(couplings)],
        dim=1,
        name=f"rev{couplings}",
    )


class SmallRevNet(nn.Module):
    """Stem convolution, one reversible stage, global pooling and a classifier."""

    def __init__(self, channels: int, couplings: int, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.stage = reversible_stage(channels, couplings)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stage(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(F.relu(features), 1), 1))


def gradient_difference(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Largest relative L2 difference, over the parameter tensors, between the
    reversible gradients and those of ``reference_mode()`` (stored activations)."""
    model.zero_grad(set_to_none=True)
    with reference_mode():
        F.cross_entropy(model(images), labels).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    return max(
        float((p.grad - g).norm() / g.norm().clamp_min(1e-30))
        for p, g in zip(model.parameters(), reference)
    )


def training_step(channels: int, couplings: int, batch: int, size: int) -> None:
    """One SGD step of a SmallRevNet on random data, then the gradient check
    against ``reference_mode()`` in float32 and float64.

    In training mode BatchNorm normalises with batch statistics, so both runs
    compute the same function. Reconstructing inputs from outputs is exact in
    exact arithmetic; in float32 its rounding grows with depth (float64 shows
    the algorithm itself is exact).
    """
    torch.manual_seed(0)
    model = SmallRevNet(channels, couplings).train()
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()  # reversible backward: inputs of each coupling recomputed
    optimizer.step()
    print(
        f"SmallRevNet({channels} channels, {couplings} couplings): training step, loss {loss:.4f}"
    )

    for dtype in (torch.float32, torch.float64):
        difference = gradient_difference(model.to(dtype), images.to(dtype), labels)
        print(
            f"  reversible vs reference_mode gradients, {dtype}: "
            f"max relative difference {difference:.1e}"
        )


def memory_by_depth(channels: int, depths: list[int], batch: int, size: int) -> None:
    """Saved activation bytes of one stage, reversible vs ``reference_mode()``."""
    print(
        f"\nsaved activations of one training forward of a stage "
        f"(input {batch}x{channels}x{size}x{size}):"
    )
    print(f"{'couplings':>9}  {'reversible':>12}  {'reference_mode':>14}  {'ratio':>6}")
    for couplings in depths:
        torch.manual_seed(0)
        stage = reversible_stage(channels, couplings).train()
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        reversible = saved_activation_bytes(stage, x)
        with reference_mode():
            stored = saved_activation_bytes(stage, x)
        print(
            f"{couplings:>9}  {reversible / MIB:>9.2f} MiB  {stored / MIB:>11.2f} MiB  "
            f"{reversible / stored:>6.3f}"
        )
    print("(reversible: only the stage output is kept, whatever the depth)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=32, help="stage width (even)")
    parser.add_argument(
        "--depths", type=int, nargs="+", default=[1, 2, 4, 8], help="couplings per stage"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    training_step(args.channels, max(args.depths), args.batch, args.size)
    memory_by_depth(args.channels, args.depths, args.batch, args.size)


if __name__ == "__main__":
    main()
