"""The mfmda_fundus bundle stage by stage, as the README runs it (tiny DDPM, random tiny ViT encoders)."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medpeft_monai.data import load_datalist
from tests.conftest import ROOT, TINY_ARGS, run_bundle

DIFFUSION = ["diffusion.json"]
TINY_DDPM = ["--ddpm_channels", "[8, 16]", "--ddpm_attention", "[False, False]", "--num_train_timesteps", "100"]
TINY_ENCODER = ["--encoder", "vit_tiny_patch16_224", "--encoder_weights", "none", "--encoder_kwargs", "{'depth': 2}"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bundle(tmp_path):
    dst = tmp_path / "mfmda_fundus"
    shutil.copytree(ROOT / "bundles" / "mfmda_fundus", dst,
                    ignore=shutil.ignore_patterns("models", "eval", "translated"))
    return dst


def test_mfmda_bundle_runs_stage_by_stage(bundle):
    models = bundle / "models"
    # stage 2 before the translation is a clear error that names the missing stage
    with pytest.raises(AssertionError, match="translate the source images first"):
        run_bundle(bundle, ["train.json"], *TINY_ARGS, "--epochs", "1")
    with pytest.raises(AssertionError, match="run the source DDPM stage first"):
        run_bundle(bundle, DIFFUSION + ["adapt.json"], *TINY_DDPM, *TINY_ENCODER)

    run_bundle(bundle, DIFFUSION + ["ddpm_train.json"], *TINY_DDPM, "--ddpm_epochs", "1")
    source_sha = _sha(models / "ddpm_source.pt")
    out = run_bundle(bundle, DIFFUSION + ["adapt.json"], *TINY_DDPM, *TINY_ENCODER, "--adapt_epochs", "1")
    assert "Delta_static" in out and "loss_consistency" in out
    assert _sha(models / "ddpm_source.pt") == source_sha  # the source DDPM artefact is left as it was
    run_bundle(bundle, DIFFUSION + ["translate.json"], *TINY_DDPM, "--ddim_steps", "10")

    translated = bundle / "translated" / "datalist.json"
    sample = json.loads(translated.read_text())
    for section, n in (("training", 24), ("validation", 8)):
        items = load_datalist(translated, section)
        assert len(items) == n
        for item in items[:2]:  # each translation sits on its source's grid and keeps the source's label
            src, img = np.asarray(Image.open(item["source"])), np.asarray(Image.open(item["image"]))
            assert img.shape == src.shape and item["label"].endswith(".png")
            assert "/translated/images/" in item["image"].replace("\\", "/")
    assert all(not e["image"].startswith("/") for e in sample["training"])  # written relative, movable

    run_bundle(bundle, ["train.json"], *TINY_ARGS, "--epochs", "1")
    assert (models / "model.pt").is_file() and (models / "adapter.pt").is_file()
    run_bundle(bundle, ["train.json", "evaluate.json"], *TINY_ARGS)
    header = (bundle / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()[0].split(",")
    assert header[1:3] == ["optic disc", "optic cup"], header
    run_bundle(bundle, ["inference.json"], *TINY_ARGS)
    masks = sorted((bundle / "eval").glob("*_seg.png"))
    assert len(masks) == 8  # the target test images
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) <= {0, 1, 2}
