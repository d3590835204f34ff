"""Shared pieces of the benchmark scripts: models, variants, measurements, results.

Every script builds its networks through :func:`build` (a module-level function,
so that ``functools.partial(build, spec, variant)`` is a picklable factory for
:func:`revcompile.memory.peak_step_memory`, which measures in a fresh process).

Model specs: ``"cifar-n<N>"`` is the CIFAR ResNet of He et al. (2016, §4.2)
with N basic blocks per stage (depth 6N + 2, option-A shortcuts), input
3x32x32; ``"resnet50"``, ``"resnet101"``, ``"resnet152"`` are torchvision's
(random weights), input 3x224x224.

Variants (see :data:`VARIANTS`): the original network, the usual
alternatives (activation checkpointing, torch.compile with a memory budget),
peer libraries (memcnn, momentumnet, revlib; each skipped with a reason when it
is not installed or does not work) and revcompile's conversions.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from benchmarks.cifar import BasicBlock, CifarResNet, residual_function

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEERS = ("memcnn", "momentumnet", "revlib")

#: torch.compile's activation budget used by the ``torch_compile_budget`` variant.
COMPILE_ACTIVATION_BUDGET = 0.1


# --------------------------------------------------------------------------
# Machine and environment
# --------------------------------------------------------------------------


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _total_memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on (recorded in every results JSON)."""
    import torchvision

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _total_memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line for tables and the README."""
    where = info.get("gpu") or f"{info['cpu_model']}, {info['cpu_cores']} cores"
    return f"{where}, torch {info['torch']}, device {info['device']}"


def peer_status() -> dict[str, str]:
    """Version of every peer library, or ``"unavailable: <reason>"``."""
    status: dict[str, str] = {}
    for name in PEERS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = __import__(name)
            status[name] = str(getattr(module, "__version__", "installed"))
        except Exception as exc:  # any import failure means "skip this peer"
            status[name] = f"unavailable: {type(exc).__name__}: {exc}"
    return status


def peer_available(name: str) -> bool:
    """True when the peer library imports."""
    return not peer_status()[name].startswith("unavailable")


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def _revnet_stage(
    couplings: Callable[[int, int], nn.Module],
) -> Callable[[int, int, int, int], nn.Module]:
    """Stage factory of a hand-written RevNet of the same depth.

    A stage keeps a first block that changes shape (stride 2 or a new width) as
    an ordinary :class:`BasicBlock`; every identity block becomes one additive
    coupling ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` with F and G half-width
    residual functions (Gomez et al. 2017; memcnn's ``RevBasicBlock``).
    ``couplings(channels, count)`` builds the reversible part.
    """

    def stage(in_planes: int, planes: int, stride: int, n: int) -> nn.Module:
        parts: list[nn.Module] = []
        count = n
        if stride != 1 or in_planes != planes:
            parts.append(BasicBlock(in_planes, planes, stride))
            count -= 1
        if count:
            parts.append(couplings(planes, count))
        return nn.Sequential(*parts)

    return stage


def _memcnn_couplings(channels: int, count: int) -> nn.Module:
    """memcnn's documented pattern: InvertibleModuleWrapper(AdditiveCoupling(Fm, Gm)).

    ``keep_input=False`` (memcnn frees each coupling's input and reconstructs
    it in backward) except for the first coupling of a stage: its input is the
    output of a ReLU that autograd saves, so freeing it would corrupt that
    saved tensor (memcnn documents ``keep_input=True`` for this case).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import memcnn

    half = channels // 2
    return nn.Sequential(
        *[
            memcnn.InvertibleModuleWrapper(
                fn=memcnn.AdditiveCoupling(
                    Fm=residual_function(half, half), Gm=residual_function(half, half)
                ),
                keep_input=index == 0,
                keep_input_inverse=False,
            )
            for index in range(count)
        ]
    )


def _revlib_couplings(channels: int, count: int) -> nn.Module:
    """revlib's documented ReversibleSequential: one module per half-residual (F, G, F, ...)."""
    import revlib

    half = channels // 2
    return revlib.ReversibleSequential(
        *[residual_function(half, half) for _ in range(2 * count)], split_dim=1
    )


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``"cifar-n18"`` -> ``("cifar", 18)``; ``"resnet50"`` -> ``("resnet50", None)``."""
    if spec.startswith("cifar-n"):
        return "cifar", int(spec.removeprefix("cifar-n"))
    return spec, None


def input_chw(spec: str) -> tuple[int, int, int]:
    """Input channels, height and width of a model spec."""
    return (3, 32, 32) if parse_spec(spec)[0] == "cifar" else (3, 224, 224)


def stage_names(model: nn.Module) -> list[str]:
    """Names of the residual stages (``layer1``, ``layer2``...) of a ResNet."""
    return [name for name, _ in model.named_children() if name.startswith("layer")]


def base_model(spec: str) -> nn.Module:
    """The original network of a spec."""
    family, n = parse_spec(spec)
    if family == "cifar":
        assert n is not None
        return CifarResNet(n)
    import torchvision

    return getattr(torchvision.models, family)(weights=None)


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------


class Checkpointed(nn.Module):
    """Runs ``body`` under non-reentrant ``torch.utils.checkpoint``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=False)


class SequentialCheckpointed(nn.Module):
    """A ResNet run as one sequence (stem + blocks) with ``checkpoint_sequential``.

    ``segments = round(sqrt(number of blocks))`` (Chen et al. 2016); the head
    (pooling, classifier) runs normally.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        stem = [model.conv1, model.bn1, model.relu]
        if hasattr(model, "maxpool"):
            stem.append(model.maxpool)
        blocks = [block for name in stage_names(model) for block in getattr(model, name)]
        self.body = nn.Sequential(nn.Sequential(*stem), *blocks)
        self.segments = max(1, round(math.sqrt(len(blocks))))
        self.head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            x = checkpoint_sequential(self.body, self.segments, x, use_reentrant=False)
        else:
            x = self.body(x)
        return self.head(x)


class ReferenceMode(nn.Module):
    """Runs a converted network under ``revcompile.reference_mode()``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import revcompile

        with revcompile.reference_mode():
            return self.body(x)


def _checkpoint_per_block(model: nn.Module, spec: str) -> nn.Module:
    for name in stage_names(model):
        stage = getattr(model, name)
        setattr(model, name, nn.Sequential(*[Checkpointed(block) for block in stage]))
    return model


def _revcompile(policy: str) -> Callable[[nn.Module, str], nn.Module]:
    def convert(model: nn.Module, spec: str) -> nn.Module:
        import revcompile

        return revcompile.convert(model, torch.randn(2, *input_chw(spec)), policy=policy)

    return convert


def _revcompile_reference(model: nn.Module, spec: str) -> nn.Module:
    return ReferenceMode(_revcompile("checkpoint")(model, spec))


def _momentumnet(model: nn.Module, spec: str) -> nn.Module:
    from momentumnet import transform_to_momentumnet

    # The documented drop-in call (README / docstring example), memory-saving mode.
    return transform_to_momentumnet(
        model, sub_layers=stage_names(model), gamma=0.9, use_backprop=False
    )


def _hand_written_revnet(couplings: Callable[[int, int], nn.Module]):
    def build_revnet(model: nn.Module, spec: str) -> nn.Module:
        family, n = parse_spec(spec)
        if family != "cifar" or n is None:
            raise ValueError("the hand-written RevNets exist for the CIFAR ResNets only")
        return CifarResNet(n, _revnet_stage(couplings))

    return build_revnet


def _torch_compile_budget(model: nn.Module, spec: str) -> nn.Module:
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = COMPILE_ACTIVATION_BUDGET
    return torch.compile(model)


#: variant name -> (builder(original model, spec) -> model, peer library or None)
VARIANTS: dict[str, tuple[Callable[[nn.Module, str], nn.Module], str | None]] = {
    "original": (lambda model, spec: model, None),
    "checkpoint_per_block": (_checkpoint_per_block, None),
    "checkpoint_sequential": (lambda model, spec: SequentialCheckpointed(model), None),
    "torch_compile_budget": (_torch_compile_budget, None),
    "memcnn_revnet": (_hand_written_revnet(_memcnn_couplings), "memcnn"),
    "revlib_revnet": (_hand_written_revnet(_revlib_couplings), "revlib"),
    "momentumnet": (_momentumnet, "momentumnet"),
    "revcompile_store": (_revcompile("store"), None),
    "revcompile_checkpoint": (_revcompile("checkpoint"), None),
    "revcompile_reference": (_revcompile_reference, None),
}


def build(spec: str, variant: str, seed: int = 0) -> nn.Module:
    """The network ``spec`` in form ``variant``, in train mode (picklable via partial)."""
    builder, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    return builder(base_model(spec), spec).train()


def skip_reason(variant: str, peers: dict[str, str]) -> str | None:
    """Why ``variant`` cannot run here (its peer library is unavailable), else None."""
    peer = VARIANTS[variant][1]
    if peer is not None and peers[peer].startswith("unavailable"):
        return f"{peer} {peers[peer]}"
    return None


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued kernels (CUDA) so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(
    model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    """One step as in ``peak_step_memory(loss="cross_entropy")``: CE vs class 0, SGD."""

    def step() -> None:
        out = model(x)
        if out.dim() == 2:
            target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
            loss = F.cross_entropy(out, target)
        else:
            loss = out.sum()
        del out
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``step``."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def interleaved_times(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several steps round-robin: ``warmup`` unmeasured rounds, then ``repeats``.

    Interleaving spreads slow periods of a shared machine over all variants,
    so that ratios between variants of one run stay meaningful. A step that
    raises is dropped from later rounds and reported with its error.
    """
    results: dict[str, dict[str, Any]] = {name: {"times_s": []} for name in steps}
    active = dict(steps)
    for round_index in range(warmup + repeats):
        for name, step in list(active.items()):
            try:
                seconds = timed(step, device)
            except Exception as exc:
                results[name]["error"] = error_text(exc)
                del active[name]
                continue
            if round_index == 0:
                results[name]["first_step_s"] = seconds
            if round_index >= warmup:
                results[name]["times_s"].append(seconds)
            if progress:
                progress(name)
    for entry in results.values():
        if entry["times_s"]:
            entry["median_s"] = statistics.median(entry["times_s"])
    return results


def saved_bytes(model: nn.Module, shape: Sequence[int], device: torch.device) -> int:
    """``revcompile.memory.saved_activation_bytes`` of a training forward at ``shape``."""
    from revcompile.memory import saved_activation_bytes

    torch.manual_seed(1)
    x = torch.randn(*shape, device=device)
    return saved_activation_bytes(model.train(), x)


def peak_bytes(
    spec: str, variant: str, shape: Sequence[int], device: str, timeout: float | None
) -> int:
    """Peak memory of one training step of ``build(spec, variant)`` in a fresh process."""
    from revcompile.memory import peak_step_memory

    return peak_step_memory(
        functools.partial(build, spec, variant),
        list(shape),
        device,
        loss="cross_entropy",
        timeout=timeout,
    )


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, shortened (for tables and results)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _isolated_child(fn: Callable[..., Any], kwargs: dict[str, Any], conn: Any) -> None:
    try:
        result: Any = {"ok": fn(**kwargs)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    try:
        conn.send(result)
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], timeout: float | None, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` in a fresh ``spawn`` process, with a time limit.

    Isolates crashes, memory and global state (torch.compile caches, the
    functorch config) of one measurement from the others. Raises
    ``RuntimeError`` with the child's traceback, on death, or on timeout.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_isolated_child, args=(fn, kwargs, sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise RuntimeError(f"timed out after {timeout:.0f} s")
        try:
            result = receiver.recv()
        except EOFError:
            process.join(10)
            raise RuntimeError(
                f"worker died without a result (exit code {process.exitcode})"
            ) from None
    finally:
        receiver.close()
        if process.is_alive():
            process.kill()
        process.join()
    if "error" in result:
        last = result["error"].strip().splitlines()[-1]
        raise RuntimeError(f"{last}\n{result['error']}")
    return result["ok"]


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def result_stem(name: str, *, quick: bool, device: str) -> Path:
    """``benchmarks/results/<name>[_cuda][_quick]`` (quick runs never overwrite full ones)."""
    suffix = "" if device == "cpu" else "_" + device.split(":")[0]
    return RESULTS_DIR / f"{name}{suffix}{'_quick' if quick else ''}"


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


def mib(n: float | None) -> str:
    """Bytes as MiB for tables; ``-`` for missing."""
    return "-" if n is None else f"{n / 2**20:,.1f}"


def seconds(s: float | None) -> str:
    """Seconds for tables; ``-`` for missing."""
    return "-" if s is None else f"{s:.3f}"


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


def base_meta(script: str, argv: Sequence[str], device: str) -> dict[str, Any]:
    """Start of every results JSON: command, machine, peers, load at start."""
    return {
        "script": script,
        "command": "python -m benchmarks." + script + (" " + " ".join(argv) if argv else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device),
        "peers": peer_status(),
        "load_average_start": load_average(),
        "python_executable": sys.executable,
    }


def finish_meta(meta: dict[str, Any], started: float) -> dict[str, Any]:
    """Load at the end and wall-clock duration."""
    meta["load_average_end"] = load_average()
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    return meta


def save_figure(fig: Any, stem: Path) -> Path:
    """Write ``<stem>.png`` and close the figure."""
    import matplotlib.pyplot as plt

    path = stem.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------
# The measurement matrix shared by memory_vs_depth and torchvision_models
# --------------------------------------------------------------------------

#: Variants measured in their own process with a time limit (slow or fragile).
ISOLATED_VARIANTS = frozenset({"torch_compile_budget"})


def measure_isolated(
    spec: str, variant: str, batch: int, device: str, warmup: int, repeats: int
) -> dict[str, Any]:
    """Build, time (``repeats`` may be 0) and count saved bytes of one variant.

    Runs in a fresh process through :func:`run_isolated`; the first step's
    time (``first_step_s``) includes torch.compile's compilation.
    """
    dev = torch.device(device)
    shape = (batch, *input_chw(spec))
    start = time.perf_counter()
    model = build(spec, variant).to(dev)
    row: dict[str, Any] = {"build_s": time.perf_counter() - start}
    row["params"] = sum(p.numel() for p in model.parameters())
    x = torch.randn(*shape, device=dev)
    step = training_step(model, x, torch.optim.SGD(model.parameters(), lr=1e-3))
    row.update(interleaved_times({variant: step}, dev, max(1, warmup), repeats)[variant])
    row["saved_bytes"] = saved_bytes(model, shape, dev)
    if not repeats:
        row.pop("times_s", None)
    return row


def run_matrix(
    specs: Sequence[str],
    variants: Sequence[str],
    *,
    batch: int,
    device: str,
    warmup: int,
    repeats: int,
    peak: bool,
    peak_timeout: float,
    isolated_timeout: float,
    on_spec_done: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Saved bytes, peak step memory and (``repeats > 0``) step time of every pair.

    Per spec: every available variant is built in this process (build time and
    parameter count recorded) and its saved bytes measured; then all of them
    are timed round-robin (:func:`interleaved_times`); then each one's peak
    step memory is measured in a fresh process. Variants in
    :data:`ISOLATED_VARIANTS` are built, timed and measured in their own
    process under ``isolated_timeout``; once one times out, it is skipped for
    the larger specs that follow. A failure is recorded in the row
    (``error``), never raised; an unavailable peer gives a ``skipped`` row.
    ``on_spec_done(rows so far)`` is called after each spec (partial results).
    """
    from tqdm import tqdm

    peers = peer_status()
    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    given_up: dict[str, str] = {}
    per_spec = len(variants) * (1 + int(peak)) + (warmup + repeats) * len(variants) * bool(repeats)
    bar = tqdm(total=len(specs) * per_spec, desc="measuring", unit="task")
    for spec in specs:
        shape = (batch, *input_chw(spec))
        spec_rows: dict[str, dict[str, Any]] = {}
        models: dict[str, nn.Module] = {}
        for variant in variants:
            bar.set_postfix_str(f"{spec} {variant}: build + saved bytes")
            row: dict[str, Any] = {"model": spec, "variant": variant, "batch": batch}
            spec_rows[variant] = row
            reason = skip_reason(variant, peers) or given_up.get(variant)
            if reason:
                row["skipped"] = reason
            elif variant in ISOLATED_VARIANTS:
                try:
                    row.update(
                        run_isolated(
                            measure_isolated,
                            isolated_timeout,
                            spec=spec,
                            variant=variant,
                            batch=batch,
                            device=device,
                            warmup=warmup,
                            repeats=repeats,
                        )
                    )
                except RuntimeError as exc:
                    row["error"] = error_text(exc)
                    if "timed out" in str(exc):
                        given_up[variant] = (
                            f"skipped: {spec} did not finish in {isolated_timeout:.0f} s"
                        )
            else:
                try:
                    start = time.perf_counter()
                    model = build(spec, variant).to(dev)
                    row["build_s"] = time.perf_counter() - start
                    row["params"] = sum(p.numel() for p in model.parameters())
                    row["saved_bytes"] = saved_bytes(model, shape, dev)
                    models[variant] = model
                except Exception as exc:
                    row["error"] = error_text(exc)
            bar.update(1)
        if repeats and models:
            x = torch.randn(*shape, device=dev)
            steps = {
                name: training_step(m, x, torch.optim.SGD(m.parameters(), lr=1e-3))
                for name, m in models.items()
            }
            bar.set_postfix_str(f"{spec}: timing {len(steps)} variants round-robin")
            timings = interleaved_times(
                steps, dev, warmup, repeats, progress=lambda _: bar.update()
            )
            for name, timing in timings.items():
                spec_rows[name].update(timing)
            del steps, x
        models.clear()
        for variant, row in spec_rows.items():
            if peak and "skipped" not in row and "error" not in row:
                bar.set_postfix_str(f"{spec} {variant}: peak step memory")
                try:
                    limit = isolated_timeout if variant in ISOLATED_VARIANTS else peak_timeout
                    row["peak_step_bytes"] = peak_bytes(spec, variant, shape, device, limit)
                except RuntimeError as exc:
                    row["peak_error"] = error_text(exc)
            bar.update(1)
        rows += spec_rows.values()
        if on_spec_done is not None:
            on_spec_done(rows)
        bar.n = len(rows) // len(variants) * per_spec
        bar.refresh()
    bar.close()
    return rows


def write_partial(stem: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write the rows measured so far, marked partial (a full run overwrites them)."""
    write_results(stem, rows, {**meta, "partial": True, "load_average_now": load_average()})
