"""Bundle inference on images other than the sample data: sliding windows at an image's native grid
(``--spatial native``) and the default whole-image resize (random 2-block ViT preset, in-process)."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import LoadImage
from PIL import Image

from medpeft_monai.data import load_datalist
from tests.conftest import TINY_ARGS, TINY_PRESET, VARIANTS, perturb_trainable

SEG_VARIANTS = [v for v in VARIANTS if v.output_format() == "segmentation"]
#: per bundle, a tiny preset other than TINY_PRESET (window prompts need a Hiera; no stage-1 modality LoRA)
PRESET = {"crossmodal_segmentation": {"backbone": "sam2_hiera_tiny", "backbone_weights": None,
                                      "backbone_kwargs": {"stages": (1, 1, 1, 1)}, "modality_lora": {},
                                      "prompts": {"method": "window_prompt", "num_prompts": 2}}}
ROI, OVERLAP = 64, 0.25


def _windows(length: int) -> int:
    """Windows along one axis of MONAI's sliding window (roi ROI, overlap OVERLAP; a shorter side is padded)."""
    return 1 if length <= ROI else math.ceil((length - ROI) / int(ROI * (1 - OVERLAP))) + 1


def large_image(src: str, dst_dir, size: tuple[int, int]) -> str:
    """The sample test image ``src`` tiled and cut to ``size`` (H, W), in its own format and channel layout."""
    if src.endswith((".nii", ".nii.gz")):
        img = nib.load(src)
        data = np.asarray(img.dataobj)
        reps = (math.ceil(size[0] / data.shape[0]), math.ceil(size[1] / data.shape[1])) + (1,) * (data.ndim - 2)
        data = np.tile(data, reps)[: size[0], : size[1]]
        affine = img.affine.copy()
        affine[:3, :3] = affine[:3, :3] @ np.diag([0.5, 0.75, 1.0])  # another spacing and an offset to keep
        affine[:3, 3] += (3.0, -2.0, 1.5)
        path = dst_dir / "large.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        return str(path)
    data = np.asarray(Image.open(src))  # PNG: (rows, cols[, 3])
    reps = (math.ceil(size[0] / data.shape[0]), math.ceil(size[1] / data.shape[1])) + (1,) * (data.ndim - 2)
    path = dst_dir / "large.png"
    Image.fromarray(np.tile(data, reps)[: size[0], : size[1]]).save(path)
    return str(path)


def grid(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(spatial shape, affine) as MONAI loads the file (the frame the bundles' masks are written in)."""
    img = LoadImage(image_only=True, ensure_channel_first=True)(path)
    return tuple(img.shape[1:]), np.asarray(img.affine)


def inference_parser(variant, tmp_path, items: list[dict], out_dir, **overrides) -> ConfigParser:
    """The variant's inference config (tiny preset) on datalist ``items``, with weights moved off their init saved
    to ``tmp_path/model.pt``."""
    parser = ConfigParser()
    parser.read_config(str(variant.config("inference")))
    parser["bundle_root"] = str(variant.bundle)
    for key, value in {**PRESET.get(variant.bundle.name, TINY_PRESET), **overrides}.items():
        parser[key] = value
    parser["test_datalist"] = items
    parser["output_dir"] = str(out_dir)
    parser["ckpt_path"] = str(tmp_path / "model.pt")
    parser["device"] = "cpu"
    if not (tmp_path / "model.pt").is_file():
        torch.save(perturb_trainable(parser.get_parsed_content("network_def", lazy=False)).state_dict(),
                   tmp_path / "model.pt")
    return parser


def run_inference(variant, tmp_path, image: str, spatial: str) -> tuple[list[tuple[int, ...]], str]:
    """Run the variant's inference config on ``image``; the input shapes the network saw, and the mask file."""
    out_dir = tmp_path / f"out_{spatial}"
    parser = inference_parser(variant, tmp_path, [{"image": image}], out_dir, spatial=spatial)
    seen = []
    parser.get_parsed_content("network").register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    parser.get_parsed_content("evaluator").run()
    masks = [p for p in out_dir.rglob("*_seg.*")]
    assert len(masks) == 1, masks
    return seen, str(masks[0])


@pytest.mark.parametrize("variant", SEG_VARIANTS, ids=lambda v: v.name)
def test_native_inference_slides_windows_over_a_large_image(variant, tmp_path):
    """``--spatial native``: an image of 200 x 150 pixels (3 x 2.3 times image_size) is not resized: the network
    sees only image_size windows, as many as MONAI's sliding window places (4 x 3 = 12), at most sw_batch_size per
    forward, and the mask is on the input's grid (shape and affine)."""
    parser = ConfigParser()
    parser.read_config(str(variant.config("inference")))
    assert parser["spatial"] == "resize" and parser["image_size"] == [ROI, ROI]  # the documented default
    section = parser["test_section"] if "test_section" in parser else "test"
    sample = load_datalist(parser.get_parsed_content("datalist"), section)[0]["image"]
    image = large_image(sample, tmp_path, (200, 150))

    seen, mask = run_inference(variant, tmp_path, image, "native")
    assert {s[2:] for s in seen} == {(ROI, ROI)}, seen  # windows, never the whole (resized) image
    assert all(s[0] <= parser["sw_batch_size"] for s in seen), seen
    assert sum(s[0] for s in seen) == _windows(200) * _windows(150) == 12
    (shape, affine), (src_shape, src_affine) = grid(mask), grid(image)
    assert shape[:2] == src_shape[:2] and sorted(src_shape[:2]) == [150, 200]  # MONAI reads a PNG as (W, H)
    np.testing.assert_allclose(affine, src_affine, atol=1e-5)
    values = np.unique(np.asarray(LoadImage(image_only=True)(mask)))
    assert set(values.tolist()) <= set(range(4))
    if variant.name == "dcrm_vit_multidomain_seg":  # the router's D(x): the mean over the image's windows
        rows = (tmp_path / "out_native" / "domains.csv").read_text().splitlines()
        assert len(rows) == 2 and abs(sum(float(p) for p in rows[1].split(",")[3:]) - 1) < 1e-4, rows

    # the default (spatial="resize"): the whole image resized to one image_size input, the mask on the same grid
    seen, mask = run_inference(variant, tmp_path, image, "resize")
    assert seen == [(1, seen[0][1], ROI, ROI)]
    assert grid(mask)[0][:2] == src_shape[:2]


def test_native_inference_pads_a_side_shorter_than_image_size(tmp_path):
    """A 40 x 150 image: padded to 64 x 150 for the windows (1 x 3) and cropped back: a 40 x 150 mask."""
    variant = next(v for v in SEG_VARIANTS if v.name == "lora_segmentation")
    data = np.random.default_rng(0).random((40, 150)).astype(np.float32)
    path = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    seen, mask = run_inference(variant, tmp_path, str(path), "native")
    assert {s[2:] for s in seen} == {(ROI, ROI)} and sum(s[0] for s in seen) == 3
    assert grid(mask)[0] == (40, 150)
    np.testing.assert_allclose(grid(mask)[1], grid(str(path))[1])


def test_inference_skips_an_unreadable_image_and_reports_it_at_the_end(tmp_path):
    """A truncated NIfTI and a truncated PNG among good images: the good ones get their masks, each bad one is logged
    as it is skipped, and the run ends non-zero with the list of skipped files and the fix as its last lines."""
    import json
    import subprocess
    import sys

    from medpeft_monai.utils import BundleVariant
    from tests.conftest import copy_bundle, trained_like_checkpoint

    bundle = copy_bundle("lora_segmentation", tmp_path)
    trained_like_checkpoint(BundleVariant(bundle), bundle / "models" / "model.pt", **TINY_PRESET)
    items = _good_and_truncated_images(tmp_path / "data")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": items}))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--datalist", str(datalist), *TINY_ARGS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-3000:]
    assert sorted(p.name for p in (bundle / "eval").iterdir()) == ["a_seg.nii.gz", "c_seg.nii.gz", "d_seg.nii.gz"]
    for bad in ("b_truncated.nii.gz", "e_truncated.png"):  # logged when skipped, naming the file and the fix
        assert any("skipped datalist item" in line and bad in line and "remove its entry from the datalist" in line
                   for line in log.splitlines()), log[-3000:]
    tail = res.stderr.strip().splitlines()
    assert tail[-4].startswith("SkippedImagesError: 2 of 5 datalist item(s) could not be read"), tail[-4]
    assert items[1]["image"] in tail[-3] and items[3]["image"] in tail[-2]
    assert "Could not read" in tail[-3] and "Could not read" in tail[-2]
    assert tail[-1].endswith("--on_error stop stops the run at the first such file instead.")


def _good_and_truncated_images(folder) -> list[dict]:
    """Datalist items: good NIfTI, truncated NIfTI, good NIfTI, truncated PNG, good PNG (64 x 64, 1 channel)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name in ("a", "c"):
        nib.save(nib.Nifti1Image(rng.random((64, 64)).astype(np.float32), np.eye(4)), str(folder / f"{name}.nii.gz"))
    (folder / "b_truncated.nii.gz").write_bytes((folder / "a.nii.gz").read_bytes()[:300])
    Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(folder / "d.png")
    (folder / "e_truncated.png").write_bytes((folder / "d.png").read_bytes()[:200])
    return [{"image": str(folder / n)} for n in ("a.nii.gz", "b_truncated.nii.gz", "c.nii.gz", "e_truncated.png",
                                                 "d.png")]


def test_skipped_images_are_reported_with_dataloader_workers_and_on_error_stop_stops(tmp_path):
    """With DataLoader workers (the skip happens in a worker process) the report still lists both files; with
    ``on_error="stop"`` the first bad file stops the run, as MONAI's Dataset does."""
    from medpeft_monai.handlers import SkippedImagesError

    variant = next(v for v in SEG_VARIANTS if v.name == "lora_segmentation")
    items = _good_and_truncated_images(tmp_path / "data")
    parser = inference_parser(variant, tmp_path, items, tmp_path / "out_workers", **{"dataloader#num_workers": 2})
    with pytest.raises(SkippedImagesError, match="2 of 5 datalist item") as err:
        parser.get_parsed_content("evaluator").run()
    assert items[1]["image"] in str(err.value) and items[3]["image"] in str(err.value)
    assert len(list((tmp_path / "out_workers").iterdir())) == 3

    parser = inference_parser(variant, tmp_path, items, tmp_path / "out_stop", on_error="stop")
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("evaluator").run()
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("b_truncated.nii.gz" in c and "Could not read" in c for c in chain), chain
    assert [p.name for p in (tmp_path / "out_stop").iterdir()] == ["a_seg.nii.gz"]
