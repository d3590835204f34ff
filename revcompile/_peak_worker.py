"""Worker side of :func:`revcompile.memory.peak_step_memory`.

Runs one training step of a freshly built model in this (fresh) process and
reports its peak memory growth. ``child_main`` is the ``multiprocessing``
(spawn) entry point; ``python -m revcompile._peak_worker pkg.mod:factory
8,3,224,224 [cpu|cuda]`` runs the same measurement from a shell and prints JSON.
Imports only torch and the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import json
import os
import resource
import sys
import traceback
from collections.abc import Callable
from typing import Any

_MMAP_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _pin_glibc_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold so freed large blocks go back to the OS at once.

    Setting ``M_MMAP_THRESHOLD`` explicitly also disables glibc's dynamic
    threshold (which otherwise rises after the first large free, after which
    freed tensors stay in the heap and RSS no longer falls). Returns False when
    the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD) == 1 and ok
    return ok


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _current_rss_bytes() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except OSError:
        return _maxrss_bytes()


def _resolve_factory(factory: str | Callable[[], Any]) -> Callable[[], Any]:
    if callable(factory):
        return factory
    module_name, sep, attr = str(factory).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory string must be 'package.module:function', got {factory!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """Build the model, run the (warm-up and) measured step, return the numbers."""
    pinned = _pin_glibc_mmap_threshold()
    import torch

    device = torch.device(request["device"])
    model = _resolve_factory(request["factory"])()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"factory returned {type(model).__name__}, not an nn.Module")
    model = model.to(device).train()
    x = torch.randn(*request["input_shape"], device=device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_kind = request["loss"]

    def step() -> None:
        out = model(x)
        if loss_kind == "cross_entropy":
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ValueError("loss='cross_entropy' needs 2-D logits as the model output")
            target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
            loss = torch.nn.functional.cross_entropy(out, target)
        else:
            leaves = [
                t
                for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
            ]
            if not leaves:
                raise ValueError("the model output has no floating tensor requiring grad")
            loss = sum(t.sum() for t in leaves)
        del out
        loss.backward()
        del loss
        optimizer.step()

    cuda = device.type == "cuda"
    # Without a resettable high-water mark, a warm-up peak would hide the step's.
    can_reset = cuda or _reset_hwm()
    if request["warmup"] and can_reset:
        step()
        optimizer.zero_grad(set_to_none=True)
    gc.collect()

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = "cuda.max_memory_allocated"
    elif can_reset:
        base = _current_rss_bytes()
        _reset_hwm()
        step()
        peak = _status_kib("VmHWM") * 1024
        method = "VmHWM after clear_refs"
    else:
        base = _current_rss_bytes()
        step()
        peak = _maxrss_bytes()
        method = "ru_maxrss"
    return {
        "peak_bytes": max(0, peak - base),
        "baseline_bytes": base,
        "method": method,
        "mmap_threshold_pinned": pinned,
        "pid": os.getpid(),
    }


def child_main(request: dict[str, Any], conn: Any) -> None:
    """``multiprocessing`` entry point: send ``measure``'s dict or ``{"error": tb}``."""
    try:
        result = measure(request)
    except BaseException:  # everything goes back to the parent
        result = {"error": traceback.format_exc()}
    try:
        conn.send(result)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m revcompile._peak_worker FACTORY SHAPE [DEVICE] [LOSS]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    request = {
        "factory": args[0],
        "input_shape": [int(s) for s in args[1].split(",")],
        "device": args[2] if len(args) > 2 else "cpu",
        "loss": args[3] if len(args) > 3 else "sum",
        "warmup": True,
    }
    print(json.dumps(measure(request)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
