"""``python -m revcompile.memory FACTORY SHAPE [DEVICE] [LOSS]``: peak step memory, as JSON.

Runs :func:`revcompile.memory.peak.measure_step_peak` in this process (start
it from a fresh shell for a clean number), e.g. ``python -m revcompile.memory
torchvision.models:resnet50 8,3,224,224 cpu cross_entropy``.
"""

from __future__ import annotations

import json
import sys

from revcompile.memory.peak import measure_step_peak


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    result = measure_step_peak(
        factory=args[0],
        input_shape=[int(s) for s in args[1].split(",")],
        device=args[2] if len(args) > 2 else "cpu",
        loss=args[3] if len(args) > 3 else "sum",  # type: ignore[arg-type]
        warmup=True,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
