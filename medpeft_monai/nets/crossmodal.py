"""Decoupled cross-modal transfer (seed 001): the stage-1 PSST network and the stage-2 TP-MoME segmenter.

Stage 1 (:class:`PSSTNetwork`, trained by :class:`~medpeft_monai.engines.PSSTTrainer`): a frozen RGB
foundation encoder learns one *modality* (e.g. MRI) without labels into a small LoRA, the adapter
``modality_<name>``; the MAE decoder, the mask token and the DINO heads are training scaffolding and are
not part of the artefact.

Stage 2 (:class:`CrossModalSegmenter`): the modality LoRA is loaded frozen, by name, from its artefact;
trainable window prompts in every block (the network's own adapter ``default``, see
:class:`~medpeft_monai.peft.WindowPromptConfig`), a mixture of modality experts (:class:`MoME`) at each
feature level and the shared :class:`~medpeft_monai.nets.decoders.LevelDecoder` learn the task. Each input
modality (an MRI sequence) runs through the same adapted encoder as a one-channel image; modalities can be
missing per sample, and a missing one contributes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medpeft_monai.backbones import BackboneError, FrozenBackbone, as_plain_tensor
from medpeft_monai.nets.decoders import LevelDecoder
from medpeft_monai.nets.segmenter import default_levels, level_layout
from medpeft_monai.peft import apply_peft, load_peft_state_dict, read_adapter

__all__ = [
    "DEFAULT_MODALITY_LORA",
    "CrossModalOutput",
    "CrossModalSegmenter",
    "DINOHead",
    "MoME",
    "PSSTNetwork",
    "PSSTOutput",
    "modality_adapter_name",
]

#: the paper's modality LoRA: rank 32 on the Q and V projections of every attention ``qkv``
#: (1.33 M parameters on sam2_hiera_base_plus)
DEFAULT_MODALITY_LORA = {"method": "lora", "rank": 32, "alpha": 32.0, "qkv_parts": "qv"}


def modality_adapter_name(modality: str) -> str:
    """The adapter name of a modality LoRA: ``modality_<modality>``."""
    return f"modality_{modality}"


def feature_levels(backbone: FrozenBackbone, levels: Sequence[int] | None) -> list[int]:
    """Block indices feeding the heads: given ones, else the model's stage ends (Hiera), else evenly spaced."""
    n = len(backbone.blocks)
    if levels is None:
        ends = getattr(backbone.model, "stage_ends", None)
        levels = list(ends) if ends else default_levels(n)
    return sorted({int(i) % n for i in levels})


class DINOHead(nn.Module):
    """DINO projection head: MLP ``in -> hidden -> hidden -> bottleneck`` (GELU), L2 normalisation, then a
    weight-normalised linear layer to ``K`` prototypes (``g(z) = W_n (z / ||z||)``)."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int = 256, bottleneck_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


class PSSTOutput(NamedTuple):
    """What :class:`PSSTNetwork` returns.

    Attributes:
        reconstruction: ``(B, in_chans, H, W)`` MAE prediction (per-patch-normalised pixel space).
        image_logits: ``(B, K)`` image-level DINO head output (pooled final tokens).
        patch_logits: ``(B, N, K)`` patch-level DINO head output on the mask-unit grid (raster order).
    """

    reconstruction: torch.Tensor
    image_logits: torch.Tensor
    patch_logits: torch.Tensor


class PSSTNetwork(nn.Module):
    """Stage 1 of the cross-modal method: frozen encoder + modality LoRA + MAE decoder + DINO heads.

    Masking is SimMIM-style: hidden mask units (``mask_unit x mask_unit`` patch tokens) are replaced by a
    learnable mask token after the patch embedding, keeping the token grid (SAM2's HieraDet cannot drop
    tokens). The hidden pixels are also zeroed before the patch embedding, whose kernels overlap their
    neighbours in SAM2 (7x7, stride 4), so no hidden pixel reaches a visible token. The MAE decoder (the
    project's :class:`LevelDecoder`) predicts every pixel, and the loss
    (:func:`~medpeft_monai.losses.masked_patch_loss`) scores the hidden units only.

    Args:
        backbone: timm model name (cross-modal CPU preset ``sam2_hiera_tiny``; paper ``sam2_hiera_base_plus``).
        modality: the modality the LoRA learns; the adapter is ``modality_<modality>``.
        weights, image_size, in_chans, model_kwargs, input_norm: see
            :class:`~medpeft_monai.backbones.FrozenBackbone`.
        lora: the modality LoRA config (default :data:`DEFAULT_MODALITY_LORA`).
        levels: blocks feeding the decoder and the patch head (default: the stage ends).
        mask_unit: side of a mask unit in patch tokens (pixels: ``mask_unit * patch size``).
        decoder_channels: width of the MAE decoder.
        head_dim, head_hidden, head_bottleneck: DINO heads (``K`` prototypes; DINO uses 65536).
    """

    def __init__(self, backbone: str = "sam2_hiera_tiny", modality: str = "mri",
                 weights: str | os.PathLike | None = None, image_size: int | Sequence[int] | None = 64,
                 in_chans: int = 1, lora: Mapping | None = None, levels: Sequence[int] | None = None,
                 mask_unit: int = 2, decoder_channels: int = 64, head_dim: int = 256, head_hidden: int = 256,
                 head_bottleneck: int = 64, model_kwargs: dict | None = None,
                 input_norm: str | Sequence | None = "auto") -> None:
        super().__init__()
        self.backbone = FrozenBackbone(backbone, weights=weights, image_size=image_size, in_chans=in_chans,
                                       model_kwargs=model_kwargs, input_norm=input_norm)
        self.modality, self.adapter_name = str(modality), modality_adapter_name(modality)
        grid = self.backbone.embed_grid
        self.mask_unit = int(mask_unit)
        if self.mask_unit < 1 or grid[0] % self.mask_unit or grid[1] % self.mask_unit:
            raise BackboneError(f"mask_unit={mask_unit} must divide the patch grid {grid} of image_size "
                                f"{self.backbone.image_size}.")
        self.unit_grid = (grid[0] // self.mask_unit, grid[1] // self.mask_unit)
        ph, pw = self.backbone.patch_size
        self.unit_pixels = (ph * self.mask_unit, pw * self.mask_unit)
        self.levels = feature_levels(self.backbone, levels)
        shapes, stride = level_layout(self.backbone, self.levels)
        # the patch-level head reads the level whose grid is closest to the mask-unit grid
        units = self.unit_grid[0] * self.unit_grid[1]
        self.patch_level = min(range(len(shapes)), key=lambda i: abs(shapes[i][1] * shapes[i][2] / units - 1.0))
        with torch.no_grad():  # width of the embedded tokens the mask token replaces
            width = self.backbone.embed(torch.zeros(1, in_chans, *self.backbone.image_size)).shape[-1]
        self.mask_token = nn.Parameter(torch.zeros(width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = LevelDecoder([s[0] for s in shapes], stride, in_chans, decoder_channels)
        self.image_head = DINOHead(self.backbone.num_features, head_dim, head_hidden, head_bottleneck)
        self.patch_head = DINOHead(shapes[self.patch_level][0], head_dim, head_hidden, head_bottleneck)
        apply_peft(self, dict(lora or DEFAULT_MODALITY_LORA), name=self.adapter_name)

    def random_mask(self, batch: int, ratio: float, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, gh, gw)`` boolean mask over the mask-unit grid with ``round(ratio * N)`` hidden units per image."""
        n = self.unit_grid[0] * self.unit_grid[1]
        hidden = min(max(int(round(float(ratio) * n)), 1), n - 1)
        order = torch.rand(batch, n, generator=generator).argsort(1)
        mask = torch.zeros(batch, n, dtype=torch.bool)
        mask.scatter_(1, order[:, :hidden], True)
        return mask.view(batch, *self.unit_grid).to(device)

    def token_mask(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """Mask-unit mask -> the patch-token mask the backbone takes (each unit covers ``mask_unit^2`` tokens)."""
        u = self.mask_unit
        return unit_mask.repeat_interleave(u, dim=1).repeat_interleave(u, dim=2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> PSSTOutput:
        """``x``: ``(B, in_chans, H, W)`` in ``[0, 1]``; ``mask``: optional ``(B, gh, gw)`` unit mask, True = hidden."""
        x = as_plain_tensor(x)
        token_mask = None
        if mask is not None:
            token_mask = self.token_mask(mask.bool())
            ph, pw = self.backbone.patch_size
            hidden = token_mask.repeat_interleave(ph, 1).repeat_interleave(pw, 2)[:, None]
            x = x.masked_fill(hidden, 0.0)  # an overlapping patch embedding (SAM2: 7x7, stride 4) sees no hidden pixel
        out = self.backbone.encode(x, levels=self.levels, mask=token_mask,
                                   mask_token=None if mask is None else self.mask_token)
        recon = self.decoder(out.levels, x.shape[-2:])
        image_logits = self.image_head(self.backbone.pool(out.tokens))
        patches = F.adaptive_avg_pool2d(out.levels[self.patch_level], self.unit_grid).flatten(2).transpose(1, 2)
        return PSSTOutput(recon, image_logits, self.patch_head(patches))


class MoME(nn.Module):
    r"""Mixture of modality experts at one feature level.

    Each modality's features are projected, ``z_m = P_m f_m`` (zero for a missing modality); the anchor is
    their concatenation ``a = [z_1, ..., z_M] * M / M_present``. One general expert ``E_0(a)`` and one expert
    per modality ``E_m(z_m)`` are mixed by a per-pixel gate anchored on ``a``:
    ``y = sum_k beta_k E_k``, ``beta = softmax(G(a))`` with the logits of missing modalities' experts set to
    ``-inf``, so ``beta`` is a distribution over the available experts and a missing modality contributes
    nothing. ``experts=False`` keeps the general expert only (plain concatenation fusion, an ablation).

    Args:
        in_channels: ``C`` of the level.
        num_modalities: ``M``.
        channels: ``D``, width of the projections and experts.
        experts: use the modality experts and the gate.
    """

    def __init__(self, in_channels: int, num_modalities: int, channels: int = 64, experts: bool = True) -> None:
        super().__init__()
        m, d = int(num_modalities), int(channels)
        self.num_modalities = m
        self.project = nn.ModuleList(nn.Conv2d(in_channels, d, 1) for _ in range(m))
        self.general = nn.Sequential(nn.Conv2d(m * d, d, 1), nn.GELU(), nn.Conv2d(d, d, 3, padding=1))
        self.experts = nn.ModuleList(nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GELU(), nn.Conv2d(d, d, 1))
                                     for _ in range(m)) if experts else None
        self.gate = nn.Sequential(nn.Conv2d(m * d, d, 1), nn.GELU(), nn.Conv2d(d, m + 1, 1)) if experts else None

    def forward(self, feats: Sequence[torch.Tensor], present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats``: ``M`` maps ``(B, C, h, w)``; ``present``: ``(B, M)`` boolean. Returns ``(y (B, D, h, w),
        beta (B, M + 1, h, w))`` (``beta`` is all on the general expert without modality experts)."""
        keep = present.to(feats[0].dtype)[:, :, None, None]
        z = [proj(f) * keep[:, i:i + 1] for i, (proj, f) in enumerate(zip(self.project, feats))]
        scale = self.num_modalities / present.sum(1).clamp_min(1).to(feats[0].dtype)
        anchor = torch.cat(z, dim=1) * scale[:, None, None, None]
        general = self.general(anchor)
        if self.experts is None:
            beta = torch.zeros(general.shape[0], self.num_modalities + 1, *general.shape[-2:], dtype=general.dtype,
                               device=general.device)
            beta[:, 0] = 1.0
            return general, beta
        logits = self.gate(anchor)
        missing = torch.cat([torch.zeros_like(present[:, :1]), ~present], dim=1)[:, :, None, None]
        beta = torch.softmax(logits.masked_fill(missing, float("-inf")), dim=1)
        y = beta[:, :1] * general
        for i, expert in enumerate(self.experts):
            y = y + beta[:, i + 1:i + 2] * expert(z[i])
        return y, beta


class CrossModalOutput(NamedTuple):
    """``pred`` ``(B, K, H, W)`` logits, ``gates`` one ``beta`` ``(B, M + 1, h, w)`` per level, ``present``
    ``(B, M)`` the modalities used (after masked-modality sampling in training)."""

    pred: torch.Tensor
    gates: list
    present: torch.Tensor


class CrossModalSegmenter(nn.Module):
    """Stage 2 of the cross-modal method (TP-MoME): multi-modal segmentation on a frozen modality LoRA.

    Args:
        backbone: timm model name (CPU preset ``sam2_hiera_tiny``).
        num_classes: output channels (with background).
        modalities: names of the input channels, in order (e.g. ``["t1", "t2", "flair"]``); each is a
            one-channel image of the modality the LoRA learned.
        modality_lora: ``{modality: artefact path}`` of stage-1 modality LoRAs, each loaded frozen as adapter
            ``modality_<modality>`` (all input channels go through the encoder with these adapters); ``None``
            or ``{}``: no stage 1 (the "stage 2 only" ablation).
        weights, image_size, model_kwargs, input_norm: see :class:`~medpeft_monai.backbones.FrozenBackbone`
            (must be those the modality LoRA was trained with; the artefact's identity is checked).
        levels: blocks fused and decoded (default: the stage ends).
        prompts: the task adapter's (``default``) config (default: window prompts, 4 per block);
            ``"linear_probe"`` for none.
        fusion: ``"mome"`` (general + modality experts + gate) or ``"concat"`` (general expert only).
        mome_channels: ``D`` of the experts.
        decoder_channels: width of the decoder.
        modality_dropout: probability that a training sample loses a random subset of its modalities
            (at least one kept): masked-modality training; 0 disables it.

    Input ``(B, M, H, W)`` in ``[0, 1]``. A modality is missing where ``present[b, m]`` is False, or, when
    ``present`` is not given, where its channel is all zeros (write a missing sequence as a zero channel).
    Output ``(B, num_classes, H, W)`` logits (or :class:`CrossModalOutput` with ``return_outputs=True``).
    The network's own adapter ``default`` (as in every network of the project) owns the prompts, ``mome``
    and ``decoder``: it is what trains and what :class:`~medpeft_monai.handlers.BundleCheckpointer` writes
    (``models/adapter.pt``); the modality LoRAs are separate, frozen adapters.
    """

    def __init__(self, backbone: str = "sam2_hiera_tiny", num_classes: int = 2,
                 modalities: Sequence[str] = ("t1", "t2", "flair"),
                 modality_lora: Mapping[str, str | os.PathLike] | None = None,
                 weights: str | os.PathLike | None = None, image_size: int | Sequence[int] | None = 64,
                 levels: Sequence[int] | None = None, prompts: str | Mapping | None = None, fusion: str = "mome",
                 mome_channels: int = 64, decoder_channels: int = 64, modality_dropout: float = 0.5,
                 model_kwargs: dict | None = None, input_norm: str | Sequence | None = "auto") -> None:
        super().__init__()
        if fusion not in ("mome", "concat"):
            raise ValueError(f"fusion must be 'mome' or 'concat', got {fusion!r}.")
        if not 0.0 <= float(modality_dropout) <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {modality_dropout}.")
        self.modalities = [str(m) for m in modalities]
        if not self.modalities:
            raise ValueError("modalities must name at least one input channel.")
        self.modality_dropout = float(modality_dropout)
        self.backbone = FrozenBackbone(backbone, weights=weights, image_size=image_size, in_chans=1,
                                       model_kwargs=model_kwargs, input_norm=input_norm)
        for modality, path in (modality_lora or {}).items():
            self.load_modality_lora(modality, path)
        self.levels = feature_levels(self.backbone, levels)
        shapes, stride = level_layout(self.backbone, self.levels)
        m = len(self.modalities)
        self.mome = nn.ModuleList(MoME(s[0], m, mome_channels, experts=fusion == "mome") for s in shapes)
        self.decoder = LevelDecoder([mome_channels] * len(shapes), stride, num_classes, decoder_channels)
        task = dict(prompts) if isinstance(prompts, Mapping) else (prompts or {"method": "window_prompt",
                                                                               "num_prompts": 4})
        self.peft_config = apply_peft(self, task, name="default", modules=("mome", "decoder"))

    def load_modality_lora(self, modality: str, path: str | os.PathLike) -> None:
        """Add adapter ``modality_<modality>`` from a stage-1 artefact, frozen (its config comes from the file)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Modality LoRA artefact not found: {path}. Run stage 1 first (bundles/crossmodal_pretrain: "
                "`python -m monai.bundle run --config_file configs/train.json`), or point modality_lora at the "
                "file it wrote (models/modality_lora_<modality>.pt).")
        payload = read_adapter(path)
        name = modality_adapter_name(modality)
        apply_peft(self, payload["method"], name=name, trainable=False)
        load_peft_state_dict(self, payload, name=name)

    def presence(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M)``: a modality is present unless its channel is all zeros."""
        return x.flatten(2).abs().amax(-1) > 0

    def sample_present(self, present: torch.Tensor) -> torch.Tensor:
        """Masked-modality training: with probability ``modality_dropout`` a sample keeps a random non-empty
        subset of its present modalities (each kept with probability 1/2)."""
        b, m = present.shape
        drop = torch.rand(b, device=present.device) < self.modality_dropout
        keep = (torch.rand(b, m, device=present.device) < 0.5) & present
        pick = torch.rand(b, m, device=present.device).masked_fill(~present, -1.0).argmax(1)
        keep[torch.arange(b, device=present.device), pick] |= ~keep.any(1) & present.any(1)
        return torch.where(drop[:, None], keep, present)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None,
                return_outputs: bool = False) -> torch.Tensor | CrossModalOutput:
        x = as_plain_tensor(x)
        m = len(self.modalities)
        if x.ndim != 4 or x.shape[1] != m:
            raise BackboneError(f"CrossModalSegmenter expects (B, {m}, H, W) images with one channel per modality "
                                f"{self.modalities}, got shape {tuple(x.shape)}. Set `modalities` to the channels "
                                "of the images (a missing sequence is an all-zero channel).")
        present = self.presence(x) if present is None else present.to(x.device).bool()
        if self.training and self.modality_dropout > 0:
            present = self.sample_present(present)
        b, _, h, w = x.shape
        out = self.backbone.encode(x.reshape(b * m, 1, h, w), levels=self.levels)
        fused, gates = [], []
        for level, mome in zip(out.levels, self.mome):
            y, beta = mome(level.view(b, m, *level.shape[1:]).unbind(1), present)
            fused.append(y)
            gates.append(beta)
        pred = self.decoder(fused, (h, w))
        return CrossModalOutput(pred, gates, present) if return_outputs else pred
