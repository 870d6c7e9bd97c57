"""Cross-modal transfer ablation: the paper's rows and a missing-modality table, through the two bundles.

Stage 1 (``bundles/crossmodal_pretrain``) runs in three variants: MAE only (``--dino False``), MAE + DINO with
uniform patch weights (``--error_alpha 0``) and full PSST (error-weighted patch guidance). Stage 2
(``bundles/crossmodal_segmentation``) then trains on each, plus: no stage 1 (``--modality_lora "{}"``), full
stage 1 with plain concatenation fusion (``--fusion concat``, no MoME) and full stage 1 without masked-modality
training (``--modality_dropout 0``). Every stage-2 model is scored on the test split for every non-empty subset
of the sequences (missing ones as all-zero channels; MONAI's ``DiceMetric``, lesion class, mean over images).

Every run is a ``python -m monai.bundle run`` of a bundle copy with the same budget. Writes
``<out>/crossmodal_ablation.csv`` (one row per stage-2 model and seed, one column per subset) and prints the two
markdown tables for BENCHMARKS.md::

    python scripts/crossmodal_ablation.py --out /tmp/crossmodal_ablation --seeds 0 1
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import bundle_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = ("t1", "t2", "flair")
STAGE1 = {
    "mae": ["--dino", "False"],
    "dino_uniform": ["--error_alpha", "0"],
    "full": [],
}
STAGE2 = [  # (row name, stage-1 variant or None, extra stage-2 overrides)
    ("stage 2 only", None, []),
    ("+ MAE", "mae", []),
    ("+ MAE + DINO (uniform patch weights)", "dino_uniform", []),
    ("full (error-weighted guidance, MoME)", "full", []),
    ("full, concat fusion instead of MoME", "full", ["--fusion", "concat"]),
    ("full, no masked-modality training", "full", ["--modality_dropout", "0"]),
]
SUBSETS = [s for k in (3, 2, 1) for s in itertools.combinations(SEQUENCES, k)]


@torch.no_grad()
def subset_dice(seg_bundle: Path, ckpt: Path, overrides: dict) -> dict[str, float]:
    """Test Dice (lesion) of one trained stage-2 model for every non-empty subset of the sequences."""
    from monai.bundle import ConfigParser
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from medpeft_monai.data import load_datalist

    parser = ConfigParser()
    parser.read_config([str(seg_bundle / "configs" / "train.json")])
    parser["bundle_root"] = str(seg_bundle)
    for k, v in overrides.items():
        parser[k] = v
    net = parser.get_parsed_content("network_def", lazy=False).eval()
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    pre = parser.get_parsed_content("validate#preprocessing")
    items = [pre(d) for d in load_datalist(parser.get_parsed_content("datalist"), "test")]
    x = torch.stack([torch.as_tensor(i["image"]) for i in items])
    y = torch.stack([torch.as_tensor(i["label"]) for i in items]).long()
    out = {}
    for subset in SUBSETS:
        keep = torch.tensor([s in subset for s in SEQUENCES])
        pred = net(x * keep.view(1, -1, 1, 1)).argmax(1, keepdim=True)
        metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
        metric(one_hot(pred, 2), one_hot(y, 2))
        out["+".join(subset)] = float(metric.aggregate())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (bundle copies, logs, CSV)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--stage1_args", nargs=argparse.REMAINDER, default=[],
                    help="extra overrides for every stage-1 run (after all other options)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    begin = time.perf_counter()
    for seed in args.seeds:
        init = ["--initialize", f"['$monai.utils.set_determinism(seed={seed})']"]
        work = out / f"seed{seed}"
        seg = work / "crossmodal_segmentation"
        if not seg.exists():
            shutil.copytree(ROOT / "bundles" / "crossmodal_segmentation", seg,
                            ignore=shutil.ignore_patterns("models", "eval"))
        stage1_dirs = {}
        for name, extra in STAGE1.items():
            pre = work / f"crossmodal_pretrain_{name}"
            if not (pre / "models" / "modality_lora_mri.pt").is_file():
                shutil.rmtree(pre, ignore_errors=True)
                shutil.copytree(ROOT / "bundles" / "crossmodal_pretrain", pre,
                                ignore=shutil.ignore_patterns("models", "eval"))
                t = bundle_run(pre, ["train.json"], [*extra, *init, *args.stage1_args], work / f"stage1_{name}.log")
                print(f"[{time.perf_counter() - begin:6.0f} s] seed {seed} stage 1 {name}: {t:.0f} s", flush=True)
            stage1_dirs[name] = pre
        for row, stage1, extra in STAGE2:
            tag = f"{stage1 or 'none'}_{'_'.join(a.strip('-') for a in extra) or 'default'}"
            ckpt_dir = seg / f"models_{tag}"
            lora = {} if stage1 is None else {"mri": str(stage1_dirs[stage1] / "models" / "modality_lora_mri.pt")}
            run_args = ["--modality_lora", str(lora), "--ckpt_dir", str(ckpt_dir), *extra, *init]
            seconds = float("nan")  # a model left by an earlier (interrupted) run is reused, not retrained
            if not (ckpt_dir / "model.pt").is_file():
                seconds = bundle_run(seg, ["train.json"], run_args, work / f"stage2_{tag}.log")
            overrides = {"modality_lora": lora}
            for i in range(0, len(extra), 2):
                key, value = extra[i].strip("-"), extra[i + 1]
                overrides[key] = float(value) if key == "modality_dropout" else value
            dice = subset_dice(seg, ckpt_dir / "model.pt", overrides)
            rows.append({"row": row, "seed": seed, "train_s": round(seconds, 1), **dice})
            print(f"[{time.perf_counter() - begin:6.0f} s] seed {seed} {row}: all three {dice['t1+t2+flair']:.3f}",
                  flush=True)
    from medpeft_monai.utils import write_csv_atomic

    header = ["row", "seed", "train_s"] + ["+".join(s) for s in SUBSETS]
    write_csv_atomic(out / "crossmodal_ablation.csv", header, [[r[h] for h in header] for r in rows])
    print(tables(rows))


def tables(rows: list[dict]) -> str:
    """The two markdown tables: ablation rows (all sequences, and mean over the six incomplete subsets) and the
    missing-modality table (full model with and without masked-modality training), mean ± sd over seeds."""
    def stat(values):
        a = np.asarray(values, dtype=float)
        return f"{a.mean():.3f}" + (f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else "")

    names = [r for r, _, _ in STAGE2]
    incomplete = ["+".join(s) for s in SUBSETS[1:]]
    lines = ["| model | test Dice, T1+T2+FLAIR | mean test Dice over the 6 incomplete subsets |", "|---|---|---|"]
    for name in names:
        sel = [r for r in rows if r["row"] == name]
        lines.append(f"| {name} | {stat([r['t1+t2+flair'] for r in sel])} | "
                     f"{stat([np.mean([r[k] for k in incomplete]) for r in sel])} |")
    lines += ["", "| sequences given | " + " | ".join(names[3:4] + names[5:6]) + " |", "|---|---|---|"]
    for subset in ["+".join(s) for s in SUBSETS]:
        cells = [stat([r[subset] for r in rows if r["row"] == n]) for n in (names[3], names[5])]
        lines.append(f"| {subset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
