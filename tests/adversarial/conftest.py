"""Put tests/ on sys.path so that the adversarial suite can import ``models`` and
``equivalence`` next to its own ``generator`` and ``checks``."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
