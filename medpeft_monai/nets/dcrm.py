"""DCRM-ViT networks: a classifier and a segmenter whose frozen ViT carries DCRM (router, PSN, RMB, DAB).

Both are the project's :class:`~medpeft_monai.nets.PeftClassifier` / :class:`~medpeft_monai.nets.PeftSegmenter`
with ``peft={"method": "dcrm", ...}``, and they return the router's outputs explicitly:

* ``forward(x)`` returns the task logits only (so MONAI trainers, evaluators, inferers and export use the
  network unchanged);
* ``forward(x, return_outputs=True)`` returns a :class:`DCRMOutput` with the logits, the router's logits
  and ``D(x)`` and the ``L_reg`` term of that same pass.

Nothing is kept on the network between calls: concurrent requests and sliding windows each get their
own routing (the segmenter routes every window, and every slice of a volume, separately).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

import medpeft_monai.peft.dcrm  # noqa: F401  (registers the "dcrm" method)
from medpeft_monai.backbones import BackboneOutput
from medpeft_monai.nets.classifier import PeftClassifier
from medpeft_monai.nets.segmenter import PeftSegmenter
from medpeft_monai.peft.core import PeftError, peft_config
from medpeft_monai.peft.dcrm import DCRMConfig, DCRMController, find_controller

__all__ = ["DCRMClassifier", "DCRMOutput", "DCRMSegmenter", "dcrm_config"]


class DCRMOutput(NamedTuple):
    """What a DCRM network returns with ``return_outputs=True`` (one forward pass).

    Attributes:
        pred: task logits ``(B, num_classes[, H, W])``.
        domain_logits: router logits ``(B, K)``, ``None`` without a router (ablation).
        domain_probs: ``D(x)`` ``(B, K)``.
        synth_reg: ``L_reg``, the mean squared synthesised parameter delta (0 without a PSN).
    """

    pred: torch.Tensor
    domain_logits: torch.Tensor | None = None
    domain_probs: torch.Tensor | None = None
    synth_reg: torch.Tensor | None = None


def dcrm_config(spec: dict | DCRMConfig | None, num_domains: int | None = None) -> DCRMConfig:
    """A :class:`DCRMConfig` from ``None``, a dict of DCRM options (``"method"`` optional) or a config.

    ``num_domains``, when given, must agree with the spec's own value (if it has one).
    """
    if spec is None:
        spec = {}
    if isinstance(spec, DCRMConfig):
        config = spec
    elif isinstance(spec, dict):
        spec = dict(spec)
        method = spec.pop("method", "dcrm")
        if method != "dcrm":
            raise PeftError(f"DCRM networks take DCRM options, got method {method!r}; use PeftClassifier/"
                            "PeftSegmenter for other methods.")
        if num_domains is not None:
            if "num_domains" in spec and int(spec["num_domains"]) != int(num_domains):
                raise PeftError(f"num_domains={num_domains} disagrees with peft['num_domains']={spec['num_domains']}.")
            spec["num_domains"] = int(num_domains)
        config = peft_config({"method": "dcrm", **spec})
    else:
        raise PeftError(f"peft must be a dict of DCRM options or a DCRMConfig, got {type(spec).__name__}.")
    if num_domains is not None and int(config.num_domains) != int(num_domains):
        raise PeftError(f"num_domains={num_domains} disagrees with the config's num_domains={config.num_domains}.")
    return config


class _DCRMNet:
    """The DCRM parts shared by the classifier and the segmenter."""

    backbone: torch.nn.Module

    @property
    def dcrm(self) -> DCRMController:
        return find_controller(self.backbone)

    @property
    def num_domains(self) -> int:
        return self.dcrm.num_domains

    def _outputs(self, pred: torch.Tensor, out: BackboneOutput) -> DCRMOutput:
        routing = out.context[self.dcrm.adapter_name]
        return DCRMOutput(pred, routing.domain_logits, routing.domain_probs, routing.synth_reg)


class DCRMClassifier(_DCRMNet, PeftClassifier):
    """``logits = Head(pool(DCRM-ViT(x)))``.

    Args:
        backbone: timm ViT name, e.g. ``vit_base_patch16_224``.
        num_classes: task classes.
        num_domains: ``K`` domains of the router (default: the spec's value, else 2).
        peft: DCRM options (see :class:`~medpeft_monai.peft.dcrm.DCRMConfig`), e.g.
            ``{"rank": 8, "bank_size": 4, "use_dab": false}``.
        weights, image_size, in_chans, dropout, model_kwargs, input_norm: as in :class:`PeftClassifier`.

    Input ``(B, in_chans, H, W)``; output ``(B, num_classes)``, or a :class:`DCRMOutput` with
    ``return_outputs=True``.
    """

    def __init__(self, backbone: str, num_classes: int, num_domains: int | None = None,
                 peft: dict | DCRMConfig | None = None, weights: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = None, in_chans: int = 3, dropout: float = 0.0,
                 model_kwargs: dict | None = None, input_norm: str | Sequence | None = "auto") -> None:
        super().__init__(backbone, num_classes, peft=dcrm_config(peft, num_domains), weights=weights,
                         image_size=image_size, in_chans=in_chans, dropout=dropout, model_kwargs=model_kwargs,
                         input_norm=input_norm)

    def forward(self, x: torch.Tensor, return_outputs: bool = False) -> torch.Tensor | DCRMOutput:
        logits, out = self.encode(x)
        return self._outputs(logits, out) if return_outputs else logits


class DCRMSegmenter(_DCRMNet, PeftSegmenter):
    """Frozen DCRM-ViT encoder + the project's shallow pixel-wise decoder (multi-level, full-resolution logits).

    Args:
        backbone, num_classes: as in :class:`PeftSegmenter`.
        num_domains: ``K`` domains of the router.
        peft: DCRM options.
        weights, image_size, in_chans, levels, decoder_channels, spatial_dims, model_kwargs, input_norm: as
            in :class:`PeftSegmenter`.

    Input ``(B, in_chans, H, W[, D])``; output ``(B, num_classes, H, W[, D])``, or a :class:`DCRMOutput`
    with ``return_outputs=True`` (for volumes the router outputs are per slice, ``(B * D, K)``).
    """

    def __init__(self, backbone: str, num_classes: int, num_domains: int | None = None,
                 peft: dict | DCRMConfig | None = None, weights: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = None, in_chans: int = 3,
                 levels: Sequence[int] | None = None, decoder_channels: int = 64, spatial_dims: int = 2,
                 model_kwargs: dict | None = None, input_norm: str | Sequence | None = "auto") -> None:
        super().__init__(backbone, num_classes, peft=dcrm_config(peft, num_domains), weights=weights,
                         image_size=image_size, in_chans=in_chans, levels=levels,
                         decoder_channels=decoder_channels, spatial_dims=spatial_dims, model_kwargs=model_kwargs,
                         input_norm=input_norm)

    def forward(self, x: torch.Tensor, return_outputs: bool = False) -> torch.Tensor | DCRMOutput:
        logits, out = self.encode_2d(self._slices(x))
        logits = self._restack(logits, x)
        return self._outputs(logits, out) if return_outputs else logits
