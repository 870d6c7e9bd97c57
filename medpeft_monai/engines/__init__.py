"""Ignite engines for training loops MONAI does not ship: bi-level / MAML-style DCRM training, the
cross-modal method's self-supervised PSST stage, and MFM-DA's target adaptation, translation and aligned
stage-2 step."""

from medpeft_monai.engines.bilevel import BilevelTrainer, modulator_parameter_names, network_outputs, split_tasks
from medpeft_monai.engines.mfmda import AlignedPairStep, TargetAdaptationTrainer, translate, translate_datalist
from medpeft_monai.engines.psst import EMATeacher, PSSTTrainer, complexity_scores

__all__ = ["AlignedPairStep", "BilevelTrainer", "EMATeacher", "PSSTTrainer", "TargetAdaptationTrainer",
           "complexity_scores", "modulator_parameter_names", "network_outputs", "split_tasks", "translate",
           "translate_datalist"]
