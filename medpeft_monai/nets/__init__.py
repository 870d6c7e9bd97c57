"""Whole networks a bundle names in ``network_def``."""

from medpeft_monai.nets.classifier import PeftClassifier
from medpeft_monai.nets.crossmodal import CrossModalSegmenter, MoME, PSSTNetwork  # noqa: E402
from medpeft_monai.nets.dcrm import DCRMClassifier, DCRMSegmenter  # noqa: E402  (after the base nets)
from medpeft_monai.nets.mfmda import FrozenImageEncoder, InstanceAwareAdaptor
from medpeft_monai.nets.segmenter import PeftSegmenter, default_levels

__all__ = ["CrossModalSegmenter", "DCRMClassifier", "DCRMSegmenter", "FrozenImageEncoder", "InstanceAwareAdaptor",
           "MoME", "PSSTNetwork", "PeftClassifier", "PeftSegmenter", "default_levels"]
