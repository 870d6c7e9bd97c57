"""PSST (Progressive Self-Supervised Tuning), stage 1 of the cross-modal method, as a MONAI/Ignite engine.

:class:`PSSTTrainer` trains a :class:`~medpeft_monai.nets.PSSTNetwork` (frozen encoder + modality LoRA +
MAE decoder + DINO heads) on unlabeled images of one modality, in two phases:

1. **MAE warm-up** (epochs ``1 .. warmup_epochs``): a random ``mask_ratio`` of mask units is hidden (mask
   token), the decoder reconstructs the pixels, ``L = L_MAE`` on the hidden units
   (:func:`~medpeft_monai.losses.masked_patch_loss`).
2. **Joint stage** (the remaining epochs), entered once:

   * *structural-complexity subset*: every training image is scored by the variance of its per-unit MAE
     reconstruction error ``e_i`` (a fixed mask); the ``complexity_fraction`` highest-scoring images form
     the joint stage's data (repeated to the length of the whole data set, so an epoch keeps its number of
     steps and is one reshuffled pass);
   * the *teacher* starts as a copy of the student's trainable parameters (LoRA, heads, decoder, mask
     token) and follows it by EMA, ``theta_t <- m theta_t + (1 - m) theta_s`` with ``m`` rising from
     ``ema_momentum[0]`` to ``ema_momentum[1]`` on a cosine; it shares the frozen backbone (its forward is
     the student's module run with the EMA tensors, ``torch.func.functional_call``) and gets no gradients;
   * per step: the student sees view 1 masked and view 2 whole, the teacher both views whole;
     ``L_PSST = lambda L_MAE + L_img + L_patch`` with the image-level DINO loss across views,
     ``L_img = (H(t_1, s_2) + H(t_2, s_1)) / 2``, and the patch-level loss on the hidden units of view 1
     weighted by the reconstruction error, ``L_patch = sum_i w_i H(t_1^i, s_1^i)``,
     ``w_i ∝ exp(alpha e_i)`` (:func:`~medpeft_monai.losses.error_weights`); centring and temperatures as
     in DINO (:class:`~medpeft_monai.losses.DINOLoss`, teacher temperature warmed up linearly).

``dino=False`` runs the MAE phase for every epoch (the "+ MAE" ablation); ``error_alpha=0`` gives uniform
patch weights (the "+ DINO" ablation). Multi-process (``torchrun``): every pass runs the unwrapped network
and the gradients are averaged across processes before each step
(:func:`~medpeft_monai.distributed.average_gradients`); the DINO centres are averaged too and the
complexity scores come from rank 0, so the processes stay identical.

Resume: the trainer's ``state_dict`` adds what the joint stage carries from epoch to epoch (the teacher's
EMA tensors, the subset, both DINO centres) to Ignite's counters, so
:class:`~medpeft_monai.handlers.BundleCheckpointer` saves it in its resume file and ``--resume True``
continues a run at an epoch boundary as if it had not stopped.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, DistributedSampler, Subset

from medpeft_monai.backbones import as_plain_tensor
from medpeft_monai.distributed import get_rank, get_world_size, unwrap_ddp
from medpeft_monai.engines.step import optimizer_step
from medpeft_monai.losses import DINOLoss, error_weights, masked_patch_loss

__all__ = ["EMATeacher", "PSSTTrainer", "complexity_scores"]

logger = logging.getLogger(__name__)



class EMATeacher:
    """EMA copies of a student's trainable parameters; the teacher's forward is the student's module run with
    them (the frozen parameters, e.g. the backbone, are shared, not copied).

    ``update(student, m)``: ``theta_t <- m theta_t + (1 - m) theta_s``. The copies are plain tensors with
    ``requires_grad=False``: the teacher never receives gradients.
    """

    def __init__(self, student: nn.Module) -> None:
        self.params = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        current = dict(student.named_parameters())
        for name, t in self.params.items():
            t.mul_(momentum).add_(current[name].detach(), alpha=1.0 - momentum)

    @torch.no_grad()
    def __call__(self, student: nn.Module, *args, **kwargs):
        return functional_call(student, self.params, args, kwargs)


@torch.no_grad()
def complexity_scores(net: nn.Module, loader, mask_ratio: float, image_key: str = "image", seed: int = 0,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Structural complexity of every image of ``loader`` (in order): the variance of its per-unit MAE
    errors ``e_i`` over the hidden units of a fixed random mask (seeded), in eval mode."""
    was = net.training
    net.eval()
    gen = torch.Generator().manual_seed(int(seed))
    scores = []
    try:
        for batch in loader:
            x = as_plain_tensor(batch[image_key]).to(device)
            mask = net.random_mask(x.shape[0], mask_ratio, device, generator=gen)
            _, err = masked_patch_loss(net(x, mask).reconstruction, x, mask, net.unit_pixels)
            hidden = mask.flatten(1)
            scores += [float(e[h].var()) for e, h in zip(err, hidden)]
    finally:
        net.train(was)
    return torch.tensor(scores)


class PSSTTrainer(SupervisedTrainer):
    """PSST stage-1 trainer (see the module docstring). Batches hold ``image`` (view 1) and ``view_key``
    (view 2, needed in the joint stage); there are no labels.

    Args:
        device, max_epochs, train_data_loader, network, optimizer: as for MONAI's ``SupervisedTrainer``
            (``network``: a :class:`~medpeft_monai.nets.PSSTNetwork`, optionally DDP-wrapped).
        warmup_epochs: MAE-only epochs before the joint stage.
        mask_ratio: fraction of hidden mask units.
        mae_weight: ``lambda`` in the joint stage.
        dino: run the joint stage (``False``: MAE for every epoch).
        error_alpha: ``alpha`` of the error-weighted patch guidance (0: uniform weights).
        complexity_fraction: share of images, highest structural complexity first, kept for the joint stage.
        teacher_temp: ``(start, end)`` teacher temperature, linear over ``teacher_temp_warmup_epochs``.
        student_temp: student temperature.
        center_momentum: DINO centre EMA momentum.
        ema_momentum: ``(start, end)`` teacher EMA momentum (cosine over the joint stage).
        view_key: batch key of view 2.
        kwargs: further ``SupervisedTrainer`` arguments (``train_handlers``, ``amp``, ...).
    """

    def __init__(self, device, max_epochs: int, train_data_loader, network: nn.Module,
                 optimizer: torch.optim.Optimizer, warmup_epochs: int = 1, mask_ratio: float = 0.6,
                 mae_weight: float = 1.0, dino: bool = True, error_alpha: float = 1.0,
                 complexity_fraction: float = 0.5, teacher_temp: tuple[float, float] = (0.04, 0.07),
                 teacher_temp_warmup_epochs: int = 1, student_temp: float = 0.1, center_momentum: float = 0.9,
                 ema_momentum: tuple[float, float] = (0.992, 1.0), view_key: str = "view2", **kwargs) -> None:
        if not isinstance(dino, bool):  # e.g. the string "false" from a command line, which bool() makes True
            raise TypeError(f"dino must be True or False, got {dino!r} ({type(dino).__name__}); on the bundle command "
                            "line write --dino False.")
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        if not 0.0 < float(complexity_fraction) <= 1.0:
            raise ValueError(f"complexity_fraction must be in (0, 1], got {complexity_fraction}.")
        if warmup_epochs < 0 or (dino and warmup_epochs >= max_epochs):
            raise ValueError(f"warmup_epochs={warmup_epochs} must be >= 0 and, with dino=True, below "
                             f"max_epochs={max_epochs} so that the joint stage runs.")
        kwargs.setdefault("loss_function", masked_patch_loss)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, **kwargs)
        self.warmup_epochs, self.mask_ratio, self.mae_weight = int(warmup_epochs), float(mask_ratio), float(mae_weight)
        self.dino, self.error_alpha = bool(dino), float(error_alpha)
        self.complexity_fraction, self.view_key = float(complexity_fraction), view_key
        self.teacher_temp = tuple(teacher_temp)
        self.teacher_temp_warmup_epochs = max(int(teacher_temp_warmup_epochs), 1)
        self.ema_momentum = tuple(ema_momentum)
        net = unwrap_ddp(network)
        k = net.image_head.prototypes.out_features
        self.image_loss = DINOLoss(k, student_temp, center_momentum).to(device)
        self.patch_loss = DINOLoss(k, student_temp, center_momentum).to(device)
        self.teacher: EMATeacher | None = None
        self.joint_subset: list[int] | None = None
        self.add_event_handler(Events.EPOCH_STARTED, self._maybe_start_joint)
        self.add_event_handler(Events.EPOCH_STARTED, self._set_sampler_epoch)  # after the joint loader is set

    # -- schedules
    def in_joint_stage(self) -> bool:
        return self.dino and self.state.epoch > self.warmup_epochs

    def current_teacher_temp(self) -> float:
        t0, t1 = self.teacher_temp
        progress = min((self.state.epoch - self.warmup_epochs - 1) / self.teacher_temp_warmup_epochs, 1.0)
        return t0 + (t1 - t0) * max(progress, 0.0)

    def current_ema_momentum(self) -> float:
        m0, m1 = self.ema_momentum
        total = max((self.state.max_epochs - self.warmup_epochs) * self.state.epoch_length, 1)
        done = self.state.iteration - self.warmup_epochs * self.state.epoch_length
        return m1 - (m1 - m0) * (math.cos(math.pi * min(done / total, 1.0)) + 1) / 2

    # -- joint stage entry
    def _maybe_start_joint(self, engine: PSSTTrainer) -> None:
        if not engine.in_joint_stage() or engine.teacher is not None:
            return
        net = unwrap_ddp(engine.network)
        loader = engine.data_loader
        dataset = loader.dataset
        ordered = DataLoader(dataset, batch_size=loader.batch_size, shuffle=False, num_workers=0,
                             collate_fn=loader.collate_fn)
        scores = complexity_scores(net, ordered, engine.mask_ratio, device=engine.state.device).to(engine.state.device)
        if get_world_size() > 1:
            dist.broadcast(scores, 0)
        keep = max(1, int(round(engine.complexity_fraction * len(scores))))
        engine.joint_subset = sorted(torch.argsort(scores.cpu(), descending=True)[:keep].tolist())
        engine._use_joint_loader()
        engine.teacher = EMATeacher(net)
        if get_rank() == 0:
            logger.info(f"PSST joint stage from epoch {engine.state.epoch}: {keep} of {len(scores)} images "
                        f"(highest MAE error variance), MAE + DINO, alpha={engine.error_alpha}.")

    def _use_joint_loader(self) -> None:
        """Train from now on on ``joint_subset`` repeated to the whole data set's length, shuffled every epoch
        (``DistributedSampler`` under ``torch.distributed``, its epoch set in :meth:`_set_sampler_epoch`). The
        iterator is made by Ignite when the epoch's data is first drawn, after every ``EPOCH_STARTED`` handler
        (and, on resume, after the random state is restored)."""
        loader = self.data_loader
        n = len(loader.dataset)
        subset = Subset(loader.dataset, [self.joint_subset[i % len(self.joint_subset)] for i in range(n)])
        sampler = DistributedSampler(subset, shuffle=True) if get_world_size() > 1 else None
        self.state.dataloader = DataLoader(subset, batch_size=loader.batch_size, shuffle=sampler is None,
                                           sampler=sampler, num_workers=loader.num_workers,
                                           collate_fn=loader.collate_fn, drop_last=loader.drop_last)
        self._dataloader_iter = None

    @staticmethod
    def _set_sampler_epoch(engine: PSSTTrainer) -> None:
        sampler = getattr(engine.state.dataloader, "sampler", None)
        if engine.joint_subset is not None and isinstance(sampler, DistributedSampler):
            sampler.set_epoch(engine.state.epoch)

    # -- resume
    def state_dict(self) -> OrderedDict:
        """Ignite's counters plus ``psst``: the teacher's EMA tensors, ``joint_subset`` and both DINO centres
        (teacher and subset ``None`` before the joint stage)."""
        state = super().state_dict()
        state["psst"] = {
            "teacher": None if self.teacher is None else {n: t.cpu() for n, t in self.teacher.params.items()},
            "joint_subset": self.joint_subset,
            "image_center": self.image_loss.center.cpu(), "patch_center": self.patch_loss.center.cpu()}
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore :meth:`state_dict` (called by ``BundleCheckpointer`` when a run resumes, before the first
        epoch); in the joint stage the subset's loader is set up again and iterated from the next epoch."""
        if "psst" not in state_dict:
            raise ValueError("the resume state holds no PSST state (teacher, subset, DINO centres): it was not "
                             "saved by a PSSTTrainer")
        super().load_state_dict(state_dict)
        psst = state_dict["psst"]
        device = self.state.device
        self.image_loss.center.copy_(psst["image_center"])
        self.patch_loss.center.copy_(psst["patch_center"])
        self.joint_subset = None if psst["joint_subset"] is None else [int(i) for i in psst["joint_subset"]]
        self.teacher = None
        if psst["teacher"] is not None:
            self.teacher = EMATeacher(unwrap_ddp(self.network))
            if set(psst["teacher"]) != set(self.teacher.params):
                raise ValueError("the saved teacher's tensors do not match this network's trainable parameters")
            for name, t in self.teacher.params.items():
                t.copy_(psst["teacher"][name].to(device))
        if self.joint_subset is not None:
            self._use_joint_loader()

    # -- iteration
    def _iteration(self, engine: PSSTTrainer, batchdata) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x1 = as_plain_tensor(batchdata[Keys.IMAGE]).to(engine.state.device)
        net = unwrap_ddp(engine.network)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        b = x1.shape[0]
        mask = net.random_mask(b, engine.mask_ratio, x1.device)
        zero = x1.new_zeros(())
        loss_image = loss_patch = zero
        if not engine.in_joint_stage():
            out = net(x1, mask)
            loss_mae, _ = masked_patch_loss(out.reconstruction, x1, mask, net.unit_pixels)
            loss = loss_mae
        else:
            if engine.view_key not in batchdata:
                raise KeyError(f"The joint PSST stage needs a second view under {engine.view_key!r} in every batch "
                               "(see medpeft_monai.data.transforms.psst_transforms).")
            x2 = as_plain_tensor(batchdata[engine.view_key]).to(x1.device)
            both = torch.cat([x1, x2])
            student = net(both, torch.cat([mask, torch.zeros_like(mask)]))
            teacher = engine.teacher(net, both)
            loss_mae, err = masked_patch_loss(student.reconstruction[:b], x1, mask, net.unit_pixels)
            temp = engine.current_teacher_temp()
            s1, s2 = student.image_logits[:b], student.image_logits[b:]
            t1, t2 = teacher.image_logits[:b], teacher.image_logits[b:]
            loss_image = 0.5 * (engine.image_loss(s2, t1, temp) + engine.image_loss(s1, t2, temp))
            weights = error_weights(err, mask, engine.error_alpha)
            loss_patch = engine.patch_loss(student.patch_logits[:b], teacher.patch_logits[:b], temp, weights)
            loss = engine.mae_weight * loss_mae + loss_image + loss_patch
            engine.image_loss.update_center(teacher.image_logits)
            engine.patch_loss.update_center(teacher.patch_logits[:b])
        engine.state.output = {Keys.IMAGE: x1, Keys.LOSS: loss}
        optimizer_step(engine, loss, net)
        if engine.teacher is not None and engine.in_joint_stage():
            engine.teacher.update(net, engine.current_ema_momentum())
        engine.state.output.update({Keys.LOSS: loss.detach(), "loss_mae": loss_mae.detach(),
                                    "loss_image": loss_image.detach(), "loss_patch": loss_patch.detach()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
