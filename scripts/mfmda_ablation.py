"""MFM-DA ablation on the fundus sample set, through the ``mfmda_fundus`` bundle.

Stage 1 runs once per seed: the source DDPM, then target adaptation twice (full instance-aware adaptor, and the
static direction only, ``--dynamic False``), each followed by translation of the labelled source images. Stage 2
(LoRA on the frozen LiteMedSAM encoder) then trains five ways with the same budget:

* source only (``--use_translations False``),
* LoRA on the translations (full adaptation) without alignment (``--align_weight 0``),
* static-direction translations with alignment,
* full MFM-DA (full adaptation, alignment),
* full MFM-DA with the alignment loss weighted 0.1 (the paper weights it 1).

Each model is scored on the target camera's labelled test images (``target_test``: the bundle's
``evaluate.json``, Dice per image for disc and cup at the network grid, mean over images). Translation quality is
the Frechet distance between frozen-encoder embeddings (LiteMedSAM, pooled) of a set of images and the target
camera's 18 images, and the mean absolute difference of per-channel mean and std in [-1, 1]; for the source
images, the source DDPM's translations (no adaptation) and both adapted translations. With 18-24 images per
set the Frechet distance is a small-sample figure: compare rows, not papers.

Writes ``<out>/mfmda_ablation.csv`` and ``<out>/mfmda_translation.csv`` and prints the markdown tables::

    python scripts/mfmda_ablation.py --out /tmp/mfmda_ablation --seeds 0
"""

from __future__ import annotations

import argparse
import csv
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
DIFF = ["diffusion.json"]
ROWS = [  # (row name, translation set or None, stage-2 overrides)
    ("source only", None, ["--use_translations", "False"]),
    ("translations (full adaptor), no alignment", "full", ["--align_weight", "0"]),
    ("translations (static direction only) + alignment", "static", []),
    ("full MFM-DA (instance-aware adaptor + alignment)", "full", []),
    ("full MFM-DA, alignment weight 0.1", "full", ["--align_weight", "0.1"]),
]


def target_dice(bundle: Path, ckpt_dir: Path, out_dir: Path, log: Path, init: list[str]) -> tuple[float, float]:
    """(disc, cup) mean Dice over the target test images, from the bundle's evaluate.json per-image report."""
    bundle_run(bundle, ["train.json", "evaluate.json"], ["--ckpt_dir", str(ckpt_dir), "--output_dir", str(out_dir),
                                                         "--use_translations", "False", *init], log)
    with open(out_dir / "val_mean_dice_raw.csv") as f:
        rows = list(csv.reader(f))
    header, values = rows[0], np.array([[float(v) for v in r[1:3]] for r in rows[1:]])
    assert header[1:3] == ["optic disc", "optic cup"], header
    disc, cup = np.nanmean(values, axis=0)
    return float(disc), float(cup)


@torch.no_grad()
def translation_quality(bundle: Path, sets: dict[str, list[str]], target: list[str]) -> dict[str, dict]:
    """Frechet distance of frozen-encoder embeddings and colour-statistics gap of each image set to ``target``."""
    from scipy import linalg

    from medpeft_monai.data.transforms import diffusion_transforms, stack_images
    from medpeft_monai.nets import FrozenImageEncoder

    encoder = FrozenImageEncoder(image_size=64)
    load = diffusion_transforms("eval", image_size=(64, 64))

    def stats(files):
        x = stack_images([{"image": f} for f in files], load)
        emb = encoder(x)[0].double().numpy()
        colour = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).mean(0).numpy()
        return emb.mean(0), np.cov(emb, rowvar=False), colour

    mu_t, cov_t, col_t = stats(target)
    out = {}
    for name, files in sets.items():
        mu, cov, col = stats(files)
        covmean = linalg.sqrtm(cov @ cov_t).real
        fd = float(((mu - mu_t) ** 2).sum() + np.trace(cov + cov_t - 2 * covmean))
        out[name] = {"frechet": fd, "colour_gap": float(np.abs(col - col_t).mean()), "n": len(files)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (bundle copy, logs, CSV)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    from medpeft_monai.data import load_datalist
    from medpeft_monai.utils import write_csv_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    rows, quality = [], []

    def say(msg):
        print(f"[{time.perf_counter() - begin:6.0f} s] {msg}", flush=True)

    for seed in args.seeds:
        init = ["--initialize", f"['$monai.utils.set_determinism(seed={seed})']"]
        work = args.out / f"seed{seed}"
        bundle = work / "mfmda_fundus"
        if not bundle.exists():
            shutil.copytree(ROOT / "bundles" / "mfmda_fundus", bundle,
                            ignore=shutil.ignore_patterns("models", "eval", "translated"))
        models, times = bundle / "models", {}
        if not (models / "ddpm_source.pt").is_file():
            times["ddpm"] = bundle_run(bundle, DIFF + ["ddpm_train.json"], init, work / "ddpm.log")
            say(f"seed {seed} source DDPM: {times['ddpm']:.0f} s")
        translated = {}
        for name, adapt_args in (("full", []), ("static", ["--dynamic", "False"])):
            ddpm = models / f"ddpm_target_{name}.pt"
            if not ddpm.is_file():
                times[f"adapt_{name}"] = bundle_run(bundle, DIFF + ["adapt.json"],
                                                    ["--ddpm_target_file", str(ddpm), *adapt_args, *init],
                                                    work / f"adapt_{name}.log")
                say(f"seed {seed} target adaptation ({name}): {times[f'adapt_{name}']:.0f} s")
            translated[name] = bundle / f"translated_{name}"
        translated["none"] = bundle / "translated_none"
        for name, folder in translated.items():
            if not (folder / "datalist.json").is_file():
                src = models / ("ddpm_source.pt" if name == "none" else f"ddpm_target_{name}.pt")
                bundle_run(bundle, DIFF + ["translate.json"], ["--translate_from", str(src), "--translated_dir",
                                                               str(folder), *init], work / f"translate_{name}.log")
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "train.json"))
        parser["bundle_root"] = str(bundle)
        datalist = parser.get_parsed_content("datalist")
        target = [e["image"] for s in ("target_unlabeled", "target_test") for e in load_datalist(datalist, s)]
        sets = {"source images": [e["image"] for e in load_datalist(datalist, "training")]}
        sets.update({f"translated, {k} adaptation" if k != "none" else "translated by the source DDPM (no adaptation)":
                     [e["image"] for e in load_datalist(translated[k] / "datalist.json", "training")]
                     for k in ("none", "static", "full")})
        for name, q in translation_quality(bundle, sets, target).items():
            quality.append({"seed": seed, "images": name, **q})
        for row, tset, extra in ROWS:
            tag = ROWS.index((row, tset, extra))
            ckpt = work / f"stage2_{tag}"
            run_args = ["--ckpt_dir", str(ckpt), *extra, *init]
            if tset is not None:
                run_args += ["--translated_datalist", str(translated[tset] / "datalist.json")]
            seconds = float("nan")
            if not (ckpt / "model.pt").is_file():
                seconds = bundle_run(bundle, ["train.json"], run_args, work / f"stage2_{tag}.log")
            disc, cup = target_dice(bundle, ckpt, work / f"eval_{tag}", work / f"eval_{tag}.log", init)
            rows.append({"row": row, "seed": seed, "train_s": round(seconds, 1), "disc": disc, "cup": cup})
            say(f"seed {seed} {row}: target Dice disc {disc:.3f} cup {cup:.3f}")
    write_csv_atomic(args.out / "mfmda_ablation.csv", ["row", "seed", "train_s", "disc", "cup"],
                     [[r[k] for k in ("row", "seed", "train_s", "disc", "cup")] for r in rows])
    write_csv_atomic(args.out / "mfmda_translation.csv", ["seed", "images", "n", "frechet", "colour_gap"],
                     [[q[k] for k in ("seed", "images", "n", "frechet", "colour_gap")] for q in quality])
    print(tables(rows, quality))


def tables(rows: list[dict], quality: list[dict]) -> str:
    def stat(values):
        a = np.asarray(values, dtype=float)
        return f"{a.mean():.3f}" + (f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else "")

    lines = ["| stage 2 | target test Dice, disc | target test Dice, cup | mean |", "|---|---|---|---|"]
    for name, _, _ in ROWS:
        sel = [r for r in rows if r["row"] == name]
        lines.append(f"| {name} | {stat([r['disc'] for r in sel])} | {stat([r['cup'] for r in sel])} | "
                     f"{stat([(r['disc'] + r['cup']) / 2 for r in sel])} |")
    lines += ["", "| images vs the target camera's images | Frechet distance (encoder) | colour-statistics gap |",
              "|---|---|---|"]
    for name in dict.fromkeys(q["images"] for q in quality):
        sel = [q for q in quality if q["images"] == name]
        lines.append(f"| {name} | {stat([q['frechet'] for q in sel])} | {stat([q['colour_gap'] for q in sel])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
