"""Every bundle under bundles/: metadata verifies offline, every config parses, and the first bundle
trains, evaluates and infers end to end on its sample data (with a shortened schedule)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata

from medpeft_monai.peft import load_peft_state_dict
from medpeft_monai.utils import bundle_variants
from tests.conftest import BUNDLES, ROOT, copy_bundle, run_bundle

SCHEMA = ROOT / "schemas" / "meta_schema.json"


def test_bundles_exist():
    assert "lora_segmentation" in [b.name for b in BUNDLES]


def is_pretraining(bundle: Path) -> bool:
    """A self-supervised pretraining bundle (e.g. crossmodal_pretrain) writes an adapter for other bundles and
    has no model to evaluate, infer with or serve: no inference*.json."""
    return not bundle_variants(bundle)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_verifies_offline_and_files_present(bundle):
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    if is_pretraining(bundle):
        for name in ("train.json", "multi_gpu_train.json", "logging.conf"):
            assert (bundle / "configs" / name).is_file(), name
        assert (bundle / "docs" / "README.md").is_file() and (bundle / "LICENSE").is_file()
        return
    for name in ("train.json", "evaluate.json", "inference.json", "logging.conf"):
        assert (bundle / "configs" / name).is_file(), name
    variants = bundle_variants(bundle)
    for variant in variants:  # a variant's own metadata<suffix>.json verifies too
        verify_metadata(meta_file=str(variant.metadata), filepath=str(SCHEMA))
        assert variant.config("train").is_file(), f"{variant.name}: no {variant.config('train').name}"
    # and every training config belongs to a variant (has its inference<suffix>.json), so the per-variant
    # tests (torchrun, MLflow, export, adapter, MONAI Label) see it
    trains = {p.name for p in (bundle / "configs").glob("train*.json")}
    assert trains == {v.config("train").name for v in variants}, (
        f"{bundle.name}: every train<suffix>.json needs its inference<suffix>.json; found {sorted(trains)}")
    assert (bundle / "docs" / "README.md").is_file() and (bundle / "LICENSE").is_file()


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_configs_parse_with_standard_ids(bundle):
    train = ConfigParser()
    train.read_config(str(bundle / "configs" / "train.json"))
    if is_pretraining(bundle):
        for key in ("network_def", "train#trainer", "dataset_dir", "bundle_root", "tracking_params"):
            assert key in train, key
        return
    for key in ("network_def", "train#trainer", "validate#evaluator", "dataset_dir", "output_dir", "bundle_root"):
        assert key in train, key
    infer = ConfigParser()
    infer.read_config(str(bundle / "configs" / "inference.json"))
    for key in ("network_def", "inferer", "preprocessing", "postprocessing", "evaluator", "dataset_dir"):
        assert key in infer, key
    merged = ConfigParser()
    merged.read_config([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "evaluate.json")])
    assert "validate#evaluator" in merged
    for cfg in (bundle / "configs").glob("*.json"):
        json.loads(cfg.read_text())  # valid JSON


def test_lora_segmentation_train_evaluate_infer(tmp_path):
    bundle = copy_bundle("lora_segmentation", tmp_path)
    out = run_bundle(bundle, ["train.json"], "--epochs", "2")
    assert "train_loss" in out  # per-iteration stats
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "adapter.pt").is_file()
    # --resume True on the command line continues from models/last.pt (tests/test_checkpoint.py: kills, equality)
    out = run_bundle(bundle, ["train.json"], "--epochs", "3", "--resume", "True")
    assert "resuming run" in out and "epoch 2 of 3 done" in out

    out = run_bundle(bundle, ["train.json", "evaluate.json"])
    summary = (bundle / "eval" / "metrics.csv").read_text()
    dice = float(summary.splitlines()[0].split(",")[1])
    assert 0.0 < dice <= 1.0
    # per-image and summary reports name the classes from the metadata (label 1, 2), not class0, class1
    header = (bundle / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()[0].split(",")
    assert header[1:3] == ["grey matter", "white matter"], header
    rows = [r.split(",")[0] for r in (bundle / "eval" / "val_mean_dice_summary.csv").read_text().splitlines()]
    assert {"grey matter", "white matter"} <= set(rows)
    assert not any(r.startswith("class") and r[5:].isdigit() for r in rows)

    run_bundle(bundle, ["inference.json"])
    preds = sorted((bundle / "eval").glob("*_seg.nii.gz"))
    test_items = json.loads((Path(_dataset_dir()) / "datalist.json").read_text())["test"]
    assert len(preds) == len(test_items)
    pred = nib.load(str(preds[0])).get_fdata()
    assert set(np.unique(pred)) <= {0.0, 1.0, 2.0}

    # the adapter artefact alone, on a freshly built frozen backbone, reproduces the full model
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    full = parser.get_parsed_content("network_def", lazy=False)
    fresh = parser.get_parsed_content("network_def", lazy=False)
    full.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu"))
    load_peft_state_dict(fresh, bundle / "models" / "adapter.pt")
    x = torch.rand(2, 1, 64, 64)
    full.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(full(x), fresh(x))


def _dataset_dir():
    from medpeft_monai.data import sample_dataset

    return sample_dataset("brain_mri_2d")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    bundle = copy_bundle("lora_segmentation", tmp_path)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "Required file not found" in res.stderr + res.stdout and "train the bundle first" in res.stderr + res.stdout
    # the root cause and its fix are the last lines, below MONAI's "Failed to evaluate ConfigExpression"
    tail = res.stderr.strip().splitlines()[-2:]
    assert tail[0] == "medpeft_monai: the error above was caused by", tail
    assert tail[1].startswith("FileNotFoundError: Required file not found") and "train the bundle first" in tail[1]


@pytest.mark.parametrize("bundle", ["lora_segmentation", "crossmodal_segmentation"])
def test_same_file_name_in_two_folders_gives_two_masks(bundle, tmp_path):
    """Inference outputs keep the inputs' folders below their common root (two patients' ``image.nii.gz``
    must not overwrite each other); images of one folder are still written side by side."""
    from monai.data import MetaTensor

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "inference.json"))
    channels = len(parser.get("modalities", [0]))
    items = []
    for patient in ("p1", "p2"):
        path = tmp_path / "data" / patient / "image.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.random.rand(64, 64, *((1, channels) if channels > 1 else ())).astype(np.float32),
                                 np.eye(4)), str(path))
        items.append({"image": str(path)})
    parser["test_datalist"] = items
    parser["output_dir"] = str(tmp_path / "eval")
    pre, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    for item in items:
        d = pre(item)
        d["pred"] = MetaTensor(torch.rand(2, 64, 64), meta=dict(d["image"].meta),
                               applied_operations=list(d["image"].applied_operations))
        post(d)
    masks = sorted(p.relative_to(tmp_path / "eval").as_posix() for p in (tmp_path / "eval").rglob("*_seg.nii.gz"))
    assert masks == ["p1/image_seg.nii.gz", "p2/image_seg.nii.gz"]


@pytest.mark.parametrize("bundle,configs", [("lora_segmentation", ("train.json", "evaluate.json")),
                                            ("dka_segmentation", ("train.json", "evaluate.json")),
                                            ("crossmodal_segmentation", ("train.json", "evaluate.json")),
                                            ("dcrm_vit_multidomain", ("train_seg.json", "evaluate_seg.json"))])
def test_dice_convention_is_one_documented_switch(bundle, configs):
    """`dice_ignore_empty` (MONAI's ignore_empty, default true: an image whose label lacks a class does not count
    for that class) reaches every Dice of the training and evaluation configs."""
    for value in (True, False):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "bundles" / bundle / "configs" / c) for c in configs])
        parser["dice_ignore_empty"] = value
        metrics = [parser.get_parsed_content(k) for k in ("train#key_metric#train_mean_dice",
                                                          "validate#key_metric#val_mean_dice",
                                                          "validate#additional_metrics#val_dice_per_class")]
        assert all(m.metric_fn.ignore_empty is value for m in metrics)
        if "val_dice_by_domain" in parser["validate#additional_metrics"]:  # DCRM: Dice per domain
            assert parser.get_parsed_content("validate#additional_metrics#val_dice_by_domain").ignore_empty is value
    text = (ROOT / "docs" / "reliability.md").read_text()
    assert "dice_ignore_empty" in text


class _LevelNet(torch.nn.Module):
    """Stand-in for a trained network that reads the class off the image's intensity (class ``c`` is drawn at
    ``c / (levels - 1)``): softmax logits per class, or (``nested``) disc / cup logits above 0.25 / 0.75."""

    def __init__(self, levels: int, nested: bool = False) -> None:
        super().__init__()
        self.levels, self.nested = levels, nested

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x[:, :1]
        if self.nested:
            return torch.cat([100 * (x0 - (r + 0.5) / 2) for r in range(2)], 1)
        return torch.cat([-100 * (x0 - c / (self.levels - 1)) ** 2 for c in range(self.levels)], 1)


def _thin_structure_pair(folder: Path, bundle: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """A 256 x 256 image/label pair (4x ``image_size``): a 64 x 64 square of the top class and 31 one-pixel
    stripes of class 1 at columns 2 mod 4, which resizing to 64 x 64 removes from the label (nearest neighbour
    keeps the columns 0 mod 4) and from the image (averaged to a quarter of their intensity). Returns the datalist
    item and the full-resolution label and blob (the prediction an image-level network gives)."""
    top = 1 if bundle in ("dka_segmentation", "crossmodal_segmentation") else 2
    label = np.zeros((256, 256), np.uint8)
    label[32:96, 32:96] = top
    label[128:240, 130:254:4] = 1
    blob = np.zeros_like(label)
    blob[32:96, 32:96] = top
    level = label.astype(np.float32) / top
    folder.mkdir(parents=True, exist_ok=True)
    if bundle in ("lora_segmentation", "crossmodal_segmentation"):  # NIfTI; multi-sequence as (H, W, 1, 3)
        image = np.repeat(level[:, :, None, None], 3, axis=3) if bundle == "crossmodal_segmentation" else level
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / "image.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(folder / "label.nii.gz"))
        item = {"image": str(folder / "image.nii.gz"), "label": str(folder / "label.nii.gz")}
    else:  # PNG: grey ultrasound, RGB fundus
        from PIL import Image

        grey = (level * 255).round().astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, -1) if bundle == "mfmda_fundus" else grey).save(folder / "image.png")
        Image.fromarray(label).save(folder / "label.png")
        item = {"image": str(folder / "image.png"), "label": str(folder / "label.png")}
    return item, label, blob


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    return 2.0 * float((pred & ref).sum()) / float(pred.sum() + ref.sum())


@pytest.mark.parametrize("bundle", ["lora_segmentation", "dka_segmentation", "crossmodal_segmentation",
                                    "mfmda_fundus"])
def test_evaluation_scores_dice_at_native_resolution_by_default(bundle, tmp_path):
    """evaluate.json scores Dice on each image's own grid (``dice_grid="native"``: the prediction inverted onto
    the image's grid, as inference writes it, against the label as stored); ``--dice_grid network`` scores on the
    ``image_size`` grid as training-time validation does. A thin structure that resizing to ``image_size``
    removes from both label and prediction costs Dice only at native resolution; the per-class and per-image
    reports keep the class names."""
    item, label, blob = _thin_structure_pair(tmp_path / "data", bundle)
    nested = bundle == "mfmda_fundus"
    if nested:  # disc = label > 0, cup = label > 1
        classes = {"optic disc": (label > 0, blob > 0), "optic cup": (label > 1, blob > 1)}
    else:
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
        names = ConfigParser.load_config_file(str(ROOT / "bundles" / bundle / "configs" / "metadata.json"))
        names = names["network_data_format"]["outputs"]["pred"]["channel_def"]
        classes = {names[str(c)]: (label == c, blob == c) for c in range(1, parser["num_classes"])}
    expected_native = {n: _dice(b, lab) for n, (lab, b) in classes.items()}
    torch.save({}, tmp_path / "model.pt")  # the stand-in network has no weights

    results = {}
    for grid in (None, "native", "network"):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "bundles" / bundle / "configs" / c) for c in ("train.json", "evaluate.json")])
        parser.update({"bundle_root": str(ROOT / "bundles" / bundle), "val_datalist": [item],
                       "ckpt_path": str(tmp_path / "model.pt"), "output_dir": str(tmp_path / f"eval_{grid}"),
                       "network": _LevelNet(3 if nested else len(classes) + 1, nested)})
        if grid is not None:
            parser["dice_grid"] = grid
        evaluator = parser.get_parsed_content("validate#evaluator")
        evaluator.run()
        # the per-image report: a column per class, named from the metadata, then the image's mean
        raw = (tmp_path / f"eval_{grid}" / "val_mean_dice_raw.csv").read_text()
        header, row = [r.split(",") for r in raw.splitlines()]
        assert header == ["filename", *classes, "mean"] and row[0] == item["image"], (header, row)
        assert float(row[-1]) == pytest.approx(evaluator.state.metrics["val_mean_dice"])
        results[grid] = (evaluator.state.metrics["val_mean_dice"], dict(zip(classes, map(float, row[1:-1]))))

    assert results[None] == results["native"]  # native is the default
    native_mean, native = results["native"]
    network_mean, network = results["network"]
    for name, value in native.items():  # the blob is found, the stripes are missed, at the image's resolution
        assert value == pytest.approx(expected_native[name], abs=0.02), (name, native, expected_native)
    assert native_mean == pytest.approx(float(np.mean(list(expected_native.values()))), abs=0.02)
    # on the 64 x 64 grid the stripes are gone from the label too: what is left (the square) is found
    assert network_mean > 0.95 and network_mean - native_mean > 0.1, (network_mean, native_mean)
    if bundle == "lora_segmentation":  # grey matter (the stripes): 0 at native resolution, absent (no score) at 64
        assert native["grey matter"] == 0.0 and np.isnan(network["grey matter"]) and network["white matter"] > 0.95


def test_dice_grid_is_checked():
    from medpeft_monai.data.transforms import with_native_label

    with pytest.raises(ValueError, match="dice_grid must be one of"):
        with_native_label(None, "resized")
