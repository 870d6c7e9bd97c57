"""Ignite engines for training loops MONAI does not ship: bi-level / MAML-style DCRM training and the
cross-modal method's self-supervised PSST stage."""

from medpeft_monai.engines.bilevel import BilevelTrainer, modulator_parameter_names, network_outputs, split_tasks
from medpeft_monai.engines.psst import EMATeacher, PSSTTrainer, complexity_scores

__all__ = ["BilevelTrainer", "EMATeacher", "PSSTTrainer", "complexity_scores", "modulator_parameter_names",
           "network_outputs", "split_tasks"]
