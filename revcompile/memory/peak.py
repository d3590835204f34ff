"""Peak memory of one training step, measured in a fresh process.

:func:`peak_step_memory` is the parent side: it starts
:func:`measure_step_peak` through the project's one fresh-process runner
(:mod:`revcompile.memory.fresh_process`). ``measure_step_peak`` builds the
model in the child, runs :func:`revcompile.memory.step.training_step` and reads
the allocator's or the kernel's high-water mark. ``python -m revcompile.memory
FACTORY SHAPE [DEVICE] [LOSS]`` runs the same measurement from a shell.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import os
import resource
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from revcompile.memory.fresh_process import run_in_fresh_process
from revcompile.memory.step import LOSSES, Loss, training_step

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


def measure_step_peak(
    factory: str | Callable[[], nn.Module],
    input_shape: Sequence[int],
    device: str,
    loss: Loss,
    warmup: bool,
) -> dict[str, Any]:
    """Build the model, run the (warm-up and) measured step, return the numbers.

    Runs in the process that measures (the fresh child of
    :func:`peak_step_memory`); see there for the method. Returns
    ``peak_bytes``, ``baseline_bytes``, ``method`` (which counter was read),
    ``mmap_threshold_pinned`` and ``pid``.
    """
    pinned = _pin_glibc_mmap_threshold()
    dev = torch.device(device)
    model = _resolve_factory(factory)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory returned {type(model).__name__}, not an nn.Module")
    model = model.to(dev).train()
    x = torch.randn(*input_shape, device=dev)
    step = training_step(model, x, loss)

    cuda = dev.type == "cuda"
    # Without a resettable high-water mark, a warm-up peak would hide the step's.
    can_reset = cuda or _reset_hwm()
    if warmup and can_reset:
        step()
    gc.collect()

    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
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


def peak_step_memory(
    factory: str | Callable[[], nn.Module],
    input_shape: Sequence[int],
    device: str = "cpu",
    *,
    loss: Loss = "sum",
    warmup: bool = True,
    timeout: float | None = None,
) -> int:
    """Peak memory growth of one training step, measured in a fresh process.

    The step is :func:`revcompile.memory.step.training_step`: ``out = model(x)``;
    ``loss`` = sum of all floating outputs (``loss="sum"``) or cross-entropy of
    2-D logits against class 0 (``loss="cross_entropy"``); ``loss.backward()``;
    ``SGD(lr=1e-3).step()`` (plain SGD: no optimizer state); gradients freed
    (``zero_grad(set_to_none=True)``). The model (from ``factory``, in
    ``train()`` mode, moved to ``device``), the input ``x = randn(input_shape)``,
    and the optimizer exist before the baseline is taken. With ``warmup`` one
    identical step runs first, so one-time costs (thread pools, kernel caches,
    lazy CUDA init) stay out of the number: it is the steady-state step.

    Measurement, in a process started with the ``spawn`` method
    (:func:`revcompile.memory.fresh_process.run_in_fresh_process`; nothing from
    this process's allocator state leaks in):

    * CPU: peak RSS growth. On Linux the kernel's high-water mark ``VmHWM`` is
      reset by writing ``5`` to ``/proc/self/clear_refs`` right before the step;
      result = ``VmHWM`` after the step - ``VmRSS`` before it. glibc's mmap
      threshold is pinned to 128 KiB with ``mallopt`` so that every tensor
      larger than that is its own mapping, returned to the OS when freed: RSS
      then follows live tensor memory instead of the heap's retained free
      chunks. Where ``clear_refs`` is not writable the fallback is
      ``ru_maxrss`` (lifetime peak) minus the RSS before the step, without
      warm-up; it undercounts if something earlier peaked higher.
      Resolution is 1 KiB; expect a few hundred KiB of noise.
    * CUDA: ``torch.cuda.max_memory_allocated()`` after
      ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before the step
      (the caching allocator's reserved-but-free memory is not counted).

    Args:
        factory: ``"package.module:function"`` (imported in the worker), or a
            picklable zero-argument callable (a module-level function, a
            ``functools.partial`` of one) returning the ``nn.Module``. A callable
            defined in a script's ``__main__`` works when the script guards its
            entry point with ``if __name__ == "__main__":`` (spawn re-imports it).
        input_shape: shape of the single float32 input.
        device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``).
        loss: ``"sum"`` or ``"cross_entropy"``.
        warmup: run one unmeasured step first.
        timeout: seconds to wait for the worker (``None``: no limit).

    Returns:
        Peak growth in bytes.

    Raises:
        revcompile.memory.fresh_process.FreshProcessError: (a ``RuntimeError``)
            the worker failed (its traceback is in the message), died (e.g.
            killed for memory), or timed out.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be 'sum' or 'cross_entropy', got {loss!r}")
    if not isinstance(factory, str) and not callable(factory):
        raise TypeError("factory must be a 'module:function' string or a zero-arg callable")
    result = run_in_fresh_process(
        measure_step_peak,
        timeout=timeout,
        factory=factory,
        input_shape=[int(s) for s in input_shape],
        device=str(device),
        loss=loss,
        warmup=bool(warmup),
    )
    return int(result["peak_bytes"])
