"""Command line of :mod:`medpeft_monai.compare` (``python -m medpeft_monai.compare --help``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from medpeft_monai.compare import run
from medpeft_monai.compare.methods import DEFAULT_METHODS, METHOD_DEFAULTS

EXAMPLES = """examples:
  # your datalist (training / validation / test sections; no validation: 20 % of training is carved off)
  python -m medpeft_monai.compare --datalist my_data/datalist.json --in-chans 1 --out compare_out
  # a bundle's sample data, backbone and weights; methods on the last 2 blocks (frozen prefix reused)
  python -m medpeft_monai.compare --bundle bundles/dka_segmentation --last-blocks 2 --fractions 0.25 1 --folds 3
  # per-method settings
  python -m medpeft_monai.compare --datalist d.json --methods linear_probe lora dka --set dka.hidden=48 lora.rank=4
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medpeft_monai.compare", epilog=EXAMPLES,
                                description="Compare PEFT methods on your data: every method x training fraction "
                                            "x fold under one budget, one HTML report.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data and backbone")
    src.add_argument("--datalist", help="Decathlon-style datalist JSON (wins over --bundle's)")
    src.add_argument("--bundle", help="bundle folder whose configs/train.json gives the defaults below")
    src.add_argument("--backbone", help="timm name (default tiny_vit_5m_224, LiteMedSAM's encoder)")
    src.add_argument("--weights", help="'litemedsam' (default), 'none', 'hub' or a local weights file")
    src.add_argument("--image-size", type=int, nargs="+", help="network input size, e.g. 64 64 (default 64 64)")
    src.add_argument("--in-chans", type=int, help="image channels (default 1)")
    src.add_argument("--num-classes", type=int, help="classes incl. background (default: from the labels)")
    src.add_argument("--backbone-kwargs", type=json.loads, help='extra timm arguments as JSON, e.g. \'{"depth": 4}\'')
    m = p.add_argument_group("methods")
    m.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"from {', '.join(METHOD_DEFAULTS)}; METHOD@LABEL is a variant with its own --set "
                        f"settings; default: {' '.join(DEFAULT_METHODS)} (skipping those that do not apply)")
    m.add_argument("--set", dest="settings", nargs="+", default=[], metavar="METHOD.KEY=VALUE",
                   help="change one method's setting, e.g. dka.hidden=48 lora.rank=4 dka.adapter_lr=0.001")
    m.add_argument("--last-blocks", type=int, help="adapt only the last N blocks (every method that takes blocks)")
    s = p.add_argument_group("protocol and budget")
    s.add_argument("--fractions", type=float, nargs="+", help="training fractions in (0, 1] (default 0.25 1)")
    s.add_argument("--folds", type=int, help="random subsets per fraction (default 3)")
    s.add_argument("--steps", type=int, help="optimiser steps per run, the same for every method (default 200)")
    s.add_argument("--batch-size", type=int, help="default 8")
    s.add_argument("--evals", type=int, help="validation checks per run; the best state is tested (default 4)")
    s.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="choose --steps so that the whole sweep takes about this long (measured first)")
    s.add_argument("--augment", action="store_true", help="random flips/affine on training images (no reuse)")
    s.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                   help="recompute the frozen prefix every step (for timing; results are the same)")
    s.add_argument("--cache-memory-gb", type=float, help="memory for reused activations, beyond it on disk (2)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--out", default="compare_out", help="output folder; rerun into it to continue (compare_out)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(out=args.out, datalist=args.datalist, bundle=args.bundle, methods=args.methods,
                 settings=args.settings, last_blocks=args.last_blocks, device=args.device, progress=args.progress,
                 backbone=args.backbone, weights=args.weights, image_size=args.image_size, in_chans=args.in_chans,
                 num_classes=args.num_classes, backbone_kwargs=args.backbone_kwargs, fractions=args.fractions,
                 folds=args.folds, steps=args.steps, batch_size=args.batch_size, evals=args.evals,
                 augment=args.augment or None, cache=args.cache, cache_memory_gb=args.cache_memory_gb,
                 time_budget_s=None if args.time_budget is None else 60 * args.time_budget)
    for r in report["recommendation"]:
        print(f"{100 * r['fraction']:g} %: {r['verdict']}")
    print(f"report: {args.out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
