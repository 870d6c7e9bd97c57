"""Low-data protocol (DKA paper, Sec. 4): metric vs training fraction for several PEFT methods.

For every fraction f and fold k, a stratified random subset of ``max(1, round(f * n_c))`` training
items per class (seeded by ``k``) trains each method under the same budget (the same number of
training samples seen, ``--samples``, by repeating the subset; same epochs, batch size, seed),
and the model after the last epoch is scored on the bundle's fixed ``test`` split. No model
selection touches the test split.

Writes ``results.csv`` (one row per method x fraction x fold), ``summary.csv`` (mean +- std) and
``low_data.png`` (metric vs fraction, mean +- std per method) into ``--out`` and prints the table.

``--lrs ADAPTER:HEAD ...`` runs every method under each learning-rate pair instead of its default
(the method column then reads ``dka@0.001:0.0001``): the paper's asynchronous-learning-rate scan.

Examples (small sweeps on the sample data, a few minutes on a CPU)::

    python scripts/low_data.py --bundle bundles/dka_classification --fractions 0.1 0.25 1.0 --folds 2 \
        --methods linear_probe dka adapter --out low_data_out
    python scripts/low_data.py --bundle bundles/dka_classification --fractions 1.0 --folds 2 --methods dka \
        --lrs 0.003:0.003 0.001:0.0001 0.003:0.0003 0.0003:0.003 --out lr_sweep_out
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from medpeft_monai.utils import atomic_path, write_csv_atomic

PAPER_FRACTIONS = [0.0063, 0.0125, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
# method name in this script -> PEFT config; learning rates: (adapter, head)
METHODS = {
    "linear_probe": ({"method": "linear_probe"}, (1e-3, 1e-3)),
    "full": ({"method": "full"}, (1e-4, 1e-3)),
    "bitfit": ({"method": "bitfit"}, (1e-3, 1e-3)),
    "lora": ({"method": "lora", "rank": 8}, (1e-3, 1e-3)),
    "adapter": ({"method": "adapter", "hidden": 16}, (1e-3, 1e-3)),
    "convpass": ({"method": "convpass", "hidden": 8}, (1e-3, 1e-3)),
    "vpt": ({"method": "vpt", "num_prompts": 10, "deep": True}, (1e-3, 1e-3)),
    "dka": ({"method": "dka", "hidden": 16}, (1e-3, 1e-4)),
}


def subsample(items: list[dict], fraction: float, seed: int, label_key: str = "label") -> list[dict]:
    """Stratified subset: ``max(1, round(fraction * n_c))`` items of every class ``c``.

    Segmentation items (label is a path) form one stratum.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fractions must be in (0, 1], got {fraction}.")
    strata: dict = defaultdict(list)
    for it in items:
        lab = it.get(label_key)
        strata[lab if isinstance(lab, int) else "all"].append(it)
    rng = random.Random(seed)
    out = []
    for key in sorted(strata, key=str):
        group = list(strata[key])
        rng.shuffle(group)
        out += group[: max(1, round(fraction * len(group)))]
    rng.shuffle(out)
    return out


def parse_lrs(text: str) -> tuple[float, float]:
    """``"ADAPTER:HEAD"`` -> ``(adapter_lr, head_lr)``."""
    try:
        adapter, head = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lrs takes ADAPTER:HEAD pairs such as 0.001:0.0001, got {text!r}.")
    if min(adapter, head) <= 0:
        raise argparse.ArgumentTypeError(f"learning rates must be positive, got {text!r}.")
    return adapter, head


def run_one(bundle: Path, method: str, train_items: list[dict], args, workdir: str,
            lrs: tuple[float, float] | None = None) -> float:
    """Train ``method`` on ``train_items`` with the bundle's train.json (at ``lrs`` = (adapter, head),
    default the method's own) and score the test split."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    peft, (adapter_lr, head_lr) = METHODS[method]
    if lrs is not None:
        adapter_lr, head_lr = lrs
    repeats = max(1, math.ceil(args.samples / len(train_items)))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = workdir
    parser["peft"] = peft
    parser["adapter_lr"], parser["head_lr"] = adapter_lr, head_lr
    parser["epochs"] = args.epochs
    parser["train_datalist"] = train_items * repeats
    parser["val_datalist"] = f"$medpeft_monai.data.load_datalist(@datalist, '{args.test_key}')"
    parser["val_interval"] = args.epochs  # score once, after the last epoch
    for key, value in (args.override or {}).items():
        parser[key] = value
    set_determinism(seed=0)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    evaluator = parser.get_parsed_content("validate#evaluator")
    return float(evaluator.state.metrics[evaluator.state.key_metric_name])


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["fraction"])].append(r["metric"])
    out = []
    for (method, fraction), vals in sorted(groups.items()):
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append({"method": method, "fraction": fraction, "mean": statistics.fmean(vals), "std": std,
                    "folds": len(vals)})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    write_csv_atomic(path, list(rows[0]), [list(r.values()) for r in rows])


def plot(summary: list[dict], path: Path, metric_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({s["method"] for s in summary}):
        pts = sorted((s["fraction"], s["mean"], s["std"]) for s in summary if s["method"] == method)
        xs, ms, ss = zip(*pts)
        ax.errorbar([100 * x for x in xs], ms, yerr=ss, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("training data (%)")
    ax.set_ylabel(metric_name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def table(summary: list[dict]) -> str:
    fractions = sorted({s["fraction"] for s in summary})
    methods = sorted({s["method"] for s in summary})
    cell = {(s["method"], s["fraction"]): f"{s['mean']:.3f} ± {s['std']:.3f}" for s in summary}
    lines = ["| method | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell.get((m, f), "") for f in fractions) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder (with configs/train.json)")
    p.add_argument("--fractions", type=float, nargs="+", default=PAPER_FRACTIONS,
                   help="training fractions in (0, 1]; default: the paper's 0.63 %% ... 100 %%")
    p.add_argument("--folds", type=int, default=5, help="random subsets per fraction (paper: 5)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples", type=int, default=64,
                   help="training samples seen per epoch (the subset is repeated), identical for every run")
    p.add_argument("--test_key", default="test", help="datalist section used as the fixed test set")
    p.add_argument("--override", type=json.loads, default=None,
                   help='JSON dict of extra config overrides, e.g. \'{"image_size": [96, 96]}\'')
    p.add_argument("--lrs", type=parse_lrs, nargs="+", default=None, metavar="ADAPTER:HEAD",
                   help="run every method under each (adapter, head) learning-rate pair instead of its default")
    p.add_argument("--out", type=Path, default=Path("low_data_out"))
    args = p.parse_args(argv)

    from monai.bundle import ConfigParser

    if not (args.bundle / "configs" / "train.json").is_file():
        p.error(f"{args.bundle} has no configs/train.json; pass a bundle folder such as bundles/dka_classification.")
    args.out.mkdir(parents=True, exist_ok=True)
    parser = ConfigParser()
    parser.read_config(str(args.bundle / "configs" / "train.json"))
    train_items = parser.get_parsed_content("train_datalist")

    rows = []
    runs = [(m, lrs, m if lrs is None else f"{m}@{lrs[0]:g}:{lrs[1]:g}")
            for m in args.methods for lrs in (args.lrs or [None])]
    total = len(args.fractions) * args.folds * len(runs)
    done = 0
    for fraction in args.fractions:
        for fold in range(args.folds):
            subset = subsample(train_items, fraction, seed=fold)
            for method, lrs, label in runs:
                done += 1
                t0 = time.time()
                with tempfile.TemporaryDirectory() as work:
                    metric = run_one(args.bundle, method, subset, args, work, lrs)
                rows.append({"method": label, "fraction": fraction, "fold": fold, "n_train": len(subset),
                             "metric": metric})
                print(f"[{done}/{total}] fraction={100 * fraction:g}% fold={fold} method={label} "
                      f"n_train={len(subset)} metric={metric:.4f} ({time.time() - t0:.0f}s)", flush=True)
                write_csv(args.out / "results.csv", rows)
    summary = summarise(rows)
    write_csv(args.out / "summary.csv", summary)
    plot(summary, args.out / "low_data.png", "test metric")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
