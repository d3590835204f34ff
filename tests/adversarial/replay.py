"""Replay generated networks from their ``NetSpec.describe()`` text (triage by hand).

The long run (``run_long.py``) lists each defect's smallest model as the text
``NetSpec.describe()`` prints; :func:`parse` turns that text back into the
``NetSpec``, so a defect can be rerun and bisected without rerunning the search:

    python tests/adversarial/replay.py tests/adversarial/LONG_RUN.md   # every smallest model
    python tests/adversarial/replay.py tests/adversarial/regressions.txt
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import checks  # noqa: E402
import generator  # noqa: E402
import torch  # noqa: E402
from generator import BlockSpec, ConvertOptions, NetSpec, Op  # noqa: E402

_HEADER = re.compile(
    r"(?P<dim>\d)-D in=(?P<in_channels>\d+) width=(?P<width>\d+) size=(?P<size>\d+) "
    r"batch=(?P<batch>\d+) stem=(?P<stem>\w+)/(?P<stem_norm>\w+) head=(?P<head>\w+) "
    r"kwarg=(?P<kwarg>True|False) state=(?P<state>\w+) train=(?P<train>True|False) "
    r"convert\((?P<options>ConvertOptions\(.*\))\)$"
)
_BLOCK = re.compile(
    r"blocks\.\d+: (?P<shortcut>\w+)\[(?P<ops>.*)\](?P<spelling>\w+)->(?P<out_width>\d+)"
    r"(?P<extras>.*)$"
)


def _split_top_level(text: str) -> list[str]:
    """``"a(1, 2),b,c((3,),)"`` -> ``["a(1, 2)", "b", "c((3,),)"]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def _op(text: str) -> Op:
    kind, _, args = text.partition("(")
    if not args:
        return Op(kind)
    # Nested ops print as dataclass reprs: Op(kind='conv', args=(...)).
    value = eval(f"({args}", {"Op": Op})  # noqa: S307 - our own printed text
    return Op(kind, value if isinstance(value, tuple) else (value,))


def _block(line: str) -> BlockSpec:
    match = _BLOCK.match(line.strip())
    if match is None:
        raise ValueError(f"not a block line: {line!r}")
    extras = match["extras"].split()
    values = dict(extra.split("=", 1) for extra in extras if "=" in extra)
    return BlockSpec(
        branch=tuple(_op(op) for op in _split_top_level(match["ops"])),
        shortcut=match["shortcut"],
        spelling=match["spelling"],
        scale=values.get("scale", "none"),
        drop=values.get("drop", "none"),
        post=values.get("post", "none"),
        repeat="repeat" in extras,
        frozen="frozen" in extras,
        out_width=int(match["out_width"]),
    )


def _options(text: str) -> ConvertOptions:
    call = ast.parse(text, mode="eval").body
    return ConvertOptions(**{k.arg: ast.literal_eval(k.value) for k in call.keywords})


def parse(text: str) -> NetSpec:
    """The ``NetSpec`` whose ``describe()`` is ``text`` (header line, then block lines)."""
    header, *blocks = [line.strip() for line in text.strip().splitlines() if line.strip()]
    match = _HEADER.match(header)
    if match is None:
        raise ValueError(f"not a NetSpec header: {header!r}")
    return NetSpec(
        dim=int(match["dim"]),
        in_channels=int(match["in_channels"]),
        width=int(match["width"]),
        size=int(match["size"]),
        batch=int(match["batch"]),
        stem=match["stem"],
        stem_norm=match["stem_norm"],
        blocks=tuple(_block(line) for line in blocks),
        head=match["head"],
        kwarg=match["kwarg"] == "True",
        state=match["state"],
        train_at_convert=match["train"] == "True",
        options=_options(match["options"]),
    )


def models_in(text: str) -> list[str]:
    """The model texts in ``text``: a LONG_RUN.md summary's code blocks, or paragraphs of
    describe() texts with ``#`` comment lines (``regressions.txt``)."""
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    if not blocks:
        paragraphs = (
            "\n".join(ln for ln in p.splitlines() if not ln.startswith("#"))
            for p in text.split("\n\n")
        )
        return [p for p in paragraphs if p.strip()]
    return [
        "\n".join(line for line in block.splitlines() if not line.strip().startswith("->"))
        for block in blocks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for text in models_in(args.path.read_text()):
        spec = parse(text)
        judged = len(checks.ILL_CONDITIONED)
        outcome = checks.run_subject(generator.subject(spec))
        print(spec.describe())
        print(f"  -> {outcome.status}: {outcome.message}")
        for defect in outcome.defects:
            print(f"  [{defect.check}] {defect.message}")
        for error, moved in checks.ILL_CONDITIONED[judged:]:
            print(f"  judged by rounding: error {error:.2e}, one rounding moves it {moved:.2e}")


if __name__ == "__main__":
    main()
