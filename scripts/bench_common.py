"""Timing helpers shared by the benchmark scripts: round-robin medians, device sync, CPU name."""

from __future__ import annotations

import platform
import statistics
import time

import torch

__all__ = ["cpu_name", "interleaved", "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median wall time (ms) of each ``fn()``, measured round-robin so load changes hit all variants alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + " (CPU)"
    except OSError:
        pass
    return platform.processor() or platform.machine()
