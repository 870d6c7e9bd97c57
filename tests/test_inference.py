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
from tests.conftest import TINY_PRESET, VARIANTS, perturb_trainable

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


def run_inference(variant, tmp_path, image: str, spatial: str) -> tuple[list[tuple[int, ...]], str]:
    """Run the variant's inference config (tiny preset, weights moved off their init) on ``image``; the input
    shapes the network saw, and the mask file."""
    parser = ConfigParser()
    parser.read_config(str(variant.config("inference")))
    parser["bundle_root"] = str(variant.bundle)
    for key, value in PRESET.get(variant.bundle.name, TINY_PRESET).items():
        parser[key] = value
    parser["spatial"] = spatial
    parser["test_datalist"] = [{"image": image}]
    parser["output_dir"] = str(tmp_path / f"out_{spatial}")
    parser["ckpt_path"] = str(tmp_path / "model.pt")
    parser["device"] = "cpu"
    torch.save(perturb_trainable(parser.get_parsed_content("network_def", lazy=False)).state_dict(),
               tmp_path / "model.pt")
    seen = []
    parser.get_parsed_content("network").register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    parser.get_parsed_content("evaluator").run()
    masks = [p for p in (tmp_path / f"out_{spatial}").rglob("*_seg.*")]
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
