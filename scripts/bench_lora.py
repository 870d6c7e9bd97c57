"""Benchmark our LoRA (Q and V of the fused qkv) against Hugging Face peft's LoRA, measured in one run.

Variants (the same seeded random timm backbone and a ``num_classes``-way linear head):

* ``frozen``: the frozen backbone alone, only the head trains (a reference, ``peft="linear_probe"``);
* ``floor``: ``frozen`` with the position embedding trainable as well: the step then back-propagates
  through every frozen block to the input, as any method adapting the first block must, but adds no
  low-rank arithmetic. Its time is the floor of a LoRA step on this backbone (a reference row: its
  trainable count differs);
* ``ours``: ``PeftClassifier(model, num_classes, peft={"method": "lora", "rank": 8})``: rank 8 on Q and on
  V of every block's ``attn.qkv``, K untouched (:class:`medpeft_monai.peft.LoRALinear`);
* ``peft``: the timm model (same weights) through ``peft.get_peft_model`` with
  ``LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], lora_dropout=0.0, modules_to_save=["head"])``:
  rank 8 on the whole qkv. Per block that is 8*d + 3d*8 trainable parameters, the same as ours'
  2 * (8*d + d*8), so the trainable counts are equal (checked).

For each: trainable parameters, median training-step time (train mode; forward, cross-entropy, backward,
AdamW step) and median unmerged inference time (eval, ``torch.inference_mode`` forward). The variants are timed
round-robin (one iteration of each in turn, :func:`bench_common.interleaved`) so load changes hit all
of them alike; this is repeated ``--repeats`` times (each with its own warm-up) and the table gives the
median over repeats of each repeat's median, the ratios ours/peft of those, and the range of the
per-repeat ratios (each measured under the same load). Trainable parameters are set to small random
values first (B != 0; timing does not depend on the values), after checking that ours and peft give the
same logits at initialisation (B = 0).

Needs Hugging Face ``peft`` (``pip install peft``), a benchmark-only dependency that is not part of the
package requirements.

Examples::

    python scripts/bench_lora.py                                            # ViT-B/16, 224 px, batch 4, CPU
    python scripts/bench_lora.py --preset smoke                             # seconds (vit_tiny, 64 px)
    python scripts/bench_lora.py --model vit_tiny_patch16_224 --image-size 64 --repeats 1 --iters 2
    python scripts/bench_lora.py --repeats 5 --iters 10 --out bench_lora_cpu.md   # .json: full results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import timm
import torch

from medpeft_monai.nets import PeftClassifier
from medpeft_monai.peft import count_parameters
from medpeft_monai.utils import write_text_atomic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import add_common_arguments, classification_closures, interleaved, setup  # noqa: E402

PRESETS = {
    "cpu": {"backbone": "vit_base_patch16_224", "model_kwargs": {}, "image_size": 224, "batch": 4,
            "warmup": 2, "iters": 10, "repeats": 3},
    "smoke": {"backbone": "vit_tiny_patch16_224", "model_kwargs": {}, "image_size": 64, "batch": 4,
              "warmup": 1, "iters": 3, "repeats": 1},
}
VARIANTS = ("frozen", "floor", "ours", "peft")
NUM_CLASSES = 10
RANK = 8


def import_peft():
    try:
        import peft
    except ImportError as err:
        raise SystemExit("scripts/bench_lora.py compares against Hugging Face peft, which is not installed. "
                         "Install it (benchmark only, not a package requirement): pip install peft") from err
    return peft


def _common(cfg: dict) -> dict:
    return {"image_size": cfg["image_size"], "model_kwargs": cfg["model_kwargs"]}


def build_ours(cfg: dict) -> PeftClassifier:
    torch.manual_seed(0)
    return PeftClassifier(cfg["backbone"], NUM_CLASSES, peft={"method": "lora", "rank": RANK, "alpha": RANK},
                          **_common(cfg))


def build_frozen(cfg: dict) -> PeftClassifier:
    torch.manual_seed(0)
    return PeftClassifier(cfg["backbone"], NUM_CLASSES, peft="linear_probe", **_common(cfg))


def build_peft(cfg: dict, frozen: PeftClassifier, head: torch.nn.Linear) -> torch.nn.Module:
    """The timm classifier with the frozen reference's backbone weights and ``head``'s weights, through peft."""
    peft = import_peft()
    model = timm.create_model(cfg["backbone"], pretrained=False, num_classes=NUM_CLASSES,
                              img_size=cfg["image_size"], **cfg["model_kwargs"])
    state = dict(frozen.backbone.model.state_dict())
    state.update({"head.weight": head.weight.detach(), "head.bias": head.bias.detach()})
    model.load_state_dict(state)
    config = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["qkv"], lora_dropout=0.0,
                             modules_to_save=["head"])
    return peft.get_peft_model(model, config)


def build_all(variants: list[str], cfg: dict, device: torch.device) -> tuple[dict, float, int]:
    """The models (on ``device``), the largest logit difference ours vs peft at initialisation and the
    head's parameter count."""
    frozen = build_frozen(cfg)
    ours = build_ours(cfg)
    peft_model = build_peft(cfg, frozen, ours.head[1])
    x = torch.randn(2, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        init_diff = (ours.eval()(x) - peft_model.eval()(x)).abs().max().item()
    floor = build_frozen(cfg)
    floor.backbone.model.pos_embed.requires_grad_(True)
    models = {"frozen": frozen, "floor": floor, "ours": ours, "peft": peft_model}
    for name in ("ours", "peft"):
        torch.manual_seed(0)
        with torch.no_grad():  # trained-like, non-zero adapters (timing does not depend on the values)
            for p in models[name].parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
    head_params = sum(p.numel() for p in ours.head.parameters())
    return {v: models[v].to(device) for v in variants}, init_diff, head_params


def bench(variants: list[str], cfg: dict, device: torch.device) -> tuple[dict, float, int]:
    models, init_diff, head_params = build_all(variants, cfg, device)
    fns = {v: classification_closures(m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3),
                                      cfg, NUM_CLASSES, device) for v, m in models.items()}
    rounds = {"train": [], "infer": []}
    for _ in range(cfg["repeats"]):
        rounds["train"].append(interleaved({v: f[0] for v, f in fns.items()}, device, cfg["warmup"], cfg["iters"]))
        rounds["infer"].append(interleaved({v: f[1] for v, f in fns.items()}, device, cfg["warmup"], cfg["iters"]))
    results = {}
    for v, model in models.items():
        trainable, total = count_parameters(model)
        results[v] = {"trainable_params": trainable, "total_params": total}
        for kind in ("train", "infer"):
            per_round = [r[v] for r in rounds[kind]]
            ratios = [r[v] / r["peft"] for r in rounds[kind]]
            results[v][kind] = {"median_ms": statistics.median(per_round), "per_repeat_ms": per_round,
                                "x_peft": statistics.median(per_round) / statistics.median(
                                    [r["peft"] for r in rounds[kind]]),
                                "x_peft_per_repeat": ratios}
    if results["ours"]["trainable_params"] != results["peft"]["trainable_params"]:
        raise SystemExit(f"Trainable counts differ: ours {results['ours']['trainable_params']:,}, peft "
                         f"{results['peft']['trainable_params']:,}; the comparison would not be like for like.")
    return results, init_diff, head_params


def markdown(results: dict, meta: dict) -> str:
    def cell(r: dict, kind: str) -> tuple[str, str]:
        t = r[kind]
        lo, hi = min(t["x_peft_per_repeat"]), max(t["x_peft_per_repeat"])
        ms = min(t["per_repeat_ms"]), max(t["per_repeat_ms"])
        return (f"{t['median_ms']:.1f} ({ms[0]:.1f}-{ms[1]:.1f})",
                f"{t['x_peft']:.3f} ({lo:.3f}-{hi:.3f})")

    lines = [
        (f"Backbone `{meta['backbone']}` {meta['model_kwargs'] or ''} at {meta['image_size']} px, batch "
         f"{meta['batch']}, {NUM_CLASSES} classes, LoRA rank {RANK} (alpha {RANK}); device "
         f"{meta['device_name']}, {meta['threads']} CPU thread(s); {meta['repeats']} repeat(s) of "
         f"{meta['iters']} round-robin iterations after {meta['warmup']} warm-up each: median over repeats of "
         f"each repeat's median, in brackets the range over repeats. torch {meta['torch']}, timm "
         f"{meta['timm']}, peft {meta['peft']}; load average at start {meta['loadavg']}."),
        "",
        f"Command: `{meta['command']}`",
        "",
        ("Ours and peft at initialisation (B = 0): max |logit difference| "
         f"{meta['init_logit_diff']:.2e}. Trainable parameters include the {meta['head_params']:,} of the head."),
        "",
        "| variant | trainable params | train step (ms) | x peft | inference (ms) | x peft |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v, r in results.items():
        train, train_x = cell(r, "train")
        infer, infer_x = cell(r, "infer")
        lines.append(f"| {v} | {r['trainable_params']:,} | {train} | {train_x} | {infer} | {infer_x} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], conflict_handler="resolve",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, PRESETS, VARIANTS)
    p.add_argument("--out", default=None,
                   help="write the markdown table atomically (the full results as JSON if the name ends in .json)")
    p.add_argument("--model", default=None, help="timm model name (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None,
                   help="independent round-robin runs (each --warmup + --iters); the spread is over these")
    args = p.parse_args(argv)
    import_peft()

    cfg, device, device_name = setup(args, PRESETS)
    if args.model is not None:
        cfg["backbone"] = args.model
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    if min(cfg["repeats"], cfg["iters"]) < 1 or cfg["warmup"] < 0:
        raise SystemExit("--repeats and --iters must be >= 1, --warmup >= 0.")
    variants = [v for v in VARIANTS if v in {*args.variants, "ours", "peft"}]  # ratios need ours and peft

    loadavg = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results, init_diff, head_params = bench(variants, cfg, device)
    peft = import_peft()

    meta = {**cfg, "preset": args.preset, "device": device.type, "device_name": device_name,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "peft": peft.__version__, "init_logit_diff": init_diff, "head_params": head_params,
            "loadavg": loadavg,
            "command": "python scripts/bench_lora.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    table = markdown(results, meta)
    print(table, end="")
    result = {"meta": meta, "results": results, "markdown": table}
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n" if args.out.endswith(".json") else table)
    return result


if __name__ == "__main__":
    main()
