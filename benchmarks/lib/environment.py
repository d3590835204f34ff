"""What a benchmark run was measured on: the machine, the load, the peer libraries."""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from typing import Any

import torch

#: The peer libraries the benchmarks compare against (each optional).
PEERS = ("memcnn", "momentumnet", "revlib")


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
