"""The papers' losses, beside MONAI's Dice/CE.

* :func:`dcrm_total_loss` / :class:`DCRMLoss`: DCRM-ViT's ``L_total = L_task + beta * L_domain + L_reg``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DCRMLoss", "dcrm_total_loss"]


def dcrm_total_loss(task: torch.Tensor, domain_logits: torch.Tensor | None = None,
                    domain_target: torch.Tensor | None = None, synth_reg: torch.Tensor | None = None,
                    beta: float = 0.1, reg_weight: float = 1e-3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_total = L_task + beta * CE(domain_logits, domain_target) + reg_weight * L_reg``.

    The domain term is 0 without router logits (ablation w/o DR) or targets; the regulariser is 0
    without a PSN. Returns ``(total, {"task", "domain", "reg"})``.
    """
    zero = task.new_zeros(())
    domain = zero
    if domain_logits is not None and domain_target is not None and beta:
        domain = F.cross_entropy(domain_logits.float(), domain_target.long().view(-1).to(domain_logits.device))
    reg = synth_reg.to(task.dtype) if synth_reg is not None else zero
    total = task + beta * domain + reg_weight * reg
    return total, {"task": task.detach(), "domain": domain.detach(), "reg": reg.detach()}


class DCRMLoss(nn.Module):
    """The total DCRM loss around a task loss (``CrossEntropyLoss``, ``DiceCELoss``, ...).

    ``forward(pred, target, domain_logits=None, domain_target=None, synth_reg=None)`` returns
    ``L_task + beta * L_domain + reg_weight * L_reg``; the parts of the last call are in ``last_parts``.
    """

    def __init__(self, task_loss: Callable, beta: float = 0.1, reg_weight: float = 1e-3) -> None:
        super().__init__()
        self.task_loss, self.beta, self.reg_weight = task_loss, float(beta), float(reg_weight)
        self.last_parts: dict[str, torch.Tensor] = {}

    def task(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.task_loss(pred, target).mean()

    def forward(self, pred: torch.Tensor, target: torch.Tensor, domain_logits: torch.Tensor | None = None,
                domain_target: torch.Tensor | None = None, synth_reg: torch.Tensor | None = None) -> torch.Tensor:
        total, self.last_parts = dcrm_total_loss(self.task(pred, target), domain_logits, domain_target, synth_reg,
                                                 self.beta, self.reg_weight)
        return total
