"""Inferers for networks that return more than logits."""

from __future__ import annotations

from monai.inferers import SimpleInferer

__all__ = ["OutputsInferer"]


class OutputsInferer(SimpleInferer):
    """``network(inputs, return_outputs=True)``: the network's full outputs (e.g. a DCRM network's
    :class:`~medpeft_monai.nets.dcrm.DCRMOutput`) instead of the logits alone.

    Pair it with :class:`medpeft_monai.handlers.DomainOutputs`, which unpacks them into the engine output.
    """

    def __call__(self, inputs, network, *args, **kwargs):
        return network(inputs, *args, return_outputs=True, **kwargs)
