"""Small, deterministic sample data sets built on first use from data shipped inside installed packages.

Nothing is downloaded. Real images come from nilearn (MNI ICBM152 2009a template and tissue maps),
pydicom / pydicom-data (DICOM test files) and scikit-image (photographs, fundus, histology).
What no package ships (optic disc/cup masks, labelled ultrasound lesions, multi-sequence MRI) is
simulated, and each data set's ``DATA_CARD.md`` says which parts are real and which are simulated.

Usage::

    from medpeft_monai.data import sample_dataset, load_datalist
    folder = sample_dataset("brain_mri_2d")          # built once, then cached
    train = load_datalist(f"{folder}/datalist.json", "training")
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .datalist import write_datalist

__all__ = [
    "SAMPLE_DATASETS",
    "sample_data_root",
    "sample_dataset",
    "simulate_fundus",
    "simulate_ultrasound",
]

_VERSION = 4  # bump when a builder's output changes: older caches are rebuilt

# ----------------------------------------------------------------------------------------------
# small I/O helpers


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG")


def _save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.ascontiguousarray(arr), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _write_card(folder: Path, text: str) -> None:
    (folder / "DATA_CARD.md").write_text(text.strip() + "\n", encoding="utf-8")


def _resize(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resize with anti-aliasing, float32 out."""
    from skimage.transform import resize

    return resize(arr.astype(np.float32), shape, order=1, anti_aliasing=True, preserve_range=True).astype(
        np.float32
    )


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _brain_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 = background where P(GM)+P(WM) < 0.5, else 1 = grey matter if P(GM) >= P(WM), else 2 = white."""
    tissue = gm + wm >= 0.5
    return np.where(tissue, np.where(gm >= wm, 1, 2), 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# MNI ICBM152 2009a from nilearn (shipped inside the nilearn wheel, no download)


@functools.lru_cache(maxsize=1)
def _mni() -> dict:
    """T1 template, GM and WM probability maps, brain mask (T1 > 0.2, as nilearn's brain mask)."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1_img = load_mni152_template(resolution=1)
    out = {
        "t1": np.asarray(t1_img.get_fdata(dtype=np.float32)),
        "gm": np.asarray(load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)),
        "wm": np.asarray(load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)),
        "affine": np.asarray(t1_img.affine, dtype=np.float64),
    }
    out["mask"] = (out["t1"] > 0.2).astype(np.float32)
    for v in out.values():
        v.setflags(write=False)
    return out


_MNI_CARD = """\
- Source: MNI ICBM152 2009a nonlinear symmetric template (T1, grey- and white-matter probability
  maps; files `mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`) shipped inside the
  `nilearn` package and read with `nilearn.datasets.load_mni152_template`,
  `load_mni152_gm_template`, `load_mni152_wm_template` (resolution 1 mm, 197x233x189, no download).
  References: Fonov et al., NeuroImage 2011 and 2009; Collins et al. 1999.
- Licence: the ICBM 2009 templates are distributed by the McConnell Brain Imaging Centre (MNI,
  McGill University) under a permissive copyright notice (use, copy, modify and distribute for any
  purpose without fee provided the copyright notice is kept; no warranty). nilearn's own
  description lists the licence as "unknown"; check
  http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009 before redistributing."""


def _brain_square() -> tuple[int, int, int]:
    """(x0, y0, side) of a square axial field of view around the brain (voxels of the 1 mm template)."""
    m = _mni()["mask"] > 0
    idx = np.argwhere(m.any(axis=2))
    (x0, y0), (x1, y1) = idx.min(0), idx.max(0) + 1
    side = int(max(x1 - x0, y1 - y0) + 8)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    return int(cx - side // 2), int(cy - side // 2), side


def _crop2d(vol: np.ndarray, z: int, x0: int, y0: int, side: int) -> np.ndarray:
    """Axial slice z cropped to [x0, x0+side) x [y0, y0+side), zero-padded where outside the volume."""
    sl = vol[:, :, z]
    pad = side
    padded = np.pad(sl, pad)
    return padded[x0 + pad : x0 + pad + side, y0 + pad : y0 + pad + side]


_BLOCK_ROLES = ("training", "validation", "training", "test", "training", "training")


def _slice_plan(per_block: int = 4, roles: tuple[str, ...] = _BLOCK_ROLES) -> list[tuple[int, str]]:
    """Axial slices (z index, split): the z range where the brain is large is cut into ``len(roles)``
    blocks (default 6: roles train, val, train, test, train, train); each block gives ``per_block``
    slices with a margin at both ends, so slices of different splits are further apart than slices
    of one split."""
    area = _mni()["mask"].sum(axis=(0, 1))
    zs = np.nonzero(area >= 0.4 * area.max())[0]
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    block = (z1 - z0) / len(roles)
    plan = []
    for b, role in enumerate(roles):
        for j in range(per_block):
            plan.append((round(z0 + b * block + (j + 1) * block / (per_block + 1)), role))
    return plan


def _brain_slices(image_size: int, plan: list[tuple[int, str]] | None = None) -> list[dict]:
    """2D slices (t1, gm, wm, mask resized to image_size) with their split, z and NIfTI affine, for the
    (z, split) pairs of ``plan`` (default ``_slice_plan()``)."""
    mni = _mni()
    x0, y0, side = _brain_square()
    s = side / image_size
    out = []
    for z, role in _slice_plan() if plan is None else plan:
        maps = {
            k: np.clip(_resize(_crop2d(mni[k], z, x0, y0, side), (image_size,) * 2), 0, 1)
            for k in ("t1", "gm", "wm", "mask")
        }
        vox = np.array([[s, 0, 0, x0 + s / 2 - 0.5], [0, s, 0, y0 + s / 2 - 0.5], [0, 0, 1, z], [0, 0, 0, 1]])
        maps.update(
            split=role, z=z, affine=mni["affine"] @ vox, z_mm=float((mni["affine"] @ [0, 0, z, 1])[2])
        )
        out.append(maps)
    return out


# ----------------------------------------------------------------------------------------------
# a. brain_mri_2d


def _build_brain_mri_2d(out: Path, image_size: int = 64) -> tuple[dict, str]:
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    for i, sl in enumerate(_brain_slices(image_size)):
        sub = "Ts" if sl["split"] == "test" else "Tr"
        img, lab = f"images{sub}/brain_{i:03d}.nii.gz", f"labels{sub}/brain_{i:03d}.nii.gz"
        _save_nifti(out / img, sl["t1"].astype(np.float32), sl["affine"])
        _save_nifti(out / lab, _brain_labels(sl["gm"], sl["wm"]), sl["affine"])
        sections[sl["split"]].append({"image": img, "label": lab, "z_mm": round(sl["z_mm"], 1)})
    sections["labels"] = {"0": "background", "1": "grey matter", "2": "white matter"}
    n = {k: len(v) for k, v in sections.items() if isinstance(v, list)}
    card = f"""
# brain_mri_2d

Axial 2D slices of a real T1-weighted brain MRI template with grey/white-matter labels.

- Files: `imagesTr|imagesTs/brain_NNN.nii.gz` (float32, {image_size}x{image_size}, intensities in [0, 1]),
  `labelsTr|labelsTs/brain_NNN.nii.gz` (uint8). Datalist `datalist.json` sections:
  training {n["training"]}, validation {n["validation"]}, test {n["test"]}; entry fields `image`, `label`,
  `z_mm` (slice position in MNI space).
- Labels: 0 = background, 1 = grey matter, 2 = white matter. Rule: background where
  P(GM) + P(WM) < 0.5 (this includes CSF), otherwise the larger of P(GM), P(WM) (ties to GM),
  computed on the probability maps after resampling to {image_size}x{image_size}.
{_MNI_CARD}
- How it was made: a square axial field of view around the brain (side = brain extent + 8 mm) is
  cropped and resized to {image_size}x{image_size} (linear, anti-aliased; about
  {_brain_square()[2] / image_size:.2f} mm pixels). The z range where the brain area is at least 40 %
  of its maximum is cut into 6 blocks with roles {list(_BLOCK_ROLES)}; each block gives 4 evenly
  spaced slices with a margin at both ends, so validation and test slices come from z ranges that
  no training slice touches. No randomness is involved. The NIfTI affine maps pixels to MNI mm.
- Limits: one template brain (an average of 152 adults, smoother than a single scan), so
  all slices share one anatomy; splits differ by brain level, not by subject. Labels come from
  the template's probability maps, not from manual segmentation. Meant for tests and demos,
  not for any claim about clinical performance.
"""
    return sections, card


# ----------------------------------------------------------------------------------------------
# b. brain_mri_3d

_VOLUME_ROLES = ("training", "training", "training", "training", "validation", "test")


def _build_brain_mri_3d(out: Path, image_size: tuple[int, int, int] = (48, 56, 48)) -> tuple[dict, str]:
    from scipy.ndimage import map_coordinates

    mni = _mni()
    size = np.asarray(image_size, dtype=int)
    if size.shape != (3,):
        raise ValueError(f"image_size must have 3 numbers for brain_mri_3d, got {image_size!r}.")
    fov = np.array([168.0, 196.0, 168.0])  # mm, covers the whole brain
    spacing = fov / size
    m = mni["mask"] > 0
    idx = np.argwhere(m)
    centre = (idx.min(0) + idx.max(0)) / 2.0  # template voxel = mm (1 mm isotropic)
    rng = np.random.default_rng(3003)
    grid = (
        np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), 0)
        .reshape(3, -1)
        .astype(np.float64)
    )
    rel = (grid - (size[:, None] - 1) / 2.0) * spacing[:, None]  # mm around the centre
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    params = []
    for i, role in enumerate(_VOLUME_ROLES):
        yaw, pitch = rng.uniform(-8, 8, 2) * np.pi / 180
        scale = rng.uniform(0.92, 1.08, 3)
        shift = rng.uniform(-5, 5, 3)
        bias = rng.uniform(-0.08, 0.08, 3)
        rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
        warp = rz @ rx @ np.diag(1.0 / scale)  # output mm -> template mm (scale > 1 makes a larger head)
        coords = centre[:, None] + shift[:, None] + warp @ rel
        vols = {
            k: map_coordinates(mni[k], coords, order=1, cval=0.0).reshape(tuple(size))
            for k in ("t1", "gm", "wm")
        }
        field = 1.0 + np.tensordot(bias, rel / (fov[:, None] / 2), axes=1).reshape(tuple(size))
        t1 = np.clip(vols["t1"] * field + rng.normal(0, 0.01, tuple(size)), 0, 1).astype(np.float32)
        origin = mni["affine"] @ np.append(centre - (size - 1) / 2.0 * spacing, 1.0)
        affine = np.diag(np.append(spacing, 1.0))
        affine[:3, 3] = origin[:3]
        sub = "Ts" if role == "test" else "Tr"
        img, lab = f"images{sub}/brain3d_{i:03d}.nii.gz", f"labels{sub}/brain3d_{i:03d}.nii.gz"
        _save_nifti(out / img, t1, affine)
        _save_nifti(out / lab, _brain_labels(vols["gm"], vols["wm"]), affine)
        sections[role].append({"image": img, "label": lab})
        params.append(
            f"| {i} | {role} | {np.degrees(yaw):+.1f} | {np.degrees(pitch):+.1f} | "
            f"{', '.join(f'{v:.3f}' for v in scale)} | {', '.join(f'{v:+.1f}' for v in shift)} | "
            f"{', '.join(f'{v:+.3f}' for v in bias)} |"
        )
    sections["labels"] = {"0": "background", "1": "grey matter", "2": "white matter"}
    table = "\n".join(params)
    card = f"""
# brain_mri_3d

Small 3D T1-weighted brain volumes with grey/white-matter labels, all derived from ONE real template.

- Files: `imagesTr|imagesTs/brain3d_NNN.nii.gz` (float32, {tuple(int(v) for v in size)}, intensities in [0, 1],
  {", ".join(f"{v:.2f}" for v in spacing)} mm voxels, RAS affine in MNI mm), `labelsTr|labelsTs/brain3d_NNN.nii.gz`
  (uint8). Datalist sections: training 4, validation 1, test 1; entry fields `image`, `label`.
- Labels: 0 = background, 1 = grey matter, 2 = white matter (background where P(GM) + P(WM) < 0.5,
  otherwise the larger probability; ties to GM), computed after resampling the probability maps.
{_MNI_CARD}
- How it was made (seed 3003): each volume samples the 1 mm template on a {tuple(int(v) for v in size)} grid
  covering {fov.tolist()} mm around the brain centre, through a small random warp (rotation about
  z (yaw) and x (pitch), per-axis scale, shift), trilinear interpolation; then a linear intensity
  bias field and Gaussian noise (sigma 0.01) are applied to the T1 and it is clipped to [0, 1].

| volume | split | yaw deg | pitch deg | scale x,y,z | shift mm | bias x,y,z |
|---|---|---|---|---|---|---|
{table}

- Limits: every volume is the same template brain (an average of 152 adults) under a different
  smooth warp; they are NOT independent subjects, so validation/test scores only show that a
  pipeline runs and learns, not that it generalises. Labels are thresholded probability maps.
"""
    return sections, card


# ----------------------------------------------------------------------------------------------
# c. medical_vs_natural

_MVN_DOMAINS = [
    "ct",
    "mri",
    "radiograph",
    "ultrasound",
    "fundus",
    "histology",
    "nuclear_medicine",
    "natural",
    "texture",
]
# Regions are (row0, row1, col0, col1) fractions of the source image.
_ALL, _TOP, _MID, _BOTTOM = (
    (0.0, 1.0, 0.0, 1.0),
    (0.0, 0.6, 0.0, 1.0),
    (0.6, 0.8, 0.0, 1.0),
    (0.8, 1.0, 0.0, 1.0),
)
# (split, domain, source, region the crops are taken from)
_MVN_SOURCES = [
    ("training", "ct", "pydicom:693_UNCR.dcm", _ALL),
    ("training", "mri", "pydicom:MR2_UNCR.dcm", _ALL),
    ("training", "mri", "pydicom:MR-SIEMENS-DICOM-WithOverlays.dcm", _ALL),
    ("training", "mri", "nilearn:mni152_t1_axial", _ALL),
    ("training", "radiograph", "pydicom:RG1_UNCR.dcm", _ALL),
    ("training", "ultrasound", "pydicom:US1_UNCR.dcm", (0.25, 0.9, 0.0, 1.0)),
    ("training", "ultrasound", "pydicom:gdcm-US-ALOKA-16.dcm", (0.1, 0.95, 0.0, 0.5)),
    ("training", "fundus", "skimage:retina", _TOP),
    ("training", "histology", "skimage:immunohistochemistry", _TOP),
    ("training", "nuclear_medicine", "pydicom:JPEG2000_UNC.dcm", _TOP),
    ("validation", "ct", "pydicom:eCT_Supplemental.dcm", _ALL),
    ("validation", "mri", "pydicom:emri_small.dcm", _ALL),
    ("validation", "radiograph", "pydicom:RG3_UNCR.dcm", (0.0, 0.5, 0.3, 0.7)),
    ("validation", "ultrasound", "pydicom:color3d_jpeg_baseline.dcm", (0.1, 0.85, 0.1, 0.9)),
    ("validation", "fundus", "skimage:retina", _MID),
    ("validation", "histology", "skimage:immunohistochemistry", _MID),
    ("validation", "nuclear_medicine", "pydicom:JPEG2000_UNC.dcm", _MID),
    ("test", "ct", "pydicom:CT_small.dcm", _ALL),
    ("test", "mri", "pydicom:MR_small.dcm", _ALL),
    ("test", "radiograph", "pydicom:RG3_UNCR.dcm", (0.5, 1.0, 0.3, 0.7)),
    ("test", "ultrasound", "pydicom:gdcm-US-ALOKA-16.dcm", (0.1, 0.95, 0.5, 1.0)),
    ("test", "fundus", "skimage:microaneurysms", _ALL),
    ("test", "fundus", "skimage:retina", _BOTTOM),
    ("test", "histology", "skimage:immunohistochemistry", _BOTTOM),
    ("test", "nuclear_medicine", "pydicom:JPEG2000_UNC.dcm", _BOTTOM),
    ("training", "natural", "skimage:astronaut", _ALL),
    ("training", "natural", "skimage:chelsea", _ALL),
    ("training", "natural", "skimage:rocket", _ALL),
    ("training", "natural", "skimage:camera", _ALL),
    ("training", "natural", "skimage:stereo_motorcycle", _ALL),
    ("training", "texture", "skimage:brick", _TOP),
    ("training", "texture", "skimage:grass", _TOP),
    ("training", "texture", "skimage:gravel", _TOP),
    ("validation", "natural", "skimage:coffee", _ALL),
    ("validation", "natural", "skimage:clock", _ALL),
    ("validation", "natural", "skimage:page", _ALL),
    ("validation", "texture", "skimage:brick", _MID),
    ("validation", "texture", "skimage:grass", _MID),
    ("validation", "texture", "skimage:gravel", _MID),
    ("test", "natural", "skimage:hubble_deep_field", _ALL),
    ("test", "natural", "skimage:moon", _ALL),
    ("test", "natural", "skimage:text", _ALL),
    ("test", "natural", "skimage:coins", _ALL),
    ("test", "texture", "skimage:brick", _BOTTOM),
    ("test", "texture", "skimage:grass", _BOTTOM),
    ("test", "texture", "skimage:gravel", _BOTTOM),
]
_MVN_COUNTS = {"training": 24, "validation": 8, "test": 8}  # per class


def _dicom_value(ds, name: str, seq: str):
    """A top-level attribute, or the same attribute inside the shared/first per-frame functional group."""
    if name in ds:
        return ds[name].value
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if group in ds and seq in ds[group][0] and name in ds[group][0][seq][0]:
            return ds[group][0][seq][0][name].value
    return None


def _first(v) -> float:
    """First value of a possibly multi-valued DICOM number."""
    if isinstance(v, (str, bytes, int, float)):
        return float(v)
    return float(v[0])


def _dicom_first_frame(ds, index: int = 0) -> np.ndarray:
    """First frame (or frame ``index``) of the pixel data, colour data as RGB, on pydicom 3 and on pydicom 2
    (the version MONAI Label's ``label`` extra pins). pydicom 2 decodes every frame once and caches them on
    ``ds``, so reading several frames of one dataset decodes it once."""
    multi_frame = int(getattr(ds, "NumberOfFrames", 1) or 1) > 1
    try:  # pydicom >= 3: decodes one frame and converts YBR to RGB itself
        from pydicom.pixels import pixel_array
    except ImportError:  # pydicom 2: decodes every frame and leaves JPEG YBR data as YBR
        from pydicom.pixel_data_handlers.util import convert_color_space

        arr = ds.pixel_array[index] if multi_frame else ds.pixel_array
        if arr.ndim == 3 and str(ds.PhotometricInterpretation).startswith("YBR"):
            arr = convert_color_space(arr, "YBR_FULL", "RGB")
        return arr
    return pixel_array(ds, index=index if multi_frame else None)


def _read_dicom(name: str):
    """The pydicom test file ``name`` as a pydicom Dataset (pydicom or pydicom-data, never downloaded)."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(
            f"pydicom test file {name!r} is not installed. Fix: pip install pydicom-data "
            "(it ships the larger pydicom test files; nothing is downloaded at run time)."
        )
    return pydicom.dcmread(path)


def _dicom_rescaled(ds, arr: np.ndarray) -> np.ndarray:
    """Stored values through the rescale slope/intercept (top level or functional groups): HU for CT."""
    slope = _dicom_value(ds, "RescaleSlope", "PixelValueTransformationSequence")
    intercept = _dicom_value(ds, "RescaleIntercept", "PixelValueTransformationSequence")
    return arr.astype(np.float32) * (1.0 if slope is None else _first(slope)) + (
        0.0 if intercept is None else _first(intercept)
    )


def _load_dicom(name: str, frame: int = 0, ds=None) -> np.ndarray:
    """A pydicom test file as float RGB in [0, 1]: first frame (or ``frame``); rescale and the file's own
    display window (else a 0.5-99.5 percentile window); MONOCHROME1 inverted; palette colour applied.
    ``ds``: the already read dataset of ``name`` (to decode a multi-frame file once on pydicom 2)."""
    try:
        from pydicom.pixels import apply_color_lut
    except ImportError:  # pydicom 2
        from pydicom.pixel_data_handlers.util import apply_color_lut

    ds = _read_dicom(name) if ds is None else ds
    arr = _dicom_first_frame(ds, frame)
    pi = str(ds.PhotometricInterpretation)
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float32)
        return rgb / float(rgb.max() or 1)
    if arr.ndim == 3:  # RGB (YBR already converted)
        return arr.astype(np.float32) / 255.0
    a = _dicom_rescaled(ds, arr)
    centre = _dicom_value(ds, "WindowCenter", "FrameVOILUTSequence")
    width = _dicom_value(ds, "WindowWidth", "FrameVOILUTSequence")
    if centre is not None and width is not None and _first(width) > 0:
        lo, hi = _first(centre) - _first(width) / 2, _first(centre) + _first(width) / 2
    else:
        lo, hi = np.percentile(a, [0.5, 99.5])
    g = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    if pi == "MONOCHROME1":
        g = 1.0 - g
    return np.repeat(g[..., None], 3, axis=-1)


def _load_skimage(name: str) -> np.ndarray:
    import skimage.data

    if name == "stereo_motorcycle":
        a = skimage.data.stereo_motorcycle()[0]
    else:
        a = getattr(skimage.data, name)()
    a = np.asarray(a, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a[..., :3]


def _load_source(src: str) -> np.ndarray:
    kind, name = src.split(":", 1)
    if kind == "pydicom":
        return _load_dicom(name)
    if kind == "skimage":
        return _load_skimage(name)
    if kind == "nilearn":
        t1 = _mni()["t1"]
        sl = np.rot90(t1[:, :, t1.shape[2] // 2 - 10])  # display orientation (anterior up)
        return np.repeat(np.clip(sl, 0, 1)[..., None], 3, axis=-1).astype(np.float32)
    raise ValueError(src)


def _shrink(img: np.ndarray, max_short_side: int) -> np.ndarray:
    """Downsample (anti-aliased) so that the shorter side is at most ``max_short_side``."""
    h, w = img.shape[:2]
    f = max_short_side / min(h, w)
    return img if f >= 1 else _resize(img, (max(1, round(h * f)), max(1, round(w * f)), img.shape[2]))


def _random_crops(img: np.ndarray, box: tuple[float, ...], n: int, size: int, rng) -> list[np.ndarray]:
    """n square crops (side 45-100 % of the region's shorter side) inside ``box`` (row0, row1, col0,
    col1 fractions), resized to size x size; mostly empty or flat crops are re-drawn (up to 30 tries)."""
    h, w = img.shape[:2]
    r0, r1, c0, c1 = int(box[0] * h), int(box[1] * h), int(box[2] * w), int(box[3] * w)
    side_max = min(r1 - r0, c1 - c0)
    side_min = max(8, int(0.45 * side_max))
    out = []
    for _ in range(n):
        best, best_score = None, -1.0
        for _try in range(30):
            s = int(rng.integers(side_min, side_max + 1))
            y, x = int(rng.integers(r0, r1 - s + 1)), int(rng.integers(c0, c1 - s + 1))
            step = max(1, s // size)
            gray = img[y : y + s : step, x : x + s : step].mean(-1)
            score = float((gray > 0.08).mean()) * min(1.0, float(gray.std()) / 0.08)
            if score > best_score:
                best, best_score = (y, x, s), score
            if score >= 0.4:
                break
        y, x, s = best
        out.append(_to_uint8(np.clip(_resize(img[y : y + s, x : x + s], (size, size, 3)), 0, 1)))
    return out


def _build_medical_vs_natural(out: Path, image_size: int = 64) -> tuple[dict, str]:
    rng = np.random.default_rng(4004)
    cache: dict[str, np.ndarray] = {}
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    for split, entries in sections.items():
        for label, is_medical in ((0, True), (1, False)):
            rows = [
                r
                for r in _MVN_SOURCES
                if r[0] == split and (r[1] not in ("natural", "texture")) == is_medical
            ]
            total = _MVN_COUNTS[split]
            counts = [total // len(rows) + (1 if k < total % len(rows) else 0) for k in range(len(rows))]
            for (_, domain, src, box), n in zip(rows, counts):
                if src not in cache:
                    cache[src] = _shrink(_load_source(src), 8 * image_size)
                for crop in _random_crops(cache[src], box, n, image_size, rng):
                    rel = f"images/{split}_{len(entries):03d}.png"
                    _save_png(out / rel, crop)
                    entries.append(
                        {
                            "image": rel,
                            "label": label,
                            "domain": domain,
                            "domain_id": _MVN_DOMAINS.index(domain),
                            "source": src,
                        }
                    )
    sections["classes"] = ["medical", "natural"]
    sections["domains"] = list(_MVN_DOMAINS)
    src_table = "\n".join(
        f"| {s} | {d} | {src} | rows {b[0]:.2f}-{b[1]:.2f}, cols {b[2]:.2f}-{b[3]:.2f} |"
        for s, d, src, b in _MVN_SOURCES
    )
    n_med = len({r[2] for r in _MVN_SOURCES if r[1] not in ("natural", "texture")})
    n_nat = len({r[2] for r in _MVN_SOURCES}) - n_med
    card = f"""
# medical_vs_natural

Binary classification of real images: medical (label 0) versus natural photographs and textures (label 1).

- Files: `images/<split>_NNN.png`, RGB uint8 {image_size}x{image_size} (grey sources are repeated to 3 channels).
  Datalist sections: training 48, validation 16, test 16 (half per class); entry fields `image`,
  `label` (0 medical, 1 natural), `domain`, `domain_id` (index into the top-level `domains` list),
  `source`. Top-level keys `classes` = ["medical", "natural"] and `domains` = {_MVN_DOMAINS}.
- Sources (all real images shipped inside installed packages; nothing is simulated):
  - `pydicom:*`: DICOM test files from `pydicom` and `pydicom-data` (MIT licensed packages), read with
    `pydicom.data.get_testdata_file(name, download=False)`. Many are downsized from the NEMA WG04
    DICOM sample sets (CT_small, MR_small, RG1/RG3 radiographs, US1, MR2); pydicom's README states
    that its author believes there is no restriction on their use. Pixel values: first frame of
    multi-frame files; YBR colour converted to RGB; rescale slope/intercept and the file's own
    display window (a 0.5-99.5 percentile window where the file has none); MONOCHROME1 inverted;
    palette colour applied.
  - `skimage:*`: scikit-image data (`skimage.data.<name>()`); retina (fundus, CC0, Wikimedia),
    microaneurysms (fundus crop from the HRF database, CC0), immunohistochemistry (no known
    copyright restrictions), astronaut/rocket/hubble_deep_field (NASA/SpaceX, public domain),
    camera/chelsea/coffee/clock (CC0 or public domain by the photographers), brick/grass/gravel
    (CC0 textures), coins (Brooklyn Museum, no known restrictions), text (public domain),
    stereo_motorcycle (left view, Middlebury 2014 stereo benchmark), moon and page (no licence
    stated in their docstrings; shipped with scikit-image, BSD-3-Clause). Check each source's
    terms before redistributing the images outside this cache.
  - `nilearn:mni152_t1_axial`: an axial slice of the MNI ICBM152 2009a T1 template (see brain_mri_2d).
- How it was made (seed 4004): for each split and class, the quota (24/8/8 per class) is shared
  round-robin among that split's sources; each source is first downsampled (anti-aliased) so that
  its shorter side is at most {8 * image_size} px; each image is a random square crop (45-100 % of the
  shorter side of the allowed region) resized to {image_size}x{image_size} with anti-aliasing; crops
  that are mostly black or flat are re-drawn (up to 30 tries). Sources are assigned to splits as
  below; where one source feeds several splits (retina, immunohistochemistry, the JPEG2000_UNC
  bone scan, the RG3 radiograph, the two panels of the ALOKA ultrasound, brick, grass, gravel) the
  splits use disjoint regions of the image, so no pixel is shared. Regions of ultrasound frames
  skip most burned-in text, but some text/graphics remain.

| split | domain | source | region |
|---|---|---|---|
{src_table}

- Limits: few distinct source images ({n_med} medical, {n_nat} natural), so many crops share a source;
  the task is easy and meant for pipeline tests, not a benchmark. Modalities are unevenly
  represented, several DICOM test files were downsized or edited by pydicom's authors, and crops of
  one image in different bands are still from one patient/scene.
"""
    return sections, card


# ----------------------------------------------------------------------------------------------
# d. fundus_disc_cup (simulation)

_FUNDUS_STYLES = {
    "source": {
        "base": (0.85, 0.33, 0.23),  # median colour of the real photograph's field (skimage.data.retina())
        "gain": 1.0,
        "vignette": 0.35,
        "gradient": (0.0, 0.2),
        "disc": (0.95, 0.62, 0.42),  # the neuroretinal rim: orange-pink
        "cup": (1.0, 0.95, 0.85),  # the cup: pale, the brightest part of the disc
        "vessel": (0.50, 0.10, 0.06),
        "noise": 0.02,
        "blur": 0.0,
        "gamma": 1.0,
        "response": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
        "haze": 0.0,
        "haze_colour": (0.0, 0.0, 0.0),
    },
    "target": {
        "base": (0.62, 0.33, 0.22),
        "gain": 0.80,
        "vignette": 0.60,
        "gradient": (0.15, 0.45),
        "disc": (0.82, 0.60, 0.46),
        "cup": (0.93, 0.86, 0.74),
        "vessel": (0.38, 0.12, 0.10),
        "noise": 0.035,
        "blur": 1.2,
        "gamma": 1.3,
        # another sensor's colour response (rows: output R, G, B from scene R, G, B): red leaks into green,
        # a yellow-green cast; and veiling glare (haze) that lowers the disc/cup contrast
        "response": ((0.80, 0.15, 0.05), (0.35, 0.60, 0.05), (0.10, 0.20, 0.50)),
        "haze": 0.20,
        "haze_colour": (0.55, 0.45, 0.25),
    },
}


def _ellipse_dist(yy, xx, cy, cx, a, b, rot):
    """Normalised elliptical distance (1 on the boundary); a = vertical, b = horizontal semi-axis."""
    dy, dx = yy - cy, xx - cx
    u = dy * np.cos(rot) - dx * np.sin(rot)
    v = dy * np.sin(rot) + dx * np.cos(rot)
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _render_strokes(points: np.ndarray, size: int) -> np.ndarray:
    """Soft max-composited Gaussian discs for points (y, x, width) on a size x size grid."""
    v = np.zeros((size, size))
    for y, x, w in points:
        rad = int(np.ceil(1.5 * w)) + 1
        y0, y1 = max(int(y) - rad, 0), min(int(y) + rad + 1, size)
        x0, x1 = max(int(x) - rad, 0), min(int(x) + rad + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        gy = (np.arange(y0, y1) + 0.5 - y)[:, None]
        gx = (np.arange(x0, x1) + 0.5 - x)[None, :]
        blob = np.exp(-(gy**2 + gx**2) / (2 * (w / 2) ** 2))
        np.maximum(v[y0:y1, x0:x1], blob, out=v[y0:y1, x0:x1])
    return v


def _vessel_points(rng, start, size: int, fov_r: float, centre: float) -> np.ndarray:
    """Random branching vessel centre lines radiating from the optic disc: rows (y, x, width)."""
    pts = []
    n_main = int(rng.integers(4, 7))
    angles = 2 * np.pi * np.arange(n_main) / n_main + rng.uniform(-0.4, 0.4, n_main)
    stack = [(start[0], start[1], a, rng.uniform(0.020, 0.030) * size, 0) for a in angles]
    step = 0.02 * size
    while stack:
        y, x, ang, w, depth = stack.pop()
        for _ in range(200):
            y, x = y + step * np.sin(ang), x + step * np.cos(ang)
            if np.hypot(y - centre, x - centre) > fov_r or w < 0.006 * size:
                break
            pts.append((y, x, w))
            ang += rng.normal(0, 0.12)
            w *= 0.985
            if depth < 2 and rng.random() < 0.05:
                side = 1 if rng.random() < 0.5 else -1
                stack.append((y, x, ang + side * rng.uniform(0.4, 0.9), w * 0.7, depth + 1))
    return np.asarray(pts, dtype=np.float64).reshape(-1, 3)


def simulate_fundus(rng: np.random.Generator, image_size: int = 64, domain: str = "source"):
    """One simulated colour fundus photograph and its disc/cup label map.

    Returns ``(image, label)``: uint8 (S, S, 3) RGB and uint8 (S, S) with 0 = background,
    1 = disc rim (disc minus cup), 2 = cup. ``domain`` is ``"source"`` or ``"target"`` (darker,
    browner, another colour response, veiling haze, more vignetting, blurred and noisier: a different
    camera for domain adaptation).
    """
    from scipy.ndimage import gaussian_filter

    if domain not in _FUNDUS_STYLES:
        raise ValueError(f"domain must be one of {sorted(_FUNDUS_STYLES)}, got {domain!r}.")
    st = _FUNDUS_STYLES[domain]
    size = int(image_size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c, fov_r = size / 2.0, 0.48 * size
    r = np.hypot(yy - c, xx - c)
    fov = np.clip(fov_r - r + 0.5, 0, 1)
    theta, g = rng.uniform(0, 2 * np.pi), rng.uniform(*st["gradient"])
    illum = (
        st["gain"]
        * (1 - st["vignette"] * (r / fov_r) ** 2)
        * (1 + g * ((xx - c) * np.cos(theta) + (yy - c) * np.sin(theta)) / fov_r)
    )
    tex = gaussian_filter(rng.normal(0, 1, (size, size)), size / 16)
    illum = illum * (1 + 0.04 * tex / (tex.std() + 1e-8))
    img = np.asarray(st["base"])[None, None] * illum[..., None]
    # optic disc and cup (cup offset limited so that it stays inside the disc)
    cy, cx = c + rng.uniform(-0.12, 0.12, 2) * size
    ad = rng.uniform(0.10, 0.14) * size
    bd = ad * rng.uniform(0.85, 1.0)
    rot = rng.uniform(-0.3, 0.3)
    cdr = rng.uniform(0.3, 0.7)
    ac = cdr * ad
    bc = min(cdr * bd * rng.uniform(0.9, 1.05), 0.95 * bd)
    ou, ov = rng.uniform(-0.25, 0.25) * (ad - ac), rng.uniform(-0.25, 0.25) * (bd - bc)
    ccy, ccx = cy + ou * np.cos(rot) + ov * np.sin(rot), cx - ou * np.sin(rot) + ov * np.cos(rot)
    d_disc = _ellipse_dist(yy, xx, cy, cx, ad, bd, rot)
    d_cup = _ellipse_dist(yy, xx, ccy, ccx, ac, bc, rot)
    disc_soft = np.clip((1 - d_disc) * ad + 0.5, 0, 1)[..., None]
    cup_soft = np.clip((1 - d_cup) * ac + 0.5, 0, 1)[..., None]
    img = img * (1 - disc_soft) + disc_soft * np.asarray(st["disc"]) * illum[..., None] * 1.1
    img = img * (1 - cup_soft) + cup_soft * np.asarray(st["cup"]) * illum[..., None] * 1.2
    # vessels leave from the cup
    vessels = _render_strokes(_vessel_points(rng, (ccy, ccx), size, fov_r, c), size)[..., None] * 0.8
    img = img * (1 - vessels) + vessels * np.asarray(st["vessel"]) * illum[..., None]
    img = np.clip(img, 0, 1) ** st["gamma"]
    img = img @ np.asarray(st["response"]).T
    img = (1 - st["haze"]) * img + st["haze"] * np.asarray(st["haze_colour"]) * fov[..., None]
    if st["blur"] > 0:
        img = gaussian_filter(img, sigma=(st["blur"], st["blur"], 0))
    img = np.clip((img + rng.normal(0, st["noise"], img.shape)) * fov[..., None], 0, 1)
    label = np.zeros((size, size), np.uint8)
    label[d_disc <= 1] = 1
    label[(d_cup <= 1) & (d_disc <= 1)] = 2
    label[fov < 0.5] = 0
    return _to_uint8(img), label


_FUNDUS_SPLITS = (
    ("training", "source", 24),
    ("validation", "source", 8),
    ("test", "source", 8),
    ("target_unlabeled", "target", 10),
    ("target_test", "target", 8),
)


def _build_fundus_disc_cup(out: Path, image_size: int = 64) -> tuple[dict, str]:
    rng = np.random.default_rng(5005)
    sections: dict[str, list] = {}
    for split, domain, n in _FUNDUS_SPLITS:
        sections[split] = []
        for k in range(n):
            img, lab = simulate_fundus(rng, image_size, domain)
            entry = {"image": f"images/{split}_{k:03d}.png"}
            _save_png(out / entry["image"], img)
            if split != "target_unlabeled":
                entry["label"] = f"labels/{split}_{k:03d}.png"
                _save_png(out / entry["label"], lab)
            entry["domain"] = domain
            sections[split].append(entry)
    sections["labels"] = {"0": "background", "1": "optic disc rim", "2": "optic cup"}
    card = f"""
# fundus_disc_cup (SIMULATED)

Simulated colour fundus photographs with optic disc / cup segmentation labels, in a source style and
a target style for domain adaptation. No package ships real disc/cup masks, so every image here is
synthetic; do not report results on it as results on real fundus photographs.

- Files: `images/<split>_NNN.png` (RGB uint8 {image_size}x{image_size}), `labels/<split>_NNN.png` (uint8).
  Datalist sections: training 24, validation 8, test 8 (source style); target_unlabeled 10
  (target style, `image` only); target_test 8 (target style, with labels). Entry fields: `image`,
  `label` (not in target_unlabeled), `domain` ("source" or "target").
- Labels: 0 = background, 1 = optic disc rim (disc minus cup), 2 = optic cup. Disc = rim + cup.
  The cup always lies inside the disc.
- Source: simulated by `medpeft_monai` (no third-party image content). Licence: same as this
  package (Apache-2.0).
- How it was made (seed 5005, `simulate_fundus` in `medpeft_monai.data.sample_data`): circular field
  of view (radius 0.48 S); orange-red background with quadratic radial illumination fall-off,
  a random linear illumination gradient and smooth low-frequency texture; an elliptical disc
  (vertical semi-axis 0.10-0.14 S, aspect 0.85-1.0, centre within +-0.12 S of the image centre,
  rotation +-0.3 rad) whose rim is orange-pink, with a pale, brighter elliptical cup (vertical cup/disc
  ratio 0.3-0.7, small offset), as the cup's pallor in real photographs;
  4-6 dark-red vessels leave the cup as random walks with tapering width and up to two levels of
  branching; Gaussian noise. Style parameters (source / target):
  {json.dumps(_FUNDUS_STYLES)}
  The source background colour is the median colour of the real fundus photograph shipped with
  scikit-image (`skimage.data.retina()`, inside its field of view). The target camera is darker and
  browner, with another colour response (a 3x3 matrix: red leaks into green, a yellow-green cast),
  veiling glare (20 % haze that lowers the disc/cup contrast), stronger vignetting and illumination
  gradient, gamma 1.3, defocus blur (Gaussian, sigma 1.2 px) and more sensor noise. A model trained
  on the source alone loses Dice on the target (mostly on the cup): the gap that domain adaptation
  (bundle `mfmda_fundus`) is meant to close.
- Limits: geometric shapes and colours only roughly follow real photographs (no macula, no
  pathology, no real vessel tree, no camera artefacts); the domain shift is a hand-made change of
  colour, illumination and sharpness. Good for tests and demos of segmentation and domain-adaptation
  pipelines, not for clinical claims.
"""
    return sections, card


# ----------------------------------------------------------------------------------------------
# e. ultrasound_lesion (simulation)


def _irregular_blob(yy, xx, cy, cx, a, b, rng) -> np.ndarray:
    """Hard mask of an ellipse (a lateral, b axial semi-axis) with a wavy, irregular boundary."""
    u, v = (xx - cx) / a, (yy - cy) / b
    psi = np.arctan2(v, u)
    rho = np.ones_like(psi)
    for k in range(3, 8):
        rho += rng.uniform(0, 0.07) * np.sin(k * psi + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= rho


def simulate_ultrasound(rng: np.random.Generator, image_size: int = 64):
    """One simulated B-mode image with 1-2 hypoechoic lesions.

    Returns ``(image, label)``: uint8 (S, S) grey image and uint8 (S, S) mask (1 = lesion).
    """
    from scipy.ndimage import gaussian_filter

    size = int(image_size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    ay, ax = -0.15 * size, size / 2.0  # virtual apex above the image
    r = np.hypot(yy - ay, xx - ax)
    phi = np.arctan2(xx - ax, yy - ay)  # 0 = straight down
    half = rng.uniform(0.55, 0.65)
    r_min, r_max = 0.2 * size, 1.12 * size
    fan = (np.abs(phi) <= half) & (r >= r_min) & (r <= r_max)
    depth = np.clip((r - r_min) / (r_max - r_min), 0, 1)

    # tissue layers: skin, fat, fascia, glandular/muscle, deep fascia, muscle
    def wave(amp: float) -> np.ndarray:
        return amp * np.sin(rng.uniform(2, 5) * phi + rng.uniform(0, 2 * np.pi))

    b1, b2, b3 = 0.05 + wave(0.01), 0.22 + wave(0.03), 0.78 + wave(0.04)
    echo = np.where(depth < b1, 0.9, np.where(depth < b2, 0.35, np.where(depth < b3, 0.6, 0.45)))
    for b in (b2, b3):
        echo = echo + 0.5 * np.exp(-(((depth - b) / 0.012) ** 2))
    lowfreq = gaussian_filter(rng.normal(0, 1, (size, size)), size / 12)
    echo = echo * (1 + 0.25 * lowfreq / (lowfreq.std() + 1e-8))
    # lesions
    label = np.zeros((size, size), bool)
    posterior = np.ones((size, size))
    n_les = int(rng.integers(1, 3))
    placed = 0
    for _ in range(60):
        if placed == n_les:
            break
        rc = r_min + rng.uniform(0.35, 0.65) * (r_max - r_min)
        pc = rng.uniform(-0.55, 0.55) * half
        cy, cx = ay + rc * np.cos(pc), ax + rc * np.sin(pc)
        a = rng.uniform(0.07, 0.13) * size
        b = a * rng.uniform(0.55, 1.0)
        m = _irregular_blob(yy, xx, cy, cx, a, b, rng)
        inside = (cy - 1.3 * b > 0) and (cy + 1.3 * b < size) and (cx - 1.3 * a > 0) and (cx + 1.3 * a < size)
        grown = gaussian_filter(label.astype(float), 2.0) > 0.01
        if not inside or not np.all(fan[m]) or (m & grown).any() or m.sum() < 6:
            continue
        label |= m
        placed += 1
        # posterior acoustic shadowing (-) or enhancement (+) behind the lesion, along the beam
        sign = -0.55 if rng.random() < 0.5 else 0.5
        width = a / rc
        prof = np.clip(1 - np.abs(phi - pc) / width, 0, 1) ** 0.5
        behind = 1 / (1 + np.exp(-(r - (rc + b)) / (0.03 * size)))
        posterior *= 1 + sign * prof * behind * np.exp(-np.maximum(r - rc - b, 0) / (0.4 * size))
    soft = gaussian_filter(label.astype(float), 0.6)
    echo = echo * posterior
    echo = echo * (1 - soft) + soft * 0.12 * (1 + 0.2 * lowfreq / (lowfreq.std() + 1e-8))
    echo = echo * np.exp(-0.5 * depth) * (1 + 0.4 * depth)  # attenuation with partial gain compensation
    # speckle: envelope of a PSF-filtered complex Gaussian field (Rayleigh distributed)
    re = gaussian_filter(rng.normal(0, 1, (size, size)), (0.6, 1.0))
    im = gaussian_filter(rng.normal(0, 1, (size, size)), (0.6, 1.0))
    env = np.hypot(re, im)
    env /= np.sqrt((env**2).mean())
    amp = np.clip(echo, 0, None) * env
    img = np.log1p(20 * amp) / np.log1p(20 * 2.0)
    img = np.clip(img, 0, 1) * fan
    return _to_uint8(img), (label & fan).astype(np.uint8)


def _build_ultrasound_lesion(out: Path, image_size: int = 64) -> tuple[dict, str]:
    rng = np.random.default_rng(6006)
    sections: dict[str, list] = {}
    for split, n in (("training", 24), ("validation", 8), ("test", 8)):
        sections[split] = []
        for k in range(n):
            img, lab = simulate_ultrasound(rng, image_size)
            entry = {"image": f"images/{split}_{k:03d}.png", "label": f"labels/{split}_{k:03d}.png"}
            _save_png(out / entry["image"], img)
            _save_png(out / entry["label"], lab)
            sections[split].append(entry)
    sections["labels"] = {"0": "background", "1": "lesion"}
    card = f"""
# ultrasound_lesion (SIMULATED)

Simulated B-mode ultrasound images with hypoechoic lesion masks. No package ships labelled ultrasound
lesions, so every image is synthetic; real ultrasound frames (pydicom US test files) are used only in
medical_vs_natural.

- Files: `images/<split>_NNN.png` (grey uint8 {image_size}x{image_size}), `labels/<split>_NNN.png`
  (uint8 0/1). Datalist sections: training 24, validation 8, test 8; entry fields `image`, `label`.
- Labels: 0 = background (including everything outside the fan), 1 = lesion. Every image has 1-2 lesions.
- Source: simulated by `medpeft_monai` (no third-party image content). Licence: same as this
  package (Apache-2.0).
- How it was made (seed 6006, `simulate_ultrasound` in `medpeft_monai.data.sample_data`): a sector
  (fan) with a virtual apex above the image and half-angle 0.55-0.65 rad; echogenicity by depth in
  layers (bright skin, dark fat, bright fascia lines, mid-grey glandular/muscle layers with wavy
  boundaries and smooth texture); 1-2 non-overlapping lesions, ellipses (lateral semi-axis
  0.07-0.13 S, axial/lateral ratio 0.55-1.0) with an irregular boundary (5 random harmonics),
  echogenicity 0.12 (hypoechoic); posterior acoustic shadowing (x0.45) or enhancement (x1.5) behind
  each lesion along the beam, fading with depth; depth attenuation with partial gain compensation;
  speckle as the envelope of a PSF-filtered complex Gaussian field (Rayleigh distributed amplitude,
  PSF sigma 0.6 px axial, 1.0 px lateral) multiplying the echogenicity; log compression.
- Limits: a hand-made texture model, not an acoustic simulation (no beamforming, no
  reverberation, no real anatomy); lesions are only hypoechoic blobs. For pipeline tests and demos.
"""
    return sections, card


# ----------------------------------------------------------------------------------------------
# f. multiseq_mri (simulation from real tissue maps)

# Tissue parameters at 1.5 T: T1, T2 (ms), proton density, as in the BrainWeb MRI simulator tables
# (Kwan et al., IEEE TMI 1999; Cocosco et al., NeuroImage 1997); lesion = MS lesion values.
_TISSUE = {
    "csf": (2569.0, 329.0, 1.00),
    "gm": (833.0, 83.0, 0.86),
    "wm": (500.0, 70.0, 0.77),
    "lesion": (752.0, 237.0, 0.76),
}
_SEQUENCES = {
    "t1": {"tr": 500.0, "te": 15.0},
    "t2": {"tr": 4000.0, "te": 100.0},
    "flair": {"tr": 9000.0, "te": 120.0},
}


def _flair_ti(tr: float) -> float:
    """Inversion time that nulls CSF: 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0."""
    t1 = _TISSUE["csf"][0]
    return float(-t1 * np.log((1 + np.exp(-tr / t1)) / 2))


def _signal(tissue: str, seq: str) -> float:
    """Spin-echo (T1w, T2w) or inversion-recovery spin-echo (FLAIR) signal of a pure tissue."""
    t1, t2, pd = _TISSUE[tissue]
    p = _SEQUENCES[seq]
    if seq == "flair":
        ti = _flair_ti(p["tr"])
        mz = abs(1 - 2 * np.exp(-ti / t1) + np.exp(-p["tr"] / t1))
    else:
        mz = 1 - np.exp(-p["tr"] / t1)
    return float(pd * mz * np.exp(-p["te"] / t2))


def _build_multiseq_mri(out: Path, image_size: int = 64) -> tuple[dict, str]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(7007)
    sig = {s: {t: _signal(t, s) for t in _TISSUE} for s in _SEQUENCES}
    norm = {s: max(sig[s].values()) for s in _SEQUENCES}
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    for i, sl in enumerate(_brain_slices(image_size)):
        gm, wm, mask = sl["gm"], sl["wm"], sl["mask"]
        # simulated lesions inside white matter (1-2 per slice, at least 3 labelled pixels)
        blob = np.zeros_like(wm)
        candidates = np.argwhere(wm > 0.9)
        for _ in range(int(rng.integers(1, 3))):
            for _try in range(50):
                cy, cx = candidates[rng.integers(len(candidates))]
                a, b = rng.uniform(1.5, 3.5), rng.uniform(1.5, 3.5)
                d = np.hypot((yy - cy) / a, (xx - cx) / b)
                one = gaussian_filter((d <= 1).astype(np.float64), 0.7)
                if ((one * wm) >= 0.5).sum() >= 3:
                    blob = np.maximum(blob, one)
                    break
        lesion = (blob * wm).astype(np.float32)
        frac = {"gm": gm, "wm": wm - lesion, "lesion": lesion, "csf": np.clip(mask - gm - wm, 0, 1)}
        chans = []
        for s in _SEQUENCES:
            clean = sum(frac[t] * sig[s][t] for t in frac) / norm[s]
            noisy = np.hypot(clean + rng.normal(0, 0.015, clean.shape), rng.normal(0, 0.015, clean.shape))
            chans.append(np.clip(noisy, 0, 1).astype(np.float32))
        label = (lesion >= 0.5).astype(np.uint8)
        sub = "Ts" if sl["split"] == "test" else "Tr"
        entry = {"image": f"images{sub}/case_{i:03d}.nii.gz"}
        # (H, W, 1, C): 2D + channels in NIfTI; LoadImaged(ensure_channel_first=True) gives (C, H, W, 1)
        _save_nifti(out / entry["image"], np.stack(chans, -1)[:, :, None, :], sl["affine"])
        for s, ch in zip(_SEQUENCES, chans):
            entry[s] = f"images{sub}/case_{i:03d}_{s}.nii.gz"
            _save_nifti(out / entry[s], ch, sl["affine"])
        entry["label"] = f"labels{sub}/case_{i:03d}.nii.gz"
        _save_nifti(out / entry["label"], label, sl["affine"])
        sections[sl["split"]].append(entry)
    sections["channels"] = list(_SEQUENCES)
    sections["labels"] = {"0": "background", "1": "lesion"}
    rel = "\n".join(
        f"| {s} | TR {p['tr']:.0f} ms, TE {p['te']:.0f} ms"
        + (f", TI {_flair_ti(p['tr']):.0f} ms" if s == "flair" else "")
        + " | "
        + " | ".join(f"{sig[s][t] / norm[s]:.2f}" for t in ("csf", "gm", "wm", "lesion"))
        + " |"
        for s, p in _SEQUENCES.items()
    )
    card = f"""
# multiseq_mri (SIMULATED contrasts from REAL tissue maps)

T1-, T2- and FLAIR-like 2D brain slices with a simulated white-matter lesion. The anatomy (tissue
probability maps) is real (MNI ICBM152 2009a); the three contrasts and the lesions are simulated.

- Files: `imagesTr|imagesTs/case_NNN.nii.gz`: 3-channel image (t1, t2, flair) stored as NIfTI shape
  ({image_size}, {image_size}, 1, 3), float32 in [0, 1]; `LoadImaged(ensure_channel_first=True)` reads it
  as (3, {image_size}, {image_size}, 1) and the presets in `medpeft_monai.data.transforms` drop the
  trailing 1 (or use `SqueezeDimd(dim=-1)`). Per-sequence single-channel files
  `case_NNN_{{t1,t2,flair}}.nii.gz` ({image_size}x{image_size}) and `labelsTr|labelsTs/case_NNN.nii.gz`
  (uint8). Datalist sections: training 16, validation 4, test 4 (same slice plan as brain_mri_2d);
  entry fields `image`, `t1`, `t2`, `flair`, `label`; top-level `channels` = ["t1", "t2", "flair"].
  To use one sequence, load e.g. the `flair` key instead of `image`.
- Labels: 0 = background, 1 = lesion (pixels where the lesion fraction >= 0.5).
{_MNI_CARD}
- How it was made (seed 7007): tissue fractions per pixel are GM and WM from the template maps and
  CSF = clip(brain mask - GM - WM, 0, 1) (brain mask = T1 template > 0.2, as nilearn's
  `load_mni152_brain_mask`; nilearn ships no CSF map). 1-2 lesions per slice: smoothed ellipses
  (semi-axes 1.5-3.5 px) centred on pixels with P(WM) > 0.9; lesion fraction = blob x P(WM), taken
  from WM. Each pixel's signal is the fraction-weighted sum of pure-tissue signals from the
  spin-echo equation S = PD (1 - exp(-TR/T1)) exp(-TE/T2) (T1w, T2w) and the inversion-recovery
  equation S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2) (FLAIR, TI chosen to null CSF),
  with 1.5 T tissue parameters as tabulated for the BrainWeb simulator (Kwan et al., IEEE TMI 1999;
  Cocosco et al., NeuroImage 1997): T1/T2/PD = CSF 2569/329/1.0, GM 833/83/0.86, WM 500/70/0.77,
  MS lesion 752/237/0.76. Each sequence is divided by its largest tissue signal and Rician noise
  (sigma 0.015) is added. Relative signals (CSF, GM, WM, lesion):

| sequence | parameters | CSF | GM | WM | lesion |
|---|---|---|---|---|---|
{rel}

  Expected orderings hold: T1w WM > GM > CSF; T2w CSF > GM > WM; FLAIR GM > WM > CSF (nulled);
  the lesion is bright on T2w and FLAIR and slightly dark on T1w.
- Limits: contrasts come from textbook equations on one template anatomy (no B1/B0
  inhomogeneity, no partial-volume texture of real scans, no skull); lesions are simple blobs.
  For pipeline tests and demos of multi-channel input, not for clinical claims.
"""
    return sections, card


# ----------------------------------------------------------------------------------------------
# shared by the multi-domain sets (g. multidomain_lesion, h. multidomain_segmentation)

# 11 blocks of MNI axial slices: 6 training, 2 validation, 3 test blocks (12 : 4 : 6 images per class)
_MD_ROLES = (
    "training",
    "validation",
    "training",
    "test",
    "training",
    "training",
    "test",
    "training",
    "validation",
    "training",
    "test",
)
_MD_COUNTS = {"training": 12, "validation": 4, "test": 6}  # per domain (and per class where there are classes)
_ABDOMEN_L, _ABDOMEN_R = (0.3, 0.85, 0.2, 0.5), (0.3, 0.85, 0.5, 0.8)  # explicit_VR-UN body, no table
_ALOKA_L, _ALOKA_R = (0.2, 0.86, 0.06, 0.5), (0.13, 0.86, 0.54, 0.97)  # the two B-mode panels, no text
_ECHO = (0.1, 0.85, 0.22, 0.8)  # color3d_jpeg_baseline: the sector, no text or markers
# CT display windows (centre, width) in HU, per file
_CT_BRAIN, _CT_SOFT = (40.0, 80.0), (40.0, 400.0)
_CT_WINDOWS = {
    "693_UNCR.dcm": _CT_BRAIN,
    "eCT_Supplemental.dcm": _CT_BRAIN,
    "J2K_pixelrep_mismatch.dcm": _CT_BRAIN,
    "CT_small.dcm": _CT_SOFT,
    "explicit_VR-UN.dcm": _CT_SOFT,
}


def _region_px(shape: tuple[int, ...], box: tuple[float, ...]) -> tuple[int, int, int, int]:
    h, w = shape[:2]
    return int(box[0] * h), int(box[1] * h), int(box[2] * w), int(box[3] * w)


def _draw_view(shape, box, rng, side, max_deg: float = 0.0, flip: bool = False) -> tuple:
    """A random square view ``(row, col, side, angle, mirrored)`` lying wholly inside ``box`` (row0, row1,
    col0, col1 fractions of ``shape``): side uniform in ``side`` (fractions of the image's shorter side),
    shrunk where the rotated square would not fit in the region; angle uniform in +-``max_deg``;
    mirrored left-right with probability 0.5 when ``flip``."""
    r0, r1, c0, c1 = _region_px(shape, box)
    angle = float(np.deg2rad(rng.uniform(-max_deg, max_deg))) if max_deg else 0.0
    mirror = bool(flip and rng.random() < 0.5)
    spread = abs(np.cos(angle)) + abs(np.sin(angle))
    s = min(rng.uniform(*side) * min(shape[:2]), (min(r1 - r0, c1 - c0) - 2) / spread)
    e = s / 2 * spread
    cy, cx = rng.uniform(r0 + e, r1 - 1 - e), rng.uniform(c0 + e, c1 - 1 - e)
    return float(cy), float(cx), float(s), angle, mirror


def _sample_view(img: np.ndarray, box, view: tuple, size: int, order: int = 1) -> np.ndarray:
    """``view`` of ``img`` (2D or H x W x C) resampled to size x size, float32. Only pixels inside ``box``
    are read; anti-aliased by a Gaussian prefilter with sigma (side / size - 1) / 2 (as skimage's resize)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    cy, cx, s, a, mirror = view
    r0, r1, c0, c1 = _region_px(img.shape, box)
    u = ((np.arange(size) + 0.5) / size - 0.5) * s
    uu, vv = np.meshgrid(u, -u if mirror else u, indexing="ij")
    rows = cy + uu * np.cos(a) - vv * np.sin(a)
    cols = cx + uu * np.sin(a) + vv * np.cos(a)
    sigma = max(0.0, (s / size - 1) / 2)
    m = int(np.ceil(4 * sigma)) + 2
    y0, y1 = max(r0, int(rows.min()) - m), min(r1, int(np.ceil(rows.max())) + m + 1)
    x0, x1 = max(c0, int(cols.min()) - m), min(c1, int(np.ceil(cols.max())) + m + 1)
    win = np.asarray(img[y0:y1, x0:x1], dtype=np.float32)
    out = []
    for ch in [win] if win.ndim == 2 else [win[..., c] for c in range(win.shape[2])]:
        if sigma > 0:
            ch = gaussian_filter(ch, sigma, mode="nearest")
        out.append(map_coordinates(ch, [rows - y0, cols - x0], order=order, mode="nearest"))
    return np.stack(out, -1) if win.ndim == 3 else out[0]


def _pick_view(img, box, rng, size: int, side, max_deg: float, flip: bool, score, tries: int = 40):
    """Best of up to ``tries`` random views by ``score(crop) -> (value, good enough)``: (crop, view)."""
    best = None
    for _ in range(tries):
        view = _draw_view(img.shape, box, rng, side, max_deg, flip)
        crop = _sample_view(img, box, view, size)
        value, ok = score(crop)
        if best is None or value > best[0]:
            best = (value, crop, view)
        if ok:
            break
    return best[1], best[2]


def _ct_hu(name: str, frame: int = 0, cache: dict | None = None) -> np.ndarray:
    """CT frame of a pydicom test file in Hounsfield units (rescale slope/intercept applied, no window)."""
    cache = {} if cache is None else cache
    if name not in cache:
        cache[name] = _read_dicom(name)
    ds = cache[name]
    return _dicom_rescaled(ds, _dicom_first_frame(ds, frame))


def _ct_display(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo = window[0] - window[1] / 2
    return np.clip((hu - lo) / window[1], 0, 1)


def _mni_axial(z: int) -> np.ndarray:
    """Square axial field of view around the brain at slice z (anterior up): H x W x 3 (T1, P(GM), P(WM))."""
    mni = _mni()
    x0, y0, side = _brain_square()
    return np.stack([np.rot90(_crop2d(mni[k], z, x0, y0, side)) for k in ("t1", "gm", "wm")], -1)


def _share(total: int, n: int) -> list[int]:
    """``total`` shared round-robin among ``n`` sources."""
    return [total // n + (1 if k < total % n else 0) for k in range(n)]


# ----------------------------------------------------------------------------------------------
# g. multidomain_lesion (real images of 5 domains, simulated lesions; class independent of domain)

_MDL_DOMAINS = ["ct", "mri", "ultrasound", "fundus", "natural"]
# (split, domain, source, region): "name.dcm#k" is frame k, "name.dcm#a-b" a random frame in a..b
_MDL_SOURCES = [
    ("training", "ct", "pydicom:693_UNCR.dcm", _ALL),
    ("training", "ct", "pydicom:CT_small.dcm", _ALL),
    ("training", "ct", "pydicom:explicit_VR-UN.dcm", _ABDOMEN_L),
    ("validation", "ct", "pydicom:eCT_Supplemental.dcm#0", _ALL),
    ("validation", "ct", "pydicom:eCT_Supplemental.dcm#1", _ALL),
    ("test", "ct", "pydicom:J2K_pixelrep_mismatch.dcm", _ALL),
    ("test", "ct", "pydicom:explicit_VR-UN.dcm", _ABDOMEN_R),
    ("training", "mri", "nilearn:mni152_t1", _ALL),
    ("validation", "mri", "nilearn:mni152_t1", _ALL),
    ("test", "mri", "nilearn:mni152_t1", _ALL),
    ("training", "ultrasound", "pydicom:gdcm-US-ALOKA-16.dcm", _ALOKA_L),
    ("training", "ultrasound", "pydicom:color3d_jpeg_baseline.dcm#0-59", _ECHO),
    ("validation", "ultrasound", "pydicom:color3d_jpeg_baseline.dcm#66-85", _ECHO),
    ("test", "ultrasound", "pydicom:gdcm-US-ALOKA-16.dcm", _ALOKA_R),
    ("test", "ultrasound", "pydicom:color3d_jpeg_baseline.dcm#92-119", _ECHO),
    ("training", "fundus", "skimage:retina", (0.0, 0.5, 0.0, 1.0)),
    ("validation", "fundus", "skimage:retina", (0.5, 0.7, 0.0, 1.0)),
    ("test", "fundus", "skimage:retina", (0.7, 1.0, 0.0, 1.0)),
    ("training", "natural", "skimage:astronaut", _ALL),
    ("training", "natural", "skimage:chelsea", _ALL),
    ("training", "natural", "skimage:rocket", _ALL),
    ("training", "natural", "skimage:brick", _ALL),
    ("validation", "natural", "skimage:coffee", _ALL),
    ("validation", "natural", "skimage:grass", _ALL),
    ("test", "natural", "skimage:stereo_motorcycle", _ALL),
    ("test", "natural", "skimage:gravel", _ALL),
    ("test", "natural", "skimage:camera", _ALL),
]
# per domain: view side (fraction of the source's shorter side), max rotation (deg), lesion semi-axis
# (fraction of the image side) and contrast range
_MDL_VIEW = {
    "ct": ((0.35, 0.6), 10.0),
    "mri": ((0.8, 1.0), 10.0),
    "ultrasound": ((0.3, 0.55), 0.0),
    "fundus": ((0.15, 0.3), 30.0),
    "natural": ((0.3, 0.7), 0.0),
}
_MDL_LESION = {
    "ct": ((0.04, 0.09), (0.2, 0.45)),  # HU change as a fraction of the window width, sign random
    "mri": ((0.04, 0.09), (0.25, 0.5)),  # relative T1 signal loss
    "ultrasound": ((0.05, 0.1), (0.45, 0.75)),  # relative echo loss
    "fundus": ((0.03, 0.07), (0.45, 0.8)),  # blend weight of the exudate / haemorrhage colour
    "natural": ((0.04, 0.09), (0.35, 0.7)),  # blend weight of the blot
}


def _lesion_blob(rng, tissue: np.ndarray, r_range: tuple[float, float]) -> tuple[np.ndarray, tuple]:
    """Soft mask (0..1) of one irregular ellipse centred on a ``tissue`` pixel at least its semi-axis away
    from the tissue's edge and the image border where there is one (else the deepest tissue pixels):
    ``(mask, (row, col, lateral semi-axis, axial semi-axis))``."""
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    size = tissue.shape[0]
    a = rng.uniform(*r_range) * size
    b = a * rng.uniform(0.6, 1.0)
    if rng.random() < 0.5:
        a, b = b, a
    dist = distance_transform_edt(np.pad(tissue, 1))[1:-1, 1:-1]
    ok = np.argwhere(dist >= max(a, b))
    if len(ok) == 0:
        ok = np.argwhere(dist >= 0.5 * dist.max())
    cy, cx = ok[rng.integers(len(ok))] + 0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    hard = _irregular_blob(yy, xx, cy, cx, a, b, rng)
    return gaussian_filter(hard.astype(np.float64), 0.7), (cy, cx, a, b)


def _mdl_base(src: str, cache: dict, image_size: int, rng) -> tuple[np.ndarray, str]:
    """Full source image for one crop (HU for CT, grey for ultrasound, RGB otherwise) and its name."""
    kind, name = src.split(":", 1)
    file, _, frames = name.partition("#")
    if "-" in frames:
        lo, hi = (int(v) for v in frames.split("-"))
        frame = int(rng.integers(lo, hi + 1))
    else:
        frame = int(frames or 0)
    key = f"{file}#{frame}"
    if key not in cache:
        if file in _CT_WINDOWS:
            cache[key] = _ct_hu(file, frame, cache.setdefault("datasets", {}))
        elif kind == "pydicom":  # ultrasound: the grey B-mode image
            ds = cache.setdefault("datasets", {})
            if file not in ds:
                ds[file] = _read_dicom(file)
            cache[key] = _load_dicom(file, frame, ds[file]).mean(-1)
        else:
            cache[key] = _shrink(_load_source(src), 8 * image_size)
    return cache[key], f"{kind}:{file}" + (f"#{frame}" if frames else "")


def _mdl_score(domain: str, crop: np.ndarray) -> tuple[float, bool]:
    """How usable a crop is (value, good enough): mostly tissue, room for a lesion, not flat."""
    if domain == "mri":  # whole-brain views: always usable
        return 1.0, True
    if domain == "ct":
        body, soft = float((crop > -200).mean()), float(((crop > -50) & (crop < 150)).mean())
        return body * soft, body >= 0.7 and soft >= 0.25
    if domain == "fundus":
        fov = float((crop.mean(-1) > 0.1).mean())
        return fov, fov >= 0.97
    grey = crop if crop.ndim == 2 else crop.mean(-1)
    value = float((grey > 0.08).mean()) * min(1.0, float(grey.std()) / 0.08)
    return value, value >= (0.6 if domain == "ultrasound" else 0.4)


def _mdl_insert(domain: str, crop: np.ndarray, rng, window=None) -> np.ndarray:
    """One simulated focal lesion rendered into a real crop, in the way of the domain (see the data card)."""
    from scipy.ndimage import gaussian_filter

    r_range, c_range = _MDL_LESION[domain]
    if domain == "ct":  # hypo- or hyperdense nodule in soft tissue, added in HU
        soft, _ = _lesion_blob(rng, (crop > -50) & (crop < 150), r_range)
        sign = -1.0 if rng.random() < 0.5 else 1.0
        return crop + sign * rng.uniform(*c_range) * window[1] * soft
    if domain == "mri":  # T1-hypointense focus in white matter (channels T1, P(GM), P(WM))
        soft, _ = _lesion_blob(rng, crop[..., 2] > 0.5, r_range)
        out = crop.copy()
        out[..., 0] *= 1 - rng.uniform(*c_range) * soft
        return out
    if domain == "ultrasound":  # hypoechoic blob with posterior acoustic enhancement below it
        size = crop.shape[0]
        smooth = gaussian_filter(crop, 1.5)
        soft, (cy, cx, a, b) = _lesion_blob(rng, smooth > max(0.15, float(np.median(smooth))), r_range)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        beam = np.exp(-(((xx - cx) / a) ** 4))
        behind = 1 / (1 + np.exp(-(yy - cy - b) / 1.0)) * np.exp(-np.maximum(yy - cy - b, 0) / (0.3 * size))
        gain = 1 + rng.uniform(0.2, 0.5) * beam * behind
        return np.clip(crop * gain * (1 - rng.uniform(*c_range) * soft), 0, 1)
    alpha = rng.uniform(*c_range)
    if domain == "fundus":  # bright yellow exudate-like or dark red haemorrhage-like spot
        soft, _ = _lesion_blob(rng, crop.mean(-1) > 0.12, r_range)
        w = alpha * soft[..., None]
        if rng.random() < 0.5:
            return crop * (1 - w) + w * np.array([0.95, 0.85, 0.45])
        return crop * (1 - w * np.array([0.55, 0.8, 0.8]))
    soft, _ = _lesion_blob(rng, np.ones(crop.shape[:2], bool), r_range)  # natural: dark or bright blot
    w = alpha * soft[..., None]
    return crop * (1 - w) if rng.random() < 0.5 else crop + w * (1 - crop)


def _build_multidomain_lesion(out: Path, image_size: int = 64) -> tuple[dict, str]:
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    mri_slices = {s: [z for z, role in _slice_plan(4, _MD_ROLES) if role == s] for s in sections}
    cache: dict = {}
    for d, domain in enumerate(_MDL_DOMAINS):
        rng = np.random.default_rng([8008, d])
        side, max_deg = _MDL_VIEW[domain]
        for split, entries in sections.items():
            rows = [r for r in _MDL_SOURCES if r[0] == split and r[1] == domain]
            for label in (0, 1):
                for (_, _, src, box), n in zip(rows, _share(_MD_COUNTS[split], len(rows))):
                    for k in range(n):
                        if domain == "mri":  # a different MNI slice for every image
                            z = mri_slices[split][label + 2 * k]
                            base, name = _mni_axial(z), f"nilearn:mni152_t1 z={z}"
                        else:
                            base, name = _mdl_base(src, cache, image_size, rng)
                        score = functools.partial(_mdl_score, domain)
                        crop, _ = _pick_view(base, box, rng, image_size, side, max_deg, True, score)
                        window = _CT_WINDOWS.get(name.split(":", 1)[1].split("#")[0])
                        if label == 1:
                            crop = _mdl_insert(domain, crop, rng, window)
                        if domain == "ct":
                            crop = _ct_display(crop, window)
                        elif domain == "mri":
                            t1 = np.clip(crop[..., 0], 0, 1)
                            crop = np.hypot(t1 + rng.normal(0, 0.01, t1.shape), rng.normal(0, 0.01, t1.shape))
                        rgb = crop if crop.ndim == 3 else np.repeat(crop[..., None], 3, -1)
                        rel = f"images/{split}_{domain}_{len(entries):03d}.png"
                        _save_png(out / rel, _to_uint8(np.clip(rgb, 0, 1)))
                        entries.append(
                            {"image": rel, "label": label, "domain": domain, "domain_id": d, "source": name}
                        )
    sections["classes"] = ["normal", "lesion"]
    sections["domains"] = list(_MDL_DOMAINS)
    return sections, _multidomain_lesion_card(sections, image_size)


def _count_table(sections: dict, domains: list[str], classes: list[str] | None) -> str:
    """Markdown table of image counts per domain (x class) x split."""
    splits = ("training", "validation", "test")
    rows = []
    for domain in domains:
        for c, name in enumerate(classes or [None]):
            n = [
                sum(1 for e in sections[s] if e["domain"] == domain and (classes is None or e["label"] == c))
                for s in splits
            ]
            rows.append(f"| {domain} |" + (f" {c} {name} |" if classes else "") + "".join(f" {v} |" for v in n))
    head = "| domain |" + (" class |" if classes else "") + " training | validation | test |"
    rule = "|---|" + ("---|" if classes else "") + "---|---|---|"
    return "\n".join([head, rule, *rows])


def _mri_slices_note(sections: dict) -> str:
    """Card text: block roles of the MNI slice plan and the slices (z index) each split uses."""
    import textwrap

    roles = ", ".join(r.replace("training", "train").replace("validation", "val") for r in _MD_ROLES)
    z = {s: sorted(int(e["source"].split("z=")[1]) for e in sections[s] if e["domain"] == "mri") for s in _MD_COUNTS}
    used = "; ".join(f"{s} z = " + ", ".join(str(v) for v in zs) for s, zs in z.items())
    text = f"- MRI slices: 11 blocks of the brain's z range with roles ({roles}); slices used: {used}."
    return textwrap.fill(text, 100, initial_indent="  ", subsequent_indent="    ")


_PYDICOM_CARD = """\
  - `pydicom:*`: DICOM test files shipped with `pydicom` / `pydicom-data` (MIT-licensed packages), read
    with `pydicom.data.get_testdata_file(name, download=False)`; pydicom's test-file README says its
    author believes there is no restriction on using them. Provenance by file: `CT_small.dcm`
    (downsized NEMA WG04 CT1), `eCT_Supplemental.dcm` (NEMA multi-frame enhanced CT sample, 2 slices
    10 mm apart, brain), `693_UNCR.dcm` (head CT from pydicom issue 693; its PatientID `CQ500-CT-310`
    points to the CQ500 head-CT data set of qure.ai, distributed under CC BY-NC-SA 4.0, i.e. not for
    commercial use), `J2K_pixelrep_mismatch.dcm` (head CT at the skull base from pydicom issue 1149,
    origin not stated), `explicit_VR-UN.dcm` (abdominal CT from The Cancer Imaging Archive, PatientID
    `PANCREAS_0001`, i.e. the TCIA Pancreas-CT collection under a Creative Commons Attribution
    licence), `gdcm-US-ALOKA-16.dcm` (ALOKA pelvic B-mode, two panels, from GDCM's test data, BSD-style
    GDCM licence), `color3d_jpeg_baseline.dcm` (120-frame echocardiography cine, origin not stated).
    Check each source's terms before redistributing images outside this cache."""


def _multidomain_lesion_card(sections: dict, image_size: int) -> str:
    src_table = "\n".join(
        f"| {s} | {d} | {src} | rows {b[0]:.2f}-{b[1]:.2f}, cols {b[2]:.2f}-{b[3]:.2f} |"
        for s, d, src, b in _MDL_SOURCES
    )
    counts = _count_table(sections, _MDL_DOMAINS, ["normal", "lesion"])
    slices = _mri_slices_note(sections)
    return f"""
# multidomain_lesion (REAL images, SIMULATED lesions)

Binary classification, normal (label 0) versus lesion (label 1), in 5 imaging domains. Every image is
a crop of a REAL image shipped inside an installed package; the lesion in class 1 is SIMULATED and
inserted into the real crop. Class and domain are independent by construction: every domain has
the same number of normal and lesion images in every split, drawn from the same source images, so
the domain (and the source file) says nothing about the class; a model has to find the lesion.

- Files: `images/<split>_<domain>_NNN.png`, RGB uint8 {image_size}x{image_size} (grey sources repeated to
  3 channels). Entry fields `image`, `label` (0 normal, 1 lesion), `domain`, `domain_id` (index into
  the top-level `domains` list), `source` (file, frame or MNI slice the crop comes from). Top-level
  keys `classes` = ["normal", "lesion"] and
  `domains` = {json.dumps(_MDL_DOMAINS)}. File names do not show the class.
- Counts (domain x class x split):

{counts}

- Sources (real base images; nothing downloaded):
{_PYDICOM_CARD}
  - `nilearn:mni152_t1`: axial slices of the MNI ICBM152 2009a T1 template, see brain_mri_2d
    (permissive MNI copyright notice; nilearn lists the licence as "unknown").
  - `skimage:*`: scikit-image data (`skimage.data.<name>()`): retina (fundus photograph, CC0,
    Wikimedia), astronaut/rocket (NASA/SpaceX, public domain), chelsea/coffee/camera (CC0 or public
    domain by the photographers), brick/grass/gravel (CC0 textures), stereo_motorcycle (left view,
    Middlebury 2014 stereo benchmark).

| split | domain | source | region |
|---|---|---|---|
{src_table}

- How it was made (seed 8008; one generator per domain, `numpy.random.default_rng([8008, domain_id])`):
  for each domain, split and class the quota (12/4/6) is shared round-robin among that split's
  sources, identically for both classes. Every image is its own random square view of the source
  region (side as a fraction of the source's shorter side, rotation, random left-right mirror:
  ct 0.35-0.6, +-10 deg; mri 0.8-1.0 of the brain field of view, +-10 deg; ultrasound 0.3-0.55, no
  rotation so the beam stays vertical; fundus 0.15-0.3, +-30 deg; natural 0.3-0.7, no rotation),
  resampled to {image_size}x{image_size} with a Gaussian anti-aliasing prefilter; views that are mostly
  air/background or flat are re-drawn (up to 40 tries). Normal and lesion images are separate
  random views, so no crop appears both with and without a lesion. CT is read in Hounsfield units
  (rescale slope/intercept) and shown in a brain window (centre 40, width 80 HU: 693_UNCR,
  eCT_Supplemental, J2K_pixelrep_mismatch) or a soft-tissue window (40/400 HU: CT_small,
  explicit_VR-UN). Ultrasound is the grey level (mean of RGB) of the first frame (ALOKA) or of a
  random frame in the listed range (echo cine). Sources of natural images and the retina are first
  downsampled to a shorter side of at most {8 * image_size} px. MRI: 4 slices per block, every MRI
  image a different slice (normal: even, lesion: odd positions in the block), Rician-like noise
  (sigma 0.01) on all MRI images.
{slices}
- The simulated lesion (class 1 only): one irregular ellipse (boundary with 5 random harmonics,
  semi-axes a, b with b/a 0.6-1.0, random orientation of the long axis, edge softened by a Gaussian
  of 0.7 px), centred on a pixel of the domain's tissue at least a semi-axis from the tissue's edge:
  - ct: in soft tissue (-50 to 150 HU); a hypodense or hyperdense nodule (sign 50/50) changing HU
    by 0.2-0.45 x the window width (16-36 HU in the brain window, 80-180 HU in the soft-tissue
    window); semi-axis 0.04-0.09 x image side. Added before windowing, so the image noise is kept.
  - mri: in white matter (P(WM) > 0.5); T1 signal reduced by 25-50 % (a T1-hypointense focus,
    like a chronic lesion); semi-axis 0.04-0.09.
  - ultrasound: in echogenic tissue (Gaussian-smoothed grey, sigma 1.5 px, above both 0.15 and the
    crop's median); echo reduced by 45-75 % (hypoechoic, the real speckle is kept) and posterior
    acoustic enhancement (gain +20-50 %) in a band below the lesion fading with depth; semi-axis
    0.05-0.1.
  - fundus: inside the field of view; a bright yellow exudate-like spot or a dark red
    haemorrhage-like spot (50/50), blend weight 0.45-0.8; semi-axis 0.03-0.07.
  - natural: anywhere; a dark or a bright blot (50/50), blend weight 0.35-0.7; semi-axis 0.04-0.09.
- Splits are kept apart by different files, different frames of a cine (ultrasound echo frames
  0-59 / 66-85 / 92-119), different MNI slice blocks, or disjoint regions of one image (retina bands
  by rows; the left ALOKA panel for training, the right one for test; the left/right halves of the
  abdominal CT body for training/test); a view lies wholly inside its region and reads no pixel
  outside it.
- Limits: the lesions are simple blobs, not real pathology, and every lesion image has exactly one;
  "normal" means only "no inserted lesion": the real base images may contain real findings (the
  CQ500 head CT comes from a data set collected for haemorrhages and fractures; the fundus image
  and the ultrasound frames were not reviewed for pathology). Few distinct base images per domain
  (CT 5 files, MRI one template, ultrasound 2 recordings, fundus 1 photograph, natural 9), so many
  crops share a source, and validation/test differ from training in anatomy and source. Meant for
  tests and demos of multi-domain classification (e.g. DCRM-ViT's router), not for clinical claims.
"""


# ----------------------------------------------------------------------------------------------
# h. multidomain_segmentation (binary; the foreground is a different structure in every domain)

_MDS_DOMAINS = ["ultrasound", "ct", "mri"]
_MDS_FOREGROUND = {
    "ultrasound": "lesion (simulated hypoechoic lesion)",
    "ct": "bone (HU > 300)",
    "mri": "white matter (P(WM) > P(GM), P(GM) + P(WM) >= 0.5)",
}
# (split, source, region) of the CT domain
_MDS_CT_SOURCES = [
    ("training", "pydicom:693_UNCR.dcm", _ALL),
    ("training", "pydicom:J2K_pixelrep_mismatch.dcm", (0.0, 0.45, 0.0, 1.0)),
    ("validation", "pydicom:CT_small.dcm", _ALL),
    ("test", "pydicom:J2K_pixelrep_mismatch.dcm", (0.45, 1.0, 0.0, 1.0)),
]
_MDS_FG = (0.02, 0.6)  # every label's foreground fraction lies in this range
_MDS_CT_WINDOW = (200.0, 1000.0)  # display window (centre, width) in HU: -300 to 700
_BONE_HU = 300.0


def _bone_label(hu: np.ndarray) -> np.ndarray:
    """Bone = HU > 300, cleaned with scikit-image morphology: specks under 4 px removed, holes under 4 px
    filled (scikit-image >= 0.26 names the size ``max_size``, inclusive; older versions ``min_size`` /
    ``area_threshold``, exclusive)."""
    from skimage.morphology import remove_small_holes, remove_small_objects

    if "max_size" in inspect.signature(remove_small_objects).parameters:
        bone = remove_small_holes(remove_small_objects(hu > _BONE_HU, max_size=3), max_size=3)
    else:  # scikit-image < 0.26
        bone = remove_small_holes(remove_small_objects(hu > _BONE_HU, min_size=4), area_threshold=4)
    return bone.astype(np.uint8)


def _jitter(img: np.ndarray, rng) -> np.ndarray:
    """Intensity jitter of an image in [0, 1]: gamma 0.85-1.15, gain 0.9-1.1, offset +-0.03."""
    g, gain, off = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1), rng.uniform(-0.03, 0.03)
    return np.clip(gain * np.clip(img, 0, 1) ** g + off, 0, 1)


def _mds_ct(rng, split: str, image_size: int, cache: dict) -> list[tuple[np.ndarray, np.ndarray, str]]:
    rows = [r for r in _MDS_CT_SOURCES if r[0] == split]
    out = []
    for (_, src, box), n in zip(rows, _share(_MD_COUNTS[split], len(rows))):
        file = src.split(":", 1)[1]
        if file not in cache:
            cache[file] = _ct_hu(file, 0, cache.setdefault("datasets", {}))
        hu = cache[file]

        def score(crop):
            fg, body = float(_bone_label(crop).mean()), float((crop > -300).mean())
            good = 0.03 <= fg <= 0.5 and body >= 0.6
            return (1.0 if good else 0.0) + body * min(fg, 0.5), good

        for _ in range(n):
            crop, _ = _pick_view(hu, box, rng, image_size, (0.3, 0.6), 10.0, True, score, tries=60)
            img = _jitter(_ct_display(crop, _MDS_CT_WINDOW), rng)
            img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
            out.append((_to_uint8(img), _bone_label(crop), src))
    return out


def _mds_mri(rng, split: str, image_size: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    out = []
    for z, role in _slice_plan(2, _MD_ROLES):
        if role != split:
            continue
        crop, _ = _pick_view(_mni_axial(z), _ALL, rng, image_size, (0.8, 1.0), 10.0, True, lambda c: (1.0, True))
        label = (_brain_labels(crop[..., 1], crop[..., 2]) == 2).astype(np.uint8)
        t1 = _jitter(crop[..., 0], rng)
        t1 = np.hypot(t1 + rng.normal(0, 0.01, t1.shape), rng.normal(0, 0.01, t1.shape))
        out.append((_to_uint8(np.clip(t1, 0, 1)), label, f"nilearn:mni152_t1 z={z}"))
    return out


def _mds_ultrasound(rng, split: str, image_size: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    out = []
    while len(out) < _MD_COUNTS[split]:
        img, lab = simulate_ultrasound(rng, image_size)
        if _MDS_FG[0] <= lab.mean() <= _MDS_FG[1]:  # drop the rare image whose lesions are too small
            out.append((img, lab, "simulated"))
    return out


def _build_multidomain_segmentation(out: Path, image_size: int = 64) -> tuple[dict, str]:
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    cache: dict = {}
    for d, domain in enumerate(_MDS_DOMAINS):
        rng = np.random.default_rng([9009, d])
        for split, entries in sections.items():
            if domain == "ct":
                pairs = _mds_ct(rng, split, image_size, cache)
            elif domain == "mri":
                pairs = _mds_mri(rng, split, image_size)
            else:
                pairs = _mds_ultrasound(rng, split, image_size)
            for k, (img, lab, src) in enumerate(pairs):
                fg = float(lab.mean())
                if not _MDS_FG[0] <= fg <= _MDS_FG[1]:
                    raise RuntimeError(
                        f"multidomain_segmentation: {domain} {split} image {k} has foreground fraction {fg:.3f}, "
                        f"outside {_MDS_FG}. Fix: use another image_size (this one gives too small crops)."
                    )
                entry = {
                    "image": f"images/{split}_{domain}_{k:03d}.png",
                    "label": f"labels/{split}_{domain}_{k:03d}.png",
                    "domain": domain,
                    "domain_id": d,
                    "source": src,
                }
                _save_png(out / entry["image"], img)
                _save_png(out / entry["label"], lab.astype(np.uint8))
                entries.append(entry)
    sections["classes"] = ["background", "foreground"]
    sections["labels"] = {"0": "background", "1": "foreground (see foreground_by_domain)"}
    sections["domains"] = list(_MDS_DOMAINS)
    sections["foreground_by_domain"] = dict(_MDS_FOREGROUND)
    return sections, _multidomain_segmentation_card(sections, image_size)


def _multidomain_segmentation_card(sections: dict, image_size: int) -> str:
    counts = _count_table(sections, _MDS_DOMAINS, None)
    fg = "\n".join(f"| {domain} | {_MDS_FOREGROUND[domain]} |" for domain in _MDS_DOMAINS)
    ct_table = "\n".join(
        f"| {s} | {src} | rows {b[0]:.2f}-{b[1]:.2f}, cols {b[2]:.2f}-{b[3]:.2f} |" for s, src, b in _MDS_CT_SOURCES
    )
    slices = _mri_slices_note(sections)
    return f"""
# multidomain_segmentation (REAL CT and MRI, SIMULATED ultrasound)

Binary segmentation in 3 imaging domains where the foreground is a DIFFERENT structure in each
domain, so a model has to know (or infer) the domain to know what to segment:

| domain | foreground (label 1) |
|---|---|
{fg}

- Files: `images/<split>_<domain>_NNN.png` (grey uint8 {image_size}x{image_size}), `labels/<split>_<domain>_NNN.png`
  (uint8 0/1). Entry fields `image`, `label`, `domain`, `domain_id` (index into the top-level
  `domains` list), `source`. Top-level keys `classes` = ["background", "foreground"], `domains` =
  {json.dumps(_MDS_DOMAINS)}, `foreground_by_domain`. Every label's foreground fraction is between
  {_MDS_FG[0]:.0%} and {_MDS_FG[1]:.0%} (checked at build time), so Dice is meaningful.
- Counts (domain x split):

{counts}

- ultrasound (SIMULATED): `simulate_ultrasound` (see ultrasound_lesion): speckled B-mode sector with
  1-2 hypoechoic lesions; label = lesion. Images whose lesions cover less than 2 % are drawn again.
  Source: simulated by `medpeft_monai` (Apache-2.0); no third-party content.
- ct (REAL images, threshold labels): single CT slices from pydicom test files, read in Hounsfield
  units (rescale slope/intercept); label = bone, HU > {_BONE_HU:.0f} on the resampled HU map, cleaned with
  scikit-image morphology (objects under 4 px removed, holes under 4 px filled). These are
  HU-threshold labels, not manual delineations (contrast-filled vessels or metal above 300 HU would
  count as bone). Image = HU window centre {_MDS_CT_WINDOW[0]:.0f}, width {_MDS_CT_WINDOW[1]:.0f} (-300 to 700
  HU), so the threshold lies at grey 0.6 before jitter. `eCT_Supplemental.dcm` is not used
  (skull-stripped brain slices, no bone), nor `explicit_VR-UN.dcm` (abdomen: under 1 % of the
  slice is bone).

| split | source | region |
|---|---|---|
{ct_table}

- mri (REAL template, template labels): axial slices of the MNI ICBM152 2009a T1 template; label =
  white matter from the template's tissue probability maps (the white-matter class of
  brain_mri_2d's rule: P(GM) + P(WM) >= 0.5 and P(WM) > P(GM)), computed on the resampled maps.
{_MNI_CARD}
- Other sources:
{_PYDICOM_CARD}
- How it was made (seed 9009; one generator per domain, `numpy.random.default_rng([9009, domain_id])`):
  CT and MRI images are random square views resampled to {image_size}x{image_size} (Gaussian anti-aliasing
  prefilter, linear interpolation), with a random rotation of +-10 deg, a random left-right mirror,
  intensity jitter (gamma 0.85-1.15, gain 0.9-1.1, offset +-0.03) and Gaussian (CT) or Rician-like
  (MRI) noise of sigma 0.01; image and label come from the same view. CT views: side 0.3-0.6 of the
  file's shorter side, inside the split's region, kept only when 3-50 % is bone and at least 60 % is
  body (HU > -300), up to 60 tries. MRI views: side 0.8-1.0 of a square field of view around the
  brain, one view per slice, 2 slices per block.
{slices}
- How the splits are kept apart: CT by file, and for the skull-base CT (`J2K_pixelrep_mismatch.dcm`)
  by disjoint regions (rows 0-0.45, the anterior skull base, for training; rows 0.45-1, the
  posterior fossa, for test; a view lies wholly inside its region and reads no pixel outside it), so
  no test pixel comes from a training crop; MRI by slice blocks (no slice is shared, and slices of
  different splits are further apart than slices of one split); ultrasound images are independent
  simulations.
- Limits: CT labels are thresholds and MRI labels come from a template's probability maps, not
  from experts; MRI is one template brain (splits differ by brain level, not by subject); CT has 3
  files, all single slices (validation is one small spine slice, training and test share one
  patient's skull-base slice in disjoint halves); ultrasound is a texture model, not an acoustic
  simulation. Meant for tests and demos of domain-conditioned segmentation, not for clinical claims.
"""


# ----------------------------------------------------------------------------------------------
# i. multiseq_lesion (simulation from real tissue maps: lesions that no single sequence finds)

# 6 blocks of 8 consecutive axial slices: 3 training, 1 validation, 2 test blocks (24 : 8 : 16 slices)
_MSL_ROLES = ("training", "test", "training", "validation", "test", "training")
_MSL_PER_BLOCK = 8
_MSL_UNLABELED_DRAWS = 4  # the unlabeled pool: every training slice 4 more times (new blobs, random flip)
_MSL_KINDS = ("lesion", "pvs", "artefact")
_MSL_COMBOS = (
    ("t1",),
    ("t2",),
    ("flair",),
    ("t2", "flair"),
    ("t1", "flair"),
    ("t1", "t2"),
    ("t1", "t2", "flair"),
)


def _msl_slice_plan(per_block: int = _MSL_PER_BLOCK, roles: tuple[str, ...] = _MSL_ROLES) -> list[tuple[int, str]]:
    """Axial slices (z index, split) of multiseq_lesion: the z range where the template has white matter
    (the area with P(WM) > 0.9 is at least 20 % of its largest axial value) is cut into ``len(roles)``
    blocks; each block gives ``per_block`` consecutive slices (1 mm apart) around its centre, so slices
    of different blocks are about (block length - per_block + 1) mm apart (5 mm at the defaults)."""
    area = (_mni()["wm"] > 0.9).sum(axis=(0, 1))
    zs = np.nonzero(area >= 0.2 * area.max())[0]
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    block = (z1 - z0) / len(roles)
    plan = []
    for b, role in enumerate(roles):
        start = round(z0 + (b + 0.5) * block - (per_block - 1) / 2)
        plan += [(start + j, role) for j in range(per_block)]
    return plan


def _msl_signals() -> dict[str, dict[str, float]]:
    """Pure-tissue signals per sequence divided by the sequence's largest tissue signal, with the two
    mimics: ``pvs`` (fluid, CSF parameters) and ``artefact`` (white matter whose FLAIR signal is raised
    to the lesion's FLAIR signal)."""
    sig = {s: {t: _signal(t, s) for t in _TISSUE} for s in _SEQUENCES}
    rel = {s: {t: v / max(sig[s].values()) for t, v in sig[s].items()} for s in _SEQUENCES}
    for s in _SEQUENCES:
        rel[s]["pvs"] = rel[s]["csf"]
        rel[s]["artefact"] = rel[s]["lesion"] if s == "flair" else rel[s]["wm"]
    return rel


def _multiseq_lesion_slice(rng: np.random.Generator, sl: dict, image_size: int) -> dict:
    """One simulated multiseq_lesion slice from the tissue maps of ``sl`` (an item of ``_brain_slices``).

    1-3 blobs of each kind (lesion, perivascular-space mimic ``pvs``, FLAIR artefact mimic) are centred
    on pixels with P(WM) > 0.9; blobs of different kinds do not overlap. Returns ``channels`` (3, H, W)
    float32 in [0, 1] in the order t1, t2, flair; ``lesion`` and ``pvs``: their tissue fractions (blob x
    P(WM)); ``artefact``: the artefact blob (it scales the FLAIR signal, it is not tissue); ``label``
    uint8 (lesion fraction >= 0.5); ``tissue`` uint8 (0 background, 1 CSF, 2 GM, 3 WM)."""
    from scipy.ndimage import gaussian_filter

    gm, wm, mask = (np.asarray(sl[k], dtype=np.float64) for k in ("gm", "wm", "mask"))
    scale = image_size / 64
    min_px = max(1, round(3 * scale**2))
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    counts = {k: int(rng.integers(1, 4)) for k in _MSL_KINDS}
    blobs = {k: np.zeros_like(wm) for k in _MSL_KINDS}
    for r in range(3):  # kinds take turns, so no kind is always the one squeezed out
        for kind in _MSL_KINDS:
            if r >= counts[kind]:
                continue
            taken = sum(blobs[k] for k in _MSL_KINDS if k != kind) > 0.01
            # centres where P(WM) > 0.9; the first blob of a kind may fall back to 0.75, then 0.6
            # (only where 0.9 leaves no room: small image sizes, thin white matter)
            for level in (0.9, 0.75, 0.6) if r == 0 else (0.9,):
                candidates = np.argwhere(wm > level)
                for _try in range(100 if len(candidates) else 0):
                    cy, cx = candidates[rng.integers(len(candidates))]
                    a, b = rng.uniform(1.5, 3.5, 2) * scale
                    inside = _ellipse_dist(yy, xx, cy, cx, a, b, rng.uniform(0, np.pi)) <= 1
                    one = gaussian_filter(inside.astype(np.float64), 0.7 * scale)
                    if not taken[one > 0.01].any() and ((one * wm) >= 0.5).sum() >= min_px:
                        blobs[kind] = np.maximum(blobs[kind], one)
                        break
                else:
                    continue
                break
            else:
                if r == 0:
                    raise RuntimeError(f"multiseq_lesion: no room for a {kind} blob in slice z={sl.get('z')}")
    lesion, pvs, artefact = blobs["lesion"] * wm, blobs["pvs"] * wm, blobs["artefact"]
    csf = np.clip(mask - gm - wm, 0, 1)
    frac = {"csf": csf, "gm": gm, "wm": np.clip(wm - lesion - pvs, 0, 1), "lesion": lesion, "pvs": pvs}
    rel = _msl_signals()
    gain = rel["flair"]["artefact"] / rel["flair"]["wm"]
    chans = []
    for s in _SEQUENCES:
        clean = sum(frac[t] * rel[s][t] for t in frac)
        if s == "flair":  # inflow artefact: the FLAIR signal under the blob is multiplied by up to `gain`
            clean = clean * (1 + (gain - 1) * artefact)
        noisy = np.hypot(clean + rng.normal(0, 0.015, clean.shape), rng.normal(0, 0.015, clean.shape))
        chans.append(np.clip(noisy, 0, 1).astype(np.float32))
    tissue = np.where(mask >= 0.5, np.argmax(np.stack([csf, gm, wm]), axis=0) + 1, 0).astype(np.uint8)
    return {
        "channels": np.stack(chans),
        "lesion": lesion.astype(np.float32),
        "pvs": pvs.astype(np.float32),
        "artefact": artefact.astype(np.float32),
        "label": (lesion >= 0.5).astype(np.uint8),
        "tissue": tissue,
    }


def _fit_box(x: np.ndarray, y: np.ndarray, rounds: int = 3, levels: int = 33) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box ``lo <= x <= hi`` (x: pixels x features) that maximises the pixel Dice for the
    boolean target ``y``: coordinate ascent over quantiles of the positive pixels' values, starting from
    their bounding box. Deterministic (ties go to the first candidate)."""
    pos = x[y]
    lo, hi = pos.min(0), pos.max(0)
    cand = np.quantile(pos, np.linspace(0, 1, levels), axis=0)  # (levels, features)
    n_pos = int(y.sum())

    def best(pred: np.ndarray) -> int:  # pred: candidates x pixels
        dice = 2 * (pred & y).sum(1) / np.maximum(pred.sum(1) + n_pos, 1)
        return int(np.argmax(dice))

    for _ in range(rounds):
        for c in range(x.shape[1]):
            rest = np.delete((x >= lo) & (x <= hi), c, axis=1).all(1)
            xc = x[:, c]
            lo[c] = cand[best(rest & (xc >= cand[:, c, None]) & (xc <= hi[c])), c]
            hi[c] = cand[best(rest & (xc >= lo[c]) & (xc <= cand[:, c, None])), c]
    return lo, hi


def _msl_separability(train: list[tuple], test: list[tuple]) -> dict[str, float]:
    """Test pixel Dice for "lesion" of the best box rule fitted on the training slices, per sequence set.
    ``train``/``test``: (channels (3, H, W), lesion mask, brain mask) per slice; brain pixels only."""

    def pixels(items):
        x = np.concatenate([ch[:, brain].T for ch, _, brain in items])
        y = np.concatenate([lab[brain] for _, lab, brain in items])
        return x.astype(np.float64), y.astype(bool)

    (xa, ya), (xb, yb) = pixels(train), pixels(test)
    order = list(_SEQUENCES)
    out = {}
    for combo in _MSL_COMBOS:
        cols = [order.index(s) for s in combo]
        lo, hi = _fit_box(xa[:, cols], ya)
        pred = ((xb[:, cols] >= lo) & (xb[:, cols] <= hi)).all(1)
        out["+".join(combo)] = round(float(2 * (pred & yb).sum() / max(pred.sum() + yb.sum(), 1)), 3)
    return out


def _build_multiseq_lesion(out: Path, image_size: int = 64) -> tuple[dict, str]:
    rng = np.random.default_rng(8118)
    slices = _brain_slices(image_size, _msl_slice_plan())
    sections: dict[str, list] = {"unlabeled": [], "training": [], "validation": [], "test": []}
    kept: dict[str, list] = {"training": [], "test": []}  # for the separability figure
    for i, sl in enumerate(slices):
        sim = _multiseq_lesion_slice(rng, sl, image_size)
        sub = "Ts" if sl["split"] == "test" else "Tr"
        entry = {
            "image": f"images{sub}/case_{i:03d}.nii.gz",
            "label": f"labels{sub}/case_{i:03d}.nii.gz",
            "tissue": f"tissue{sub}/case_{i:03d}.nii.gz",
        }
        # (H, W, 1, C) as multiseq_mri: LoadImaged(ensure_channel_first=True) gives (C, H, W, 1)
        _save_nifti(out / entry["image"], np.moveaxis(sim["channels"], 0, -1)[:, :, None, :], sl["affine"])
        _save_nifti(out / entry["label"], sim["label"], sl["affine"])
        _save_nifti(out / entry["tissue"], sim["tissue"], sl["affine"])
        sections[sl["split"]].append(entry)
        if sl["split"] in kept:
            kept[sl["split"]].append((sim["channels"], sim["label"] > 0, sl["mask"] >= 0.5))
    train = [sl for sl in slices if sl["split"] == "training"]
    for d in range(_MSL_UNLABELED_DRAWS):
        for sl in train:
            if rng.integers(2):  # left-right mirror (axis 0 is x); the slice's affine is kept
                sl = {**sl, **{k: sl[k][::-1] for k in ("t1", "gm", "wm", "mask")}}
            sim = _multiseq_lesion_slice(rng, sl, image_size)
            entry = {"image": f"imagesUn/pool_{len(sections['unlabeled']):03d}.nii.gz"}
            _save_nifti(out / entry["image"], np.moveaxis(sim["channels"], 0, -1)[:, :, None, :], sl["affine"])
            sections["unlabeled"].append(entry)
    separability = _msl_separability(kept["training"], kept["test"])
    sections["channels"] = list(_SEQUENCES)
    sections["labels"] = {"0": "background", "1": "lesion"}
    sections["tissue_labels"] = {"0": "background", "1": "csf", "2": "grey_matter", "3": "white_matter"}
    sections["separability"] = separability
    return sections, _multiseq_lesion_card(sections, image_size)


def _multiseq_lesion_card(sections: dict, image_size: int) -> str:
    n = {k: len(v) for k, v in sections.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    rel = _msl_signals()
    cols = ("csf", "gm", "wm", "lesion", "pvs", "artefact")
    signals = "\n".join(
        f"| {s} | TR {p['tr']:.0f} ms, TE {p['te']:.0f} ms"
        + (f", TI {_flair_ti(p['tr']):.0f} ms" if s == "flair" else "")
        + " | "
        + " | ".join(f"{rel[s][t]:.2f}" for t in cols)
        + " |"
        for s, p in _SEQUENCES.items()
    )
    sep = "\n".join(f"| {k.replace('+', ' + ')} | {v:.3f} |" for k, v in sections["separability"].items())
    plan = _msl_slice_plan()
    z = {r: sorted(zz for zz, role in plan if role == r) for r in ("training", "validation", "test")}
    blocks = ", ".join(f"{role} z {z0}-{z0 + _MSL_PER_BLOCK - 1}" for z0, role in plan[::_MSL_PER_BLOCK])
    gap = min(abs(a - b) for r in ("validation", "test") for a in z[r] for b in z["training"])
    gain = rel["flair"]["artefact"] / rel["flair"]["wm"]
    scale = image_size / 64
    return f"""
# multiseq_lesion (SIMULATED contrasts and lesions from REAL tissue maps)

T1-, T2- and FLAIR-like 2D brain slices with three kinds of small white-matter blob, chosen so that
no single sequence tells the lesions apart: true lesions (labelled), perivascular-space mimics and
FLAIR artefact mimics (both unlabelled). T2 alone confuses lesions with perivascular spaces, FLAIR
alone confuses them with artefacts; T2 + FLAIR (or T1 with either) separates them. The anatomy
(tissue probability maps) is real (MNI ICBM152 2009a); contrasts, blobs and noise are simulated.

- Files: `imagesTr|imagesTs/case_NNN.nii.gz` and `imagesUn/pool_NNN.nii.gz`: 3-channel image
  (t1, t2, flair) stored as NIfTI shape ({image_size}, {image_size}, 1, 3), float32 in [0, 1];
  `LoadImaged(ensure_channel_first=True)` reads it as (3, {image_size}, {image_size}, 1) (drop the
  trailing 1, e.g. `SqueezeDimd(dim=-1)`). There are no single-sequence files: to drop a sequence,
  select or zero its channel. `labelsTr|labelsTs/case_NNN.nii.gz`: lesion mask (uint8);
  `tissueTr|tissueTs/case_NNN.nii.gz`: tissue map (uint8). All files carry the slice's affine
  (pixels to MNI mm; test slices are under `Ts`, validation and training under `Tr`).
- Datalist `datalist.json` sections: unlabeled {n["unlabeled"]} (field `image` only, for
  self-supervised pre-training), training {n["training"]}, validation {n["validation"]},
  test {n["test"]} (fields `image`, `label`, `tissue`). Top-level keys: `channels` = ["t1", "t2",
  "flair"]; `labels` = 0 background, 1 lesion (pixels with lesion fraction >= 0.5); `tissue_labels`
  = 0 background, 1 csf, 2 grey_matter, 3 white_matter (argmax of the CSF, GM and WM fractions where
  the brain mask >= 0.5; blob pixels count as white matter); `separability` (below).
{_MNI_CARD}
- How it was made (seed 8118, numpy `default_rng`): slices as in `brain_mri_2d` (square field of
  view around the brain resized to {image_size}x{image_size}, about {_brain_square()[2] / image_size:.2f} mm
  pixels) but from the z range where the template has white matter (area with P(WM) > 0.9 at least
  20 % of its maximum), cut into 6 blocks of 8 consecutive slices (1 mm apart):
  {blocks}.
  Validation and test slices are at least {gap} mm from every training or unlabeled slice. The
  unlabeled pool reuses the {n["training"]} training slices {_MSL_UNLABELED_DRAWS} times, each time with
  new blobs, new noise and a random left-right mirror (the affine is not changed).
  Tissue fractions: GM and WM from the template maps, CSF = clip(brain mask - GM - WM, 0, 1). Per
  slice 1-3 blobs of each kind: smoothed ellipses (semi-axes {1.5 * scale:.2g}-{3.5 * scale:.2g} px,
  random orientation, Gaussian smoothing sigma {0.7 * scale:.2g} px) centred on pixels with
  P(WM) > 0.9 (the first blob of a kind falls back to 0.75, then 0.6, where 0.9 leaves no room),
  each with at least {max(1, round(3 * scale**2))} pixels of fraction >= 0.5; blobs of different kinds
  do not overlap (their footprints, value > 0.01, are disjoint). Lesion and
  perivascular-space fractions are blob x P(WM), taken from WM. Lesions have MS-lesion tissue
  parameters; perivascular spaces are fluid (CSF parameters); the artefact (a simulated FLAIR
  flow/inflow artefact) is not tissue: it multiplies the FLAIR signal by 1 + {gain - 1:.2f} x blob,
  which makes pure white matter as bright as a pure lesion on FLAIR and leaves T1 and T2 unchanged.
  Signals are the fraction-weighted sums of pure-tissue signals from the spin-echo equation
  (T1w, T2w) and the inversion-recovery equation (FLAIR, TI nulls CSF), with the 1.5 T BrainWeb
  tissue parameters of `multiseq_mri`; each sequence is divided by its largest tissue signal, Rician
  noise (sigma 0.015) is added and values are clipped to [0, 1]. Relative pure signals:

| sequence | parameters | CSF | GM | WM | lesion | PVS mimic | artefact mimic |
|---|---|---|---|---|---|---|---|
{signals}

  So a lesion is slightly dark on T1, bright on T2 and bright on FLAIR; a perivascular space is
  dark on T1, bright on T2 and dark on FLAIR; an artefact is iso-intense to white matter on T1 and
  T2 and as bright as a lesion on FLAIR.
- Separability (measured at build time, stored as `separability` in the datalist): pixel Dice for
  "lesion" on the test section (brain pixels, all test slices pooled) of the best axis-aligned box
  rule `lo <= intensity <= hi` per used sequence, fitted on the training section by coordinate
  ascent over quantiles of the lesion pixels' intensities (numpy only, deterministic). A simple
  per-pixel rule needs more than one sequence:

| sequences | test Dice |
|---|---|
{sep}

- Limits: contrasts come from textbook equations on one template anatomy (no B1/B0 inhomogeneity,
  no texture of real scans, no skull, no motion); blobs are simple smoothed ellipses and the
  artefact is a multiplicative blob, not a physical flow simulation; splits differ by brain level,
  not by subject, and the unlabeled pool shares anatomy with the training slices. For
  demonstrating multi-sequence fusion and missing-sequence robustness, not clinical claims.
"""


# ----------------------------------------------------------------------------------------------
# registry and cache


_BUILDERS: dict[str, Callable[..., tuple[dict, str]]] = {
    "brain_mri_2d": _build_brain_mri_2d,
    "brain_mri_3d": _build_brain_mri_3d,
    "medical_vs_natural": _build_medical_vs_natural,
    "fundus_disc_cup": _build_fundus_disc_cup,
    "ultrasound_lesion": _build_ultrasound_lesion,
    "multiseq_mri": _build_multiseq_mri,
    "multidomain_lesion": _build_multidomain_lesion,
    "multidomain_segmentation": _build_multidomain_segmentation,
    "multiseq_lesion": _build_multiseq_lesion,
}
SAMPLE_DATASETS: tuple[str, ...] = tuple(_BUILDERS)


def sample_data_root() -> Path:
    """Cache folder: ``$MEDPEFT_DATA_DIR`` if set, else ``~/.cache/medpeft_monai/sample_data``."""
    env = os.environ.get("MEDPEFT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medpeft_monai" / "sample_data"


def _folder_name(name: str, kwargs: dict) -> str:
    if not kwargs:
        return name

    def fmt(v):
        return "x".join(str(int(x)) for x in v) if isinstance(v, (list, tuple)) else str(v)

    tag = "_".join(f"{k}-{fmt(v)}" for k, v in sorted(kwargs.items()))
    return f"{name}__{re.sub(r'[^A-Za-z0-9_.-]', '', tag)}"


def sample_dataset(name: str, root: str | os.PathLike | None = None, **kwargs) -> str:
    """Build (once) and return the folder of sample data set ``name``.

    The folder holds ``datalist.json`` (Decathlon style, see ``load_datalist``), ``DATA_CARD.md``
    and the files. It is ``root/name`` (``root`` defaults to ``sample_data_root()``); keyword
    arguments such as ``image_size=128`` select a variant stored in ``root/name__image_size-128``.
    The build writes into a temporary folder that is renamed at the end, so an interrupted build
    leaves no partial data set.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown sample data set {name!r}. Available: {list(SAMPLE_DATASETS)}.")
    builder = _BUILDERS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p != "out"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"Sample data set {name!r} does not accept {unknown}; accepted keyword arguments: {accepted}."
        )
    root_path = Path(root).expanduser() if root is not None else sample_data_root()
    target = root_path / _folder_name(name, kwargs)
    stale = None
    if (target / "datalist.json").is_file():
        built = json.loads((target / "datalist.json").read_text()).get("build", {}).get("version")
        if built == _VERSION:
            return str(target)
        stale = target  # made by another medpeft_monai version: rebuilt below, then swapped in
    elif target.exists():
        raise RuntimeError(
            f"{target} exists but has no datalist.json (not made by sample_dataset, or edited). "
            "Fix: delete that folder to rebuild it, or pass another root / set MEDPEFT_DATA_DIR."
        )
    root_path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=root_path))
    try:
        print(
            f"[medpeft_monai] building sample data set '{name}' in {target} (one-off, offline) ...",
            flush=True,
        )
        sections, card = builder(tmp, **kwargs)
        sections = {**sections, "name": name, "build": {"version": _VERSION, "params": kwargs}}
        _write_card(tmp, card)
        write_datalist(tmp / "datalist.json", sections)
        if stale is not None:
            print(f"[medpeft_monai] replacing {target} (built by sample data version {built}, now {_VERSION})")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=root_path))
            os.replace(target, old / target.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "datalist.json").is_file():  # not a concurrent build that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
