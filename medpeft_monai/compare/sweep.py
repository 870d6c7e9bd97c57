"""The comparison sweep: every method x training fraction x fold, trained under one budget and scored.

For a fraction ``f`` and fold ``j`` the training subset holds ``max(1, round(f * n_c))`` items of every
class ``c`` (segmentation: one stratum), drawn with seed ``j`` from the datalist's ``training`` section;
every method of the cell trains on that subset for the same number of optimiser steps and batch size
(seed ``j`` for the initialisation and the batch order), keeps the state with the best ``validation``
metric (checked ``evals`` times), and that state is scored on the ``test`` section. No choice looks at
the test section. A datalist without ``validation`` gets the documented split carved from ``training``
(:func:`medpeft_monai.data.load_datalist`).

Each finished cell writes ``runs/<method>/f<fraction>_fold<j>/result.json`` last (atomically), with the
hash of everything it depends on; a rerun skips the cells whose result matches, so a killed sweep
continues where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medpeft_monai.backbones import FrozenBackbone, as_plain_tensor
from medpeft_monai.compare.cache import PrefixCache, cacheable_start
from medpeft_monai.compare.methods import MethodSpec
from medpeft_monai.data import load_datalist
from medpeft_monai.data.transforms import classification_transforms, segmentation_transforms
from medpeft_monai.peft import PeftError, count_parameters, load_peft_state_dict, param_groups, peft_state_dict
from medpeft_monai.peft.core import save_atomic
from medpeft_monai.utils import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["Split", "SweepData", "SweepSettings", "fraction_subset", "load_data", "run_cell", "run_sweep"]

#: methods whose ERF the report shows (spatial mixing in the adapter; linear probing = the frozen encoder's)
ERF_METHODS = ("linear_probe", "dka", "convpass")


@dataclass
class SweepSettings:
    """Everything a sweep's results depend on (recorded in the report and hashed per cell)."""

    datalist: str
    backbone: str = "tiny_vit_5m_224"
    weights: str | None = "litemedsam"
    image_size: list[int] = field(default_factory=lambda: [64, 64])
    in_chans: int = 1
    num_classes: int | None = None
    backbone_kwargs: dict = field(default_factory=dict)
    fractions: list[float] = field(default_factory=lambda: [0.25, 1.0])
    folds: int = 3
    steps: int = 200
    batch_size: int = 8
    evals: int = 4
    augment: bool = False
    cache: bool = True
    cache_memory_gb: float = 2.0
    time_budget_s: float | None = None


@dataclass
class Split:
    """One datalist section, preprocessed once: ``images`` ``(N, C, H, W)`` in ``[0, 1]``, ``labels``
    ``(N, 1, H, W)`` (segmentation) or ``(N,)`` (classification)."""

    items: list[dict]
    images: torch.Tensor
    labels: torch.Tensor

    @property
    def files(self) -> list[str]:
        return [str(it["image"]) for it in self.items]


@dataclass
class SweepData:
    task: str
    num_classes: int
    train: Split
    val: Split
    test: Split
    fingerprint: str

    def split(self, name: str) -> Split:
        return getattr(self, name)


def _task(items: list[dict]) -> str:
    label = items[0].get("label") if items else None
    if isinstance(label, (str, os.PathLike)):
        return "segmentation"
    if isinstance(label, (int, np.integer)) or (isinstance(label, float) and label.is_integer()):
        return "classification"
    raise ValueError(f"The datalist's training entries need a 'label': a label image path (segmentation) or an "
                     f"integer class (classification); the first entry has {label!r}.")


def _file_fingerprint(items: list[dict]) -> str:
    h = hashlib.sha256()
    for it in items:
        for key in ("image", "label"):
            v = it.get(key)
            h.update(str(v).encode())
            if isinstance(v, str) and os.path.exists(v):
                st = os.stat(v)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _preprocess(items: list[dict], transform, task: str) -> Split:
    images, labels = [], []
    for it in items:
        d = transform(dict(it))
        images.append(as_plain_tensor(torch.as_tensor(d["image"])).float())
        label = d["label"]
        labels.append(as_plain_tensor(torch.as_tensor(label)).float() if task == "segmentation" else int(label))
    return Split(items, torch.stack(images), torch.stack(labels) if task == "segmentation"
                 else torch.tensor(labels, dtype=torch.long))


def load_data(settings: SweepSettings) -> SweepData:
    """Read the ``training``, ``validation`` and ``test`` sections of the datalist and preprocess every image
    once (whole image resized to ``image_size``, intensities scaled to ``[0, 1]``, ``in_chans`` channels)."""
    sections = {name: load_datalist(settings.datalist, name) for name in ("training", "validation", "test")}
    for name, items in sections.items():
        if not items:
            raise ValueError(f"Section '{name}' of {settings.datalist} is empty; the comparison needs training, "
                             "validation (or a training section to carve it from) and test entries.")
    task = _task(sections["training"])
    size = list(settings.image_size)
    if task == "segmentation":
        transform = segmentation_transforms("eval", image_size=size, num_channels=settings.in_chans)
    else:
        transform = classification_transforms("eval", image_size=size, num_channels=settings.in_chans)
    splits = {name: _preprocess(items, transform, task) for name, items in sections.items()}
    found = 1 + int(max(float(s.labels.max()) for s in splits.values()))
    num_classes = settings.num_classes or max(found, 2)
    if found > num_classes:
        raise ValueError(f"The labels hold class {found - 1} but num_classes={num_classes}; pass --num-classes "
                         f"{found} (background included) or fix the labels.")
    every = [it for items in sections.values() for it in items]
    return SweepData(task, num_classes, splits["training"], splits["validation"], splits["test"],
                     _file_fingerprint(every))


def fraction_subset(items: list[dict], fraction: float, fold: int) -> list[int]:
    """Indices of a stratified random subset: ``max(1, round(fraction * n_c))`` items of every class ``c``
    (segmentation items form one stratum), drawn with seed ``fold``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fractions must be in (0, 1], got {fraction}.")
    strata: dict = defaultdict(list)
    for i, it in enumerate(items):
        label = it.get("label")
        strata[label if isinstance(label, (int, np.integer)) else "all"].append(i)
    rng = random.Random(fold)
    out: list[int] = []
    for key in sorted(strata, key=str):
        group = list(strata[key])
        rng.shuffle(group)
        out += group[: max(1, round(fraction * len(group)))]
    return sorted(out)


def frozen_backbone(settings: SweepSettings) -> FrozenBackbone:
    """The sweep's frozen backbone with its weights, loaded once per sweep (each model adapts a copy)."""
    return FrozenBackbone(settings.backbone, weights=settings.weights, image_size=settings.image_size,
                          in_chans=settings.in_chans, model_kwargs=settings.backbone_kwargs)


def build_model(settings: SweepSettings, data: SweepData, peft: dict,
                frozen: FrozenBackbone | None = None) -> nn.Module:
    """The network of one run, on a copy of ``frozen`` (:func:`frozen_backbone`; built here when ``None``).
    The backbone is built under its own fixed seed, so a copy gives the same model as a fresh build."""
    from medpeft_monai.nets import PeftClassifier, PeftSegmenter

    net = PeftSegmenter if data.task == "segmentation" else PeftClassifier
    backbone = copy.deepcopy(frozen) if frozen is not None else frozen_backbone(settings)
    return net(backbone, data.num_classes, peft=peft)


def _levels(model: nn.Module) -> list[int]:
    return list(getattr(model, "levels", ()))


class _Inputs:
    """What the network sees for a batch of split indices: cached frozen prefixes (``k > 0``), the
    preprocessed images, or (training with ``augment``) freshly augmented ones."""

    def __init__(self, data: SweepData, settings: SweepSettings, cache: PrefixCache | None, k: int,
                 device: torch.device) -> None:
        self.data, self.cache, self.k, self.device = data, cache, k, device
        self.augment = None
        if settings.augment:
            size = list(settings.image_size)
            if data.task == "segmentation":
                self.augment = segmentation_transforms("train", image_size=size, num_channels=settings.in_chans)
            else:
                self.augment = classification_transforms("train", image_size=size, num_channels=settings.in_chans)

    def logits(self, model: nn.Module, split: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.data.split(split)
        if split == "train" and self.augment is not None:
            batch = _preprocess([s.items[i] for i in idx], self.augment, self.data.task)
            return model(batch.images.to(self.device)), batch.labels.to(self.device)
        y = s.labels[idx].to(self.device)
        if self.k:
            return model.forward_prefix(self.cache.batch(self.k, split, idx, self.device)), y
        return model(s.images[idx].to(self.device)), y


def _loss_fn(task: str) -> nn.Module:
    if task == "segmentation":
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)
    return nn.CrossEntropyLoss()


def _scores(task: str, num_classes: int, logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per image: Dice of every foreground class (NaN where the class is absent from the label), or
    ``[correct]`` for classification."""
    if task == "classification":
        return (logits.argmax(1) == labels).float().cpu().numpy()[:, None]
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    pred = one_hot(logits.argmax(1, keepdim=True), num_classes)
    truth = one_hot(labels.long(), num_classes)
    return DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, truth).cpu().numpy()


def evaluate(model: nn.Module, inputs: _Inputs, split: str, batch_size: int = 16) -> tuple[np.ndarray, torch.Tensor]:
    """Per-image scores (see :func:`_scores`) and the logits (on the CPU) of ``split``, in eval mode."""
    n = len(inputs.data.split(split).items)
    was = model.training
    model.eval()
    rows, outputs = [], []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            logits, y = inputs.logits(model, split, list(range(s, min(n, s + batch_size))))
            rows.append(_scores(inputs.data.task, inputs.data.num_classes, logits, y))
            outputs.append(logits.cpu())
    model.train(was)
    return np.concatenate(rows), torch.cat(outputs)


def summary_metric(scores: np.ndarray) -> float:
    """Mean over classes of the mean over images (absent classes ignored): mean Dice, or accuracy."""
    with np.errstate(all="ignore"):
        per_class = np.nanmean(scores, axis=0)
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def _batches(indices: list[int], batch_size: int, steps: int, seed: int):
    """``steps`` batches walking through seeded permutations of ``indices`` (every item once per pass)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(indices)
            rng.shuffle(perm)
            order += perm
        yield order[:batch_size]
        order = order[batch_size:]


def cell_hash(settings: SweepSettings, data: SweepData, spec: MethodSpec, fraction: float, fold: int,
              steps: int) -> str:
    keep = {k: v for k, v in asdict(settings).items() if k not in ("cache", "cache_memory_gb", "time_budget_s")}
    text = json.dumps({"settings": keep, "steps": steps, "data": data.fingerprint, "method": spec.to_dict(),
                       "fraction": fraction, "fold": fold}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _inference_ms(model: nn.Module, images: torch.Tensor, device: torch.device, n: int = 8) -> float:
    """Median milliseconds of one whole-network forward (no cache) per test image."""
    model.eval()
    times = []
    with torch.no_grad():
        model(images[:1].to(device))                                   # warm-up
        for i in range(min(n, len(images))):
            t0 = time.perf_counter()
            model(images[i:i + 1].to(device))
            times.append(1000 * (time.perf_counter() - t0))
    return float(statistics.median(times))


def _save_predictions(path: Path, data: SweepData, logits: torch.Tensor, scores: np.ndarray) -> dict:
    """Best and worst test cases of this cell (by per-image score) as one PNG: the image with the label's
    outline (green) and the prediction filled in (red, alpha) / the class names for classification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.errstate(all="ignore"):
        per_image = np.nanmean(scores, axis=1)
    order = [i for i in np.argsort(-np.nan_to_num(per_image, nan=-1.0)) if np.isfinite(per_image[i])]
    if not order:
        return {}
    cases = {"best": int(order[0]), "worst": int(order[-1])}
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    for ax, (name, i) in zip(axes, cases.items()):
        img = data.test.images[i]
        ax.imshow(img[0].numpy() if img.shape[0] == 1 else img[:3].permute(1, 2, 0).numpy(), cmap="gray")
        if data.task == "segmentation":
            pred = logits[i].argmax(0).cpu().numpy()
            truth = data.test.labels[i, 0].numpy()
            ax.imshow(np.ma.masked_where(pred == 0, pred), cmap="autumn", alpha=0.45, vmin=0,
                      vmax=max(1, data.num_classes - 1), interpolation="nearest")
            if truth.max() > 0:
                ax.contour(truth, levels=np.arange(0.5, data.num_classes), colors="lime", linewidths=0.8)
            ax.set_title(f"{name}: Dice {per_image[i]:.2f}\n{Path(data.test.files[i]).name}", fontsize=8)
        else:
            ax.set_title(f"{name}: true {int(data.test.labels[i])}, predicted {int(logits[i].argmax())}\n"
                         f"{Path(data.test.files[i]).name}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return {name: data.test.files[i] for name, i in cases.items()}


def run_cell(settings: SweepSettings, data: SweepData, spec: MethodSpec, fraction: float, fold: int, steps: int,
             cell_dir: Path, cache: PrefixCache | None, device: torch.device, progress=None,
             extras: bool = False, frozen: FrozenBackbone | None = None) -> dict:
    """Train ``spec`` on the ``(fraction, fold)`` subset for ``steps`` steps, keep the best validation state,
    score the test section; write the adapter (and with ``extras`` the prediction and ERF figures) to
    ``cell_dir`` and return the result record (written last, by the caller). ``extras`` (one run per method)
    also measures the inference time of the whole network. ``frozen``: see :func:`build_model`."""
    from monai.utils import set_determinism

    train_idx = fraction_subset(data.train.items, fraction, fold)
    set_determinism(seed=fold)
    model = build_model(settings, data, spec.peft, frozen).to(device)
    k, why_not = cacheable_start(model) if cache is not None else (0, "reuse switched off (--no-cache)")
    if k and settings.augment:
        k, why_not = 0, "augmentation changes the input every step"
    if k:
        for split in ("train", "val", "test"):
            cache.fill(model.backbone, k, split, data.split(split).images, _levels(model))
    inputs = _Inputs(data, settings, cache, k, device)
    optimizer = torch.optim.AdamW(param_groups(model, spec.adapter_lr, spec.head_lr), weight_decay=0.01)
    loss_fn = _loss_fn(data.task)
    eval_at = {max(1, round(steps * (j + 1) / settings.evals)) for j in range(settings.evals)} | {steps}
    best = (-math.inf, 0, None)
    train_s = 0.0
    model.train()
    for step, idx in enumerate(_batches(train_idx, settings.batch_size, steps, seed=fold), start=1):
        t0 = time.perf_counter()
        logits, y = inputs.logits(model, "train", idx)
        loss = loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{spec.name}: non-finite loss at step {step} (fraction {fraction}, fold {fold}); "
                                     f"lower {spec.name}.adapter_lr / head_lr with --set.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_s += time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
        if step in eval_at:
            val = summary_metric(evaluate(model, inputs, "val")[0])
            if val > best[0]:
                best = (val, step, peft_state_dict(model))
    load_peft_state_dict(model, best[2])
    scores, test_logits = evaluate(model, inputs, "test")
    cell_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(best[2], cell_dir / "adapter.pt")
    trainable, total = count_parameters(model)
    result = {
        "method": spec.name, "fraction": fraction, "fold": fold, "n_train": len(train_idx),
        "train_files": [data.train.files[i] for i in train_idx], "steps": steps, "batch_size": settings.batch_size,
        "peft": spec.peft, "adapter_lr": spec.adapter_lr, "head_lr": spec.head_lr,
        "metric": summary_metric(scores), "val_metric": best[0], "best_step": best[1],
        "per_class": [None if not np.isfinite(v) else float(v) for v in np.nanmean(scores, axis=0)]
        if np.isfinite(scores).any() else [],
        "per_image": {f: [None if not np.isfinite(v) else float(v) for v in row]
                      for f, row in zip(data.test.files, scores)},
        "train_seconds": train_s, "inference_ms": None,
        "trainable_params": trainable, "total_params": total,
        "adapter_bytes": os.path.getsize(cell_dir / "adapter.pt"),
        "prefix_reuse": {"start_block": k, "blocks": len(model.backbone.blocks), "reason": why_not},
    }
    if extras:
        result["inference_ms"] = _inference_ms(model, data.test.images, device)
        result["cases"] = _save_predictions(cell_dir / "predictions.png", data, test_logits, scores)
        if spec.name.split("@")[0] in ERF_METHODS:
            from medpeft_monai.erf import effective_receptive_field, erf_summary, save_erf_png

            erf = effective_receptive_field(model, data.test.images[:4].to(device))
            save_erf_png(erf, cell_dir / "erf.png", title=f"{spec.name}: ERF")
            result["erf"] = erf_summary(erf)
    return result


def _cell_dir(out: Path, spec: MethodSpec, fraction: float, fold: int) -> Path:
    return out / "runs" / spec.name / f"f{fraction:g}_fold{fold}"


def applicable(settings: SweepSettings, data: SweepData, specs: list[MethodSpec],
               frozen: FrozenBackbone | None = None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The methods that can be built on this backbone, built (``{name: model}``), and ``{name: reason}``
    for those that cannot."""
    built, skipped = {}, {}
    for spec in specs:
        try:
            built[spec.name] = build_model(settings, data, spec.peft, frozen)
        except (PeftError, ValueError, TypeError) as err:
            skipped[spec.name] = str(err).split("\n")[0]
    return built, skipped


def prefill(cache: PrefixCache, models: list[nn.Module], data: SweepData, device: torch.device) -> None:
    """Cache the prefixes of every start block these models reuse (:func:`cacheable_start`), the shallowest
    first so that each deeper one continues from it: one pass through the frozen blocks per image."""
    first_at: dict[int, nn.Module] = {}
    for model in models:
        k, _ = cacheable_start(model)
        if k:
            first_at.setdefault(k, model)
    for k in sorted(first_at):
        model = first_at[k].to(device)
        for split in ("train", "val", "test"):
            cache.fill(model.backbone, k, split, data.split(split).images, _levels(model))


def calibrate_steps(settings: SweepSettings, data: SweepData, specs: list[MethodSpec], cache: PrefixCache | None,
                    device: torch.device, cells_per_method: int, frozen: FrozenBackbone | None = None) -> int:
    """Steps per run that fit the sweep in ``settings.time_budget_s``: each method's seconds per optimiser
    step (its frozen prefix cached) and per run outside the steps (building, evaluations, test), measured
    on one short run, summed over the sweep's cells."""
    per_step = per_cell = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        for spec in specs:
            t0 = time.perf_counter()
            r = run_cell(settings, data, spec, max(settings.fractions), 0, 4, Path(scratch), cache, device,
                         frozen=frozen)
            per_step += cells_per_method * r["train_seconds"] / 4
            per_cell += cells_per_method * (time.perf_counter() - t0 - r["train_seconds"])
    return max(1, int((settings.time_budget_s - per_cell) / per_step))


def run_sweep(settings: SweepSettings, specs: list[MethodSpec], out: str | os.PathLike,
              device: str | torch.device | None = None, show_progress: bool = True) -> dict:
    """Run (or continue) the sweep into ``out`` and write the report. Returns the report's data."""
    from tqdm.auto import tqdm

    from medpeft_monai.compare.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_data(settings)
    logger.info("comparison: %s task, %d classes; training %d, validation %d, test %d images",
                data.task, data.num_classes, len(data.train.items), len(data.val.items), len(data.test.items))
    frozen = frozen_backbone(settings)
    built, skipped = applicable(settings, data, specs, frozen)
    specs = [spec for spec in specs if spec.name in built]
    if not specs:
        raise ValueError(f"None of the methods applies to {settings.backbone}: {skipped}")
    cache = PrefixCache(out / "prefix_cache", int(settings.cache_memory_gb * (1 << 30))) if settings.cache else None
    cells = [(spec, f, j) for f in settings.fractions for j in range(settings.folds) for spec in specs]
    plan_file = out / "plan.json"
    plan_key = hashlib.sha256(json.dumps([asdict(settings), [s.to_dict() for s in specs]], sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    if plan.get("key") != plan_key:
        steps = settings.steps
        if settings.time_budget_s:
            steps = calibrate_steps(settings, data, specs, cache, device, len(settings.fractions) * settings.folds,
                                    frozen)
            logger.info("time budget %.0f s: %d optimiser steps per run", settings.time_budget_s, steps)
        plan = {"key": plan_key, "steps": steps}
        write_text_atomic(plan_file, json.dumps(plan))
    steps = plan["steps"]
    results, todo = [], []
    for spec, f, j in cells:
        h = cell_hash(settings, data, spec, f, j, steps)
        done = _cell_dir(out, spec, f, j) / "result.json"
        record = json.loads(done.read_text()) if done.is_file() else None
        if record is not None and record.get("hash") == h:
            results.append(record)
        else:
            todo.append((spec, f, j, h))
    if cache is not None and not settings.augment:
        prefill(cache, [built[name] for name in dict.fromkeys(spec.name for spec, *_ in todo)], data, device)
    del built
    started = time.perf_counter()
    # a terminal gets a live bar; a log file (no tty) a line every 30 s
    bar = tqdm(total=len(todo) * steps, unit="step", disable=not show_progress or not todo, dynamic_ncols=True,
               desc=f"{len(todo)} runs ({len(cells) - len(todo)} done before)",
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    for n, (spec, f, j, h) in enumerate(todo, start=1):
        bar.set_postfix_str(f"run {n}/{len(todo)}: {spec.name} {100 * f:g}% fold {j}")
        cell_dir = _cell_dir(out, spec, f, j)
        record = run_cell(settings, data, spec, f, j, steps, cell_dir, cache, device, bar,
                          extras=j == 0 and f == max(settings.fractions), frozen=frozen)
        record["hash"] = h
        write_text_atomic(cell_dir / "result.json", json.dumps(record, indent=1))
        results.append(record)
    bar.close()
    sweep = {"settings": asdict(settings), "methods": [s.to_dict() for s in specs], "skipped_methods": skipped,
             "steps": steps, "task": data.task, "num_classes": data.num_classes,
             "sections": {"training": len(data.train.items), "validation": len(data.val.items),
                          "test": len(data.test.items)},
             "device": str(device), "seconds_this_invocation": time.perf_counter() - started,
             "runs_this_invocation": len(todo), "prefix_cache": cache.describe() if cache else None}
    if cache is not None:
        cache.clear()
    return write_report(out, sweep, results)
