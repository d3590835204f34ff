"""Coverage of the zoo (issue 14): what ``convert(model, x)`` makes reversible, and why not.

Every model of ``benchmarks.lib.zoo`` (timm, torchvision, transformers and
hand-written networks, random init, nothing downloaded) is converted with the
DEFAULT options, ``revcompile.convert(model, x)``, at its memory size (224x224
for images). Per model:

- residual blocks found and their fates (coupling F/G, half-coupling, kept
  with the report's reason codes);
- stride-1 identity blocks: blocks of the report whose shortcut is the block
  input itself (``shortcut == "identity"``) and whose branch output has the
  shortcut's shape, i.e. every block except those kept as ``projection``
  (projection shortcut) or ``broadcast`` (branch output shape differs); the
  share of them made reversible (fate F, G or half);
- saved-bytes ratio: bytes autograd saves in one float32 training forward at
  the memory size, converted / original, counted on fake tensors
  (``benchmarks.lib.exactness.fake_saved_bytes``: the count of
  ``revcompile.memory.saved_activation_bytes`` without compute);
- convert time (wall clock, one thread, the memory-size conversion);
- float64 gradient check: the model built for the small check size (32x32, or
  64x64 where a 1x1 last stage makes train-mode BatchNorm over 2 samples
  ill-conditioned) is converted with the defaults, cast to float64, and one
  training step is compared with the same network under ``reference_mode()``:
  output, input gradient, every parameter gradient (max relative error) and
  every buffer (bitwise); it passes at <= 1e-9;
- the ``split="halve"`` column: the share of identity blocks made reversible by
  ``convert(model, x, split="halve")`` (conversion only), the default before
  ``"auto"``: what the default gains over halving alone.

A model that ``convert`` refuses is listed with the ``ConversionError``
message; any other exception (in conversion, measurement or the check) is a
crash, listed with the exception type, its first line and the innermost
revcompile frame: those are bugs. The totals row gives the share over all
models; the models with nothing reversible are listed with why.

    python -m benchmarks.coverage                      # every model (<= 15 minutes)
    python -m benchmarks.coverage --models resnet18 res_unet
    python -m benchmarks.coverage --quick              # three small models
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from collections import Counter
from typing import Any

import torch
from torch import nn

import revcompile
from benchmarks.lib.environment import load_average, machine_line
from benchmarks.lib.exactness import fake_saved_bytes, max_relative_error
from benchmarks.lib.results import Run, add_results_dir
from benchmarks.lib.zoo import ZOO, ZooModel
from revcompile.conversion_report import KeptReason

RTOL = 1e-9
QUICK = ("resnet18", "resnet1d_34", "res_unet")
#: Report codes of blocks that are not stride-1 identity blocks.
NOT_IDENTITY = {"projection", "broadcast"}
REVERSIBLE_FATES = {"F", "G", "half", "single"}


def randomize_zero_weights(model: nn.Module) -> nn.Module:
    """Zero-initialised heads (torchvision's ViT) give a zero output: nothing to compare."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(std=0.02)
    return model


def failure(error: BaseException) -> dict[str, str]:
    """``refused`` (a ConversionError) or ``crash`` (anything else), with where it was raised."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    kind = "refused" if isinstance(error, revcompile.ConversionError) else "crash"
    frames = [
        f"{frame.filename.split('/')[-1]}:{frame.lineno} {frame.name}"
        for frame in traceback.extract_tb(error.__traceback__)
        if "/revcompile/" in frame.filename or "/passes/" in frame.filename
    ]
    found = {"status": kind, "error": f"{type(error).__name__}: {first_line}"}
    if kind == "crash":
        found["where"] = frames[-1] if frames else "outside revcompile"
    return found


def block_counts(report: revcompile.ConversionReport) -> dict[str, Any]:
    """Blocks, identity blocks, the reversible ones among them, fates and kept reasons."""
    identity = [b for b in report.blocks if b.shortcut == "identity" and b.code not in NOT_IDENTITY]
    return {
        "blocks": len(report.blocks),
        "identity_blocks": len(identity),
        "reversible_identity": sum(b.fate in REVERSIBLE_FATES for b in identity),
        "fates": dict(Counter(b.fate for b in report.blocks)),
        "kept": dict(Counter(b.code for b in report.kept)),
        "kept_reasons": {b.code: b.reason for b in report.kept},
        "kept_details": sorted({f"{b.code}: {b.detail}" for b in report.kept if b.detail}),
        "rejected_adds": [f"{r.node}: {r.reason}" for r in report.rejected],
        "stages": [
            {"name": s.name, "split": s.split, "blocks": len(s.blocks)} for s in report.stages
        ],
    }


def gradient_check(entry: ZooModel) -> dict[str, Any]:
    """The float64 check at ``entry.check_size`` (see the module docstring)."""
    torch.manual_seed(0)
    model = randomize_zero_weights(entry.make(entry.check_size)).train()
    x = torch.randn(entry.input_shape(entry.check_size), dtype=torch.float64)
    try:
        gm = revcompile.convert(model, x.float()).double().train()
        error = max_relative_error(gm, x)
    except Exception as exc:  # noqa: BLE001 -- every failure is a row of the table
        return {"input": list(x.shape), **failure(exc)}
    return {
        "input": list(x.shape),
        "status": "passed" if error.worst <= RTOL and error.buffers_equal else "FAILED",
        "max_rel_err": error.worst,
        "output_rel_err": error.output,
        "input_grad_rel_err": error.input_grad,
        "param_grad_rel_err": error.param_grad,
        "buffers_equal": error.buffers_equal,
    }


def halve_split(entry: ZooModel, x: torch.Tensor) -> dict[str, Any]:
    """Identity blocks made reversible by ``split="halve"`` (conversion only).

    A fresh model: a conversion that leaves state on its original (see
    :func:`proxies_left`) must not decide what this one finds.
    """
    torch.manual_seed(0)
    try:
        model = entry.make(entry.memory_size).train()
        counts = block_counts(revcompile.report(revcompile.convert(model, x, split="halve")))
    except Exception as exc:  # noqa: BLE001
        return failure(exc)
    return {
        "status": "converted",
        **{k: counts[k] for k in ("identity_blocks", "reversible_identity")},
    }


def proxies_left(model: nn.Module) -> list[str]:
    """``module.attribute`` of every fx Proxy left on ``model`` (in an attribute, or one level
    down in a dict, list or tuple, keys included): tracing mutated the original model."""
    found = []
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            items = [value]
            if isinstance(value, dict):
                items = [*value.keys(), *value.values()]
            elif isinstance(value, list | tuple):
                items = list(value)
            if any(isinstance(item, torch.fx.Proxy) for item in items):
                found.append(f"{path}.{name}" if path else name)
    return found


def measure(entry: ZooModel) -> dict[str, Any]:
    """One row: the default conversion at the memory size, its saved bytes, the checks."""
    row: dict[str, Any] = {"model": entry.name, "source": entry.source, "task": entry.task}
    torch.manual_seed(0)
    try:
        model = entry.make(entry.memory_size).train()
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "crash", "error": f"building the model: {failure(exc)['error']}"}
    x = torch.randn(entry.input_shape(entry.memory_size))
    row["input"] = list(x.shape)
    start = time.perf_counter()
    try:
        gm = revcompile.convert(model, x)
    except Exception as exc:  # noqa: BLE001
        return {**row, **failure(exc), "convert_s": round(time.perf_counter() - start, 2)}
    row["convert_s"] = round(time.perf_counter() - start, 2)
    report = revcompile.report(gm)
    row.update(status="converted", **block_counts(report))
    row["proxies_left_on_original"] = proxies_left(model)
    row["params_before"], row["params_after"] = report.params_before, report.params_after
    try:
        row["saved_bytes_before"] = fake_saved_bytes(model, x)
        row["saved_bytes_after"] = fake_saved_bytes(gm.train(), x)
        row["saved_ratio"] = row["saved_bytes_after"] / row["saved_bytes_before"]
    except Exception as exc:  # noqa: BLE001
        row["saved_bytes"] = failure(exc)
    row["gradient_check"] = gradient_check(entry)
    row["halve"] = halve_split(entry, x)
    return row


def crashes(rows: list[dict[str, Any]]) -> list[str]:
    """Every non-ConversionError failure: ``model (step): Type: first line [where]``."""
    found = []
    for row in rows:
        parts = [
            ("convert", row),
            *((k, row.get(k) or {}) for k in ("saved_bytes", "gradient_check", "halve")),
        ]
        for step, part in parts:
            if part.get("status") == "crash":
                where = f" [{part['where']}]" if "where" in part else ""
                found.append(f"{row['model']} ({step}): {part['error']}{where}")
    return found


def nothing_reversible(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Models with no reversible block under the defaults, with why."""
    found = []
    for row in rows:
        if row["status"] != "converted":
            found.append((row["model"], f"{row['status']}: {row['error']}"))
        elif not any(row["fates"].get(fate) for fate in REVERSIBLE_FATES):
            if row["kept"]:
                why = "; ".join(f"{n} × {row['kept_reasons'][c]}" for c, n in row["kept"].items())
            else:
                adds = row["rejected_adds"]
                why = "no residual blocks found" + (
                    f" ({len(adds)} adds rejected, e.g. {adds[0]})" if adds else " (no adds)"
                )
            found.append((row["model"], why))
    return found


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over the converted models, the shares, and the failure lists."""
    converted = [r for r in rows if r["status"] == "converted"]
    identity = sum(r["identity_blocks"] for r in converted)
    reversible = sum(r["reversible_identity"] for r in converted)
    halve = [r["halve"] for r in converted if r["halve"]["status"] == "converted"]
    halve_identity = sum(a["identity_blocks"] for a in halve)
    checks = [r["gradient_check"] for r in converted]
    return {
        "models": len(rows),
        "converted": len(converted),
        "refused": [r["model"] for r in rows if r["status"] == "refused"],
        "blocks": sum(r["blocks"] for r in converted),
        "identity_blocks": identity,
        "reversible_identity": reversible,
        "share": reversible / identity if identity else None,
        "halve_share": sum(a["reversible_identity"] for a in halve) / halve_identity
        if halve_identity
        else None,
        "kept": dict(sum((Counter(r["kept"]) for r in converted), Counter())),
        "gradient_check_passed": sum(c["status"] == "passed" for c in checks),
        "gradient_check_total": len(checks),
        "nothing_reversible": nothing_reversible(rows),
        "crashes": crashes(rows),
        "originals_modified": {
            r["model"]: r["proxies_left_on_original"]
            for r in converted
            if r["proxies_left_on_original"]
        },
    }


def _percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "—"


def _cell(row: dict[str, Any]) -> list[str]:
    """The table cells of one row."""
    name = f"{row['source']} `{row['model']}`"
    if row["status"] != "converted":
        return [name, f"**{row['status']}**: {row['error']}", *["—"] * 6]
    fates = row["fates"]
    couplings = fates.get("F", 0) + fates.get("G", 0)
    found = f"{row['blocks']} (F/G {couplings}, half {fates.get('half', 0)})"
    kept = "; ".join(f"{n} × {code}" for code, n in row["kept"].items()) or "—"
    check = row["gradient_check"]
    if "max_rel_err" in check:
        size = "x".join(map(str, check["input"][2:]))
        check_cell = f"{check['status']} ({check['max_rel_err']:.1e}, {size})"
        if not check["buffers_equal"]:
            check_cell += ", buffers differ"
    else:
        check_cell = f"**{check['status']}**: {check['error']}"
    halve = row["halve"]
    halve_cell = (
        _percent(halve["reversible_identity"], halve["identity_blocks"])
        if halve["status"] == "converted"
        else f"**{halve['status']}**"
    )
    saved = f"{row['saved_ratio']:.3f}" if "saved_ratio" in row else "**crash**"
    return [
        name,
        found,
        _percent(row["reversible_identity"], row["identity_blocks"]),
        kept,
        check_cell,
        saved,
        f"{row['convert_s']:.2f}",
        halve_cell,
    ]


def markdown(rows: list[dict[str, Any]], total: dict[str, Any], machine: str) -> str:
    """The README section: settings, the per-model table, totals, nothing reversible, crashes."""
    header = [
        "model",
        "residual blocks (reversible)",
        "stride-1 identity blocks reversible",
        "kept (report code)",
        "float64 gradient check (max rel. err.)",
        "saved bytes converted / original",
        "convert (s)",
        '`split="halve"`',
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row)) + " |" for row in rows]
    kept = ", ".join(f"{n} × {code}" for code, n in total["kept"].items()) or "none"
    lines.append(
        f"| **total: {total['models']} models, {total['converted']} converted** "
        f"| {total['blocks']} "
        f"| **{_percent(total['reversible_identity'], total['identity_blocks'])}** "
        f"| {kept} | {total['gradient_check_passed']}/{total['gradient_check_total']} passed "
        "| | | "
        + (f"{100 * total['halve_share']:.0f}%" if total["halve_share"] is not None else "—")
        + " |"
    )
    settings = (
        "`revcompile.convert(model, x)` with the default options, random init, batch 2, "
        "224x224 (video 16x112x112, 1-D 2048 samples, U-Net 128x128); saved bytes of one "
        "float32 training forward at that size, counted on fake tensors. A stride-1 identity "
        "block is a block of the report whose shortcut is its input and whose branch output "
        "has the input's shape (every block but those kept as `projection` or `broadcast`); "
        "reversible = coupling F/G, half-coupling or single-block coupling. Gradient check: "
        "the model built for the size in the cell, converted, float64, one training step "
        "vs `reference_mode()`, "
        f"passes at <= {RTOL:.0e} relative with equal buffers. "
        f'`split="halve"`: the same share under `convert(model, x, split="halve")`, the '
        f'default before `split="auto"`. {machine}.'
    )
    codes = sorted({code for row in rows for code in row.get("kept", {})})
    legend = "Kept codes: " + "; ".join(f"`{c}` = {KeptReason(c).words}" for c in codes) + "."
    parts = [settings, "\n".join(lines), legend]
    empty = total["nothing_reversible"]
    parts.append(
        "Models with nothing reversible under the defaults:\n\n"
        + ("\n".join(f"- `{model}`: {why}" for model, why in empty) if empty else "- none")
    )
    parts.append(
        "Crashes (exceptions other than `ConversionError`):\n\n"
        + ("\n".join(f"- {line}" for line in total["crashes"]) if total["crashes"] else "- none")
    )
    modified = [
        f"- `{model}`: {len(where)} ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
        for model, where in total["originals_modified"].items()
    ]
    parts.append(
        "Originals modified by `convert` (fx Proxies left in module attributes):\n\n"
        + ("\n".join(modified) or "- none")
    )
    return "\n\n".join(parts)


def write_json(run: Run, rows: list[dict[str, Any]], partial: bool) -> None:
    """``<stem>.json``: meta + rows (no CSV: the rows are nested)."""
    meta = (
        {**run.meta, "partial": True, "load_average_now": load_average()} if partial else run.meta
    )
    run.stem.parent.mkdir(parents=True, exist_ok=True)
    run.stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [entry.name for entry in ZOO]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=names, default=names, metavar="MODEL")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.models = list(QUICK)
    return args


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)  # the 15-minute budget is for one thread
    # A model rejecting an example input is a row of the table (refused); torch would also
    # log the failing meta kernel's traceback, and fx a warning per shallow-copied proxy.
    for name in ("torch._subclasses.fake_tensor", "torch.fx.proxy"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args, run = Run.from_command_line("coverage", parse_args, argv)
    if not args.quick and len(args.models) < len(ZOO):
        run.stem = run.stem.with_name("coverage_subset")  # never overwrite the full table
    rows = []
    for entry in (e for e in ZOO if e.name in args.models):
        start, cpu_start = time.perf_counter(), time.process_time()
        row = measure(entry)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        row["cpu_s"] = round(time.process_time() - cpu_start, 1)  # the load does not count
        rows.append(row)
        check = row.get("gradient_check", {}).get("status", "-")
        print(
            f"{entry.name}: {row['status']}, identity reversible "
            f"{row.get('reversible_identity', '-')}/{row.get('identity_blocks', '-')}, "
            f"check {check}, {row['wall_s']} s" + (f" -- {row['error']}" if "error" in row else ""),
            flush=True,
        )
        write_json(run, rows, partial=True)
    total = totals(rows)
    run.meta["totals"] = total
    run.finish()
    run.meta["cpu_s"] = round(time.process_time(), 1)
    write_json(run, rows, partial=False)
    run.write_markdown([markdown(rows, total, machine_line(run.meta["machine"]))])
    print(f"identity blocks reversible: {total['reversible_identity']}/{total['identity_blocks']}")
    for line in total["crashes"]:
        print("crash:", line)
    print(f"wrote {run.stem}.{{json,md}}: {run.meta['wall_s']} s, {run.meta['cpu_s']} s CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
