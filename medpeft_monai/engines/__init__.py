"""Ignite engines for training loops MONAI does not ship (bi-level / MAML-style DCRM training)."""

from medpeft_monai.engines.bilevel import (
    BilevelTrainer,
    DCRMLoss,
    DomainAccuracy,
    DomainEpisodeSampler,
    DomainOutputs,
    datalist_domains,
    dcrm_total_loss,
    modulator_parameter_names,
    split_tasks,
)

__all__ = [
    "BilevelTrainer",
    "DCRMLoss",
    "DomainAccuracy",
    "DomainEpisodeSampler",
    "DomainOutputs",
    "datalist_domains",
    "dcrm_total_loss",
    "modulator_parameter_names",
    "split_tasks",
]
