"""Shared by the benchmark scripts: command-line options, preset and device set-up, round-robin timing
medians, device sync, CPU name, running a bundle config in a subprocess."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["add_common_arguments", "bundle_run", "classification_closures", "cpu_name", "interleaved", "setup", "sync"]


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


def classification_closures(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: dict,
                            num_classes: int, device: torch.device):
    """A training step (train mode; forward, cross-entropy, backward, optimizer step) and an inference
    forward (eval, ``torch.inference_mode``), both on one fixed seeded batch of ``cfg["batch"]`` images."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"], generator=gen).to(device)
    y = torch.randint(0, num_classes, (cfg["batch"],), generator=gen).to(device)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    return train_step, infer


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + " (CPU)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_common_arguments(p: argparse.ArgumentParser, presets: dict, variants) -> None:
    """Options every benchmark takes: preset and its overrides, device, threads, variants, JSON output."""
    p.add_argument("--preset", choices=sorted(presets), default="cpu")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--depth", type=int, default=None, help="override the number of ViT blocks")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--variants", nargs="+", choices=variants, default=list(variants))
    p.add_argument("--out", default=None, help="write the results as JSON")


def setup(args: argparse.Namespace, presets: dict) -> tuple[dict, torch.device, str]:
    """The preset with the command-line overrides, the torch device (CPU threads set) and its name."""
    cfg = dict(presets[args.preset])
    cfg["model_kwargs"] = dict(cfg["model_kwargs"])
    for key in ("batch", "image_size", "warmup", "iters"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.depth is not None:
        cfg["model_kwargs"]["depth"] = args.depth
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no CUDA device is available.")
        return cfg, device, torch.cuda.get_device_name(device)
    return cfg, device, cpu_name()


def bundle_run(bundle: Path, configs: list[str], args: list[str], log: Path) -> float:
    """Run a bundle config in a subprocess; returns the wall time (s); on failure prints the log's tail."""
    files = [str(bundle / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           files[0] if len(files) == 1 else json.dumps(files), "--bundle_root", str(bundle), *args]
    start = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start
