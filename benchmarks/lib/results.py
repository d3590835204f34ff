"""Results of a benchmark run: the metadata, CSV/JSON files and Markdown tables.

Every script writes ``<results dir>/<name>[_cuda][_quick].{csv,json,md,png}``;
:class:`Run` holds what every results JSON starts with (command, machine,
peers, load) and where the files go.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.lib.environment import load_average, machine_info, peer_status

#: Where the committed results live (``--results-dir`` of every script).
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


@dataclass
class Run:
    """One run of a benchmark script: its results stem and the metadata written with them.

    ``meta`` starts with the command, the machine, the peer libraries and the
    load at the start; :meth:`finish` adds the load at the end and the
    wall-clock duration.
    """

    stem: Path
    meta: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def from_command_line(
        cls,
        script: str,
        parse_args: Callable[[list[str]], argparse.Namespace],
        argv: list[str] | None,
    ) -> tuple[argparse.Namespace, Run]:
        """Parse ``argv`` (default ``sys.argv[1:]``) and start the run of ``benchmarks.<script>``.

        The parsed arguments have ``results_dir`` (see :func:`add_results_dir`),
        and ``device`` and ``quick`` where the script has those options
        (default ``"cpu"``, False). The stem is
        ``<results_dir>/<script>[_cuda][_quick]``: quick runs never overwrite
        full ones, CUDA runs never overwrite CPU ones.
        """
        argv = sys.argv[1:] if argv is None else argv
        args = parse_args(argv)
        device = getattr(args, "device", "cpu")
        quick = getattr(args, "quick", False)
        suffix = "" if device == "cpu" else "_" + device.split(":")[0]
        meta = {
            "script": script,
            "command": "python -m benchmarks." + script + (" " + " ".join(argv) if argv else ""),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(device),
            "peers": peer_status(),
            "load_average_start": load_average(),
            "python_executable": sys.executable,
        }
        stem = Path(args.results_dir) / f"{script}{suffix}{'_quick' if quick else ''}"
        return args, cls(stem, meta)

    def finish(self) -> None:
        """Record the load at the end and the wall-clock duration in ``meta``."""
        self.meta["load_average_end"] = load_average()
        self.meta["wall_s"] = round(time.perf_counter() - self.started, 1)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """``<stem>.csv`` (one line per row) and ``<stem>.json`` (meta + rows)."""
        write_results(self.stem, rows, self.meta)

    def write_partial(self, rows: list[dict[str, Any]]) -> None:
        """Write the rows measured so far, marked partial (a full run overwrites them)."""
        write_results(
            self.stem, rows, {**self.meta, "partial": True, "load_average_now": load_average()}
        )

    def write_markdown(self, tables: Sequence[str]) -> None:
        """``<stem>.md``: the tables, separated by blank lines."""
        self.stem.with_suffix(".md").write_text("\n\n".join(tables) + "\n")

    def report(self) -> None:
        """Print the load at the start and the end, and the files written."""
        start, end = self.meta["load_average_start"], self.meta["load_average_end"]
        print(f"load average start {start} end {end}")
        print(f"wrote {self.stem}.{{csv,json,md,png}}")


def add_results_dir(parser: argparse.ArgumentParser) -> None:
    """The ``--results-dir`` option every script has (tests point it at a temporary folder)."""
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the results files go (default: benchmarks/results)",
    )


def write_results(stem: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``<stem>.csv`` (one line per row) and ``<stem>.json`` (meta + rows)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    stem.with_suffix(".csv").write_text(buffer.getvalue())
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def _csv_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return " ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, shortened (for tables and results)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mib(n: float | None) -> str:
    """Bytes as MiB for tables; ``-`` for missing."""
    return "-" if n is None else f"{n / 2**20:,.1f}"


def fixed(value: float | None, digits: int = 2) -> str:
    """A number with ``digits`` decimals for tables (ratios); ``-`` for missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def seconds(s: float | None) -> str:
    """Seconds for tables; ``-`` for missing."""
    return fixed(s, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` or None when either is missing."""
    return None if a is None or not b else a / b


def print_table(title: str, header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    """Print a table (rich) and return it as Markdown (for the README)."""
    from rich.console import Console
    from rich.table import Table

    lines = [list(map(str, line)) for line in lines]
    table = Table(title=title)
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=200).print(table)
    markdown = ["| " + " | ".join(header) + " |"]
    markdown.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    markdown += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(markdown)
