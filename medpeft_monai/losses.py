"""The papers' losses, beside MONAI's Dice/CE.

* :func:`dcrm_total_loss` / :class:`DCRMLoss`: DCRM-ViT's ``L_total = L_task + beta * L_domain + L_reg``.
* PSST (cross-modal stage 1): :func:`masked_patch_loss` (MAE on masked patches, per-patch error ``e_i``),
  :func:`error_weights` (``w_i ∝ exp(alpha e_i)``) and :class:`DINOLoss` (centred, sharpened teacher vs
  student cross-entropy, image- or patch-level).
* MFM-DA: :func:`gram_matrix` / :func:`style_loss` (stage 1b style term) and :func:`pyramid_alignment_loss`
  (stage 2 hierarchical alignment, ``1 - cos`` over channels per position, averaged over levels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DCRMLoss", "DINOLoss", "dcrm_total_loss", "error_weights", "gram_matrix", "masked_patch_loss", "patchify",
           "pyramid_alignment_loss", "style_loss"]


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


# ---------------------------------------------------------------------------------------------- PSST


def patchify(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, C * ph * pw)`` non-overlapping patches in raster order."""
    b, c, h, w = x.shape
    ph, pw = patch
    if h % ph or w % pw:
        raise ValueError(f"image {(h, w)} is not a multiple of the patch size {patch}.")
    x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def masked_patch_loss(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, patch: tuple[int, int],
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MAE reconstruction loss on the hidden patches only, with per-patch-normalised pixel targets.

    ``t_i = (x_i - mean(x_i)) / sqrt(var(x_i) + eps)`` per patch ``i``; ``e_i = mean((p_i - t_i)^2)``;
    ``L_MAE = sum_i m_i e_i / sum_i m_i`` (``m_i = 1`` for hidden patches), so visible patches never count.

    Args:
        pred: ``(B, C, H, W)`` prediction in the normalised target space.
        image: ``(B, C, H, W)`` the unmasked input.
        mask: ``(B, H / ph, W / pw)`` boolean, ``True`` = hidden.
        patch: ``(ph, pw)`` pixels per patch (the mask unit).

    Returns ``(L_MAE, e)`` with ``e`` ``(B, N)`` the per-patch error of every patch (hidden or not).
    """
    target = patchify(image, patch)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=False)
    target = (target - mean) / (var + eps).sqrt()
    err = (patchify(pred, patch) - target).pow(2).mean(-1)
    m = mask.flatten(1).to(err.dtype)
    if m.shape != err.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the {tuple(err.shape)} patches of the image.")
    return (err * m).sum() / m.sum().clamp_min(1.0), err


def error_weights(err: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""PSST's reconstruction-error guidance: ``w_i = m_i exp(alpha e_i) / sum_j m_j exp(alpha e_j)`` per image.

    Hidden patches that the MAE reconstructs badly (hard, structured regions) weigh more in the patch-level
    distillation; ``alpha = 0`` gives iBOT's uniform ``1 / #hidden``. ``err`` is detached (weights carry no
    gradient). ``err``: ``(B, N)``; ``mask``: ``(B, N)`` or ``(B, gh, gw)`` boolean. Returns ``(B, N)``.
    """
    m = mask.flatten(1)
    logits = (float(alpha) * err.detach().float()).masked_fill(~m, float("-inf"))
    w = torch.softmax(logits, dim=1)
    return torch.nan_to_num(w, nan=0.0)  # an image with no hidden patch has all-zero weights


class DINOLoss(nn.Module):
    r"""DINO self-distillation: ``H(P_t, P_s) = - sum_k P_t^k log P_s^k`` with
    ``P_t = softmax((g_t - c) / tau_t)`` (centred, sharpened, no gradient) and ``P_s = softmax(g_s / tau_s)``.

    The centre ``c`` is an EMA of the teacher outputs, ``c <- m c + (1 - m) mean(g_t)``, updated explicitly by
    :meth:`update_center` (averaged over processes under ``torch.distributed``). One instance per output kind
    (image-level, patch-level), each with its own centre.

    Args:
        out_dim: ``K`` prototypes.
        student_temp: ``tau_s`` (DINO: 0.1).
        center_momentum: ``m`` (DINO: 0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.register_buffer("center", torch.zeros(1, int(out_dim)))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """``student``, ``teacher``: ``(..., K)`` logits of the same positions. Without ``weights`` the mean of
        ``H`` over all positions; with ``weights`` (shape ``student.shape[:-1]``, e.g. :func:`error_weights`
        ``(B, N)``) ``sum(w H) / B``."""
        p_t = torch.softmax((teacher.detach().float() - self.center) / float(teacher_temp), dim=-1)
        ce = -(p_t * torch.log_softmax(student.float() / self.student_temp, dim=-1)).sum(-1)
        if weights is None:
            return ce.mean()
        return (weights * ce).sum() / ce.shape[0]

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        batch = teacher.detach().float().reshape(-1, teacher.shape[-1])
        total, count = batch.sum(0, keepdim=True), torch.tensor(float(batch.shape[0]), device=batch.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1.0 - self.center_momentum)


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """``G = F F^T / (C H W)`` per image: ``(B, C, H, W) -> (B, C, C)`` channel correlations (style)."""
    b, c = feat.shape[:2]
    f = feat.reshape(b, c, -1)
    return f @ f.transpose(1, 2) / f.shape[1] / f.shape[2]


def style_loss(feats: list[torch.Tensor], target_grams: list[torch.Tensor]) -> torch.Tensor:
    """Per-image Gram (style) loss, relative per level: ``sum_l mean (G_l(x) - G_l^t)^2 / mean (G_l^t)^2``, ``(B,)``.

    ``target_grams``: one ``(C, C)`` (e.g. the mean over the target images) or ``(B, C, C)`` per level. Dividing by
    the target Gram's own size makes the loss independent of the encoder's feature scale (raw Gram differences of
    a foundation encoder's features are ~1e-7), so one weight suits any encoder.
    """
    return sum(((gram_matrix(f) - g) ** 2).flatten(1).mean(1) / (g**2).mean().clamp_min(1e-12)
               for f, g in zip(feats, target_grams))


def pyramid_alignment_loss(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
    """Pyramid hierarchical alignment: ``L_align = 1/n sum_l mean_(h,w) (1 - cos(a_l[:, :, h, w], b_l[:, :, h, w]))``.

    Cosine over channels at every position of each level (``(B, C_l, H_l, W_l)``), averaged over positions, images
    and the ``n`` levels; 0 for identical inputs.
    """
    if len(feats_a) != len(feats_b) or not feats_a:
        raise ValueError(f"pyramid_alignment_loss needs the same, non-zero number of levels, got {len(feats_a)} "
                         f"and {len(feats_b)}.")
    return sum((1 - F.cosine_similarity(a, b, dim=1)).mean() for a, b in zip(feats_a, feats_b)) / len(feats_a)
