"""A dataset for inference runs that must finish: an image that cannot be read or preprocessed is logged and
left out instead of stopping the run (:class:`SkippingDataset`); the bundles'
:class:`medpeft_monai.handlers.SkippedItemsReport` lists the skipped files at the end and fails the run."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

from monai.transforms import apply_transform
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["ON_ERROR", "SkippingDataset", "describe_error", "item_files"]

logger = logging.getLogger(__name__)

#: what :class:`SkippingDataset` does with an item whose transform fails
ON_ERROR = ("skip", "stop")


def item_files(item) -> str:
    """The file(s) of a datalist item, for messages: its ``image`` value (or every path-valued entry)."""
    if isinstance(item, Mapping):
        if "image" in item:
            return str(item["image"])
        paths = [str(v) for v in item.values() if isinstance(v, (str, os.PathLike))]
        return ", ".join(paths) if paths else repr(dict(item))
    return str(item)


def describe_error(err: BaseException) -> str:
    """``Type: message`` of the most telling exception of ``err``'s chain: MONAI's ``applying transform ...``
    wrappers are passed over down to the error a transform raised (e.g. ``LoadImageNamedd``'s, which names the
    file and the fix)."""
    seen = {id(err)}
    while (isinstance(err, RuntimeError) and str(err).startswith("applying transform")
           and (nxt := err.__cause__ or err.__context__) is not None and id(nxt) not in seen):
        seen.add(id(nxt))
        err = nxt
    return f"{type(err).__name__}: {err}"


class SkippingDataset(IterableDataset):
    """Datalist items through ``transform``, in order, as MONAI's ``Dataset`` gives them, for inference.

    ``on_error="skip"`` (default): an item whose ``transform`` (loading, finite-value check, channel matching, ...)
    raises is left out; an error naming its file(s) and the cause is logged and the run goes on with the next
    item. Each item that is given out carries its datalist position under ``index_key``, from which
    :class:`medpeft_monai.handlers.SkippedItemsReport` finds the items that never reached the network (also with
    DataLoader workers) and reports them at the end. ``on_error="stop"``: the first failure is raised, as by
    MONAI's ``Dataset``.

    Iterable (no ``len``): ignite's epoch ends when the items do. With ``num_workers > 1`` the items are dealt
    to the workers in turn, so each is loaded once.
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, on_error: str = "skip",
                 index_key: str = "datalist_index") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
        self.data = data
        self.transform = transform
        self.on_error = on_error
        self.index_key = index_key
        #: position -> reason of the items skipped in this process (the workers' own are in their logs)
        self.skipped: dict[int, str] = {}

    def __iter__(self):
        worker = get_worker_info()
        indices = range(len(self.data))
        if worker is not None:
            indices = indices[worker.id::worker.num_workers]
        for i in indices:
            item = self.data[i]
            try:
                out = apply_transform(self.transform, dict(item) if isinstance(item, Mapping) else item) \
                    if self.transform is not None else item
            except Exception as err:
                if self.on_error == "stop":
                    raise
                reason = describe_error(err)
                self.skipped[i] = reason
                logger.error(f"skipped datalist item {i} ({item_files(item)}): {reason}")
                continue
            if isinstance(out, Mapping):
                out = dict(out)
                out[self.index_key] = i
            yield out
