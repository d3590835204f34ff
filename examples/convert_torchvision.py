"""Convert torchvision's ResNet-50 and see what it buys in activation memory.

Prints the conversion report (which residual blocks became reversible
couplings and why the others were kept), the activation bytes autograd saves
for one training forward before and after (measured at a small batch), and the
largest batch whose saved activations fit in a memory budget, from the exact
symbolic formula of saved bytes in the batch size and resolution.

    python examples/convert_torchvision.py
    python examples/convert_torchvision.py --budget-gb 80 --resolution 320

The network is randomly initialised (``weights=None``: nothing is downloaded).
The converted network is a RevNet with ResNet-50's layout, meant to be
trained; it is not a drop-in replacement for pretrained weights.
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import revcompile
from revcompile.memory import activation_memory_formula, max_batch_size, saved_activation_bytes

GIB = 2**30
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget-gb", type=float, default=16.0, help="activation memory budget in GiB"
    )
    parser.add_argument("--resolution", type=int, default=224, help="input height and width")
    parser.add_argument(
        "--batch", type=int, default=2, help="batch size of the measured forward (>= 2)"
    )
    parser.add_argument(
        "--policy",
        choices=("checkpoint", "store"),
        default="checkpoint",
        help="storage of the non-reversible segments (stem, downsampling blocks, head)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    example = torch.randn(args.batch, 3, args.resolution, args.resolution)

    revnet = revcompile.convert(resnet, example, policy=args.policy)
    print(revcompile.report(revnet))

    resnet.train()
    revnet.train()
    measured_before = saved_activation_bytes(resnet, example)
    measured_after = saved_activation_bytes(revnet, example)
    print(
        f"\nsaved activations of one training forward at batch {args.batch}, "
        f"{args.resolution}x{args.resolution}:\n"
        f"  resnet50            {measured_before / MIB:9.1f} MiB\n"
        f"  converted (RevNet)  {measured_after / MIB:9.1f} MiB"
        f"   ratio {measured_after / measured_before:.3f}"
    )

    budget_bytes = args.budget_gb * GIB
    size = {"H": args.resolution, "W": args.resolution}
    batches = []
    for model in (resnet, revnet):
        formula = activation_memory_formula(model, example)
        batches.append(max_batch_size(formula, budget_bytes, **size))
    print(
        f"\nlargest batch whose saved activations fit in {args.budget_gb:g} GiB at "
        f"{args.resolution}x{args.resolution} (exact formula in B, H, W):\n"
        f"  resnet50            {batches[0]:6d}\n"
        f"  converted (RevNet)  {batches[1]:6d}   {batches[1] / max(batches[0], 1):.1f}x\n"
        "(saved activations only: parameters, gradients, optimizer state and the\n"
        " transient memory of backward come on top)"
    )


if __name__ == "__main__":
    main()
