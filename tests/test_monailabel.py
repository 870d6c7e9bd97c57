"""MONAI Label: every segmentation model of the bundles (each bundle variant whose metadata declares a
segmentation output, e.g. DCRM-ViT's `_seg` variant) loads in the app shipped in medpeft_monai/label_app,
and a real `monailabel start_server` (127.0.0.1) returns, for an image posted to /infer/<model> with an
HTTP client, a label in the image's geometry that matches the bundle's own inference and the sample label.

Needs the `label` extra (`pip install -e ".[dev,label]"`); without it these tests skip and say so."""

import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medpeft_monai.utils import BundleVariant
from tests.conftest import (
    ROOT,
    TINY_PRESET,
    VARIANTS,
    copy_bundle,
    free_port,
    run_bundle,
    running_server,
    trained_like_checkpoint,
)

APP = ROOT / "medpeft_monai" / "label_app"
TINY_BUNDLE = "lora_segmentation"
DCRM_SEG = "dcrm_vit_multidomain_seg"  # a variant (inference_seg.json, metadata_seg.json, model_seg.pt)
SKIP_REASON = 'MONAI Label is not installed: install the label extra, pip install -e ".[dev,label]" (the README does)'


SEG_MODELS = [v for v in VARIANTS if v.output_format() == "segmentation"]


def require_monailabel():
    pytest.importorskip("monailabel", reason=SKIP_REASON)


def test_segmentation_models_exist():
    assert {TINY_BUNDLE, "dka_segmentation", DCRM_SEG} <= {v.name for v in SEG_MODELS}
    # DCRM-ViT's classification model has no segmentation output and is not served
    assert "dcrm_vit_multidomain" not in {v.name for v in SEG_MODELS}


@pytest.mark.parametrize("variant", SEG_MODELS, ids=lambda v: v.name)
def test_readme_documents_monai_label_slicer_and_ohif(variant):
    text = (variant.bundle / "docs" / "README.md").read_text()
    assert "## MONAI Label" in text, f"{variant.bundle.name}/docs/README.md needs a '## MONAI Label' section"
    section = text.split("## MONAI Label", 1)[1].split("\n## ", 1)[0]
    for needle in ("monailabel start_server", "medpeft_monai/label_app", "3D Slicer", "OHIF", variant.name):
        assert needle in section, f"{variant.bundle.name}: MONAI Label section does not mention {needle!r}"


def load_app_module():
    """medpeft_monai/label_app/main.py, loaded from its file as `monailabel start_server` does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("medpeft_label_app_main", APP / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", SEG_MODELS, ids=lambda v: v.name)
def test_bundle_loads_and_infers_in_monailabel_app(variant, tmp_path):
    """The app registers the model through MONAI Label's BundleInferTask (strict weight loading) and
    returns a label on the input image's grid and affine (in-process, untrained weights)."""
    require_monailabel()
    from monai.bundle import ConfigParser

    from medpeft_monai.data import load_datalist

    label_app = load_app_module()
    copy = BundleVariant(copy_bundle(variant.bundle.name, tmp_path / "bundles"), variant.suffix)
    assert label_app.segmentation_models(tmp_path / "bundles")[variant.name] == copy
    trained_like_checkpoint(copy, copy.model_file)
    # another variant's weights in the same folder are not offered
    (copy.bundle / "models" / "model_other.pt").write_bytes(b"")

    task = label_app.SegmentationBundleInfer(copy, {})
    assert task.is_valid()
    assert task.bundle_config_path == str(copy.config("inference"))
    meta = json.loads(variant.metadata.read_text())
    channels = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
    assert task.labels == {v.lower(): int(k) for k, v in channels.items() if v.lower() != "background"}
    # only this variant's full checkpoint (adapter.pt is not one)
    assert task.info()["config"]["model_filename"] == [copy.model_file.name]

    parser = ConfigParser()
    parser.read_config(str(copy.config("inference")))
    image = load_datalist(parser.get_parsed_content("datalist"), "test")[0]["image"]
    result_file, _ = task({"image": image, "device": "cpu"})
    try:
        (pred_shape, pred_affine, pred), (src_shape, src_affine, _) = read_grid(result_file), read_grid(image)
        in_channels = next(iter(meta["network_data_format"]["inputs"].values()))["num_channels"]
        if in_channels > 1 and len(src_shape) == 4 and src_shape[-1] == in_channels:
            src_shape = src_shape[:3]  # a channel-last multi-channel NIfTI (H, W, 1, C): the label is on its grid
        assert pred_shape == src_shape
        np.testing.assert_allclose(pred_affine, src_affine, atol=1e-4)
        assert set(np.unique(pred).tolist()) <= {int(k) for k in channels}
    finally:
        os.remove(result_file)


def read_grid(path):
    """(spatial shape, affine, data) of an image file: nibabel for NIfTI, MONAI's loader for PNG/JPEG/..."""
    path = str(path)
    if path.endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        return tuple(img.shape), img.affine, np.asarray(img.dataobj)
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True, ensure_channel_first=True)(path)
    return tuple(img.shape[1:]), np.asarray(img.affine), np.asarray(img[0])


def _dice(pred: np.ndarray, ref: np.ndarray, classes) -> float:
    scores = [2 * np.sum((pred == c) & (ref == c)) / max(np.sum(pred == c) + np.sum(ref == c), 1) for c in classes]
    return float(np.mean(scores))


def tiny_preset(bundle: Path, *configs: str) -> None:
    """Give ``configs`` of a bundle copy the random 2-block ViT preset."""
    for name in configs:
        cfg = json.loads((bundle / "configs" / name).read_text())
        cfg.update(TINY_PRESET)
        (bundle / "configs" / name).write_text(json.dumps(cfg, indent=4))


@pytest.fixture
def trained_tiny_bundle(tmp_path):
    """Bundle copies with a 2-block ViT preset: the tiny bundle, trained briefly, and the DCRM-ViT
    segmentation variant with untrained weights; both ran their own inference config."""
    require_monailabel()
    bundles = tmp_path / "bundles"
    bundle = copy_bundle(TINY_BUNDLE, bundles)
    tiny_preset(bundle, "train.json", "inference.json")
    run_bundle(bundle, ["train.json"], "--epochs", "8", "--learning_rate", "0.005", "--batch_size", "2", timeout=900)
    # the bundles' own predictions for their test images, to compare with what MONAI Label returns
    run_bundle(bundle, ["inference.json"], timeout=900)
    dcrm = copy_bundle("dcrm_vit_multidomain", bundles)
    tiny_preset(dcrm, "inference_seg.json")
    dcrm_seg = BundleVariant(dcrm, "_seg")
    trained_like_checkpoint(dcrm_seg, dcrm_seg.model_file)
    run_bundle(dcrm, ["inference_seg.json"], timeout=900)
    return bundles


@pytest.fixture
def label_server(trained_tiny_bundle, tmp_path):
    require_monailabel()
    app = tmp_path / "app"  # start_server creates model/ lib/ logs/ bin/ in the app folder: use a copy
    app.mkdir()
    shutil.copy(APP / "main.py", app / "main.py")
    studies = tmp_path / "studies"
    studies.mkdir()
    port = free_port()
    env = dict(os.environ, MONAI_LABEL_SESSION_PATH=str(tmp_path / "sessions"),
               MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--conf", "bundles", str(trained_tiny_bundle), "--conf", "models", f"{TINY_BUNDLE},{DCRM_SEG}",
           "--host", "127.0.0.1", "--port", str(port)]
    import requests

    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, url + "/info/", tmp_path / "monailabel.log", "monailabel", timeout=300, poll=1,
                        grace=30, env=env):
        yield url, requests.get(url + "/info/", timeout=5).json()


def post_for_label(url: str, model: str, image: Path, out_dir: Path) -> Path:
    """POST ``image`` to ``/infer/<model>?output=image`` with an HTTP client; the returned label's file."""
    import requests

    with open(image, "rb") as f:
        res = requests.post(f"{url}/infer/{model}", params={"output": "image"},
                            files={"file": (image.name, f, "application/octet-stream")}, timeout=300)
    assert res.status_code == 200, res.text[:2000]
    out = out_dir / f"pred_{image.name}"
    out.write_bytes(res.content)
    return out


def test_monailabel_server_infers_with_image_geometry(label_server, trained_tiny_bundle, tmp_path):
    import requests
    from scipy.ndimage import zoom

    from medpeft_monai.data import sample_dataset

    url, info = label_server
    ohif = requests.get(f"{url}/ohif/", timeout=30)  # the OHIF viewer MONAI Label hosts
    assert ohif.status_code == 200 and "<html" in ohif.text.lower()
    model = info["models"][TINY_BUNDLE]
    assert model["type"] == "segmentation" and model["dimension"] == 2
    assert model["labels"] == {"grey matter": 1, "white matter": 2}

    data = Path(sample_dataset("brain_mri_2d"))
    item = json.loads((data / "datalist.json").read_text())["test"][0]
    image_path, label_path = data / item["image"], data / item["label"]
    # a second copy at twice the resolution (half the spacing): not the network's input size
    image, label = nib.load(str(image_path)), nib.load(str(label_path))
    big_affine = image.affine.copy()
    big_affine[:2, :2] /= 2
    big_image = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(zoom(np.asarray(image.dataobj), 2, order=1).astype(np.float32), big_affine), big_image)
    big_label = zoom(np.asarray(label.dataobj), 2, order=0)

    own_name = Path(item["image"]).name.split(".")[0] + "_seg.nii.gz"
    own = nib.load(str(trained_tiny_bundle / TINY_BUNDLE / "eval" / own_name))
    for path, ref_label, ref_pred in ((image_path, np.asarray(label.dataobj), np.asarray(own.dataobj)),
                                      (big_image, big_label, None)):
        pred_img, src = nib.load(str(post_for_label(url, TINY_BUNDLE, path, tmp_path))), nib.load(str(path))
        assert pred_img.shape == src.shape  # the image's grid ...
        np.testing.assert_allclose(pred_img.affine, src.affine, atol=1e-4)  # ... and its position in space
        pred = np.asarray(pred_img.dataobj)
        assert set(np.unique(pred)) <= {0, 1, 2}
        dice = _dice(pred, ref_label, (1, 2))
        assert dice > 0.3, f"mean grey/white matter Dice {dice:.3f} against the sample label"
        if ref_pred is not None:  # same model, same pre/post-processing as `monai.bundle run inference.json`
            assert _dice(pred, ref_pred.reshape(pred.shape), (0, 1, 2)) > 0.99

    # a bundle variant: DCRM-ViT's segmentation model (inference_seg.json, model_seg.pt), on a PNG
    assert "dcrm_vit_multidomain" not in info["models"]  # the classification model is not served
    model = info["models"][DCRM_SEG]
    assert model["type"] == "segmentation" and model["dimension"] == 2 and model["labels"] == {"foreground": 1}
    data = Path(sample_dataset("multidomain_segmentation"))
    item = json.loads((data / "datalist.json").read_text())["test"][0]
    image_path = data / item["image"]
    out = post_for_label(url, DCRM_SEG, image_path, tmp_path)
    (pred_shape, _, pred), (src_shape, _, _) = read_grid(out), read_grid(image_path)
    assert pred_shape == src_shape and set(np.unique(pred)) <= {0, 1}
    own = read_grid(trained_tiny_bundle / "dcrm_vit_multidomain" / "eval" / "seg" / f"{image_path.stem}_seg.png")[2]
    assert np.mean(pred == own) > 0.99  # the same labels as `monai.bundle run inference_seg.json`


def served_tiny_bundle(tmp_path) -> BundleVariant:
    """A copy of the tiny bundle with the random 2-block ViT preset in its inference config and trained-like
    weights in models/model.pt: what the app serves in the in-process tests."""
    copy = BundleVariant(copy_bundle(TINY_BUNDLE, tmp_path / "bundles"))
    tiny_preset(copy.bundle, "inference.json")
    trained_like_checkpoint(copy, copy.model_file, **TINY_PRESET)
    return copy


def test_non_finite_image_is_an_error_not_a_blank_label(tmp_path):
    """A NaN pixel: MONAI Label's inference raises naming the file (HTTP error) instead of answering with an
    all-background label."""
    require_monailabel()
    label_app, copy = load_app_module(), served_tiny_bundle(tmp_path)
    image = tmp_path / "nan_image.nii.gz"
    data = np.random.rand(64, 64).astype(np.float32)
    data[10, 10] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(image))
    task = label_app.SegmentationBundleInfer(copy, {})
    with pytest.raises(Exception) as err:
        task({"image": str(image), "device": "cpu"})
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("nan_image.nii.gz holds 1 NaN or infinite value(s)" in c for c in chain), chain[:3]


def test_conf_spatial_native_serves_sliding_windows_on_the_image_grid(tmp_path):
    """``--conf spatial native``: the served model tiles a 200 x 150 image with image_size windows (12, never one
    resized image) and the label comes back on the image's grid and affine."""
    require_monailabel()
    import torch

    from medpeft_monai.nets import PeftSegmenter

    label_app, copy = load_app_module(), served_tiny_bundle(tmp_path)
    image = tmp_path / "large.nii.gz"
    affine = np.diag([0.5, 0.75, 2.0, 1.0])
    affine[:3, 3] = (4.0, -3.0, 1.0)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((200, 150)).astype(np.float32), affine), str(image))
    with pytest.raises(ValueError, match="spatial must be 'resize' or 'native'"):
        label_app.SegmentationBundleInfer(copy, {"spatial": "tiles"})
    task = label_app.SegmentationBundleInfer(copy, {"spatial": "native", "sw_batch_size": "3"})
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[0].shape)) if isinstance(m, PeftSegmenter) else None)
    try:
        result_file, _ = task({"image": str(image), "device": "cpu"})
    finally:
        hook.remove()
    try:
        assert {s[2:] for s in seen} == {(64, 64)} and sum(s[0] for s in seen) == 12 and max(s[0] for s in seen) <= 3
        shape, pred_affine, _ = read_grid(result_file)
        assert shape == (200, 150)
        np.testing.assert_allclose(pred_affine, affine, atol=1e-5)
    finally:
        os.remove(result_file)
