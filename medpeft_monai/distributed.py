"""Helpers for multi-process (``torchrun``) bundle training: ``configs/multi_gpu_train.json``.

A bundle's ``multi_gpu_train.json`` is merged over ``train.json`` the MONAI way::

    torchrun --nproc_per_node 2 -m monai.bundle run \\
        --config_file "['configs/train.json','configs/multi_gpu_train.json']" --bundle_root .

It wraps ``network`` in ``DistributedDataParallel``, gives both data loaders a
``DistributedSampler`` (DCRM's episode loader shards its ``DomainEpisodeSampler`` by rank instead,
and its ``BilevelTrainer`` averages the gradients itself) and keeps handlers that only write
outputs (console statistics, MONAI's checkpoint saver, experiment tracking) on rank 0 through
:func:`handlers_for_rank`. Handlers that change the training state or run collective operations
(``ValidationHandler``, ``LrScheduleHandler``, ``EarlyStopHandler``, ``MetricsSaver``,
``ClassificationSaver``, ...) stay on every rank, so the ranks never fall out of step. So does
:class:`~medpeft_monai.handlers.BundleCheckpointer`: every rank loads the state of ``--resume True``, and
only rank 0 takes the folder's lock and writes ``model.pt``, ``adapter.pt``, the manifest and ``last.pt``.

:func:`backend` and :func:`local_device` pick NCCL/GPU when CUDA is present and Gloo/CPU otherwise,
so the same config runs on GPUs and, for tests, on a CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "RANK_ZERO_ONLY",
    "average_gradients",
    "backend",
    "get_rank",
    "get_world_size",
    "handlers_for_rank",
    "is_rank_zero_only",
    "local_device",
    "unwrap_ddp",
]

# Handlers that only produce outputs; every other handler runs on all ranks.
RANK_ZERO_ONLY = (
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "CheckpointSaver",
    "MLFlowHandler",
    "ClearMLStatsHandler",
    "ClearMLImageHandler",
    "MLflowBundleLogger",
)


def backend() -> str:
    """``"nccl"`` with CUDA, else ``"gloo"`` (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def get_rank() -> int:
    """This process's rank, 0 when not distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes, 1 when not distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero_only(handler: Any) -> bool:
    """True for handlers that only write outputs (by class name, or a ``rank_zero_only = True`` attribute)."""
    if getattr(handler, "rank_zero_only", False):
        return True
    return any(cls.__name__ in RANK_ZERO_ONLY for cls in type(handler).__mro__)


def handlers_for_rank(handlers: Sequence[Any] | None, rank: int | None = None) -> list[Any]:
    """All ``handlers`` on rank 0; on other ranks only those that are not output-only."""
    handlers = list(handlers or [])
    rank = get_rank() if rank is None else rank
    return handlers if rank == 0 else [h for h in handlers if not is_rank_zero_only(h)]


def unwrap_ddp(network: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` (or ``DataParallel``) wrapper holds; any other module as it is."""
    inner = getattr(network, "module", None)
    return inner if isinstance(inner, nn.Module) else network


def average_gradients(net: nn.Module) -> None:
    """Multi-process training without DDP's hooks: ``grad <- (1 / world_size) * sum_ranks grad``.

    For engines that run the unwrapped network (DCRM's functional inner loop, PSST's several passes per
    step); one all-reduce for every trainable parameter before the optimizer step, so every process takes
    the same step. A parameter that has no gradient on any process keeps ``grad = None``. Does nothing in a
    single process.
    """
    if get_world_size() == 1:
        return
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat(grads + [has_grad])
    dist.all_reduce(flat)
    flat /= get_world_size()
    offset = 0
    for p, seen in zip(params, flat[-len(params):].tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if seen > 0 else None
        offset += n
