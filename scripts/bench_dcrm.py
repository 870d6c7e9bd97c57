"""Benchmark DCRM-ViT against the frozen backbone (linear probe) and LoRA, measured in one run.

Variants (all classifiers with the same frozen backbone and a linear head):

* ``linear_probe``: the frozen backbone alone (the reference);
* ``lora``: LoRA rank 8 on Q and V of every block (``{"method": "lora"}``);
* ``dcrm``: DCRM-ViT with its defaults (router, PSN, RMB on Q/V, relative DAB) in every block;
* ``dcrm_no_dab``: the same without the Domain-Aware Bias (a float attention mask can change which
  fused attention kernel runs, so its cost is reported separately).

Reported:

* trainable parameters without the head, and their share of the frozen backbone's parameters (paper:
  about 3.5 % at ViT-B/16);
* the PSN's parameters and per-image FLOPs (analytic :func:`~medpeft_monai.peft.dcrm.psn_flops`, checked
  against ``torch.utils.flop_counter`` by the tests) and its share of the backbone's forward FLOPs (paper:
  under 0.04 %); the router's FLOPs; the whole model's forward FLOPs relative to the frozen backbone
  (``FlopCounterMode``, one image);
* median inference time per batch (eval, ``torch.inference_mode``, one forward pass, no test-time
  updates) and median joint training-step time (forward, L_task + L_domain + L_reg, backward, AdamW),
  measured round-robin after warm-up so machine-load changes hit every variant alike; ratios are to the
  linear probe and to LoRA in the same run.

Examples::

    python scripts/bench_dcrm.py                                    # small CPU preset
    python scripts/bench_dcrm.py --preset vitb --device cuda --out bench_dcrm_vitb.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from medpeft_monai.losses import dcrm_total_loss
from medpeft_monai.nets import PeftClassifier
from medpeft_monai.nets.dcrm import DCRMClassifier
from medpeft_monai.peft import count_parameters
from medpeft_monai.peft.dcrm import TALer, find_controller, psn_flops, router_flops
from medpeft_monai.utils import write_text_atomic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import add_common_arguments, interleaved, setup  # noqa: E402

PRESETS = {
    "cpu": {"backbone": "vit_tiny_patch16_224", "model_kwargs": {"depth": 12}, "image_size": 96, "batch": 8,
            "warmup": 3, "iters": 15},
    "vitb": {"backbone": "vit_base_patch16_224", "model_kwargs": {}, "image_size": 224, "batch": 32,
             "warmup": 5, "iters": 20},
}
VARIANTS = ("linear_probe", "lora", "dcrm", "dcrm_no_dab")
NUM_CLASSES = 10


def build(variant: str, cfg: dict, num_domains: int):
    torch.manual_seed(0)
    common = {"image_size": cfg["image_size"], "model_kwargs": cfg["model_kwargs"]}
    if variant == "linear_probe":
        model = PeftClassifier(cfg["backbone"], NUM_CLASSES, peft="linear_probe", **common)
    elif variant == "lora":
        model = PeftClassifier(cfg["backbone"], NUM_CLASSES, peft={"method": "lora", "rank": 8}, **common)
    else:
        model = DCRMClassifier(cfg["backbone"], NUM_CLASSES, num_domains=num_domains,
                               peft={"use_dab": variant == "dcrm"}, **common)
    with torch.no_grad():  # trained-like, non-zero modules (timing does not depend on the values)
        for n, p in model.named_parameters():
            if p.requires_grad and not n.endswith("log_inner_lr"):
                p.normal_(0, 0.02)
    return model


def prepare(variant: str, cfg: dict, device: torch.device, num_domains: int):
    model = build(variant, cfg, num_domains).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"], generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (cfg["batch"],), generator=gen).to(device)
    d = torch.randint(0, num_domains, (cfg["batch"],), generator=gen).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    is_dcrm = isinstance(model, DCRMClassifier)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        if is_dcrm:
            out = model(x, return_outputs=True)
            task, _ = dcrm_total_loss(F.cross_entropy(out.pred, y), out.domain_logits, d, out.synth_reg)
        else:
            task = F.cross_entropy(model(x), y)
        task.backward()
        opt.step()

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    return model, train_step, infer


def forward_flops(model: torch.nn.Module, cfg: dict, device: torch.device) -> int:
    model.eval()
    x = torch.randn(1, 3, cfg["image_size"], cfg["image_size"], device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def bench(variants: list[str], cfg: dict, device: torch.device, num_domains: int, train: bool) -> tuple[list, dict]:
    prepared = {v: prepare(v, cfg, device, num_domains) for v in variants}
    infer = interleaved({v: p[2] for v, p in prepared.items()}, device, cfg["warmup"], cfg["iters"])
    steps = (interleaved({v: p[1] for v, p in prepared.items()}, device, cfg["warmup"], cfg["iters"])
             if train else {})
    probe = prepared["linear_probe"][0]
    backbone_params = sum(p.numel() for p in probe.backbone.parameters())
    head_params = sum(p.numel() for p in probe.head.parameters())
    backbone_flops = forward_flops(probe.backbone, cfg, device)
    rows = []
    for v, (model, _, _) in prepared.items():
        trainable, total = count_parameters(model)
        row = {"variant": v, "trainable_params": trainable - head_params, "total_params": total,
               "trainable_share_of_backbone": (trainable - head_params) / backbone_params,
               "forward_flops": forward_flops(model, cfg, device), "inference_ms": infer[v],
               "inference_images_per_s": cfg["batch"] / infer[v] * 1e3,
               "train_step_ms": steps.get(v)}
        rows.append(row)
    dcrm = next((prepared[v][0] for v in ("dcrm", "dcrm_no_dab") if v in prepared), None)
    psn = {}
    if dcrm is not None:
        ctrl = find_controller(dcrm)
        talers = [m for m in dcrm.modules() if isinstance(m, TALer)]
        c = dcrm.peft_config
        cost = psn_flops(talers[0].width, num_domains, len(talers), c.rank, c.bank_size, c.bottleneck, c.use_rescale)
        hidden = ctrl.router.contract.out_features
        psn = {"psn_params": sum(p.numel() for p in ctrl.psn.parameters()), "psn_flops": cost["total"],
               "psn_mlp_flops": cost["mlp"], "psn_materialise_flops": cost["materialise"],
               "router_params": sum(p.numel() for p in ctrl.router.parameters()),
               "router_flops": router_flops(talers[0].width, num_domains, dcrm.backbone.grid_size, hidden,
                                            c.gate_channels),
               "backbone_flops": backbone_flops, "backbone_params": backbone_params,
               "psn_flops_share": cost["total"] / backbone_flops}
    return rows, psn


def markdown(rows: list[dict], psn: dict, meta: dict) -> str:
    ref = next(r for r in rows if r["variant"] == "linear_probe")
    lora = next((r for r in rows if r["variant"] == "lora"), None)
    train = ref["train_step_ms"] is not None
    lines = [
        (f"Backbone `{meta['backbone']}` {meta['model_kwargs'] or ''} at {meta['image_size']} px, batch "
         f"{meta['batch']}, {meta['num_classes']} classes, K={meta['num_domains']} domains; device "
         f"{meta['device_name']}, {meta['threads']} CPU thread(s); median of {meta['iters']} round-robin "
         f"iterations after {meta['warmup']} warm-up. Trainable params exclude the head."),
        "",
        "| variant | trainable params | share of backbone | fwd GFLOPs/img | x frozen | inference (ms) | "
        "img/s | time x frozen | time x LoRA |" + (" train step (ms) | x frozen |" if train else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if train else ""),
    ]
    for r in rows:
        line = (f"| {r['variant']} | {r['trainable_params']:,} | {100 * r['trainable_share_of_backbone']:.2f} % | "
                f"{r['forward_flops'] / 1e9:.3f} | {r['forward_flops'] / ref['forward_flops']:.3f} | "
                f"{r['inference_ms']:.1f} | {r['inference_images_per_s']:.1f} | "
                f"{r['inference_ms'] / ref['inference_ms']:.2f} | "
                + (f"{r['inference_ms'] / lora['inference_ms']:.2f} |" if lora else "- |"))
        if train:
            line += f" {r['train_step_ms']:.1f} | {r['train_step_ms'] / ref['train_step_ms']:.2f} |"
        lines.append(line)
    if psn:
        lines += [
            "",
            (f"PSN: {psn['psn_params']:,} parameters, {psn['psn_flops'] / 1e6:.2f} MFLOPs per image "
            f"(MLP {psn['psn_mlp_flops'] / 1e6:.2f} + forming W(x) from the bank "
            f"{psn['psn_materialise_flops'] / 1e6:.2f}) = {100 * psn['psn_flops_share']:.4f} % of the frozen "
            f"backbone's {psn['backbone_flops'] / 1e9:.2f} GFLOPs; router: {psn['router_params']:,} parameters, "
            f"{psn['router_flops'] / 1e6:.2f} MFLOPs per image."),
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, PRESETS, VARIANTS)
    p.add_argument("--num-domains", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    args = p.parse_args(argv)

    cfg, device, device_name = setup(args, PRESETS)
    variants = ["linear_probe", *[v for v in args.variants if v != "linear_probe"]]

    rows, psn = bench(variants, cfg, device, args.num_domains, train=not args.no_train)
    meta = {**cfg, "preset": args.preset, "device": device.type, "device_name": device_name,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "num_classes": NUM_CLASSES,
            "num_domains": args.num_domains,
            "command": "python scripts/bench_dcrm.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    table = markdown(rows, psn, meta)
    print(table)
    result = {"meta": meta, "results": rows, "psn": psn, "markdown": table}
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
