"""Benchmark the Dual-Kernel Adapter against linear probing, measured in one run.

Variants (all a PeftClassifier with the same frozen backbone and a linear head):

* ``linear_probe``: the frozen backbone alone, only the head trains (the reference);
* ``dka``: DKA in every block, the two-branch reference (51x51 and 5x5 depthwise convolutions);
* ``dka_merged``: the same adapters after ``merge_peft``: one depthwise convolution per adapter with the
  merged kernel cropped to the token grid (training rebuilds that kernel from the parameters each step).

For each: trainable parameters, median training-step time (forward, cross-entropy, backward, AdamW step
with the paper's adapter/head learning rates) and median inference time (eval, ``torch.inference_mode``),
after warm-up iterations, with ``torch.cuda.synchronize`` on GPUs. The variants are timed round-robin
(one iteration of each in turn), so a change in machine load affects all of them alike; ratios are to
``linear_probe`` in the same run. On GPUs the peak allocated memory of one step is reported too.

Examples::

    python scripts/bench_dka.py                                  # small CPU preset
    python scripts/bench_dka.py --preset vitb --device cuda --out bench_dka_vitb.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import medpeft_monai.peft.dka  # noqa: F401  (registers "dka")
from medpeft_monai.nets.classifier import PeftClassifier
from medpeft_monai.peft import count_parameters, merge_peft, param_groups
from medpeft_monai.peft.dka import cropped_kernel_size
from medpeft_monai.utils import write_text_atomic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import add_common_arguments, interleaved, setup, sync  # noqa: E402

PRESETS = {
    "cpu": {"backbone": "vit_tiny_patch16_224", "model_kwargs": {"depth": 12}, "image_size": 96, "batch": 8,
            "warmup": 5, "iters": 20},
    "vitb": {"backbone": "vit_base_patch16_224", "model_kwargs": {}, "image_size": 224, "batch": 32,
             "warmup": 5, "iters": 20},
}
VARIANTS = ("linear_probe", "dka", "dka_merged")


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
    if variant == "dka_merged":
        merge_peft(model)
    return model.to(device)


def prepare(variant: str, cfg: dict, device: torch.device, num_classes: int = 10):
    """The model and its training-step and inference closures."""
    model = build(variant, cfg, device, num_classes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"], generator=gen).to(device)
    y = torch.randint(0, num_classes, (cfg["batch"],), generator=gen).to(device)
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-4))

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

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
        f"batch {meta['batch']}, "
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, PRESETS, VARIANTS)
    p.add_argument("--hidden", type=int, default=16, help="DKA width m (paper: 16 classification, 192 segmentation)")
    args = p.parse_args(argv)

    cfg, device, device_name = setup(args, PRESETS)
    cfg["hidden"] = args.hidden
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
            "command": "python scripts/bench_dka.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    table = markdown(rows, meta)
    print(table)
    result = {"meta": meta, "results": rows, "markdown": table}
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
