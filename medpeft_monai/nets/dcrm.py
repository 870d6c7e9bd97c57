"""DCRM-ViT networks: a classifier and a segmenter whose frozen ViT carries DCRM (router, PSN, RMB, DAB).

Both are the project's :class:`~medpeft_monai.nets.PeftClassifier` / :class:`~medpeft_monai.nets.PeftSegmenter`
with ``peft={"method": "dcrm", ...}``, plus access to the router's output of the last forward pass:

* ``forward(x)`` returns the task logits only (so MONAI trainers, evaluators and inferers use the
  network unchanged);
* ``last_domain_logits`` / ``last_domain_probs``: ``(B, K)`` router logits (``None`` without a router)
  and ``D(x)`` of the last forward pass; ``last_synth_reg``: the ``L_reg`` term of that pass;
* ``forward_with_domain(x)`` returns ``(logits, domain_logits)``.

With a sliding-window inferer every window is routed separately and ``last_*`` hold the last window's
values; the segmenter's 3D mode routes every slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

import medpeft_monai.peft.dcrm  # noqa: F401  (registers the "dcrm" method)
from medpeft_monai.nets.classifier import PeftClassifier
from medpeft_monai.nets.segmenter import PeftSegmenter
from medpeft_monai.peft.core import PeftError, peft_config
from medpeft_monai.peft.dcrm import DCRMConfig, DCRMController

__all__ = ["DCRMClassifier", "DCRMSegmenter", "dcrm_config"]


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


class _DomainAccess:
    """Router outputs of the last forward pass (mixed into the DCRM networks)."""

    backbone: torch.nn.Module

    @property
    def dcrm(self) -> DCRMController:
        return self.backbone.dcrm

    @property
    def num_domains(self) -> int:
        return self.dcrm.num_domains

    @property
    def last_domain_logits(self) -> torch.Tensor | None:
        return self.dcrm.context.domain_logits

    @property
    def last_domain_probs(self) -> torch.Tensor | None:
        return self.dcrm.context.domain_probs

    @property
    def last_synth_reg(self) -> torch.Tensor | None:
        return self.dcrm.context.synth_reg

    def forward_with_domain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(task logits, domain logits (B, K) or None without a router)`` in one forward pass."""
        logits = self(x)
        return logits, self.last_domain_logits


class DCRMClassifier(_DomainAccess, PeftClassifier):
    """``logits = Head(pool(DCRM-ViT(x)))``.

    Args:
        backbone: timm ViT name, e.g. ``vit_base_patch16_224``.
        num_classes: task classes.
        num_domains: ``K`` domains of the router (default: the spec's value, else 2).
        peft: DCRM options (see :class:`~medpeft_monai.peft.dcrm.DCRMConfig`), e.g.
            ``{"rank": 8, "bank_size": 4, "use_dab": false}``.
        weights, image_size, in_chans, dropout, model_kwargs: as in :class:`PeftClassifier`.

    Input ``(B, in_chans, H, W)``; output ``(B, num_classes)``; ``last_domain_logits`` ``(B, K)``.
    """

    def __init__(self, backbone: str, num_classes: int, num_domains: int | None = None,
                 peft: dict | DCRMConfig | None = None, weights: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = None, in_chans: int = 3, dropout: float = 0.0,
                 model_kwargs: dict | None = None) -> None:
        super().__init__(backbone, num_classes, peft=dcrm_config(peft, num_domains), weights=weights,
                         image_size=image_size, in_chans=in_chans, dropout=dropout, model_kwargs=model_kwargs)


class DCRMSegmenter(_DomainAccess, PeftSegmenter):
    """Frozen DCRM-ViT encoder + the project's shallow pixel-wise decoder (multi-level, full-resolution logits).

    Args:
        backbone, num_classes: as in :class:`PeftSegmenter`.
        num_domains: ``K`` domains of the router.
        peft: DCRM options.
        weights, image_size, in_chans, levels, decoder_channels, spatial_dims, model_kwargs: as in
            :class:`PeftSegmenter`.

    Input ``(B, in_chans, H, W[, D])``; output ``(B, num_classes, H, W[, D])``.
    """

    def __init__(self, backbone: str, num_classes: int, num_domains: int | None = None,
                 peft: dict | DCRMConfig | None = None, weights: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = None, in_chans: int = 3,
                 levels: Sequence[int] | None = None, decoder_channels: int = 64, spatial_dims: int = 2,
                 model_kwargs: dict | None = None) -> None:
        super().__init__(backbone, num_classes, peft=dcrm_config(peft, num_domains), weights=weights,
                         image_size=image_size, in_chans=in_chans, levels=levels,
                         decoder_channels=decoder_channels, spatial_dims=spatial_dims, model_kwargs=model_kwargs)
