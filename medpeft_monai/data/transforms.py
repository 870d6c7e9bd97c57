"""Transform presets made of MONAI dictionary transforms.

Bundle configs call them as expressions, for example::

    "$medpeft_monai.data.transforms.segmentation_transforms('train', image_size=@image_size)"
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandRotate90d,
    RandSpatialCropd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    SpatialPadd,
)
from monai.transforms.inverse import InvertibleTransform

__all__ = [
    "CheckFinited",
    "CheckLabelRanged",
    "CheckSameGridd",
    "DICE_GRIDS",
    "LoadImageNamedd",
    "DropTrailingSingletond",
    "MatchChannelsd",
    "NestedRegionsd",
    "RandChannelSelectd",
    "SPATIAL_MODES",
    "nested_regions_to_label",
    "stack_images",
    "classification_transforms",
    "diffusion_transforms",
    "psst_transforms",
    "segmentation_transforms",
    "with_native_label",
]

_MODES = ("train", "eval", "infer")
#: how images reach the network's ``image_size`` in :func:`segmentation_transforms`
SPATIAL_MODES = ("resize", "native", "pad_crop")
#: where the evaluation's Dice is computed (``dice_grid`` of the bundles' ``evaluate.json``, :func:`with_native_label`)
DICE_GRIDS = ("native", "network")
logger = logging.getLogger(__name__)


class MatchChannelsd(MapTransform):
    """Bring channel-first images to ``num_channels`` channels.

    Allowed changes: 1 -> N (repeat), RGBA 4 -> 3 (drop alpha), RGB(A) 3/4 -> 1 (mean of the colour
    channels). Any other mismatch raises ``ValueError`` naming the key and the fix.
    """

    def __init__(self, keys: KeysCollection, num_channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}.")
        self.num_channels = int(num_channels)

    def _match(self, img, key: Hashable):
        c, n = int(img.shape[0]), self.num_channels
        if c == n:
            return img
        if c == 1:
            reps = (n,) + (1,) * (img.ndim - 1)
            return img.repeat(*reps) if isinstance(img, torch.Tensor) else np.tile(img, reps)
        if c == 4 and n == 3:
            return img[:3]
        if c in (3, 4) and n == 1:
            return (
                img[:3].mean(0, keepdims=True)
                if isinstance(img, np.ndarray)
                else img[:3].mean(0, keepdim=True)
            )
        raise ValueError(
            f"'{key}' has {c} channels (shape {tuple(img.shape)}) but {n} are expected, and {c} -> {n} "
            f"has no safe conversion. Fix: set num_channels={c} (and the network's input channels to {c}), "
            "or select the channels you need before this transform."
        )

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._match(d[key], key)
        return d


class LoadImageNamedd(LoadImaged):
    """MONAI's ``LoadImaged`` whose failures name the file and the fix (a truncated NIfTI otherwise ends in a
    bare ``EOFError``)."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as err:
            files = {k: data.get(k) for k in self.keys if isinstance(data, Mapping) and k in data}
            raise ValueError(
                f"Could not read {files} ({type(err).__name__}: {err}). Fix: check that the file is complete and "
                "in a format MONAI reads (NIfTI, PNG, JPEG, DICOM, ...), replace it, or remove its entry from "
                "the datalist.") from err


def _file_name(x) -> str:
    meta = getattr(x, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "?"))


class CheckFinited(MapTransform):
    """Refuse an image holding NaN or infinite values, naming the file (one NaN pixel turns a training loss
    into NaN and an inference result into an all-background mask); ``replace=True`` sets them to 0 instead
    and logs a warning naming the file and the count."""

    def __init__(self, keys: KeysCollection, replace: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.replace = bool(replace)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            bad = ~torch.isfinite(torch.as_tensor(d[key]))
            count = int(bad.sum())
            if not count:
                continue
            if not self.replace:
                raise ValueError(
                    f"Image {_file_name(d[key])} holds {count} NaN or infinite value(s). Fix: repair or remove the "
                    "file, or set nonfinite='zero' on the transform preset to replace them by 0.")
            logger.warning(f"{_file_name(d[key])}: replaced {count} NaN or infinite value(s) by 0 (nonfinite='zero').")
            d[key] = torch.where(bad, torch.zeros((), dtype=d[key].dtype), d[key])
        return d


class CheckLabelRanged(MapTransform):
    """Refuse a label map with values outside ``0 .. num_classes - 1`` (or not whole numbers), naming the file,
    the value found and the fix, instead of a one-hot ``index out of bounds`` deep inside the loss.

    It also records which classes the labels it passed hold (one ``bincount`` per label): :meth:`unused_classes`
    gives the classes none of them holds, which :class:`medpeft_monai.handlers.LabelClassesCheck` reports as a
    warning when ``num_classes`` is larger than the training labels need. Only the labels checked in this
    process count (the bundles cache their training set in the main process).
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.labels_seen = 0
        self._present = torch.zeros(self.num_classes, dtype=torch.bool)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable for DataLoader workers (a lock is not)
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def classes_present(self) -> list[int]:
        """The class values found in the labels checked so far."""
        return [int(c) for c in torch.nonzero(self._present).flatten()]

    def unused_classes(self) -> list[int]:
        """The classes of ``0 .. num_classes - 1`` that no label checked so far holds."""
        return [c for c in range(self.num_classes) if not bool(self._present[c])]

    def _record(self, label: torch.Tensor) -> None:
        flat = label.as_subclass(torch.Tensor).detach().flatten().to("cpu", torch.int64)
        present = torch.bincount(flat, minlength=self.num_classes)[: self.num_classes] > 0
        with self._lock:
            self._present |= present
            self.labels_seen += 1

    def __call__(self, data: Mapping) -> dict:
        for key in self.key_iterator(data):
            label = torch.as_tensor(data[key])
            low, high = float(label.min()), float(label.max())
            if low < 0 or high > self.num_classes - 1:
                raise ValueError(
                    f"Label {_file_name(data[key])} holds the value {high if high > self.num_classes - 1 else low:g}, "
                    f"but num_classes={self.num_classes} allows labels 0..{self.num_classes - 1}. Fix: set "
                    f"num_classes to the number of classes including background (e.g. --num_classes {int(high) + 1}), "
                    "or remap the label values.")
            if not bool(torch.equal(label, label.round())):
                raise ValueError(f"Label {_file_name(data[key])} holds non-integer values; a label map must hold "
                                 "class indices. Fix: save the labels as integers (nearest-neighbour resampling).")
            self._record(label)
        return dict(data)


class CheckSameGridd(MapTransform):
    """Refuse an image/label pair whose spatial shapes differ (naming both files).

    The presets resize image and label independently afterwards, so a label drawn on another grid would
    be stretched onto the image silently; resample it to the image first.
    """

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"CheckSameGridd takes (image_key, label_key), got {self.keys}.")

    def __call__(self, data: Mapping) -> dict:
        image_key, label_key = self.keys
        image, label = data[image_key], data[label_key]
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(
                f"Label {_file_name(label)} has spatial shape {tuple(label.shape[1:])} but its image "
                f"{_file_name(image)} has {tuple(image.shape[1:])}. Fix: resample the label onto the image grid (e.g. "
                "with MONAI's ResampleToMatch) or pair the right files in the datalist.")
        return dict(data)


class NestedRegionsd(MapTransform):
    """Label map -> ``num_regions`` nested binary channels, channel ``i`` = ``label > i`` (for fundus:
    disc = label > 0, cup = label > 1, as the MFM-DA paper's two-channel BCE). Inverse:
    :func:`nested_regions_to_label`."""

    def __init__(self, keys: KeysCollection, num_regions: int) -> None:
        super().__init__(keys)
        if int(num_regions) < 1:
            raise ValueError(f"num_regions must be >= 1, got {num_regions}.")
        self.num_regions = int(num_regions)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            d[key] = torch.cat([torch.as_tensor(lab[:1] > i) for i in range(self.num_regions)]).to(torch.float32)
            if hasattr(lab, "meta"):
                from monai.data import MetaTensor

                d[key] = MetaTensor(d[key], meta=lab.meta)
        return d


def nested_regions_to_label(regions: torch.Tensor) -> torch.Tensor:
    """Binary nested channels ``(K, ...)`` (e.g. disc, cup) -> label map ``(1, ...)``: the number of nested
    regions a pixel lies in, a region counting only inside the previous one (a cup outside the disc is dropped)."""
    inside = torch.cumprod((torch.as_tensor(regions) > 0.5).to(torch.int64), dim=0)
    return inside.sum(0, keepdim=True)


class DropTrailingSingletond(MapTransform, InvertibleTransform):
    """Drop trailing size-1 spatial dims until an image has ``spatial_rank`` spatial dims; invertible.

    A 2D multi-channel NIfTI stored as (H, W, 1, C) loads as (C, H, W, 1); this makes it (C, H, W).
    Images that already have the rank, or whose extra dims are not size 1, are left unchanged. The
    metadata (4x4 affine with the slice's z offset, ``spatial_shape`` (H, W, 1)) is kept, and the
    inverse (e.g. MONAI's ``Invertd`` on a prediction) puts the dropped dims back, so a mask is written
    on the input's own (H, W, 1) grid, not as a (1, H, W) volume with permuted axes.
    """

    def __init__(self, keys: KeysCollection, spatial_rank: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_rank = int(spatial_rank)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            dropped = 0
            while d[key].ndim - 1 > self.spatial_rank and d[key].shape[-1] == 1:
                d[key] = d[key][..., 0]
                dropped += 1
            self.push_transform(d[key], extra_info={"dropped": dropped})
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            dropped = self.pop_transform(d[key])["extra_info"]["dropped"]
            for _ in range(dropped):
                d[key] = d[key][..., None]
        return d


def _load(keys: Sequence[str], image_key: str, spatial_rank: int, nonfinite: str) -> list:
    """The start of every preset: load ``keys`` (errors name the file), refuse or zero NaN/Inf pixels of the image
    (``nonfinite``: ``"error"`` or ``"zero"``), drop trailing singleton dims down to ``spatial_rank``."""
    if nonfinite not in ("error", "zero"):
        raise ValueError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}.")
    return [
        LoadImageNamedd(keys=list(keys), ensure_channel_first=True, image_only=True),
        CheckFinited(keys=image_key, replace=nonfinite == "zero"),
        DropTrailingSingletond(keys=list(keys), spatial_rank=spatial_rank),
    ]


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    return mode


def _intensity(key: str, intensity: str):
    if intensity == "scale":
        return ScaleIntensityd(keys=key, minv=0.0, maxv=1.0)
    if intensity == "zscore":
        return NormalizeIntensityd(keys=key, channel_wise=True)
    raise ValueError(f"intensity must be 'scale' (min-max to [0, 1]) or 'zscore', got {intensity!r}.")


def _interp(image_size: Sequence[int]) -> str:
    return "bilinear" if len(image_size) == 2 else "trilinear"


def segmentation_transforms(
    mode: str = "train",
    image_size: Sequence[int] = (64, 64),
    keys: Sequence[str] = ("image", "label"),
    num_channels: int | None = None,
    intensity: str = "scale",
    spatial: str = "resize",
    num_classes: int | None = None,
    nonfinite: str = "error",
    augmentation: str = "anatomy",
    pair_key: str | None = None,
) -> Compose:
    """Load, normalise and size image/label pairs for segmentation.

    Args:
        mode: ``"train"`` (adds light flips/rot90/affine augmentation), ``"eval"``, or ``"infer"``
            (loads only the image key).
        image_size: output spatial size, 2 or 3 numbers.
        keys: ``(image_key, label_key)``.
        num_channels: if set, images are brought to this many channels (see ``MatchChannelsd``).
        intensity: ``"scale"`` (min-max to [0, 1]) or ``"zscore"`` (per channel).
        spatial: how an image reaches the network's ``image_size``:

            * ``"resize"`` (default): the whole image is interpolated to ``image_size`` (label nearest) in every
              mode; the field of view is the whole image and a sliding window over it is a single window.
            * ``"native"``: the image keeps its own grid. ``train`` takes one random ``image_size`` crop per
              item (after zero-padding any side shorter than ``image_size``); ``eval`` and ``infer`` only
              zero-pad sides shorter than ``image_size`` (symmetrically; ``Invertd`` crops it off), so MONAI's
              ``SlidingWindowInferer(roi_size=image_size)`` tiles the whole native grid: masks and Dice
              are on each image's own grid (for an image smaller than ``image_size``, Dice also counts the
              padding). Train and infer with the same mode: a network trained on
              resized whole images sees another scale on native windows.
            * ``"pad_crop"``: centre pad/crop to ``image_size`` in every mode.
        num_classes: if set, labels outside ``0 .. num_classes - 1`` are refused naming the file
            (:class:`CheckLabelRanged`).
        nonfinite: NaN/Inf pixels in an image: ``"error"`` (refused naming the file) or ``"zero"`` (set to 0,
            logged); :class:`CheckFinited`.
        augmentation: training augmentation preset: ``"anatomy"`` (default; left-right flips along the first
            spatial axis, which is left-right for RAS NIfTI and PNG alike, and small rotations/scaling: a brain
            stays upright), ``"free"`` (also up-down flips and 90-degree rotations, for images without a
            canonical orientation such as microscopy) or ``"none"``.
        pair_key: a second image of the same grid (e.g. the source image of an MFM-DA translation), loaded,
            checked, normalised, sized and augmented exactly as the image (same random flips and affine).
    """
    _check_mode(mode)
    image_key = keys[0]
    label_key = keys[1] if len(keys) > 1 and mode != "infer" else None
    images = [image_key] + ([pair_key] if pair_key and mode != "infer" else [])
    all_keys = images + ([label_key] if label_key else [])
    size = tuple(int(s) for s in image_size)
    xforms = _load(all_keys, image_key, len(size), nonfinite)
    if len(images) > 1:
        xforms += [CheckFinited(keys=images[1], replace=nonfinite == "zero"), CheckSameGridd(keys=images)]
    if label_key:
        xforms.append(CheckSameGridd(keys=(image_key, label_key)))
        if num_classes is not None:
            xforms.append(CheckLabelRanged(keys=label_key, num_classes=num_classes))
    if num_channels is not None:
        xforms.append(MatchChannelsd(keys=images, num_channels=num_channels))
    xforms += [_intensity(k, intensity) for k in images]
    if spatial == "resize":
        modes = [_interp(size)] * len(images) + (["nearest"] if label_key else [])
        anti = [True] * len(images) + ([False] if label_key else [])
        xforms.append(Resized(keys=all_keys, spatial_size=size, mode=modes, anti_aliasing=anti))
    elif spatial == "native":
        xforms.append(SpatialPadd(keys=all_keys, spatial_size=size))  # only sides shorter than image_size
        if mode == "train":
            xforms.append(RandSpatialCropd(keys=all_keys, roi_size=size, random_size=False))
    elif spatial == "pad_crop":
        xforms.append(ResizeWithPadOrCropd(keys=all_keys, spatial_size=size))
    else:
        raise ValueError(f"spatial must be one of {SPATIAL_MODES}, got {spatial!r}.")
    if augmentation not in ("anatomy", "free", "none"):
        raise ValueError(f"augmentation must be 'anatomy', 'free' or 'none', got {augmentation!r}.")
    if mode == "train" and augmentation != "none":
        affine_modes = [_interp(size)] * len(images) + (["nearest"] if label_key else [])
        xforms.append(RandFlipd(keys=all_keys, prob=0.5, spatial_axis=0))
        if augmentation == "free":
            xforms += [RandFlipd(keys=all_keys, prob=0.5, spatial_axis=1),
                       RandRotate90d(keys=all_keys, prob=0.5, max_k=3)]
        xforms.append(RandAffined(keys=all_keys, prob=0.5, rotate_range=0.26, scale_range=0.1, mode=affine_modes,
                                  padding_mode="zeros"))
    xforms.append(EnsureTyped(keys=all_keys, dtype=torch.float32))
    return Compose(xforms)


def with_native_label(preprocessing, dice_grid: str = "native", label_key: str = "label", spatial_rank: int = 2,
                      native_key: str = "label_native"):
    """Evaluation preprocessing whose label stays as stored, on its image's own grid, for Dice at each image's
    native resolution (``dice_grid`` of the bundles' ``evaluate.json``).

    ``dice_grid="native"``: ``preprocessing`` loads, checks and sizes image and label for the network as before;
    then ``label_key`` is replaced by the same label file loaded again as it is stored (channel first, trailing
    singleton dims dropped to ``spatial_rank`` as for the image; never resized, padded or cropped; the file name
    travels under ``native_key`` meanwhile). The evaluation inverts the prediction onto the image's grid
    (``Invertd``, as inference does) before it is discretised and scored, so the Dice is that of the masks
    inference writes. Needs a batch size of 1 (the images' sizes differ) and labels given as files.
    ``dice_grid="network"``: ``preprocessing`` itself; the Dice is computed on the grid the network sees
    (``image_size`` with ``spatial="resize"``). The choice is logged.
    """
    if dice_grid not in DICE_GRIDS:
        raise ValueError(f"dice_grid must be one of {DICE_GRIDS} ('native': Dice on each image's own grid, "
                         f"'network': on the grid the network sees), got {dice_grid!r}.")
    if dice_grid == "network":
        logger.info("Dice on the network's grid (dice_grid='network'): prediction and label as the preprocessing "
                    "sized them for the network, not at each image's native resolution.")
        return preprocessing
    logger.info("Dice on each image's native grid (dice_grid='native'): the prediction is inverted onto the "
                "image's grid and compared with the label as stored.")
    return Compose([
        CopyItemsd(keys=label_key, times=1, names=native_key),
        preprocessing,
        DeleteItemsd(keys=label_key),
        LoadImageNamedd(keys=native_key, ensure_channel_first=True, image_only=True),
        DropTrailingSingletond(keys=native_key, spatial_rank=spatial_rank),
        EnsureTyped(keys=native_key, dtype=torch.float32),
        CopyItemsd(keys=native_key, times=1, names=label_key),
        DeleteItemsd(keys=native_key),
    ])


def classification_transforms(
    mode: str = "train",
    image_size: Sequence[int] = (64, 64),
    num_channels: int | None = 3,
    intensity: str = "scale",
    image_key: str = "image",
    label_key: str = "label",
    nonfinite: str = "error",
) -> Compose:
    """Load and normalise images for classification; the integer label becomes a long tensor.

    ``mode`` is ``"train"`` (adds light flip/affine augmentation), ``"eval"`` or ``"infer"``
    (label optional); ``nonfinite`` as in :func:`segmentation_transforms`.
    """
    _check_mode(mode)
    size = tuple(int(s) for s in image_size)
    xforms = _load([image_key], image_key, len(size), nonfinite)
    if num_channels is not None:
        xforms.append(MatchChannelsd(keys=image_key, num_channels=num_channels))
    xforms += [
        _intensity(image_key, intensity),
        Resized(keys=image_key, spatial_size=size, mode=_interp(size), anti_aliasing=True),
    ]
    if mode == "train":
        xforms += [
            RandFlipd(keys=image_key, prob=0.5, spatial_axis=0),
            RandAffined(keys=image_key, prob=0.5, rotate_range=0.26, scale_range=0.1, padding_mode="zeros"),
        ]
    xforms.append(EnsureTyped(keys=image_key, dtype=torch.float32))
    xforms.append(EnsureTyped(keys=label_key, dtype=torch.long, allow_missing_keys=mode == "infer"))
    return Compose(xforms)


class RandChannelSelectd(Randomizable, MapTransform):
    """Keep one randomly chosen channel of a multi-channel image (e.g. one MRI sequence of a T1/T2/FLAIR
    stack): every channel is then an image of the same modality, as self-supervised modality training
    wants. One-channel images pass through."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self._index = 0

    def randomize(self, channels: int) -> None:
        self._index = int(self.R.randint(channels))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(d[key].shape[0])
            d[key] = d[key][self._index:self._index + 1]
        return d


def _view_augmentation(key: str) -> list:
    """One view's random augmentation (DINO-style, anatomy-friendly: left-right flips only, along the first
    spatial axis as in the ``"anatomy"`` segmentation preset)."""
    return [
        RandFlipd(keys=key, prob=0.5, spatial_axis=0),
        RandAffined(keys=key, prob=0.8, rotate_range=0.26, scale_range=0.2, translate_range=4,
                    padding_mode="zeros"),
        RandAdjustContrastd(keys=key, prob=0.5, gamma=(0.7, 1.5)),
        RandGaussianNoised(keys=key, prob=0.3, std=0.02),
    ]


def psst_transforms(image_size: Sequence[int] = (64, 64), image_key: str = "image", view_key: str = "view2",
                    select_channel: bool = True, nonfinite: str = "error") -> Compose:
    """Unlabeled images -> two independently augmented views for PSST (stage 1 of the cross-modal method).

    Loads ``image_key``, keeps one random channel (``select_channel``: each sequence of a multi-sequence
    image is an image of the modality), scales to ``[0, 1]``, resizes to ``image_size``, copies it to
    ``view_key`` and augments each view on its own (flip, affine, gamma, noise). ``nonfinite`` as in
    :func:`segmentation_transforms`.
    """
    size = tuple(int(s) for s in image_size)
    xforms = _load([image_key], image_key, len(size), nonfinite)
    if select_channel:
        xforms.append(RandChannelSelectd(keys=image_key))
    xforms += [
        ScaleIntensityd(keys=image_key, minv=0.0, maxv=1.0),
        Resized(keys=image_key, spatial_size=size, mode=_interp(size), anti_aliasing=True),
        CopyItemsd(keys=image_key, times=1, names=view_key),
        *_view_augmentation(image_key),
        *_view_augmentation(view_key),
        EnsureTyped(keys=[image_key, view_key], dtype=torch.float32),
    ]
    return Compose(xforms)


def diffusion_transforms(mode: str = "train", image_size: Sequence[int] = (64, 64), num_channels: int = 3,
                         image_key: str = "image", nonfinite: str = "error") -> Compose:
    """Images for a DDPM: loaded (errors name the file), ``num_channels`` channels, min-max scaled to ``[-1, 1]``,
    resized to ``image_size``; ``mode="train"`` adds left-right flips (first spatial axis). No labels."""
    _check_mode(mode)
    size = tuple(int(s) for s in image_size)
    xforms = _load([image_key], image_key, len(size), nonfinite) + [
        MatchChannelsd(keys=image_key, num_channels=num_channels),
        ScaleIntensityd(keys=image_key, minv=-1.0, maxv=1.0),
        Resized(keys=image_key, spatial_size=size, mode=_interp(size), anti_aliasing=True),
    ]
    if mode == "train":
        xforms.append(RandFlipd(keys=image_key, prob=0.5, spatial_axis=0))
    xforms.append(EnsureTyped(keys=image_key, dtype=torch.float32))
    return Compose(xforms)


def stack_images(items: Sequence[Mapping], transform, image_key: str = "image") -> torch.Tensor:
    """``(N, C, ...)`` batch of the transformed images of datalist ``items`` (e.g. the few target images)."""
    if not items:
        raise ValueError("stack_images got no datalist items; check the datalist section.")
    return torch.stack([torch.as_tensor(transform(dict(it))[image_key]).as_subclass(torch.Tensor) for it in items])
