"""Command line: ``revcompile convert`` and ``revcompile inspect``.

``revcompile convert SRC -o OUT`` converts a model and writes it (load it back
with ``revcompile.load(OUT)``); ``revcompile inspect SRC`` prints the analysis
and the activation-memory model and writes nothing. ``SRC`` is
``package.module:factory`` or a file holding a whole pickled ``nn.Module``
(see :func:`revcompile.io.load_source`).

Errors are one line on stderr (``revcompile: error: ...``) naming the problem
and what to do, with no traceback unless ``--debug``. Exit codes: 0 success,
1 the model could not be analysed or converted (fx cannot trace it, it rejects
the input shape), 2 usage errors (bad arguments, a source that cannot be
loaded, an output path that cannot be written), 130 interrupted. Files are
written atomically and only after everything else succeeded, so a failed or
interrupted run leaves OUT and the report file as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from revcompile import cli_budget, options
from revcompile.api import analyze, convert, report
from revcompile.cli_memory import dynamic_dims, memory_model, one_line
from revcompile.errors import ConversionError, InputShapeError, RevcompileError, SourceError
from revcompile.io import atomic_write, load_source, probe_writable, save
from revcompile.memory import saved_activation_bytes

__all__ = ["main"]

EXIT_OK = 0
EXIT_CONVERSION = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(RevcompileError):
    """A bad argument or path: exit code 2."""


class WriteError(RevcompileError):
    """Writing an output failed after the checks passed (disk full...): exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# --------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,224,224"`` (or ``8x3x224x224``) -> ``(8, 3, 224, 224)``."""
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"malformed --input-shape {text!r}: expected positive integers separated by "
            "commas, batch first, e.g. 8,3,224,224"
        )
    return tuple(int(p) for p in parts)


def parse_kwargs(text: str) -> dict[str, Any]:
    """A JSON object of factory keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"malformed --kwargs {text!r}: {error}; give a JSON object such as "
            "'{\"num_classes\": 10}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"--kwargs must be a JSON object (keyword -> value), got {type(value).__name__}; "
            "e.g. '{\"num_classes\": 10}'"
        )
    return value


def parse_budget(text: str) -> int:
    """``"24GB"`` -> 24e9 bytes, ``"24GiB"`` -> 24 * 2**30, a bare number is bytes."""
    try:
        return options.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"malformed --budget {text!r}: {error}") from None


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``revcompile`` argument parser (subcommands ``convert`` and ``inspect``)."""
    source = argparse.ArgumentParser(add_help=False)
    source.add_argument(
        "src",
        metavar="SRC",
        help="package.module:factory (e.g. torchvision.models:resnet50), or a file holding a "
        "whole pickled nn.Module (needs --trust-pickle)",
    )
    source.add_argument(
        "--input-shape",
        type=parse_shape,
        metavar="N,C,H,W",
        help="shape of the model input, batch first (e.g. 8,3,224,224)",
    )
    source.add_argument(
        "--kwargs",
        type=parse_kwargs,
        default=None,
        metavar="JSON",
        help="keyword arguments of the factory, a JSON object (e.g. '{\"num_classes\": 10}')",
    )
    source.add_argument(
        "--weights",
        metavar="FILE",
        help="state_dict file for a factory source, loaded with torch.load(weights_only=True)",
    )
    source.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a whole-module SRC file: unpickling runs code named in the "
        "file, use it only for files you trust",
    )
    source.add_argument(
        "--frontend",
        choices=options.choices(options.Frontend),
        default="auto",
        help="tracer: plain torch.fx (fx), shape-carrying (shapes, needs --input-shape) or fx "
        "with shapes as fallback (auto, default)",
    )
    source.add_argument("--debug", action="store_true", help="print the traceback of an error")

    parser = _Parser(
        prog="revcompile",
        description="Convert residual networks into reversible RevNets "
        "(activation memory that does not grow with depth).",
        epilog="exit codes: 0 ok, 1 the model cannot be analysed or converted, "
        "2 usage error (arguments, unreadable source, unwritable output), 130 interrupted",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    convert = commands.add_parser(
        "convert",
        parents=[source],
        help="convert a model and write it (load with revcompile.load)",
        description="Convert SRC, print the conversion report (blocks and their fates, "
        "parameters and, with --input-shape, saved activation bytes before and after) "
        "and write the converted model to OUT atomically.",
    )
    convert.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write")
    convert.add_argument(
        "--policy",
        choices=options.choices(options.Policy),
        default="checkpoint",
        help="non-reversible segments: recompute in backward (checkpoint, default) or store",
    )
    convert.add_argument(
        "--leftover",
        choices=options.choices(options.Leftover),
        default=options.DEFAULT_LEFTOVER,
        help="odd last block of a chain: half-coupling (half, default), a coupling of "
        "its own (single) or ordinary block (store)",
    )
    convert.add_argument(
        "--split",
        choices=options.choices(options.Split),
        default=options.DEFAULT_SPLIT,
        help="stage streams: channel halves (halve), two full-width copies "
        "(duplicate, for attention and other blocks that cannot be halved) or halve "
        "where possible and duplicate elsewhere (auto, default)",
    )
    convert.add_argument(
        "--report", metavar="FILE", help="also write the report as JSON (ConversionReport.to_dict)"
    )
    cli_budget.add_arguments(convert)

    inspect = commands.add_parser(
        "inspect",
        parents=[source],
        help="analysis and memory model only; writes nothing",
        description="Print what conversion would do and, with --input-shape, the activation "
        "memory model before and after conversion: formula in B (batch) and the input's "
        "spatial sizes, bytes at the shape, largest batch within --budget.",
    )
    inspect.add_argument(
        "--budget",
        type=parse_budget,
        metavar="SIZE",
        help="memory budget for saved activations, e.g. 24GB (powers of 1000) or 24GiB",
    )
    cli_budget.add_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _check_outputs(args: argparse.Namespace, outputs: dict[str, str]) -> None:
    """Refuse outputs that would overwrite an input or each other, or cannot be written."""
    inputs = {"SRC": args.src, "--weights": args.weights}
    inputs = {k: v for k, v in inputs.items() if v is not None and os.path.exists(v)}
    seen: dict[str, str] = {}
    for label, path in outputs.items():
        for other_label, other in {**inputs, **seen}.items():
            if _same_file(path, other):
                raise UsageError(
                    f"{label} {path} is the same file as {other_label}; writing it would "
                    "destroy the input: choose another output path"
                )
        seen[label] = path
        try:
            probe_writable(path)
        except IsADirectoryError:
            raise UsageError(
                f"{label} {path} is a directory; give a file path such as "
                f"{os.path.join(path, 'model_rev.pt')}"
            ) from None
        except FileNotFoundError:
            raise UsageError(
                f"the directory of {label} {path} does not exist; create it first "
                f"(mkdir -p {os.path.dirname(os.path.abspath(path))})"
            ) from None
        except OSError as error:
            raise UsageError(
                f"cannot write {label} {path} ({error.strerror or error}); choose a writable "
                "directory"
            ) from None


def _load_model(args: argparse.Namespace) -> Any:
    return load_source(
        args.src, kwargs=args.kwargs, weights=args.weights, trust_pickle=args.trust_pickle
    )


def _example_input(model: Any, shape: tuple[int, ...] | None) -> Any:
    if shape is None:
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, dtype=dtype, generator=generator)


def _training_saved_bytes(model: Any, x: Any) -> int:
    was_training = model.training
    model.train()
    try:
        return saved_activation_bytes(model, x)
    finally:
        model.train(was_training)


def _params_line(report: Any) -> str:
    before, after = report.params_before, report.params_after
    change = f" ({(after - before) / before:+.1%})" if before else ""
    return f"parameters: {before:,} before, {after:,} after{change}"


def run_convert(args: argparse.Namespace) -> int:
    """``revcompile convert``: load, convert, report, write OUT (and the JSON report)."""
    outputs = {"OUT": args.output}
    if args.report:
        outputs["--report"] = args.report
    _check_outputs(args, outputs)
    _check_memory_budget(args)
    model = _load_model(args)
    x = _example_input(model, args.input_shape)
    gm = convert(
        model, x, policy=args.policy, leftover=args.leftover, split=args.split,
        frontend=args.frontend, **cli_budget.convert_options(args),
    )  # fmt: skip
    the_report = report(gm)
    print(the_report)
    print()
    print(_params_line(the_report))
    if x is not None:
        before = _training_saved_bytes(model, x)
        after = _training_saved_bytes(gm, x)
        print(
            f"saved activations at input {_shape_text(x.shape)} (training forward): "
            f"{_human(before)} before, {_human(after)} after ({after / before:.1%})"
            if before
            else f"saved activations at input {_shape_text(x.shape)}: 0 B"
        )
    try:
        save(gm, args.output)
        print(
            f"wrote {args.output} ({_human(os.path.getsize(args.output))}); "
            "load it with revcompile.load()"
        )
        if args.report:
            text = json.dumps(the_report.to_dict(), indent=2) + "\n"
            atomic_write(args.report, lambda f: f.write(text.encode()))
            print(f"wrote report {args.report}")
    except OSError as error:
        raise WriteError(
            f"writing failed ({one_line(error)}); the file was left unchanged"
        ) from error
    return EXIT_OK


def _check_memory_budget(args: argparse.Namespace) -> None:
    if args.memory_budget is not None and args.input_shape is None:
        raise UsageError("--memory-budget needs --input-shape (the plan is made at an input shape)")


def run_inspect(args: argparse.Namespace) -> int:
    """``revcompile inspect``: analysis and memory model, printed; writes nothing."""
    if args.budget is not None and args.input_shape is None:
        raise UsageError(
            "--budget needs --input-shape (the memory model is computed from an input shape)"
        )
    _check_memory_budget(args)
    model = _load_model(args)
    x = _example_input(model, args.input_shape)
    memory: dict[str, Any] | None = None
    if x is None:
        the_report = analyze(model, frontend=args.frontend)
    else:
        gm = convert(model, x, frontend=args.frontend, **cli_budget.convert_options(args))
        the_report = report(gm)
        plan = the_report.budget
        memory = {
            "input_shape": list(args.input_shape),
            "symbols": sorted(dynamic_dims(args.input_shape)),
            "budget_bytes": args.budget,
            "before": memory_model(model, args.input_shape, x, args.budget),
            "after": memory_model(gm, args.input_shape, x, args.budget),
            "plan_max_batch": None
            if plan is None
            else cli_budget.largest_batch(model, x, plan.budget_bytes, args.preserve_function),
        }
    if args.json:
        print(json.dumps({"source": args.src, "report": the_report.to_dict(), "memory": memory}))
        return EXIT_OK
    print(the_report)
    if the_report.params_after is not None:
        print()
        print(_params_line(the_report))
    print()
    if memory is None:
        print("memory model: pass --input-shape N,C,H,W to compute it")
        return EXIT_OK
    symbols = ", ".join(memory["symbols"])
    print(f"saved activation bytes of a training forward, as a function of {symbols}:")
    for when in ("before", "after"):
        entry = memory[when]
        print(f"  {when + ':':7} {entry['formula'] or 'unavailable (' + entry['error'] + ')'}")
    before, after = memory["before"], memory["after"]
    if before["bytes"] is not None and after["bytes"] is not None:
        print(
            f"at input {_shape_text(args.input_shape)}: {_human(before['bytes'])} before, "
            f"{_human(after['bytes'])} after"
        )
    if args.budget is not None:
        where = _shape_text(args.input_shape[1:])
        print(
            f"largest batch within {_human(args.budget)} (input {where}): "
            f"{_batch_text(before['max_batch'])} before, {_batch_text(after['max_batch'])} after"
        )
    if memory["plan_max_batch"] is not None:
        where = _shape_text(args.input_shape[1:])
        print(
            f"largest batch whose planned saved activations fit in "
            f"{_human(the_report.budget.budget_bytes)} (input {where}): "
            f"{_batch_text(memory['plan_max_batch'])}"
        )
    for note in [*before.get("notes", []), *after.get("notes", [])]:
        print(f"note: {note}")
    return EXIT_OK


def _batch_text(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def _fail(code: int, message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"revcompile: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``revcompile`` command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    debug = args.debug
    command = {"convert": run_convert, "inspect": run_inspect}[args.command]
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            return command(args)
    except (UsageError, SourceError) as error:
        return _fail(EXIT_USAGE, one_line(error), debug)
    except WriteError as error:
        return _fail(EXIT_CONVERSION, str(error), debug)
    except InputShapeError as error:
        message = f"{one_line(error)}; give an --input-shape the model accepts (batch first)"
        return _fail(EXIT_CONVERSION, f"cannot convert {args.src}: {message}", debug)
    except ConversionError as error:
        return _fail(EXIT_CONVERSION, f"cannot convert {args.src}: {one_line(error)}", debug)
    except RevcompileError as error:
        return _fail(EXIT_CONVERSION, one_line(error), debug)
    except KeyboardInterrupt:
        return _fail(
            EXIT_INTERRUPTED,
            "interrupted; outputs are written atomically: each is complete or unchanged",
            debug,
        )
    except Exception as error:
        return _fail(
            EXIT_CONVERSION,
            f"{type(error).__name__}: {one_line(error)} (rerun with --debug for the traceback)",
            debug,
        )


if __name__ == "__main__":
    sys.exit(main())
