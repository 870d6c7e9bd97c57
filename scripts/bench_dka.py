"""Benchmark the Dual-Kernel Adapter against linear probing, measured in one run.

Variants (all a PeftClassifier with the same frozen backbone and a linear head):

* ``linear_probe``: the frozen backbone alone, only the head trains (the reference);
* ``dka_two_branch``: DKA in every block, run as the two-branch reference (``DualKernelConv.path =
  "two_branch"``: 51x51 and 5x5 depthwise convolutions, summed);
* ``dka``: the same adapters as they train by default (``path="auto"``): on grids smaller than the kernel's
  reach one depthwise convolution per adapter with the summed kernel cropped to the token grid, rebuilt from
  the branch parameters with autograd on every forward (on larger grids the two branches);
* ``dka_merged``: the same adapters after ``merge_peft``: inference uses a cached cropped kernel (training
  in this mode rebuilds it like ``dka``).

For each: trainable parameters, median training-step time (forward, cross-entropy, backward, AdamW step
with the paper's adapter/head learning rates) and median inference time (eval, ``torch.inference_mode``),
after warm-up iterations, with ``torch.cuda.synchronize`` on GPUs. The variants are timed round-robin
(one iteration of each in turn), so a change in machine load affects all of them alike; ratios are to
``linear_probe`` in the same run. On GPUs the peak allocated memory of one step is reported too.

``--conv-grids`` times the :class:`~medpeft_monai.peft.dka.DualKernelConv` alone instead (forward + backward
with the input and both branches needing gradients): the two-branch reference against the cropped single
kernel the adapters train with, on each grid, as paired timings (the two forms alternate, and the median of
the per-pair ratios is reported, which machine load changes little). This is the measurement behind the
choice of the training path.

Examples::

    python scripts/bench_dka.py                                  # small CPU preset
    python scripts/bench_dka.py --threads 1 --conv-grids 4x4 6x6 14x14 4x16 24x24 26x26 32x32 40x24 64x64
    python scripts/bench_dka.py --preset vitb --device cuda --out bench_dka_vitb.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import medpeft_monai.peft.dka  # noqa: F401  (registers "dka")
from medpeft_monai.nets.classifier import PeftClassifier
from medpeft_monai.peft import count_parameters, merge_peft, param_groups
from medpeft_monai.peft.dka import DualKernelConv, cropped_kernel_size
from medpeft_monai.utils import write_text_atomic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import add_common_arguments, classification_closures, interleaved, setup, sync  # noqa: E402

PRESETS = {
    "cpu": {"backbone": "vit_tiny_patch16_224", "model_kwargs": {"depth": 12}, "image_size": 96, "batch": 8,
            "warmup": 5, "iters": 20},
    "vitb": {"backbone": "vit_base_patch16_224", "model_kwargs": {}, "image_size": 224, "batch": 32,
             "warmup": 5, "iters": 20},
}
VARIANTS = ("linear_probe", "dka_two_branch", "dka", "dka_merged")


def _peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def build(variant: str, cfg: dict, device: torch.device, num_classes: int) -> PeftClassifier:
    torch.manual_seed(0)
    peft = "linear_probe" if variant == "linear_probe" else {"method": "dka", "hidden": cfg["hidden"]}
    model = PeftClassifier(cfg["backbone"], num_classes=num_classes, peft=peft, image_size=cfg["image_size"],
                           model_kwargs=cfg["model_kwargs"])
    if variant != "linear_probe":
        with torch.no_grad():  # trained-like, non-zero adapters (timing does not depend on the values)
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
    if variant == "dka_two_branch":
        for m in model.modules():
            if isinstance(m, DualKernelConv):
                m.path = "two_branch"
    if variant == "dka_merged":
        merge_peft(model)
    return model.to(device)


def prepare(variant: str, cfg: dict, device: torch.device, num_classes: int = 10):
    """The model and its training-step and inference closures."""
    model = build(variant, cfg, device, num_classes)
    train_step, infer = classification_closures(model, torch.optim.AdamW(param_groups(model, 1e-3, 1e-4)), cfg,
                                                num_classes, device)
    return model, train_step, infer


def bench(variants: list[str], cfg: dict, device: torch.device) -> list[dict]:
    prepared = {v: prepare(v, cfg, device) for v in variants}
    train = interleaved({v: p[1] for v, p in prepared.items()}, device, cfg["warmup"], cfg["iters"])
    infer = interleaved({v: p[2] for v, p in prepared.items()}, device, cfg["warmup"], cfg["iters"])
    rows = []
    for v, (model, train_step, infer_fn) in prepared.items():
        trainable, total = count_parameters(model)
        rows.append({"variant": v, "trainable_params": trainable, "total_params": total,
                     "train_step_ms": train[v], "inference_ms": infer[v],
                     "train_images_per_s": cfg["batch"] / train[v] * 1e3,
                     "inference_images_per_s": cfg["batch"] / infer[v] * 1e3,
                     "train_peak_mib": _peak_mib(train_step, device),
                     "inference_peak_mib": _peak_mib(infer_fn, device)})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    ref = next(r for r in rows if r["variant"] == "linear_probe")
    lines = [
        (f"Backbone `{meta['backbone']}` {meta['model_kwargs'] or ''} at {meta['image_size']} px "
        f"(token grid {meta['grid'][0]}x{meta['grid'][1]}; merged kernel {meta['merged_kernel'][0]}x"
        f"{meta['merged_kernel'][1]} instead of {meta['large_kernel']}x{meta['large_kernel']}), "
        f"batch {meta['batch']}, random (not pretrained) backbone weights, "
        f"DKA m={meta['hidden']} in all {meta['num_blocks']} blocks; device {meta['device_name']}, "
        f"{meta['threads']} CPU thread(s); median of {meta['iters']} round-robin iterations after "
        f"{meta['warmup']} warm-up."),
        "",
        "| variant | trainable params | train step (ms) | x frozen | inference (ms) | x frozen |"
        + (" train peak (MiB) |" if meta["device"] == "cuda" else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if meta["device"] == "cuda" else ""),
    ]
    for r in rows:
        line = (f"| {r['variant']} | {r['trainable_params']:,} | {r['train_step_ms']:.1f} | "
                f"{r['train_step_ms'] / ref['train_step_ms']:.2f} | {r['inference_ms']:.1f} | "
                f"{r['inference_ms'] / ref['inference_ms']:.2f} |")
        if meta["device"] == "cuda":
            line += f" {r['train_peak_mib']:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def conv_bench(grids: list[tuple[int, int]], channels: int, batch: int, device: torch.device,
               large: int = 51, small: int = 5, seconds: float = 4.0) -> list[dict]:
    """Paired forward + backward timings of one DualKernelConv, two-branch reference against single kernel."""

    def step(conv, z):
        zz = z.detach().requires_grad_()
        sync(device)
        start = time.perf_counter()
        conv(zz).square().sum().backward()
        sync(device)
        return (time.perf_counter() - start) * 1e3

    rows = []
    for grid in grids:
        torch.manual_seed(0)
        conv = DualKernelConv(channels, large, small).to(device)
        z = torch.randn(batch, channels, *grid, device=device)
        forms = {}
        for path in ("two_branch", "single"):
            conv.path = path
            step(conv, z)  # warm-up
            forms[path] = step(conv, z)
        n = max(5, min(21, int(seconds * 1e3 / max(forms["two_branch"], 1e-3))))
        two, one, ratio = [], [], []
        for i in range(n):
            times = {}
            for path in (("two_branch", "single") if i % 2 == 0 else ("single", "two_branch")):
                conv.path = path
                times[path] = step(conv, z)
            two.append(times["two_branch"]), one.append(times["single"])
            ratio.append(times["single"] / times["two_branch"])
        kh, kw = cropped_kernel_size(large, grid)
        rows.append({"grid": list(grid), "kernel": [kh, kw], "channels": channels, "batch": batch, "pairs": n,
                     "two_branch_ms": statistics.median(two), "single_ms": statistics.median(one),
                     "ratio": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
                     "mac_ratio": kh * kw / (large * large + small * small)})
    return rows


def conv_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        (f"`DualKernelConv` ({meta['large_kernel']}x{meta['large_kernel']} + {meta['small_kernel']}x"
         f"{meta['small_kernel']}, m={rows[0]['channels']}, batch {rows[0]['batch']}) forward + backward; "
         f"device {meta['device_name']}, {meta['threads']} CPU thread(s); paired timings, median of the "
         "per-pair ratios."),
        "",
        "| grid | single kernel | two-branch (ms) | single (ms) | single / two-branch [min, max] | MACs ratio |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['grid'][0]}x{r['grid'][1]} | {r['kernel'][0]}x{r['kernel'][1]} | "
                     f"{r['two_branch_ms']:.1f} | {r['single_ms']:.1f} | {r['ratio']:.2f} "
                     f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {r['mac_ratio']:.2f} |")
    return "\n".join(lines)


def report(result: dict, out: str | None) -> dict:
    """Print the result's table and write the whole result as JSON to ``out`` (atomically) if given."""
    print(result["markdown"])
    if out:
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    return result


def _grid(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, PRESETS, VARIANTS)
    p.add_argument("--hidden", type=int, default=16, help="DKA width m (paper: 16 classification, 192 segmentation)")
    p.add_argument("--conv-grids", nargs="+", type=_grid, default=None, metavar="HxW",
                   help="time the DualKernelConv alone on these token grids (two-branch vs single kernel)")
    args = p.parse_args(argv)

    cfg, device, device_name = setup(args, PRESETS)
    cfg["hidden"] = args.hidden
    command = "python scripts/bench_dka.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.conv_grids:
        batch = args.batch if args.batch is not None else 8
        rows = conv_bench(args.conv_grids, args.hidden, batch, device)
        meta = {"device": device.type, "device_name": device_name, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "large_kernel": 51, "small_kernel": 5, "command": command}
        return report({"meta": meta, "conv_results": rows, "markdown": conv_markdown(rows, meta)}, args.out)
    if "linear_probe" not in args.variants:
        args.variants = ["linear_probe", *args.variants]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    rows = bench(args.variants, cfg, device)
    probe = PeftClassifier(cfg["backbone"], 2, image_size=cfg["image_size"], model_kwargs=cfg["model_kwargs"])
    grid = probe.backbone.grid_size
    meta = {**cfg, "preset": args.preset, "device": device.type, "device_name": device_name,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "grid": list(grid),
            "num_blocks": len(probe.backbone.blocks), "large_kernel": 51,
            "merged_kernel": list(cropped_kernel_size(51, grid)),
            "command": command}
    return report({"meta": meta, "results": rows, "markdown": markdown(rows, meta)}, args.out)


if __name__ == "__main__":
    main()
