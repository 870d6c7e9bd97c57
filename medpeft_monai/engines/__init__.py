"""Ignite engines for training loops MONAI does not ship (bi-level / MAML-style DCRM training)."""

from medpeft_monai.engines.bilevel import BilevelTrainer, modulator_parameter_names, network_outputs, split_tasks

__all__ = ["BilevelTrainer", "modulator_parameter_names", "network_outputs", "split_tasks"]
