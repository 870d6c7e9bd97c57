"""MFM-DA (seed 003): target adaptation of a source DDPM, source -> target translation, and the stage-2 step.

Stage 1a trains MONAI's ``DiffusionModelUNet`` on source images with MONAI's own pieces (``SupervisedTrainer``,
``DiffusionInferer``, ``DiffusionPrepareBatch``, ``DDPMScheduler``; epsilon prediction, L1). The rest is here:

* :class:`TargetAdaptationTrainer` (stage 1b): fine-tunes the whole DDPM on the few unlabeled target images
  with the :class:`~medpeft_monai.nets.mfmda.InstanceAwareAdaptor`. Odd iterations: a source batch is noised
  to ``t ~ U[t_lo T, t_hi T)``, the one-step prediction ``x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)``
  is embedded by the frozen encoder ``f`` and pulled to ``f(x_src) + Delta`` (direction consistency,
  ``L_dc = ||f(x0_hat) - (f(x_src) + Delta)||^2 / ||Delta_static||^2``: the paper's squared error, divided by the
  size of the domain gap so that it starts near 1 whatever the encoder's feature scale) and to the target style
  (relative Gram loss against the mean target Gram matrices, :func:`~medpeft_monai.losses.style_loss`), both
  weighted per image by ``w(t) = base^(t / T)``; plus the diffusion loss on a target batch. Even iterations: the
  diffusion loss on a target batch with ``t < t_lo T`` (fine detail).
* :func:`translate` / :func:`translate_datalist`: source -> target by partial noising to ``t0 = strength T``
  and deterministic DDIM denoising; while ``t > guidance_until T`` the low frequencies of the sample
  (``lowpass``: ``factor`` x average-pool down, bilinear up) are replaced by those of the source noised to the
  same step (ILVR-style low-pass guidance), so anatomy and labels stay put while appearance changes. The
  final DDIM sample (``t = 0``) is kept (the authors' code keeps a middle step's ``x0`` prediction).
* :class:`AlignedPairStep` (stage 2): the ``iteration_update`` of MONAI's ``SupervisedTrainer`` for
  (translation, source, label) batches: ``L = BCE(both images) + align_weight * L_align`` with the pyramid
  alignment between the encoder levels of each source image and its translation
  (:func:`~medpeft_monai.losses.pyramid_alignment_loss`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medpeft_monai.backbones import as_plain_tensor
from medpeft_monai.distributed import get_rank, unwrap_ddp
from medpeft_monai.engines.step import optimizer_step
from medpeft_monai.losses import gram_matrix, pyramid_alignment_loss, style_loss

__all__ = ["AlignedPairStep", "StageSaver", "TargetAdaptationTrainer", "load_stage", "lowpass", "predict_x0",
           "save_stage", "translate", "translate_datalist"]

logger = logging.getLogger(__name__)



def save_stage(path: str | os.PathLike, **modules: nn.Module) -> str:
    """Write a stage-1 artefact atomically: ``{name: state_dict}`` of the given modules (DDP unwrapped); only
    process 0 writes under ``torchrun``. Returns ``path``."""
    from medpeft_monai.peft import save_atomic

    if get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_atomic({k: unwrap_ddp(m).state_dict() for k, m in modules.items()}, path)
        logger.info(f"saved {sorted(modules)} to {path}")
    return os.fspath(path)


class StageSaver:
    """Ignite handler: :func:`save_stage` of ``modules`` to ``path`` when the engine completes (attach it before
    the MLflow logger that uploads the file). Nothing is written when training fails."""

    def __init__(self, path: str | os.PathLike, modules: Mapping[str, nn.Module]) -> None:
        self.path, self.modules = path, dict(modules)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, lambda _: save_stage(self.path, **self.modules))


def load_stage(path: str | os.PathLike, fix: str, **modules: nn.Module) -> dict[str, nn.Module]:
    """Load a :func:`save_stage` artefact into ``modules`` (by name), strictly, and return them; a missing file or
    one written for another architecture is an error naming the file and ``fix`` (the stage or option to run).

    Bundle configs build their network through it (``"network": "$...load_stage(path, fix, unet=...)['unet']"``),
    so the weights are part of the network's definition, not of an ``initialize`` list a command line may replace.
    """
    from medpeft_monai.utils import require_file

    state = torch.load(require_file(path, fix), map_location="cpu", weights_only=True)
    for name, module in modules.items():
        if not isinstance(state, dict) or name not in state:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} holds no {name!r} weights (found {found}). Fix: {fix}.")
        try:
            unwrap_ddp(module).load_state_dict(state[name])
        except RuntimeError as err:
            raise ValueError(f"{path} was written for another {name} architecture than this config builds "
                             f"({str(err).splitlines()[0]} ...). Fix: use the same network settings as the run that "
                             f"wrote it, or {fix}.") from err
    return modules


def predict_x0(scheduler, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One-step clean-image estimate ``x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, clamped to ``[-1, 1]``."""
    a = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.ndim - 1)))
    return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)


def lowpass(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Low frequencies of ``x``: ``factor`` x average-pool down, bilinear back up."""
    small = F.avg_pool2d(x, int(factor))
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


class TargetAdaptationTrainer(SupervisedTrainer):
    """Stage 1b of MFM-DA (see the module docstring). Batches of ``train_data_loader`` hold source ``image``
    in ``[-1, 1]``; ``target_images`` are the few unlabeled target images, ``(N, C, H, W)`` in ``[-1, 1]``.

    Args:
        device, max_epochs, train_data_loader, network, optimizer: as for MONAI's ``SupervisedTrainer``
            (``network``: the source DDPM's ``DiffusionModelUNet``; ``optimizer`` over it and the adaptor).
        scheduler: the DDPM noise scheduler of stage 1a (its ``alphas_cumprod``, ``add_noise``).
        encoder: the frozen :class:`~medpeft_monai.nets.mfmda.FrozenImageEncoder` ``f``.
        adaptor: the :class:`~medpeft_monai.nets.mfmda.InstanceAwareAdaptor`; its static direction is set from
            ``f`` of the source loader's images and of ``target_images`` when training starts (unless set).
        target_images: the unlabeled target images.
        target_batch_size: target images per step (drawn at random, with replacement across steps).
        consistency_weight, style_weight, diffusion_weight: weights of ``L_dc``, ``L_style`` and the diffusion loss.
        consistency_t: ``(t_lo, t_hi)`` as fractions of ``T`` for the consistency steps; even steps use ``t < t_lo T``.
        time_weight_base: ``base`` of the per-image time weight ``base^(t / T)`` (20 in the authors' code).
        kwargs: further ``SupervisedTrainer`` arguments (``train_handlers``, ``loss_function``: the diffusion
            loss, default L1).
    """

    def __init__(self, device, max_epochs: int, train_data_loader, network: nn.Module, optimizer, scheduler,
                 encoder: nn.Module, adaptor: nn.Module, target_images: torch.Tensor, target_batch_size: int = 4,
                 consistency_weight: float = 1.0, style_weight: float = 1.0, diffusion_weight: float = 1.0,
                 consistency_t: Sequence[float] = (0.3, 0.8), time_weight_base: float = 20.0, **kwargs) -> None:
        t_lo, t_hi = (float(v) for v in consistency_t)
        if not 0.0 < t_lo < t_hi <= 1.0:
            raise ValueError(f"consistency_t must be (t_lo, t_hi) with 0 < t_lo < t_hi <= 1, got {consistency_t}.")
        target_images = as_plain_tensor(torch.as_tensor(target_images)).float()
        if target_images.ndim != 4 or len(target_images) == 0:
            raise ValueError(f"target_images must be a non-empty (N, C, H, W) batch, got {tuple(target_images.shape)}.")
        kwargs.setdefault("loss_function", nn.L1Loss())
        kwargs.setdefault("decollate", False)  # the output is the step's losses, not per-image predictions
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, **kwargs)
        self.scheduler, self.encoder, self.adaptor = scheduler, encoder.to(device), adaptor.to(device)
        self.target_images = target_images.to(device)
        self.target_batch_size = int(target_batch_size)
        self.consistency_weight, self.style_weight = float(consistency_weight), float(style_weight)
        self.diffusion_weight, self.consistency_t = float(diffusion_weight), (t_lo, t_hi)
        self.time_weight_base = float(time_weight_base)
        self.target_grams: list[torch.Tensor] = []
        self.add_event_handler(Events.STARTED, self._measure_domains)

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.num_train_timesteps)

    @torch.no_grad()
    def _embed_all(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        embs, grams = [], None
        for chunk in images.split(16):
            emb, levels = self.encoder(chunk)
            embs.append(emb)
            g = [gram_matrix(f).sum(0) for f in levels]
            grams = g if grams is None else [a + b for a, b in zip(grams, g)]
        return torch.cat(embs), [g / len(images) for g in grams]

    def _measure_domains(self, engine: TargetAdaptationTrainer) -> None:
        """``Delta_static``/``mu_target`` from ``f`` of every source and target image; the mean target Gram matrices."""
        target_emb, engine.target_grams = engine._embed_all(engine.target_images)
        if bool(engine.adaptor.initialised):
            return
        source = [as_plain_tensor(b[Keys.IMAGE]).to(engine.state.device) for b in engine.data_loader]
        source_emb, _ = engine._embed_all(torch.cat(source))
        engine.adaptor.set_directions(source_emb, target_emb)
        logger.info(f"MFM-DA adaptation: {len(source_emb)} source and {len(target_emb)} target images; "
                    f"|Delta_static| = {engine.adaptor.static_direction.norm():.4f}.")

    def _diffusion_loss(self, x0: torch.Tensor, t_max: int) -> torch.Tensor:
        noise = torch.randn_like(x0)
        t = torch.randint(0, t_max, (x0.shape[0],), device=x0.device).long()
        return self.loss_function(self.network(self.scheduler.add_noise(x0, noise, t), t), noise)

    def _iteration(self, engine: TargetAdaptationTrainer, batchdata) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x_src = as_plain_tensor(batchdata[Keys.IMAGE]).to(engine.state.device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        pick = torch.randint(0, len(engine.target_images), (engine.target_batch_size,), device=x_src.device)
        x_tgt = engine.target_images[pick]
        n_t = engine.num_timesteps
        t_lo, t_hi = (int(round(v * n_t)) for v in engine.consistency_t)
        zero = x_src.new_zeros(())
        loss_dc = loss_style = zero
        if engine.state.iteration % 2 == 1:  # consistency step
            noise = torch.randn_like(x_src)
            t = torch.randint(t_lo, t_hi, (x_src.shape[0],), device=x_src.device).long()
            x_t = engine.scheduler.add_noise(x_src, noise, t)
            x0_hat = predict_x0(engine.scheduler, x_t, engine.network(x_t, t), t)
            with torch.no_grad():
                f_src, _ = engine.encoder(x_src)
            f_hat, levels = engine.encoder(x0_hat)
            delta = engine.adaptor(f_src)
            weight = engine.time_weight_base ** (t.float() / n_t)
            scale = (engine.adaptor.static_direction ** 2).sum().clamp_min(1e-12)
            per_dc = ((f_hat - (f_src + delta)) ** 2).sum(1) / scale
            per_style = style_loss(levels, engine.target_grams)
            loss_dc, loss_style = (weight * per_dc).mean(), (weight * per_style).mean()
            loss_diff = engine._diffusion_loss(x_tgt, n_t)
        else:  # fine-detail step
            loss_diff = engine._diffusion_loss(x_tgt, max(t_lo, 1))
        loss = (engine.consistency_weight * loss_dc + engine.style_weight * loss_style
                + engine.diffusion_weight * loss_diff)
        engine.state.output = {Keys.IMAGE: x_src, Keys.LOSS: loss}
        optimizer_step(engine, loss, engine.network)
        engine.state.output.update({Keys.LOSS: loss.detach(), "loss_consistency": loss_dc.detach(),
                                    "loss_style": loss_style.detach(), "loss_diffusion": loss_diff.detach()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


@torch.no_grad()
def translate(network: nn.Module, scheduler, source: torch.Tensor, strength: float = 0.6, guidance_until: float = 0.4,
              lowpass_factor: int = 8, num_inference_steps: int = 40, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Source -> target translation (module docstring): ``(B, C, H, W)`` in ``[-1, 1]`` to the same.

    Args:
        network: the (adapted) DDPM ``DiffusionModelUNet``.
        scheduler: a MONAI ``DDIMScheduler`` with the DDPM's noise schedule; ``set_timesteps`` is called here.
        source: source images in ``[-1, 1]``.
        strength: ``t0 / T``, how far the source is noised (0.6 in the paper).
        guidance_until: low-pass guidance runs while ``t > guidance_until * T`` (0: every step; >= strength: none).
        lowpass_factor: down-sampling factor of the low-pass filter (8 in the paper).
        num_inference_steps: DDIM steps over the full schedule; those at or below ``t0`` run.
        generator: random generator for the noise (reproducible translations).
    """
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}.")
    h, w = source.shape[-2:]
    if h % int(lowpass_factor) or w % int(lowpass_factor):
        raise ValueError(f"Image size {(h, w)} must be divisible by lowpass_factor={lowpass_factor}.")
    network.eval()
    n_train = int(scheduler.num_train_timesteps)
    scheduler.set_timesteps(int(num_inference_steps), device=source.device)
    steps = [int(t) for t in scheduler.timesteps if int(t) <= strength * n_train]
    if not steps:
        raise ValueError(f"No DDIM step at or below t0 = {strength} T; raise num_inference_steps or strength.")
    stride = n_train // int(num_inference_steps)

    def noised(t: int) -> torch.Tensor:
        noise = torch.randn(source.shape, generator=generator, device="cpu").to(source)
        return scheduler.add_noise(source, noise, torch.full((len(source),), t, device=source.device).long())

    x = noised(steps[0])
    for t in steps:
        eps = network(x, torch.full((len(x),), t, device=x.device).long())
        x, _ = scheduler.step(eps, t, x)
        t_prev = t - stride
        if t_prev > guidance_until * n_train:
            x = x - lowpass(x, lowpass_factor) + lowpass(noised(t_prev), lowpass_factor)
    return x.clamp(-1, 1)


def translate_datalist(network: nn.Module, scheduler, datalist: str | os.PathLike, sections: Sequence[str],
                       transform: Callable, out_dir: str | os.PathLike, device: torch.device | str = "cpu",
                       batch_size: int = 8, seed: int = 0, image_key: str = "image", source_key: str = "source",
                       **translate_kwargs) -> str:
    """Translate the 2-D images of the datalist's ``sections`` and write ``out_dir/datalist.json``.

    ``transform`` loads an item to a ``[-1, 1]`` image of the DDPM's size (MONAI metadata kept). Each translation
    is resized back to its source's grid (so the source's label fits it) and written atomically as PNG,
    ``out_dir/images/<section>_NNN.png``, in the source file's orientation. The new datalist (written last,
    atomically) keeps every entry's keys (``label``, ...) with ``image`` = the translation and ``source_key`` = the
    source image. ``translate_kwargs`` go to :func:`translate`. Returns the datalist path.
    """
    from PIL import Image

    from medpeft_monai.data import load_datalist, write_datalist
    from medpeft_monai.utils import atomic_path

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(int(seed))
    result: dict[str, list] = {}
    for section in sections:
        items, result[section] = load_datalist(datalist, section), []
        for start in range(0, len(items), int(batch_size)):
            chunk = items[start:start + int(batch_size)]
            loaded = [transform(dict(it))[image_key] for it in chunk]
            x = torch.stack([as_plain_tensor(v) for v in loaded]).to(device)
            y = translate(network, scheduler, x, generator=generator, **translate_kwargs).cpu()
            for k, (item, img, src) in enumerate(zip(chunk, y, loaded)):
                native = tuple(int(v) for v in np.asarray(src.meta.get("spatial_shape", img.shape[1:])).ravel()[:2])
                if native != tuple(img.shape[1:]):
                    img = F.interpolate(img[None], size=native, mode="bilinear", align_corners=False)[0]
                path = (out / "images" / f"{section}_{start + k:03d}.png").absolute()
                # MONAI reads PNG as (C, W, H): back to the file's (H, W, C)
                arr = ((img.permute(2, 1, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                with atomic_path(path) as tmp:
                    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(tmp, format="PNG")
                result[section].append({**item, image_key: str(path), source_key: item[image_key]})
            logger.info(f"translated {min(start + len(chunk), len(items))}/{len(items)} {section} images")
    return write_datalist(out / "datalist.json", result)


class AlignedPairStep:
    """Stage-2 ``iteration_update`` for MONAI's ``SupervisedTrainer``:
    ``L = loss_fn([y_trans; y_src], [label; label]) + align_weight * L_align(levels(x_src), levels(x_trans))``.

    The batch holds the translation under ``image``, its source under ``source_key`` and the shared ``label``.
    Both images pass the network once, concatenated; ``align_weight = 0`` or a batch without ``source_key``
    (e.g. source-only training) is the plain supervised step. The network is a
    :class:`~medpeft_monai.nets.PeftSegmenter` (``encode_2d`` gives the logits and the encoder levels), optionally
    DDP-wrapped (the unwrapped module runs and the gradients are averaged across processes).
    """

    def __init__(self, align_weight: float = 1.0, source_key: str = "source") -> None:
        if float(align_weight) < 0:
            raise ValueError(f"align_weight must be >= 0, got {align_weight}.")
        self.align_weight, self.source_key = float(align_weight), source_key

    def __call__(self, engine: SupervisedTrainer, batchdata) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = engine.state.device
        x = as_plain_tensor(batchdata[Keys.IMAGE]).to(device)
        y = as_plain_tensor(batchdata[Keys.LABEL]).to(device)
        paired = self.source_key in batchdata
        net = unwrap_ddp(engine.network)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        b = x.shape[0]
        inputs = torch.cat([x, as_plain_tensor(batchdata[self.source_key]).to(device)]) if paired else x
        logits, out = net.encode_2d(inputs)
        labels = torch.cat([y, y]) if paired else y
        loss_task = engine.loss_function(logits, labels)
        loss_align = x.new_zeros(())
        if paired and self.align_weight > 0:
            loss_align = pyramid_alignment_loss([f[b:] for f in out.levels], [f[:b] for f in out.levels])
        loss = loss_task + self.align_weight * loss_align
        engine.state.output = {Keys.IMAGE: x, Keys.LABEL: y, Keys.PRED: logits[:b], Keys.LOSS: loss}
        optimizer_step(engine, loss, net)
        engine.state.output.update({Keys.LOSS: loss.detach(), "loss_task": loss_task.detach(),
                                    "loss_align": loss_align.detach()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
