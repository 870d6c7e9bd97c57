"""Frozen-prefix reuse: the activations entering the first adapted block, computed once per image.

A method that adapts only blocks ``k ..`` (and linear probing, ``k = len(blocks)``) never changes what
enters block ``k``: :meth:`~medpeft_monai.backbones.FrozenBackbone.frozen_prefix` of an image is the same
for every epoch, fold and method built on the same frozen weights. :class:`PrefixCache` keeps it per
``(k, split, image)``, in memory up to ``max_bytes`` and in ``.pt`` files under ``folder`` beyond that,
and hands batches of it to the network's ``forward_prefix``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from timm.layers import DropPath
from torch import nn

from medpeft_monai.backbones import FrozenBackbone, FrozenPrefix
from medpeft_monai.checkpoint import torch_bytes, write_bytes_atomic

__all__ = ["PrefixCache", "cacheable_start", "stochastic_modules"]


def stochastic_modules(backbone: FrozenBackbone, start: int) -> list[str]:
    """Names of the modules before block ``start`` (and outside the blocks) that make a forward random in
    train mode (dropout, drop-path with a non-zero rate): with any of them the frozen prefix is not a fixed
    function of the image."""
    names = []
    for name, m in backbone.model.named_modules():
        index = backbone.block_of(name)
        if index is not None and index >= start:
            continue
        if isinstance(m, DropPath):
            rate = m.drop_prob
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            rate = m.p
        else:
            continue
        if rate:
            names.append(name)
    return names


def cacheable_start(model: nn.Module) -> tuple[int, str]:
    """``(k, reason)``: the block index whose input can be cached for ``model`` (``0``: nothing to reuse),
    and a sentence saying why when it is 0."""
    backbone = model.backbone
    k = backbone.first_adapted_block()
    if k == 0:
        return 0, "the method changes the first block or what precedes it"
    random_parts = stochastic_modules(backbone, k)
    if random_parts:
        return 0, f"the frozen backbone has random layers ({', '.join(random_parts[:3])})"
    return k, ""


class PrefixCache:
    """Frozen prefixes per ``(k, split, index)``.

    Args:
        folder: where entries go once the in-memory ones hold ``max_bytes`` (created on demand, emptied now
            and by :meth:`clear`: the files are one sweep's scratch, not results).
        max_bytes: memory bound of the in-memory entries.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int = 2 << 30) -> None:
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.max_bytes = int(max_bytes)
        self.memory: dict[tuple, FrozenPrefix] = {}
        self.on_disk: set[tuple] = set()
        self.bytes_in_memory = 0
        self.computed = 0

    @staticmethod
    def _nbytes(p: FrozenPrefix) -> int:
        return p.tokens.nbytes + sum(t.nbytes for t in p.levels.values())

    def _path(self, key: tuple) -> Path:
        k, split, index = key
        return self.folder / f"k{k}" / f"{split}_{index}.pt"

    def _store(self, key: tuple, prefix: FrozenPrefix) -> None:
        size = self._nbytes(prefix)
        if self.bytes_in_memory + size <= self.max_bytes:
            self.memory[key] = prefix
            self.bytes_in_memory += size
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, torch_bytes({"tokens": prefix.tokens, "start": prefix.start,
                                              "levels": prefix.levels}))
        self.on_disk.add(key)

    def _load(self, key: tuple) -> FrozenPrefix:
        if key in self.memory:
            return self.memory[key]
        d = torch.load(self._path(key), map_location="cpu", weights_only=True)
        return FrozenPrefix(d["tokens"], d["start"], d["levels"])

    def holds(self, key: tuple) -> bool:
        return key in self.memory or key in self.on_disk

    def _deepest_held(self, k: int, split: str, indices: list[int]) -> int:
        """The latest start block ``j < k`` whose prefixes of all ``indices`` are held (0: none)."""
        starts = {key[0] for key in (*self.memory, *self.on_disk) if key[1] == split and key[0] < k}
        return next((j for j in sorted(starts, reverse=True)
                     if all(self.holds((j, split, i)) for i in indices)), 0)

    def fill(self, backbone: FrozenBackbone, k: int, split: str, images: torch.Tensor, levels=(),
             batch_size: int = 16) -> None:
        """Compute the prefixes (blocks ``0 .. k - 1``) of every image of ``split`` not yet held, in batches,
        with ``backbone`` in eval mode and no gradients. Where the prefixes at an earlier block ``j`` are
        held, only blocks ``j .. k - 1`` run (:meth:`~medpeft_monai.backbones.FrozenBackbone.extend_prefix`)."""
        todo = [i for i in range(len(images)) if not self.holds((k, split, i))]
        device = next(backbone.parameters()).device
        was = backbone.training
        backbone.eval()
        with torch.no_grad():
            for s in range(0, len(todo), batch_size):
                idx = todo[s:s + batch_size]
                j = self._deepest_held(k, split, idx)
                if j:
                    p = backbone.extend_prefix(self.batch(j, split, idx, device), k, levels)
                else:
                    p = backbone.frozen_prefix(images[idx].to(device), k, levels)
                for n, i in enumerate(idx):
                    one = FrozenPrefix(p.tokens[n:n + 1].cpu().clone(), k,
                                       {lv: f[n:n + 1].cpu().clone() for lv, f in p.levels.items()})
                    self._store((k, split, i), one)
                    self.computed += 1
        backbone.train(was)

    def batch(self, k: int, split: str, indices, device: torch.device | str = "cpu") -> FrozenPrefix:
        """The held prefixes of ``indices`` stacked into one batch on ``device``."""
        parts = [self._load((k, split, int(i))) for i in indices]
        tokens = torch.cat([p.tokens for p in parts]).to(device)
        levels = {lv: torch.cat([p.levels[lv] for p in parts]).to(device) for lv in parts[0].levels}
        return FrozenPrefix(tokens, k, levels)

    def clear(self) -> None:
        """Forget every entry and remove the on-disk ones."""
        self.memory.clear()
        self.on_disk.clear()
        self.bytes_in_memory = 0
        shutil.rmtree(self.folder, ignore_errors=True)

    def describe(self) -> dict:
        return {"entries_in_memory": len(self.memory), "entries_on_disk": len(self.on_disk),
                "bytes_in_memory": self.bytes_in_memory, "prefixes_computed": self.computed}
