"""The end of every custom Ignite iteration in this package (one place for the event order)."""

from __future__ import annotations

import torch
from monai.engines.utils import IterationEvents
from torch import nn

from medpeft_monai.distributed import average_gradients

__all__ = ["optimizer_step"]


def optimizer_step(engine, loss: torch.Tensor, net: nn.Module) -> None:
    """MONAI's iteration events around ``loss.backward()`` and ``engine.optimizer.step()``, with the gradients of
    ``net`` averaged across processes in between (:func:`~medpeft_monai.distributed.average_gradients`, a no-op in
    one process): ``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, backward, average, ``BACKWARD_COMPLETED``, step.
    ``engine.state.output`` must be set before (handlers of the first two events read it)."""
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    loss.backward()
    average_gradients(net)
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    engine.optimizer.step()
