"""Triage of a float64 gradient check that misses its bound: defect or conditioning?

For each coverage model (``benchmarks/lib/zoo.py``) and size: the float64
step error of ``convert(model, x)`` against ``reference_mode()``
(``max_relative_error``), how far one rounding of the stage inputs moves the
reference itself (``rounding_sensitivity``), and whether the ``exact=True``
conversion is bitwise equal to its reference (``bitwise_in_exact_mode``).
An error below the reference's own rounding sensitivity, with exact mode
bitwise, is the network's conditioning (as the adversarial suite judges it,
``tests/adversarial/checks.py``); anything else is a defect.

    python -m benchmarks.conditioning efficientnet_v2_s --sizes 32,64
"""

from __future__ import annotations

import argparse

import torch

import revcompile
from benchmarks.coverage import randomize_zero_weights
from benchmarks.lib.exactness import bitwise_in_exact_mode, max_relative_error, rounding_sensitivity
from benchmarks.lib.zoo import ZOO


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="names from benchmarks/lib/zoo.py")
    parser.add_argument("--sizes", default="32,64")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    entries = {entry.name: entry for entry in ZOO}
    for name in args.models:
        entry = entries[name]
        for size in map(int, args.sizes.split(",")):
            torch.manual_seed(0)
            model = randomize_zero_weights(entry.make(size)).train()
            x = torch.randn(entry.input_shape(size))
            converted = revcompile.convert(model, x).double().train()
            exact = revcompile.convert(model, x, exact=True).double().train()
            x = x.double()
            error = max_relative_error(converted, x).worst
            moved = rounding_sensitivity(converted, x)
            bitwise = bitwise_in_exact_mode(exact, x)
            print(
                f"{name} at {size}: error {error:.3g}, one rounding moves the reference by "
                f"{moved:.3g}, exact mode bitwise equal: {bitwise}",
                flush=True,
            )


if __name__ == "__main__":
    main()
