"""MONAI Label app that serves every trained segmentation model of this project's bundles.

Start it from the repository root (needs ``pip install -e ".[label]"``)::

    monailabel start_server --app medpeft_monai/label_app --studies /path/to/images \\
        --conf bundles bundles --host 127.0.0.1 --port 8000

Each bundle variant (:class:`medpeft_monai.utils.BundleVariant`: ``configs/inference<suffix>.json``,
``configs/metadata<suffix>.json`` or ``metadata.json``, ``models/model<suffix>.pt``) under ``--conf bundles
<folder>`` (default: the ``bundles/`` folder of this checkout) whose metadata declares a ``segmentation``
output and that has trained weights becomes the MONAI Label model ``<bundle name><suffix>``
(``POST /infer/<model>``; listed by ``GET /info/``): ``lora_segmentation``, ``dka_segmentation`` and
``dcrm_vit_multidomain_seg`` (the segmentation variant of DCRM-ViT; its classification model is not
served). MONAI Label's own ``BundleInferTask`` runs it with the variant's inference config
(``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``; the ``SaveImaged`` step is left out
and the label is written in the input image's geometry). 2D models return a 2D NIfTI label with the
image's affine (MONAI Label's default writer would keep the channel axis and drop the affine of 2D
images; see ``SegmentationBundleInfer.writer``).

Options (``--conf <key> <value>``):
    bundles: folder holding the bundles (default: ``bundles/`` next to the installed package, else
        ``./bundles``).
    models: comma-separated model names to serve, or ``all`` (default).
    preload: ``true`` to build the networks at start-up instead of on the first request.
    spatial: ``resize`` or ``native``, for every served model: how an image reaches the network (default: each
        variant's inference config, ``"spatial": "resize"`` in this project's bundles). ``native`` keeps the
        image's grid and tiles it with ``SlidingWindowInferer(roi_size=image_size)``; serve it only for a model
        trained with ``--spatial native`` (see ``medpeft_monai.data.transforms.segmentation_transforms``).
    sw_batch_size: windows per forward pass of the sliding window (default: the inference config's, 4).

``monailabel start_server`` creates ``model/``, ``lib/``, ``logs/`` and ``bin/`` folders inside the
app folder; they hold nothing this app needs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import monailabel
import nibabel as nib
import numpy as np
from monai.data import MetaTensor
from monai.transforms import Lambdad
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask
from monailabel.utils.others.generic import file_ext

from medpeft_monai.utils import BundleVariant, bundle_folders, bundle_variants

logger = logging.getLogger(__name__)


def default_bundles_dir() -> Path:
    import medpeft_monai

    repo = Path(medpeft_monai.__file__).resolve().parents[1] / "bundles"
    return repo if repo.is_dir() else Path.cwd() / "bundles"


def segmentation_models(bundles_dir: str | os.PathLike, names: str = "all") -> dict[str, BundleVariant]:
    """Bundle variants (model name -> variant) whose metadata declares a segmentation output; ``names``
    (comma-separated model names, or ``all``) filters them."""
    root = Path(bundles_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"Bundles folder not found: {root}. Pass --conf bundles <folder with bundles>.")
    wanted = None if names.strip().lower() == "all" else {n.strip() for n in names.split(",") if n.strip()}
    found = {}
    for folder in bundle_folders(root):
        for variant in bundle_variants(folder):
            if wanted is not None and variant.name not in wanted:
                continue
            if variant.output_format() != "segmentation":
                logger.info(f"--- {variant.name}: not a segmentation model, not served")
                continue
            found[variant.name] = variant
    if wanted is not None and wanted - set(found):
        raise ValueError(f"Requested models {sorted(wanted - set(found))} are not segmentation models of the bundles "
                         f"in {root}; available: {sorted(found)}.")
    return found


def config_overrides(conf: dict[str, str]) -> dict:
    """The inference-config values that the app's ``--conf`` options set: ``spatial``, ``sw_batch_size``."""
    out: dict = {}
    if conf.get("spatial"):
        spatial = conf["spatial"].strip().lower()
        if spatial not in ("resize", "native"):
            raise ValueError(f"--conf spatial must be 'resize' or 'native', got {conf['spatial']!r}.")
        out["spatial"] = spatial
    if conf.get("sw_batch_size"):
        out["sw_batch_size"] = int(conf["sw_batch_size"])
    return out


class VariantConstants(BundleConstants):
    """MONAI Label's bundle file names, pointed at one variant's inference config, metadata and weights."""

    def __init__(self, variant: BundleVariant) -> None:
        self.variant = variant

    def configs(self) -> list[str]:
        return [self.variant.config("inference").name]

    def metadata_json(self) -> str:
        return self.variant.metadata.name

    def model_pytorch(self) -> str:
        return self.variant.model_file.name

    def model_torchscript(self) -> str:
        return self.variant.model_file.with_suffix(".ts").name


def _drop_channel(x):
    return x[0] if x.ndim == 3 and x.shape[0] == 1 else x


class SegmentationBundleInfer(BundleInferTask):
    """``BundleInferTask`` for one bundle variant: loads its ``models/model<suffix>.pt`` strictly and writes
    2D labels with their affine.

    Only that file is offered as model file (``adapter<suffix>.pt`` and other variants' weights are not).
    """

    def __init__(self, variant: BundleVariant, conf: dict[str, str]) -> None:
        self._overrides = config_overrides(conf)
        super().__init__(str(variant.bundle), conf, const=VariantConstants(variant), type="segmentation",
                         load_strict=True)
        if self.is_valid():
            self._config["model_filename"] = [variant.model_file.name]

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        for key, value in self._overrides.items():
            parser[key] = value
        return parser

    def post_transforms(self, data=None):
        post = list(super().post_transforms(data))
        if self.dimension == 2:  # Restored keeps (1, H, W) for 2D; the label is (H, W)
            post.append(Lambdad(keys=self.output_label_key, func=_drop_channel))
        return post

    def writer(self, data, extension=None, dtype=None):
        ext = extension or data.get("result_extension") or file_ext(data.get("image_path") or "")
        if self.dimension != 2:
            return super().writer(data, extension, dtype)
        if ext.lower() not in (".nii", ".nii.gz"):  # PNG/JPEG/...: 8- or 16-bit integer labels
            return super().writer(data, extension, dtype or "uint8")
        # 2D NIfTI: write (H, W) with the input's 4x4 affine; MONAI Label's writers either drop the affine
        # of 2D arrays (ITK path) or fail on it (nibabel path)
        pred = data[self.output_label_key]
        pred = pred.array if isinstance(pred, MetaTensor) else np.asarray(pred)
        meta = data.get(f"{self.output_label_key}_meta_dict") or {}
        affine = meta.get("affine")
        if affine is None:
            affine = data[self.input_key].meta.get("original_affine")
        affine = np.asarray(affine, dtype=np.float64)
        with tempfile.NamedTemporaryFile(suffix=ext, delete=False) as f:  # MONAI Label deletes it after sending
            out = f.name
        nib.save(nib.Nifti1Image(pred.astype(dtype or np.uint8), affine), out)
        return out, data.get(self.output_json_key, {})


class MyApp(MONAILabelApp):
    """Serves the segmentation models of the project's bundles through MONAI Label's ``BundleInferTask``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles_dir = Path(conf.get("bundles") or default_bundles_dir())
        self.models = segmentation_models(self.bundles_dir, conf.get("models", "all"))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medpeft_monai segmentation bundles",
            description="Frozen foundation-model backbones with PEFT adapters, served from MONAI bundles",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, variant in self.models.items():
            if not variant.model_file.is_file():
                logger.warning(f"--- {name}: no {variant.model_file}; train it first: python -m monai.bundle run "
                               f"--config_file {variant.config('train')} --bundle_root {variant.bundle}")
                continue
            task = SegmentationBundleInfer(variant, self.conf)
            if not task.is_valid():
                logger.warning(f"--- {name}: MONAI Label could not load the bundle, not served")
                continue
            logger.info(f"+++ Adding inferer {name} => {variant.config('inference')}")
            infers[name] = task
        if not infers:
            logger.warning(f"No trained segmentation model found under {self.bundles_dir}.")
        return infers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
