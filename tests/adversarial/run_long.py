"""The long run of the adversarial suite: many generated networks, a summary in Markdown.

    python tests/adversarial/run_long.py --examples 1000 --out tests/adversarial/LONG_RUN.md
    python tests/adversarial/run_long.py --examples 50 --families conv,norm   # bisect a family
    python tests/adversarial/run_long.py --per-family 40                      # each family alone

Every network is converted and checked (``checks.run_subject``); nothing stops
at a defect. The summary counts networks by outcome, cases per check with at
least one defect, and each distinct defect message (numbers and block paths
normalised away) with its issue-12 class and the smallest model that shows it.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import checks  # noqa: E402
import generator  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

# Issue 12's defect classes, recognised by message; first match wins.
CLASSES: list[tuple[str, str]] = [
    (r"keyword argument 'scale'|unexpected keyword", "2: forward kwargs frozen at default"),
    (r"attribute last|Proxy", "4: original modified (attribute set in forward)"),
    (r"calls", "4: buffer update in forward (counter) lost / run on the original"),
    (r"Tried to erase Node", "5: dead code / in-place statement in a branch"),
    (r"deepcopy protocol", "5: weight_norm / prune in a branch (deepcopy)"),
    (r"\('dict'.*!= original's \('OrderedDict", "2: output container type changed"),
    (r"unsupported op|cannot be moved", "7: unmovable post-op refused for the whole model"),
    (r"inplace operation", "5: in-place op on a stage output / model input"),
    (r"does not require grad", "5: noise in a branch"),
]


TITLE = "Adversarial suite: long run"
CASE_SECONDS = 60
"""A network that takes longer is counted as ``timeout`` (and its spec listed)."""


class CaseTimeout(BaseException):  # not caught by the checks
    pass


def _timeout(signum, frame):
    raise CaseTimeout


def classify(key: str) -> str:
    for pattern, label in CLASSES:
        if re.search(pattern, key):
            return label
    return "unclassified (triage by hand: see the smallest model)"


def normalise(message: str) -> str:
    message = re.sub(r"blocks\.\d+(\.[\w]+)*", "<block>", message)
    message = re.sub(r"\b\d[\d.e+-]*\b", "#", message)
    return message[:160]


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    cases_per_check: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)
    smallest: dict[str, tuple[str, str]] = field(default_factory=dict)
    refusals: Counter = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    defective: int = 0
    out: Path | None = None  # the summary is rewritten there every 50 networks

    def add(self, spec: generator.NetSpec) -> None:
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(CASE_SECONDS)
        try:
            outcome = checks.run_subject(generator.subject(spec))
        except CaseTimeout:
            outcome = checks.Outcome("timeout", [], spec.describe())
        finally:
            signal.alarm(0)
        self.seconds.append(time.perf_counter() - start)
        self.outcomes[outcome.status] += 1
        if outcome.status in ("refused", "invalid", "timeout"):
            self.refusals[f"{outcome.status}: {normalise(outcome.message)}"] += 1
        self.defective += bool(outcome.defects)
        if self.out is not None and len(self.seconds) % 50 == 0:
            self.out.write_text(markdown(self, TITLE + " (in progress)"))
        for check in {d.check for d in outcome.defects}:
            self.cases_per_check[check] += 1
        for defect in outcome.defects:
            key = f"{defect.check}: {normalise(defect.message)}"
            self.messages[key] += 1
            known = self.smallest.get(key)
            if known is None or len(defect.model) < len(known[1]):
                self.smallest[key] = (defect.message, defect.model)


def run(tally: Tally, examples: int, families: frozenset[str] | None) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(generator.networks(families))
    def one(spec: generator.NetSpec) -> None:
        tally.add(spec)

    one()


def _ill_conditioned_line() -> str:
    cases = checks.ILL_CONDITIONED
    if not cases:
        return "No reversible step differed from reference_mode() by more than 1e-9."
    worst = max(cases)
    return (
        f"{len(cases)} reversible steps differed from reference_mode() by more than 1e-9 "
        f"(largest {worst[0]:.2e}, where one rounding of the stage inputs moves the reference "
        f"by {worst[1]:.2e}); each was judged by that movement and by exact mode, bit for bit "
        "(``checks.check_reference``)."
    )


def markdown(tally: Tally, title: str) -> str:
    total = sum(tally.outcomes.values())
    seconds = sorted(tally.seconds)
    lines = [
        f"# {title}",
        "",
        f"{total} generated networks; {tally.defective} with at least one defect. "
        f"Seconds per network: median {seconds[len(seconds) // 2]:.2f}, max {seconds[-1]:.2f}.",
        "",
        _ill_conditioned_line(),
        "",
        "| outcome | networks |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in tally.outcomes.most_common()),
        "",
        "## Networks with a defect, per check",
        "",
        "| check | networks |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in tally.cases_per_check.most_common()),
        "",
        "## Distinct defects (by class)",
        "",
    ]
    by_class: dict[str, list[str]] = {}
    for key in tally.messages:
        by_class.setdefault(classify(key), []).append(key)
    for label in sorted(by_class):
        keys = sorted(by_class[label], key=lambda k: -tally.messages[k])
        count = sum(tally.messages[k] for k in keys)
        lines += [f"### {label} ({count} defects)", ""]
        for key in keys:
            message, model = tally.smallest[key]
            lines += [
                f"- {tally.messages[key]} x `{key}`",
                "",
                "  smallest model:",
                "",
                "  ```",
                *(f"  {line}" for line in model.splitlines()),
                f"  -> {message}",
                "  ```",
                "",
            ]
    if tally.refusals:
        lines += [
            "## Refusals (ConversionError) and invalid networks",
            "",
            "| networks | message |",
            "|---|---|",
        ]
        lines += [f"| {v} | `{k}` |" for k, v in tally.refusals.most_common()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--families", default="", help="comma-separated op families")
    parser.add_argument(
        "--per-family",
        type=int,
        default=0,
        help="also run each family alone (with the base vocabulary)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tally = Tally(out=args.out)
    families = frozenset(f for f in args.families.split(",") if f) or None
    if args.examples:
        run(tally, args.examples, families)
    for family in generator.FAMILIES if args.per_family else ():
        run(tally, args.per_family, frozenset({family}))
    text = markdown(tally, TITLE)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
