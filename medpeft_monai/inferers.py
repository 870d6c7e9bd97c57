"""Inferers for networks that return more than logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer, sliding_window_inference

__all__ = ["OutputsInferer"]


class OutputsInferer(Inferer):
    """``network(inputs, return_outputs=True)``: the network's full outputs (e.g. a DCRM network's
    :class:`~medpeft_monai.nets.dcrm.DCRMOutput`) instead of the logits alone.

    Pair it with :class:`medpeft_monai.handlers.DomainOutputs`, which unpacks them into the engine output.

    With ``roi_size`` (the network's ``image_size``), an input of another spatial size goes through MONAI's
    ``sliding_window_inference`` (``sw_batch_size`` windows per forward, ``overlap``, ``mode``), one image at a
    time: the logits (the output's first field) are stitched as MONAI's ``SlidingWindowInferer`` does, and every
    other tensor field (e.g. the router's per-image ``domain_probs``, ``(1, K)`` per window) is the mean over
    that image's windows. An input of exactly ``roi_size`` (or any input when ``roi_size`` is ``None``) is one
    forward pass, as before.
    """

    def __init__(self, roi_size: Sequence[int] | None = None, sw_batch_size: int = 1, overlap: float = 0.25,
                 mode: str = "constant") -> None:
        super().__init__()
        self.roi_size = None if roi_size is None else tuple(int(s) for s in roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = overlap
        self.mode = mode

    def __call__(self, inputs, network, *args, **kwargs):
        if self.roi_size is None or tuple(inputs.shape[2:]) == self.roi_size:
            return network(inputs, *args, return_outputs=True, **kwargs)
        return _stack([self._windows(inputs[i:i + 1], network, *args, **kwargs) for i in range(inputs.shape[0])])

    def _windows(self, image, network, *args, **kwargs):
        """One image's outputs: stitched logits, the other fields averaged over its windows."""
        calls = []

        def logits(x):
            out = network(x, *args, return_outputs=True, **kwargs)
            calls.append((int(x.shape[0]), out))
            return out[0]

        pred = sliding_window_inference(image, self.roi_size, self.sw_batch_size, logits, overlap=self.overlap,
                                        mode=self.mode)
        fields = [pred]
        for j in range(1, len(calls[0][1])):
            values = [(n, out[j]) for n, out in calls]
            if any(v is None for _, v in values):
                fields.append(None)
            elif all(torch.is_tensor(v) and v.ndim >= 1 for _, v in values):  # per window: (n, ...)
                fields.append(torch.cat([v for _, v in values]).mean(0, keepdim=True))
            else:  # a per-call scalar, weighted by the windows of the call
                total = sum(n for n, _ in values)
                fields.append(sum(n * v for n, v in values) / total)
        return type(calls[0][1])(*fields)


def _stack(outputs: list):
    """Per-image outputs (named tuples of ``(1, ...)`` tensors) -> one batch output."""
    if len(outputs) == 1:
        return outputs[0]
    fields = []
    for values in zip(*outputs):
        if values[0] is None:
            fields.append(None)
        elif values[0].ndim >= 1:
            fields.append(torch.cat(values))
        else:
            fields.append(torch.stack(values).mean())
    return type(outputs[0])(*fields)
