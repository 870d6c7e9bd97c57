"""Ignite handlers for bundles: save the adapter artefact beside the full checkpoint."""

from __future__ import annotations

import logging
import os

import torch
from ignite.engine import Engine, Events
from torch import nn

from medpeft_monai.peft import peft_state_dict, save_atomic

__all__ = ["AdapterSaver", "scores_and_labels"]


def scores_and_labels(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decollated classification output -> ``(scores (B, C), labels (B,))`` for ignite's ``Accuracy``.

    Use as ``"output_transform": "$medpeft_monai.handlers.scores_and_labels"`` on an ignite metric.
    """
    scores = torch.stack([torch.as_tensor(item["pred"]) for item in output])
    labels = torch.stack([torch.as_tensor(item["label"]).long().reshape(-1)[0] for item in output])
    return scores, labels


class AdapterSaver:
    """Write ``adapter.pt`` (trainable PEFT + head parameters, backbone name, method config) atomically.

    Attach to the validation evaluator: the file is rewritten whenever the evaluator's key metric
    reaches a new best (MONAI's ``best_metric_epoch`` equals the current epoch), and, with
    ``save_final=True`` attached to the trainer, once at the end of training.

    Args:
        network: the PEFT network being trained.
        save_dir: folder for the file (usually the bundle's ``models/``).
        filename: file name, default ``adapter.pt``.
        on_best: save on a new best key metric (attach to the evaluator).
    """

    def __init__(self, network: nn.Module, save_dir: str, filename: str = "adapter.pt", on_best: bool = True) -> None:
        self.network, self.path, self.on_best = network, os.path.join(save_dir, filename), on_best
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED if self.on_best else Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.on_best and getattr(engine.state, "best_metric_epoch", -1) != engine.state.epoch:
            return
        net = self.network.module if hasattr(self.network, "module") else self.network  # DDP
        save_atomic(peft_state_dict(net), self.path)
        self.logger.info(f"saved adapter artefact to {self.path}")
