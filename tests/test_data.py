"""Tests for medpeft_monai.data: datalists, offline sample data builders and transform presets."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medpeft_monai.data import (
    SAMPLE_DATASETS,
    DatalistError,
    MatchChannelsd,
    classification_transforms,
    load_datalist,
    sample_data_root,
    sample_dataset,
    segmentation_transforms,
    write_datalist,
)
from medpeft_monai.data import sample_data as sd


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Every sample data set built once for this module, through MEDPEFT_DATA_DIR."""
    root = tmp_path_factory.mktemp("sample_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDPEFT_DATA_DIR", str(root))
        for name in SAMPLE_DATASETS:
            assert sample_dataset(name) == str(root / name)
    return root


def _read(path: str) -> np.ndarray:
    if path.endswith(".png"):
        return np.asarray(Image.open(path))
    return np.asarray(nib.load(path).dataobj)


def _sections(folder: Path) -> dict:
    return json.loads((folder / "datalist.json").read_text())


def _label_values(items, tf) -> set:
    values = set()
    for item in items:
        values |= set(torch.unique(tf(item)["label"]).int().tolist())
    return values


# ------------------------------------------------------------------ sample data: common behaviour


def test_sample_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDPEFT_DATA_DIR", str(tmp_path))
    assert sample_data_root() == tmp_path
    monkeypatch.delenv("MEDPEFT_DATA_DIR")
    assert sample_data_root() == Path.home() / ".cache" / "medpeft_monai" / "sample_data"


def test_unknown_dataset_and_kwargs(tmp_path):
    with pytest.raises(ValueError, match="Available: .*brain_mri_2d"):
        sample_dataset("no_such_data", root=tmp_path)
    with pytest.raises(ValueError, match="accepted keyword arguments: \\['image_size'\\]"):
        sample_dataset("ultrasound_lesion", root=tmp_path, colour=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", SAMPLE_DATASETS)
def test_builder_writes_complete_dataset(data_root, name):
    folder = data_root / name
    card = (folder / "DATA_CARD.md").read_text()
    for word in (
        ("Source", "Licence", "How it was made", "Limits", "seed")
        if name != "brain_mri_2d"
        else ("Source", "Licence", "How it was made", "Limits")
    ):
        assert word.lower() in card.lower(), f"{name} card lacks {word}"
    simulated = ("fundus_disc_cup", "ultrasound_lesion", "multiseq_mri", "multiseq_lesion")
    if name in simulated + ("multidomain_lesion", "multidomain_segmentation"):
        assert "SIMULATED" in card
    data = _sections(folder)
    assert data["name"] == name
    lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    assert {"training", "validation", "test"} <= set(lists)
    for key in lists:
        items = load_datalist(folder / "datalist.json", key)  # checks that every file exists
        assert items and all(os.path.isabs(i["image"]) for i in items)
    # a second call reuses the cache (no rebuild message, same folder)
    assert sample_dataset(name, root=data_root) == str(folder)


def test_cached_dataset_is_not_rebuilt(data_root, capsys):
    sample_dataset("ultrasound_lesion", root=data_root)
    assert "building" not in capsys.readouterr().out


@pytest.mark.parametrize("name", SAMPLE_DATASETS)
def test_builds_are_deterministic(data_root, tmp_path, name):
    other = Path(sample_dataset(name, root=tmp_path))
    a, b = _sections(data_root / name), _sections(other)
    assert a == b
    for items in a.values():
        if isinstance(items, list) and items and isinstance(items[0], dict):
            for item in items:
                for field in ("image", "label"):
                    if isinstance(item.get(field), str):
                        x, y = _read(str(data_root / name / item[field])), _read(str(other / item[field]))
                        assert x.dtype == y.dtype and np.array_equal(x, y), item[field]


def test_failed_build_leaves_nothing(monkeypatch, tmp_path, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(sd, "_write_card", boom)
    with pytest.raises(RuntimeError, match="simulated failure"):
        sample_dataset("ultrasound_lesion", root=tmp_path)
    assert "building sample data set 'ultrasound_lesion'" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no dataset folder, no temporary folder


def test_cache_from_an_older_builder_is_rebuilt(tmp_path, capsys):
    folder = Path(sample_dataset("ultrasound_lesion", root=tmp_path, image_size=32))
    datalist = json.loads((folder / "datalist.json").read_text())
    datalist["build"]["version"] = sd._VERSION - 1
    (folder / "datalist.json").write_text(json.dumps(datalist))
    (folder / "leftover.txt").write_text("from the old build")
    capsys.readouterr()
    assert sample_dataset("ultrasound_lesion", root=tmp_path, image_size=32) == str(folder)
    assert "replacing" in capsys.readouterr().out
    assert _sections(folder)["build"]["version"] == sd._VERSION
    assert not (folder / "leftover.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary or stale folder left


def test_dicom_colour_sources_are_rgb():
    """YBR (JPEG) ultrasound is converted to RGB on every pydicom version: a grey-scale echo then has
    R = G = B up to JPEG rounding, whereas unconverted YBR data would be a strongly tinted image."""
    echo = sd._load_dicom("color3d_jpeg_baseline.dcm")
    assert echo.shape == (480, 640, 3) and 0.0 <= echo.min() and echo.max() <= 1.0
    assert np.abs(echo[..., 0] - echo[..., 1]).mean() < 0.01 and np.abs(echo[..., 1] - echo[..., 2]).mean() < 0.01
    doppler = sd._load_dicom("US1_UNCR.dcm")  # native RGB colour Doppler keeps its colour
    assert np.abs(doppler[..., 0] - doppler[..., 2]).max() > 0.5


def test_kwargs_select_a_variant_folder(tmp_path):
    folder = Path(sample_dataset("ultrasound_lesion", root=tmp_path, image_size=32))
    assert folder.name == "ultrasound_lesion__image_size-32"
    item = load_datalist(folder / "datalist.json", "test")[0]
    assert _read(item["image"]).shape == (32, 32)


# ------------------------------------------------------------------ sample data: per data set


def test_brain_mri_2d(data_root):
    dl = data_root / "brain_mri_2d" / "datalist.json"
    splits = {k: load_datalist(dl, k) for k in ("training", "validation", "test")}
    assert [len(v) for v in splits.values()] == [16, 4, 4]
    tf = segmentation_transforms("eval", image_size=(64, 64))
    out = tf(splits["training"][0])
    assert out["image"].shape == (1, 64, 64) and out["label"].shape == (1, 64, 64)
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert _label_values(splits["training"], tf) == {0, 1, 2}
    raw = _read(splits["test"][0]["image"])
    assert raw.shape == (64, 64) and raw.dtype == np.float32
    assert _read(splits["test"][0]["label"]).dtype == np.uint8
    # splits come from separate z ranges: no slice shared, and slices of other splits are further
    # from any training slice than the spacing inside a block
    z = {k: np.array([i["z_mm"] for i in v]) for k, v in splits.items()}
    gap_within = np.diff(np.sort(z["training"][:4])).min()
    for k in ("validation", "test"):
        assert np.abs(z[k][:, None] - z["training"][None]).min() > gap_within
    assert np.abs(z["validation"][:, None] - z["test"][None]).min() > gap_within


def test_brain_mri_3d(data_root):
    dl = data_root / "brain_mri_3d" / "datalist.json"
    train = load_datalist(dl, "training")
    assert (
        len(train) == 4 and len(load_datalist(dl, "validation")) == 1 and len(load_datalist(dl, "test")) == 1
    )
    tf = segmentation_transforms("eval", image_size=(48, 56, 48))
    out = tf(train[0])
    assert out["image"].shape == (1, 48, 56, 48) and out["label"].shape == (1, 48, 56, 48)
    assert _label_values(train[:1], tf) == {0, 1, 2}
    img = nib.load(train[0]["image"])
    assert np.allclose(np.diag(img.affine)[:3], [3.5, 3.5, 3.5])
    vols = [_read(i["image"]) for i in train]
    assert not any(np.array_equal(vols[0], v) for v in vols[1:])


def test_medical_vs_natural(data_root):
    folder = data_root / "medical_vs_natural"
    data = _sections(folder)
    assert data["classes"] == ["medical", "natural"]
    sizes = {k: len(data[k]) for k in ("training", "validation", "test")}
    assert sizes == {"training": 48, "validation": 16, "test": 16}
    for key, n in sizes.items():
        labels = [e["label"] for e in data[key]]
        assert labels.count(0) == labels.count(1) == n // 2
        for e in data[key]:
            assert data["domains"][e["domain_id"]] == e["domain"]
            assert (e["label"] == 1) == (e["domain"] in ("natural", "texture"))
    # every medical domain appears in training; raw files are RGB uint8 PNGs
    assert {e["domain"] for e in data["training"]} == set(data["domains"])
    raw = _read(str(folder / data["test"][0]["image"]))
    assert raw.shape == (64, 64, 3) and raw.dtype == np.uint8
    # a source used by several splits only uses disjoint regions of the image
    by_source: dict = {}
    for split, _domain, src, box in sd._MVN_SOURCES:
        by_source.setdefault(src, []).append((split, box))
    for uses in by_source.values():
        for i, (s1, b1) in enumerate(uses):
            for s2, b2 in uses[i + 1 :]:
                assert s1 != s2
                overlap_rows = min(b1[1], b2[1]) > max(b1[0], b2[0])
                overlap_cols = min(b1[3], b2[3]) > max(b1[2], b2[2])
                assert not (overlap_rows and overlap_cols)
    items = load_datalist(folder / "datalist.json", "training")
    out = classification_transforms("train", image_size=(64, 64))(items[0])
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
    assert out["label"].dtype == torch.long and int(out["label"]) == items[0]["label"]
    assert classification_transforms("infer")({"image": items[0]["image"]})["image"].shape == (3, 64, 64)


def test_fundus_disc_cup(data_root):
    from scipy.ndimage import binary_dilation

    folder = data_root / "fundus_disc_cup"
    dl = folder / "datalist.json"
    sizes = {
        k: len(load_datalist(dl, k))
        for k in ("training", "validation", "test", "target_unlabeled", "target_test")
    }
    assert sizes == {"training": 24, "validation": 8, "test": 8, "target_unlabeled": 10, "target_test": 8}
    assert all("label" not in i and i["domain"] == "target" for i in load_datalist(dl, "target_unlabeled"))
    means = {}
    for key in ("training", "target_test"):
        items = load_datalist(dl, key)
        for item in items:
            lab = _read(item["label"])
            assert set(np.unique(lab)) == {0, 1, 2}
            # the cup lies inside the disc: no cup pixel touches the background
            assert not (binary_dilation(lab == 2) & (lab == 0)).any()
        means[key] = np.mean([_read(i["image"]).mean() for i in items])
        assert _read(items[0]["image"]).shape == (64, 64, 3)
    assert means["target_test"] < means["training"]  # the target style is darker
    out = segmentation_transforms("train", image_size=(64, 64), num_channels=3)(
        load_datalist(dl, "training")[0]
    )
    assert out["image"].shape == (3, 64, 64) and out["label"].shape == (1, 64, 64)
    assert segmentation_transforms("infer")(load_datalist(dl, "target_unlabeled")[0])["image"].shape == (
        3,
        64,
        64,
    )


def test_ultrasound_lesion(data_root):
    dl = data_root / "ultrasound_lesion" / "datalist.json"
    items = load_datalist(dl, "training")
    assert [len(load_datalist(dl, k)) for k in ("training", "validation", "test")] == [24, 8, 8]
    for item in items:
        img, lab = _read(item["image"]).astype(float), _read(item["label"])
        assert img.shape == (64, 64) and set(np.unique(lab)) == {0, 1}
        tissue = (img > 0) & (lab == 0)
        assert img[lab == 1].mean() < img[tissue].mean()  # hypoechoic
    out = segmentation_transforms("eval", num_channels=3)(items[0])
    assert out["image"].shape == (3, 64, 64) and _label_values(
        items[:1], segmentation_transforms("eval")
    ) == {0, 1}


def test_multiseq_mri(data_root):
    from monai.transforms import LoadImaged

    dl = data_root / "multiseq_mri" / "datalist.json"
    data = _sections(data_root / "multiseq_mri")
    assert data["channels"] == ["t1", "t2", "flair"]
    items = load_datalist(dl, "training")
    assert [len(load_datalist(dl, k)) for k in ("training", "validation", "test")] == [16, 4, 4]
    item = items[len(items) // 2]
    raw = LoadImaged("image", ensure_channel_first=True, image_only=True)(item)["image"]
    assert raw.shape == (3, 64, 64, 1)
    out = segmentation_transforms("eval", image_size=(64, 64))(item)
    assert out["image"].shape == (3, 64, 64) and out["label"].shape == (1, 64, 64)
    for c, seq in enumerate(data["channels"]):
        assert np.allclose(_read(item[seq]), np.asarray(raw[c, :, :, 0]))
    lab = _read(item["label"]) > 0
    assert lab.sum() >= 3
    t1, t2, flair = (_read(item[s]) for s in ("t1", "t2", "flair"))
    wm = (t1 > np.percentile(t1[t1 > 0.1], 80)) & ~lab  # bright on T1 = white matter
    assert flair[lab].mean() > flair[wm].mean() and t2[lab].mean() > t2[wm].mean()
    single = segmentation_transforms("eval", keys=("flair", "label"))(item)
    assert single["flair"].shape == (1, 64, 64)


@pytest.fixture(scope="module")
def multiseq_lesion(tmp_path_factory) -> Path:
    """multiseq_lesion built once for its own tests (without building every other data set)."""
    return Path(sample_dataset("multiseq_lesion", root=tmp_path_factory.mktemp("multiseq_lesion")))


def test_multiseq_lesion_sections(multiseq_lesion):
    dl = multiseq_lesion / "datalist.json"
    data = _sections(multiseq_lesion)
    assert data["channels"] == ["t1", "t2", "flair"]
    assert data["labels"] == {"0": "background", "1": "lesion"}
    assert data["tissue_labels"] == {"0": "background", "1": "csf", "2": "grey_matter", "3": "white_matter"}
    splits = {k: load_datalist(dl, k) for k in ("unlabeled", "training", "validation", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"unlabeled": 96, "training": 24, "validation": 8, "test": 16}
    assert all(set(i) == {"image"} for i in data["unlabeled"])  # no labels in the pool
    for k in ("training", "validation", "test"):
        assert all(set(i) == {"image", "label", "tissue"} for i in data[k])
    assert not any(p.name.endswith(("_t1.nii.gz", "_t2.nii.gz", "_flair.nii.gz")) for p in multiseq_lesion.rglob("*"))
    item = splits["training"][0]
    img, lab, tis = _read(item["image"]), _read(item["label"]), _read(item["tissue"])
    assert img.shape == (64, 64, 1, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert lab.shape == tis.shape == (64, 64) and lab.dtype == tis.dtype == np.uint8
    assert set(np.unique(lab)) == {0, 1} and set(np.unique(tis)) == {0, 1, 2, 3}
    assert (tis[lab > 0] == 3).all()  # lesions count as white matter
    assert _read(splits["unlabeled"][0]["image"]).shape == (64, 64, 1, 3)
    out = segmentation_transforms("eval", image_size=(64, 64))(item)
    assert out["image"].shape == (3, 64, 64) and out["label"].shape == (1, 64, 64)


def test_multiseq_lesion_eval_slices_are_apart_from_training(multiseq_lesion):
    dl = multiseq_lesion / "datalist.json"
    z = {
        k: np.array([nib.load(i["image"]).affine[2, 3] for i in load_datalist(dl, k)])
        for k in ("unlabeled", "training", "validation", "test")
    }
    assert set(z["unlabeled"]) <= set(z["training"])  # the pool reuses the training slices
    seen = np.concatenate([z["training"], z["unlabeled"]])
    spacing = np.diff(np.unique(z["training"])).min()
    for k in ("validation", "test"):
        gap = np.abs(z[k][:, None] - seen[None]).min()
        assert gap >= 4.0 and gap > 3 * spacing, (k, gap, spacing)
    assert np.abs(z["validation"][:, None] - z["test"][None]).min() >= 4.0


def test_multiseq_lesion_needs_two_sequences_per_pixel():
    """The simulation itself: lesions bright on T2 and FLAIR, perivascular-space mimics bright on T2
    but dark on FLAIR, artefact mimics bright on FLAIR only (white matter on T1 and T2)."""
    rng = np.random.default_rng(0)
    slices = sd._brain_slices(64, sd._msl_slice_plan())[::6]
    vals: dict = {k: [] for k in ("lesion", "pvs", "artefact", "wm")}
    for sl in slices:
        out = sd._multiseq_lesion_slice(rng, sl, 64)
        ch = out["channels"]
        assert ch.shape == (3, 64, 64) and ch.dtype == np.float32 and 0 <= ch.min() and ch.max() <= 1
        feet = {k: out[k] > 0.01 for k in ("lesion", "pvs", "artefact")}
        assert not (feet["lesion"] & feet["pvs"]).any() and not (feet["lesion"] & feet["artefact"]).any()
        assert not (feet["pvs"] & feet["artefact"]).any()
        np.testing.assert_array_equal(out["label"], (out["lesion"] >= 0.5).astype(np.uint8))
        assert out["label"].sum() >= 3 and (out["tissue"][out["label"] > 0] == 3).all()
        for k in ("lesion", "pvs", "artefact"):
            assert (out[k] >= 0.5).sum() >= 3, k
            vals[k].append(ch[:, out[k] >= 0.5])
        vals["wm"].append(ch[:, (sl["wm"] > 0.9) & ~(feet["lesion"] | feet["pvs"] | feet["artefact"])])
    m = {k: np.concatenate(v, axis=1).mean(1) for k, v in vals.items()}  # mean (t1, t2, flair) per kind
    les, pvs, art, wm = m["lesion"], m["pvs"], m["artefact"], m["wm"]
    assert les[1] > wm[1] + 0.2 and les[2] > wm[2] + 0.2 and les[0] < wm[0]
    assert pvs[1] > wm[1] + 0.2 and pvs[2] < wm[2] and pvs[0] < les[0]  # T2 like a lesion, FLAIR nulled
    assert art[2] > wm[2] + 0.2 and abs(art[1] - wm[1]) < 0.05 and abs(art[0] - wm[0]) < 0.05
    assert abs(art[2] - les[2]) < 0.15  # about as bright as a lesion on FLAIR


def test_multiseq_lesion_thin_white_matter_small_images():
    """At 32 px the thinnest white-matter slices still get every kind of blob (fallback centres)."""
    rng = np.random.default_rng(1)
    for sl in sd._brain_slices(32, sd._msl_slice_plan())[-4:]:
        out = sd._multiseq_lesion_slice(rng, sl, 32)
        assert out["channels"].shape == (3, 32, 32)
        assert all((out[k] >= 0.5).any() for k in ("lesion", "pvs", "artefact"))


def test_multiseq_lesion_separability(multiseq_lesion):
    sep = _sections(multiseq_lesion)["separability"]
    assert list(sep) == ["t1", "t2", "flair", "t2+flair", "t1+flair", "t1+t2", "t1+t2+flair"]
    assert all(0.0 <= v <= 1.0 for v in sep.values())
    for single in ("t1", "t2", "flair"):
        assert sep[single] < sep["t1+t2+flair"] - 0.1 and sep[single] < sep["t2+flair"] - 0.1, sep
    card = (multiseq_lesion / "DATA_CARD.md").read_text()
    assert "SIMULATED" in card and "| t1 + t2 + flair | " in card and "not clinical claims" in card
    assert f"| t2 + flair | {sep['t2+flair']:.3f} |" in card


def test_multiseq_lesion_separability_rule():
    """The box rule fitted for the figure finds a box that holds the positives of a separable toy."""
    x = np.array([[0.1, 0.1], [0.5, 0.5], [0.55, 0.45], [0.9, 0.2], [0.2, 0.9], [0.48, 0.52]])
    y = np.array([False, True, True, False, False, True])
    lo, hi = sd._fit_box(x, y)
    assert np.array_equal(((x >= lo) & (x <= hi)).all(1), y)


def _assert_disjoint_regions(sources) -> None:
    """A source file used by several splits only feeds them from disjoint regions of the image or from
    disjoint frame ranges ("file#a-b": frames a..b, "file#k": frame k, "file": every frame)."""
    by_file: dict = {}
    for split, src, box in sources:
        file, _, frames = src.partition("#")
        lo, _, hi = frames.partition("-")
        span = (int(lo), int(hi or lo)) if frames else (0, 10**9)
        by_file.setdefault(file, []).append((split, box, span))
    for uses in by_file.values():
        for i, (s1, b1, f1) in enumerate(uses):
            for s2, b2, f2 in uses[i + 1 :]:
                if s1 != s2:
                    regions = min(b1[1], b2[1]) > max(b1[0], b2[0]) and min(b1[3], b2[3]) > max(b1[2], b2[2])
                    assert not (regions and min(f1[1], f2[1]) >= max(f1[0], f2[0])), (s1, s2, b1, b2, f1, f2)


def _mri_slices(items) -> set:
    return {int(i["source"].split("z=")[1]) for i in items if i["domain"] == "mri"}


def test_multidomain_lesion(data_root):
    folder = data_root / "multidomain_lesion"
    dl = folder / "datalist.json"
    data = _sections(folder)
    assert data["classes"] == ["normal", "lesion"]
    assert len(data["domains"]) >= 4 and {"ct", "mri", "ultrasound", "fundus", "natural"} <= set(data["domains"])
    splits = {k: load_datalist(dl, k) for k in ("training", "validation", "test")}
    seen = set()
    for key, n in {"training": 12, "validation": 4, "test": 6}.items():
        items = splits[key]
        cells = Counter((i["domain"], i["label"]) for i in items)
        assert cells == {(d, c): n for d in data["domains"] for c in (0, 1)}  # every cell, balanced
        # class is not given away by the domain, nor by the source file within a domain
        by_file = Counter((i["source"].split("#")[0].split(" z=")[0], i["label"]) for i in items)
        assert all(by_file[(f, 0)] == by_file[(f, 1)] for f, _ in by_file)
        for item in items:
            assert data["domains"][item["domain_id"]] == item["domain"] and item["label"] in (0, 1)
            img = _read(item["image"])
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            seen.add(img.tobytes())
    assert len(seen) == sum(len(v) for v in splits.values())  # no image twice, within or across splits
    for domain in data["domains"]:
        for key in ("training", "test"):
            assert {i["label"] for i in splits[key] if i["domain"] == domain} == {0, 1}
    # splits never share a source region or frame, nor an MNI slice
    _assert_disjoint_regions([(s, src, box) for s, d, src, box in sd._MDL_SOURCES if d != "mri"])
    z = {k: _mri_slices(v) for k, v in splits.items()}
    assert not (z["training"] & z["test"] or z["training"] & z["validation"] or z["validation"] & z["test"])
    card = (folder / "DATA_CARD.md").read_text()
    assert "simulated" in card.lower() and "independent" in card
    assert "| ct | 0 normal | 12 | 4 | 6 |" in card and "| natural | 1 lesion | 12 | 4 | 6 |" in card
    out = classification_transforms("eval", image_size=(64, 64))(splits["test"][0])
    assert out["image"].shape == (3, 64, 64) and int(out["label"]) == splits["test"][0]["label"]


@pytest.mark.parametrize("domain", sd._MDL_DOMAINS)
def test_multidomain_lesion_is_focal(domain):
    """The inserted lesion changes one compact spot of the image, sized as the data card says."""
    rng = np.random.default_rng(0)
    if domain == "ct":
        crop, window = np.full((64, 64), 40.0), sd._CT_SOFT
    elif domain == "mri":
        crop, window = np.stack([np.full((64, 64), 0.8), np.zeros((64, 64)), np.ones((64, 64))], -1), None
    elif domain == "ultrasound":
        crop, window = np.full((64, 64), 0.5), None
    else:
        crop, window = np.full((64, 64, 3), 0.5), None
    for _ in range(5):
        out = sd._mdl_insert(domain, crop.copy(), rng, window)
        changed = np.abs(np.asarray(out, float) - crop).reshape(64, 64, -1).max(-1) > 1e-3 * np.abs(crop).max()
        if domain == "ultrasound":  # the posterior enhancement below the lesion changes pixels too
            assert 6 <= changed.sum() <= 0.5 * changed.size
        else:
            assert 6 <= changed.sum() <= 400
        rows, cols = np.nonzero(changed)
        assert np.ptp(cols) < 24 and (domain == "ultrasound" or np.ptp(rows) < 24)


def test_multidomain_segmentation(data_root):
    folder = data_root / "multidomain_segmentation"
    dl = folder / "datalist.json"
    data = _sections(folder)
    assert data["classes"] == ["background", "foreground"]
    assert data["domains"] == ["ultrasound", "ct", "mri"] and set(data["foreground_by_domain"]) == set(data["domains"])
    splits = {k: load_datalist(dl, k) for k in ("training", "validation", "test")}
    inside, outside = Counter(), Counter()
    for key, n in {"training": 12, "validation": 4, "test": 6}.items():
        assert Counter(i["domain"] for i in splits[key]) == {d: n for d in data["domains"]}
        for item in splits[key]:
            assert data["domains"][item["domain_id"]] == item["domain"]
            img, lab = _read(item["image"]), _read(item["label"])
            assert img.shape == lab.shape == (64, 64) and img.dtype == lab.dtype == np.uint8
            assert set(np.unique(lab)) == {0, 1} and 0.02 <= lab.mean() <= 0.6, item["label"]
            tissue = (lab == 0) & (img > 25)
            inside[item["domain"]] += img[lab == 1].mean() > img[tissue].mean()
            outside[item["domain"]] += 1
    # the foreground is a different structure per domain: a hypoechoic lesion (darker than the tissue around),
    # bone (the brightest CT structure), white matter (brighter than grey matter on T1)
    assert inside["ultrasound"] == 0 and inside["ct"] == outside["ct"] and inside["mri"] == outside["mri"]
    _assert_disjoint_regions(sd._MDS_CT_SOURCES)
    z = {k: _mri_slices(v) for k, v in splits.items()}
    assert not (z["training"] & z["test"] or z["training"] & z["validation"] or z["validation"] & z["test"])
    ct_files = {k: {i["source"] for i in v if i["domain"] == "ct"} for k, v in splits.items()}
    assert ct_files["validation"].isdisjoint(ct_files["training"] | ct_files["test"])
    card = (folder / "DATA_CARD.md").read_text()
    assert "simulated" in card.lower() and "| ct | 12 | 4 | 6 |" in card
    out = segmentation_transforms("eval", image_size=(64, 64))(splits["training"][0])
    assert out["image"].shape == (1, 64, 64) and out["label"].shape == (1, 64, 64)


def test_multidomain_views_read_only_their_region():
    """Crops of a region never read a pixel outside it, at any rotation, mirror or scale."""
    img = np.full((100, 120, 2), np.nan, np.float32)
    img[20:80, 30:90] = 1.0
    box = (0.2, 0.8, 0.25, 0.75)
    rng = np.random.default_rng(0)
    for _ in range(20):
        view = sd._draw_view(img.shape, box, rng, (0.2, 1.0), 30.0, True)
        assert np.isfinite(sd._sample_view(img, box, view, 16)).all()


# ------------------------------------------------------------------ datalist reading and writing


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_datalist_errors(tmp_path):
    with pytest.raises(DatalistError, match="Datalist file not found: .*nope.json.*Fix"):
        load_datalist(tmp_path / "nope.json")
    bad = _write(tmp_path / "bad.json", '{\n  "training": [\n    {"image": "a.png",}\n  ]\n}')
    with pytest.raises(DatalistError, match="bad.json.*not valid JSON.*line 3, column"):
        load_datalist(bad)
    ok = _write(tmp_path / "ok.json", json.dumps({"training": [{"image": "a.png", "label": 0}]}))
    with pytest.raises(DatalistError, match=r"no section 'validation'.*Available sections: \['training'\]"):
        load_datalist(ok, "validation")
    with pytest.raises(DatalistError, match=r"Entry 0 of section 'training'.*image file not found.*a.png"):
        load_datalist(ok)
    (tmp_path / "a.png").write_bytes(b"")
    missing = _write(
        tmp_path / "missing.json",
        json.dumps(
            {"training": [{"image": "a.png", "label": 1}, {"image": "a.png", "label": "lab/b.nii.gz"}]}
        ),
    )
    with pytest.raises(DatalistError, match=r"Entry 1 .*label file not found.*b.nii.gz"):
        load_datalist(missing)
    # no 'validation' section: one of the two is carved out for validation (tests below)
    assert len(load_datalist(missing, check_files=False) + load_datalist(missing, "validation", check_files=False)) == 2
    not_dict = _write(tmp_path / "nd.json", json.dumps({"training": ["a.png"]}))
    with pytest.raises(DatalistError, match="Entry 0 .* is a str, not an object"):
        load_datalist(not_dict)
    no_image = _write(tmp_path / "ni.json", json.dumps({"training": [{"label": 0}]}))
    with pytest.raises(DatalistError, match="Entry 0 .* has no 'image' field"):
        load_datalist(no_image)
    with pytest.raises(ValueError):  # DatalistError is a ValueError
        load_datalist(tmp_path)


def test_load_datalist_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    dl = _write(
        tmp_path / "dl.json",
        json.dumps({"training": [{"image": "imgs/a.png", "label": 1}], "test": ["imgs/a.png"]}),
    )
    item = load_datalist(dl)[0]
    assert item == {"image": str(tmp_path / "imgs" / "a.png"), "label": 1}
    assert load_datalist(dl, "test") == [{"image": str(tmp_path / "imgs" / "a.png")}]
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = _write(other / "dl.json", json.dumps({"training": [{"image": "imgs/a.png"}]}))
    assert load_datalist(moved, base_dir=tmp_path)[0]["image"] == str(tmp_path / "imgs" / "a.png")


def test_write_datalist_roundtrip(tmp_path):
    (tmp_path / "data").mkdir()
    img = tmp_path / "data" / "x.nii.gz"
    img.write_bytes(b"")
    out = tmp_path / "data" / "datalist.json"
    write_datalist(
        out, {"training": [{"image": str(img), "label": 0, "domain": "ct"}], "classes": ["a", "b"]}
    )
    stored = json.loads(out.read_text())
    assert stored == {"training": [{"image": "x.nii.gz", "label": 0, "domain": "ct"}], "classes": ["a", "b"]}
    assert load_datalist(out)[0]["image"] == str(img)
    assert sorted(p.name for p in out.parent.iterdir()) == ["datalist.json", "x.nii.gz"]  # no temp left


# ------------------------------------------------------------------ transforms


def test_match_channels():
    x = torch.rand(1, 8, 8)
    assert MatchChannelsd("image", 3)({"image": x})["image"].shape == (3, 8, 8)
    assert MatchChannelsd("image", 3)({"image": np.zeros((4, 8, 8))})["image"].shape == (3, 8, 8)
    assert MatchChannelsd("image", 1)({"image": torch.rand(3, 8, 8)})["image"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="2 channels .* but 3 are expected.*Fix: set num_channels=2"):
        MatchChannelsd("image", 3)({"image": torch.rand(2, 8, 8)})


def test_preset_arguments_are_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        segmentation_transforms("training")
    with pytest.raises(ValueError, match="intensity must be"):
        classification_transforms("eval", intensity="minmax")
    with pytest.raises(ValueError, match="spatial must be"):
        segmentation_transforms("eval", spatial="crop")


def test_training_subset_is_monai_partition_and_refuses_bad_fractions():
    from monai.bundle import ConfigParser
    from monai.data import partition_dataset

    from medpeft_monai.data import DatalistError, training_subset
    from tests.conftest import ROOT

    items = [{"image": f"{i}.png"} for i in range(10)]
    assert training_subset(items, 1.0) == items
    assert training_subset(items, 0.3) == partition_dataset(items, ratios=[0.3, 0.7], shuffle=True, seed=0)[0]
    for bad, match in ((0.0, r"in \(0, 1\]"), (-0.5, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"),
                       (0.01, "selects no item")):
        with pytest.raises(DatalistError, match=match):
            training_subset(items, bad)
    with pytest.raises(DatalistError, match="training section of the datalist is empty"):
        training_subset([], 1.0)
    parser = ConfigParser()  # every bundle goes through it: a negative fraction is an error, not 56 % of the data
    parser.read_config(str(ROOT / "bundles" / "lora_segmentation" / "configs" / "train.json"))
    parser["data_fraction"] = -0.5
    with pytest.raises(Exception) as err:  # MONAI wraps it in "Failed to evaluate ConfigExpression"
        parser.get_parsed_content("train_datalist")
    assert isinstance(err.value.__cause__, DatalistError) and "data_fraction must be in" in str(err.value.__cause__)


def test_label_on_another_grid_is_refused_naming_both_files(tmp_path):
    import nibabel as nib

    from medpeft_monai.data.transforms import segmentation_transforms

    nib.save(nib.Nifti1Image(np.random.rand(32, 32).astype(np.float32), np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.uint8), np.eye(4)), str(tmp_path / "lab.nii.gz"))
    item = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    with pytest.raises(Exception) as err:
        segmentation_transforms("eval", image_size=(32, 32))(item)
    text = "".join(str(e) for e in (err.value, err.value.__cause__) if e)
    assert "lab.nii.gz has spatial shape (16, 16)" in text and "img.nii.gz" in text and "ResampleToMatch" in text
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.uint8), np.eye(4)), str(tmp_path / "lab.nii.gz"))
    assert segmentation_transforms("eval", image_size=(16, 16))(item)["label"].shape == (1, 16, 16)


def test_truncated_image_error_names_the_file(tmp_path):
    import nibabel as nib

    from medpeft_monai.data.transforms import classification_transforms, segmentation_transforms

    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(32, 32).astype(np.float32), np.eye(4)), str(good))
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(good.read_bytes()[:200])
    for xform, item in ((segmentation_transforms("eval", image_size=(32, 32)), {"image": str(bad), "label": str(good)}),
                        (classification_transforms("infer", image_size=(32, 32), num_channels=1), {"image": str(bad)})):
        with pytest.raises(Exception) as err:
            xform(item)
        chain, e = [], err.value
        while e is not None:
            chain.append(str(e))
            e = e.__cause__
        assert any("truncated.nii.gz" in m and "remove its entry from the datalist" in m for m in chain), chain


def test_channel_last_nifti_prediction_inverts_onto_the_image_grid(multiseq_lesion):
    """(H, W, 1, C) NIfTI: the preset drops the trailing 1 for the 2-D network and Invertd puts it back, keeping
    the file's 4x4 affine (its z offset), so a mask is written on the image's (H, W, 1) grid."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    item = load_datalist(multiseq_lesion / "datalist.json", "test")[0]
    pre = segmentation_transforms("infer", image_size=(32, 32), num_channels=3)
    out = pre(item)
    assert out["image"].shape == (3, 32, 32)
    source = nib.load(item["image"])
    out["pred"] = MetaTensor(torch.rand(2, 32, 32), meta=dict(out["image"].meta),
                             applied_operations=list(out["image"].applied_operations))
    pred = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(out)["pred"]
    assert tuple(pred.shape) == (2, *source.shape[:3])
    np.testing.assert_allclose(np.asarray(pred.affine), source.affine, atol=1e-5)


def test_labels_outside_num_classes_are_refused_naming_the_file(tmp_path):
    image, label = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(16, 16).astype(np.float32), np.eye(4)), str(image))
    lab = np.zeros((16, 16), np.uint8)
    lab[4:8, 4:8] = 2
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(label))
    item = {"image": str(image), "label": str(label)}
    with pytest.raises(Exception) as err:  # MONAI's Compose wraps it in "applying transform ..."
        segmentation_transforms("eval", image_size=(16, 16), num_classes=2)(item)
    text = "".join(str(e) for e in (err.value, err.value.__cause__) if e)
    assert "lab.nii.gz holds the value 2" in text and "num_classes=2" in text and "--num_classes 3" in text
    assert segmentation_transforms("eval", image_size=(16, 16), num_classes=3)(item)["label"].max() == 2


def test_non_finite_image_is_refused_naming_the_file_or_replaced_on_request(tmp_path):
    path = tmp_path / "nan.nii.gz"
    img = np.random.rand(16, 16).astype(np.float32)
    img[3, 4] = np.nan
    img[5, 5] = np.inf
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(path))
    for preset in (lambda **kw: segmentation_transforms("infer", image_size=(16, 16), **kw),
                   lambda **kw: classification_transforms("infer", image_size=(16, 16), num_channels=1, **kw)):
        with pytest.raises(Exception) as err:
            preset()({"image": str(path)})
        text = "".join(str(e) for e in (err.value, err.value.__cause__) if e)
        assert "nan.nii.gz holds 2 NaN or infinite value(s)" in text and "nonfinite='zero'" in text
        out = preset(nonfinite="zero")({"image": str(path)})["image"]
        assert torch.isfinite(out).all()


def test_segmentation_augmentation_presets_keep_anatomy_upright_by_default():
    from monai.transforms import RandFlipd, RandRotate90d

    def flips(preset):
        return sorted(t.flipper.spatial_axis for t in preset.transforms if isinstance(t, RandFlipd))

    def rot90(preset):
        return any(isinstance(t, RandRotate90d) for t in preset.transforms)

    anatomy = segmentation_transforms("train", image_size=(16, 16))
    assert flips(anatomy) == [0] and not rot90(anatomy)  # left-right only: a brain stays upright
    free = segmentation_transforms("train", image_size=(16, 16), augmentation="free")
    assert flips(free) == [0, 1] and rot90(free)
    assert flips(segmentation_transforms("train", image_size=(16, 16), augmentation="none")) == []
    with pytest.raises(ValueError, match="augmentation must be"):
        segmentation_transforms("train", augmentation="wild")


def test_psst_views_flip_left_right_only():
    from monai.transforms import RandFlipd

    from medpeft_monai.data.transforms import psst_transforms

    flips = [t.flipper.spatial_axis for t in psst_transforms((16, 16)).transforms if isinstance(t, RandFlipd)]
    assert flips == [0, 0]  # one per view, the first (left-right) spatial axis, as the "anatomy" preset


def test_native_spatial_mode_crops_for_training_and_keeps_the_grid_for_evaluation(tmp_path):
    """``spatial="native"``: training takes one random image_size crop of image and label together (no resize, so
    the crop's pixels are the file's own), evaluation keeps the whole grid and pads only a side shorter than
    image_size; ``"resize"`` still resizes, and an unknown mode is refused."""
    rows, cols = np.meshgrid(np.arange(100), np.arange(70), indexing="ij")
    data = (rows * 1000 + cols).astype(np.float32)  # every pixel unique: a crop is found by its corner value
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "image.nii.gz"))
    nib.save(nib.Nifti1Image((rows % 3).astype(np.uint8), np.eye(4)), str(tmp_path / "label.nii.gz"))
    item = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    kwargs = dict(image_size=(32, 32), intensity="zscore", num_classes=3, augmentation="none", spatial="native")
    train = segmentation_transforms("train", **kwargs)
    train.set_random_state(0)
    for _ in range(3):
        out = train(item)
        assert out["image"].shape == out["label"].shape == (1, 32, 32)
        image = out["image"][0] * float(np.std(data)) + float(np.mean(data))  # undo the z-score
        r0, c0 = divmod(int(round(float(image[0, 0]))), 1000)
        np.testing.assert_allclose(image.numpy(), data[r0:r0 + 32, c0:c0 + 32], atol=0.5)
        assert torch.equal(out["label"][0], torch.as_tensor(rows[r0:r0 + 32, c0:c0 + 32] % 3).float())
    evaluated = segmentation_transforms("eval", **{**kwargs, "image_size": (32, 80)})(item)
    assert evaluated["image"].shape == evaluated["label"].shape == (1, 100, 80)  # 70 columns padded to 80
    assert segmentation_transforms("eval", **{**kwargs, "spatial": "resize"})(item)["image"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="spatial must be one of"):
        segmentation_transforms("eval", spatial="tile")


def test_num_classes_above_the_training_labels_is_a_warning_naming_the_values_and_the_fix(tmp_path, caplog):
    """Labels 0..1 with num_classes=4: a warning (not an error) naming the values found, the classes that never
    occur and the fix; labels that use every class say nothing. Every segmentation bundle's training wires it."""
    import logging

    from monai.bundle import ConfigParser

    from medpeft_monai.handlers import LabelClassesCheck
    from tests.conftest import ROOT

    items = []
    for i in range(2):
        nib.save(nib.Nifti1Image(np.random.rand(16, 16).astype(np.float32), np.eye(4)), str(tmp_path / f"i{i}.nii.gz"))
        label = np.zeros((16, 16), np.uint8)
        label[4:8, 4:8] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / f"l{i}.nii.gz"))
        items.append({"image": str(tmp_path / f"i{i}.nii.gz"), "label": str(tmp_path / f"l{i}.nii.gz")})
    for num_classes, expected in ((4, "hold the class values [0, 1], but num_classes=4: class(es) [2, 3] never occur"),
                                  (2, None)):
        xform = segmentation_transforms("train", image_size=(16, 16), num_classes=num_classes)
        for item in items:
            xform(item)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medpeft_monai.handlers"):
            LabelClassesCheck(xform).report()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if expected is None:
            assert not warnings
        else:
            assert len(warnings) == 1 and expected in warnings[0] and "(2 label files)" in warnings[0]
            assert "Fix: if these labels are complete, set --num_classes 2" in warnings[0]

    bundles = {"lora_segmentation": "train.json", "dka_segmentation": "train.json", "mfmda_fundus": "train.json",
               "crossmodal_segmentation": "train.json", "dcrm_vit_multidomain": "train_seg.json"}
    for bundle, config in bundles.items():
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / bundle / "configs" / config))
        targets = [h.get("_target_") for h in parser["train"]["handlers"]]
        index = targets.index("medpeft_monai.handlers.LabelClassesCheck")
        parser["train#handlers"] = [parser[f"train#handlers#{index}"]]  # build this handler alone
        if "source_key" in parser:  # mfmda_fundus: read from the translated datalist, which is not made here
            parser["source_key"] = None
        check = parser.get_parsed_content("train#handlers#0")
        assert len(check.checks) == 1 and check.option in ("--num_classes", "--label_classes"), bundle


# ------------------------------------------------------------------ a datalist without a validation section


def _no_validation_datalist(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(b"")
    return _write(folder / "dl.json", json.dumps({"training": [{"image": f"{i}.png", "label": i % 2} for i in range(n)],
                                                  "test": [{"image": "0.png"}]}))


def test_missing_validation_section_is_carved_from_training_documented_and_stable(tmp_path, caplog):
    import logging

    from medpeft_monai.data import VALIDATION_FRACTION, VALIDATION_SEED, validation_split

    dl = _no_validation_datalist(tmp_path, 12)
    with caplog.at_level(logging.WARNING, logger="medpeft_monai.data.datalist"):
        train, val = load_datalist(dl, "training"), load_datalist(dl, "validation")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"datalist {dl} has no 'validation' section: using 2 of the 12 training items (seed 0, "
                        "20%) for validation; add a 'validation' list to choose them yourself"]  # once, not per call
    assert (len(train), len(val)) == (10, 2)  # max(1, round(0.2 * 12)) = 2
    images = [e["image"] for e in json.loads(dl.read_text())["training"]]
    assert sorted(Path(e["image"]).name for e in train + val) == sorted(images)  # disjoint, union = training
    assert (load_datalist(dl, "training"), load_datalist(dl, "validation")) == (train, val)  # the same split again
    full = [dict(e, image=str(tmp_path / e["image"])) for e in json.loads(dl.read_text())["training"]]
    assert (train, val) == validation_split(full, VALIDATION_FRACTION, VALIDATION_SEED)  # the documented function

    items = [{"image": f"{i}.png"} for i in range(10)]
    for n, n_val in ((2, 1), (3, 1), (5, 1), (8, 2), (10, 2), (13, 3)):
        rest, held = validation_split([{"image": f"{i}.png"} for i in range(n)])
        assert (len(rest), len(held)) == (n - n_val, n_val)
    assert validation_split(items, 0.5, seed=1) == validation_split(items, 0.5, seed=1) != validation_split(items, 0.5)
    assert len(validation_split(items, 0.99)[0]) == 1  # at least one training item is left
    with pytest.raises(DatalistError, match="1 training item.*Fix: list at least 2"):
        validation_split(items[:1])
    # a single training item: training reads it, validation says what to add
    one = _no_validation_datalist(tmp_path / "one", 1)
    assert len(load_datalist(one, "training")) == 1
    with pytest.raises(DatalistError, match=r"no section 'validation'.*too few.*Fix: add a 'validation' list"):
        load_datalist(one, "validation")


def test_validation_section_is_used_as_given(tmp_path):
    dl = _no_validation_datalist(tmp_path, 6)
    sections = json.loads(dl.read_text())
    sections["validation"] = [{"image": "5.png", "label": 1}]
    dl.write_text(json.dumps(sections))
    assert [Path(e["image"]).name for e in load_datalist(dl, "training")] == [f"{i}.png" for i in range(6)]
    assert [Path(e["image"]).name for e in load_datalist(dl, "validation")] == ["5.png"]
    sections["validation"] = []  # an explicit empty section stays empty
    dl.write_text(json.dumps(sections))
    assert load_datalist(dl, "validation") == [] and len(load_datalist(dl, "training")) == 6


def test_bundle_trains_on_a_user_datalist_without_validation(tmp_path):
    """dka_segmentation (tiny random ViT, 1 epoch) on a user datalist with training + test only."""
    import shutil

    from tests.conftest import TINY_ARGS, copy_bundle, run_bundle

    source = Path(sample_dataset("ultrasound_lesion"))
    sections = _sections(source)
    user = tmp_path / "my_data"
    user.mkdir()
    entries = {}
    for section, n in (("training", 5), ("test", 1)):
        entries[section] = []
        for item in sections[section][:n]:
            entry = {}
            for field in ("image", "label"):
                if field in item:
                    name = f"{section}_{field}_{Path(item[field]).name}"
                    shutil.copy(source / item[field], user / name)
                    entry[field] = name
            entries[section].append(entry)
    (user / "datalist.json").write_text(json.dumps(entries))
    bundle = copy_bundle("dka_segmentation", tmp_path)
    out = run_bundle(bundle, ["train.json"], *TINY_ARGS, "--epochs", "1", "--datalist", str(user / "datalist.json"))
    assert "no 'validation' section: using 1 of the 5 training items" in out
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "adapter.pt").is_file()
