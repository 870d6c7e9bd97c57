"""Effective receptive field (ERF) of a frozen, PEFT-adapted backbone.

Following Luo et al. (2016) and Araujo et al. (2019), as used by the DKA paper: the ERF of an output
unit is the magnitude of the gradient of that unit with respect to the input pixels. Here the unit is
the central spatial location of the last block's feature map (``FrozenBackbone.forward_levels(x, [-1])``,
i.e. the central patch token of a ViT or the central location of a Swin/Hiera stage), summed over
channels::

    ERF(u, v) = mean_over_images( sum_over_channels | d f_centre(x) / d x[c, u, v] | )

normalised so that its maximum is 1. Two area figures summarise it:

* :func:`erf_area` ``(map, t)``: fraction of pixels whose normalised contribution exceeds ``t``;
* :func:`erf_coverage` ``(map, t)``: RepLKNet's "high-contribution area ratio", the area (as a fraction of
  the image) of the smallest square centred on the unit that holds ``t`` of the total contribution.

Command line::

    python -m medpeft_monai.erf --backbone vit_base_patch16_224 --weights hub \\
        --peft '{"method": "dka"}' --adapter runs/dka/adapter.pt --images my_pngs/ --out erf.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medpeft_monai.backbones import FrozenBackbone
from medpeft_monai.peft.core import PeftError, adapter_parameters, find_backbone, load_peft_state_dict
from medpeft_monai.utils import atomic_path, write_text_atomic

__all__ = [
    "effective_receptive_field",
    "erf_area",
    "erf_coverage",
    "erf_summary",
    "load_images",
    "sample_image_paths",
    "save_erf_png",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Real images that ship inside scikit-image (no download): fundus, histology, microscopy, photographs.
SAMPLE_IMAGES = ("retina.jpg", "ihc.png", "microaneurysms.png", "cell.png", "camera.png", "astronaut.png",
                 "chelsea.png", "coffee.png", "moon.png", "coins.png", "rocket.jpg", "hubble_deep_field.jpg")


def _unit_centre(feature_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[float, float]:
    """Pixel coordinates (row, col) of the centre of the central feature location."""
    (h, w), (ih, iw) = feature_hw, image_hw
    return (h // 2 + 0.5) * ih / h - 0.5, (w // 2 + 0.5) * iw / w - 0.5


def effective_receptive_field(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor],
                              batch_size: int = 8, layer: int = -1, normalise: bool = True,
                              return_centre: bool = False):
    """ERF map ``(H, W)`` of the central unit of block ``layer`` (see the module docstring).

    Args:
        model: a network containing a :class:`~medpeft_monai.backbones.FrozenBackbone` (or the backbone).
        images: ``(N, C, H, W)`` tensor, or an iterable of such batches, already preprocessed.
        batch_size: images per backward pass when ``images`` is one tensor.
        layer: block index whose output holds the unit (default: the last block).
        normalise: divide by the maximum (the map then lies in ``[0, 1]``).
        return_centre: also return the ``(row, col)`` pixel centre of the analysed unit (for an even
            feature map the central location ``(h // 2, w // 2)`` lies half a unit below/right of the
            image centre).

    Returns:
        the ``(H, W)`` float64 map, or ``(map, centre)`` with ``return_centre``.

    The model runs in eval mode (restored afterwards); parameters get no gradients.
    """
    backbone = find_backbone(model)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}.")
        batches: Iterable[torch.Tensor] = images.split(batch_size)
    else:
        batches = images
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    total, count = None, 0
    try:
        for x in batches:
            x = x.detach().to(device=device, dtype=torch.float32).requires_grad_(True)
            feats = backbone.forward_levels(x, [layer])[0]
            h, w = feats.shape[-2:]
            unit = feats[:, :, h // 2, w // 2].sum()
            (grad,) = torch.autograd.grad(unit, x)
            contrib = grad.abs().sum(dim=1).sum(dim=0).detach()
            total = contrib if total is None else total + contrib
            count += x.shape[0]
    finally:
        backbone.train(was_training)
    if total is None:
        raise ValueError("No images were given.")
    erf = (total / count).cpu().double()
    if normalise:
        erf = erf / erf.max().clamp_min(torch.finfo(erf.dtype).tiny)
    if return_centre:
        return erf, _unit_centre((int(h), int(w)), tuple(erf.shape))
    return erf


def erf_area(erf: torch.Tensor, threshold: float = 0.2) -> float:
    """Fraction of pixels whose contribution, relative to the maximum, is above ``threshold``."""
    m = torch.as_tensor(erf, dtype=torch.float64)
    m = m / m.max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((m > threshold).double().mean())


def erf_coverage(erf: torch.Tensor, fraction: float = 0.5, centre: tuple[float, float] | None = None) -> float:
    """Area ratio of the smallest centred square holding ``fraction`` of the total contribution.

    Args:
        erf: the map ``(H, W)``.
        fraction: share of the total contribution to cover (RepLKNet reports 0.2, 0.3, 0.5, 0.99).
        centre: ``(row, col)`` of the square's centre in pixels (e.g. from
            ``effective_receptive_field(..., return_centre=True)``); default: the image centre.
    """
    m = torch.as_tensor(erf, dtype=torch.float64)
    hh, ww = m.shape
    if centre is None:
        centre = ((hh - 1) / 2, (ww - 1) / 2)
    rows = torch.arange(hh, dtype=torch.float64).view(-1, 1)
    cols = torch.arange(ww, dtype=torch.float64).view(1, -1)
    dist = torch.maximum((rows - centre[0]).abs(), (cols - centre[1]).abs()).flatten()  # Chebyshev radius
    order = torch.argsort(dist, stable=True)
    d_sorted, mass = dist[order], m.flatten()[order]
    cum = torch.cumsum(mass, 0) / mass.sum().clamp_min(torch.finfo(torch.float64).tiny)
    k = int(torch.searchsorted(cum, torch.tensor([float(fraction)], dtype=torch.float64)).clamp_max(len(cum) - 1))
    radius = d_sorted[k]
    return float((dist <= radius).double().mean())


def erf_summary(erf: torch.Tensor, thresholds: Sequence[float] = (0.2, 0.3, 0.5),
                fractions: Sequence[float] = (0.2, 0.3, 0.5, 0.99),
                centre: tuple[float, float] | None = None) -> dict[str, float]:
    """Both area figures at several levels, e.g. ``{"area>0.2": ..., "cover0.5": ...}``."""
    out = {f"area>{t:g}": erf_area(erf, t) for t in thresholds}
    out.update({f"cover{f:g}": erf_coverage(erf, f, centre) for f in fractions})
    return out


def save_erf_png(erf: torch.Tensor, path: str | os.PathLike, title: str | None = None, log_scale: bool = False,
                 dpi: int = 120) -> str:
    """Write the map as a heat-map PNG (matplotlib's Agg canvas, written atomically). Returns the path.

    ``log_scale`` shows ``log10(1 + 1000 * erf)`` to make faint far contributions visible.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = torch.as_tensor(erf, dtype=torch.float64).cpu().numpy()
    m = m / max(float(m.max()), np.finfo(np.float64).tiny)
    if log_scale:
        m = np.log10(1.0 + 1000.0 * m) / 3.0
    fig = Figure(figsize=(4.2, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="RdYlGn", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


# ------------------------------------------------------------------------------------------ images
def sample_image_paths() -> list[Path]:
    """Real images shipped inside scikit-image (fundus, IHC, microscopy, photographs): no download."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [folder / n for n in SAMPLE_IMAGES if (folder / n).is_file()]


def load_images(paths: Sequence[str | os.PathLike], image_size: tuple[int, int], in_chans: int = 3,
                mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                ) -> torch.Tensor:
    """Read images, resize to ``image_size`` and normalise with ``mean`` / ``std``: ``(N, in_chans, H, W)``."""
    from PIL import Image

    if in_chans not in (1, 3):
        raise ValueError(f"load_images reads grey (1) or RGB (3) images, not in_chans={in_chans}.")
    mean_t = torch.tensor(list(mean), dtype=torch.float32)
    std_t = torch.tensor(list(std), dtype=torch.float32)
    if in_chans == 1:
        mean_t, std_t = mean_t.mean().view(1), std_t.mean().view(1)
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("L" if in_chans == 1 else "RGB").resize((image_size[1], image_size[0]),
                                                                    Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        t = torch.from_numpy(arr.copy())
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        out.append((t - mean_t.view(-1, 1, 1)) / std_t.view(-1, 1, 1))
    if not out:
        raise ValueError("No images to load.")
    return torch.stack(out)


def _image_paths(folder: str | None, limit: int) -> list[Path]:
    if folder is None:
        paths = sample_image_paths()
    else:
        root = Path(folder)
        if not root.is_dir():
            raise SystemExit(f"--images {folder}: not a folder.")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise SystemExit(f"--images {folder}: no {', '.join(IMAGE_SUFFIXES)} files found.")
    return paths[:limit]


# ------------------------------------------------------------------------------------------ CLI
def _load_backbone_adapter(backbone: FrozenBackbone, payload: dict, source: str) -> None:
    """Load the backbone part of an adapter artefact saved from a whole network (classifier, segmenter)."""
    mine = list(adapter_parameters(backbone))
    state = payload.get("state_dict", {})
    prefixes = {k[: -len(mine[0])] for k in state if k.endswith(mine[0])} if mine else {""}
    for prefix in sorted(prefixes, key=len):
        if all(prefix + n in state for n in mine):
            sub = dict(payload, state_dict={n: state[prefix + n] for n in mine})
            load_peft_state_dict(backbone, sub)
            return
    raise PeftError(f"{source} holds no adapter weights for this backbone (looked for e.g. {mine[:2]}).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medpeft_monai.erf",
        description="Effective receptive field of the central unit of a (PEFT-adapted) frozen backbone: "
                    "writes a heat-map PNG and prints area figures.")
    p.add_argument("--backbone", help="timm model name (default: the one stored in --adapter)")
    p.add_argument("--weights", default=None, help="backbone weights: none (default), hub or a local file")
    p.add_argument("--peft", default=None,
                   help='PEFT method name or JSON, e.g. \'{"method": "dka", "hidden": 16}\' '
                        "(default: the config stored in --adapter, else linear_probe)")
    p.add_argument("--adapter", default=None, help="adapter artefact saved with peft_state_dict (.pt)")
    p.add_argument("--images", default=None,
                   help="folder of images (png/jpg/tif); default: real sample images shipped with scikit-image")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--image-size", type=int, nargs="+", default=None, help="side or H W (default: backbone's)")
    p.add_argument("--in-chans", type=int, default=None, help="1 or 3 (default: --adapter's, else 3)")
    p.add_argument("--model-kwargs", default=None, help='JSON for timm.create_model, e.g. \'{"depth": 4}\'')
    p.add_argument("--layer", type=int, default=-1, help="block whose central unit is analysed (default: last)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.3, 0.5, 0.99])
    p.add_argument("--log-scale", action="store_true", help="plot log10(1 + 1000 ERF)")
    p.add_argument("--out", default="erf.png", help="PNG to write")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import medpeft_monai.peft.dka  # noqa: F401  (registers "dka" until the package imports it)
    from medpeft_monai.peft import apply_peft  # registers every packaged method

    payload = None
    if args.adapter:
        if not os.path.isfile(args.adapter):
            raise SystemExit(f"--adapter {args.adapter}: file not found.")
        payload = torch.load(args.adapter, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "state_dict" not in payload:
            raise SystemExit(f"--adapter {args.adapter} is not an adapter artefact (peft_state_dict).")
    name = args.backbone or (payload or {}).get("backbone")
    if not name:
        raise SystemExit("Give --backbone (or an --adapter file that names it).")
    if args.peft is not None:
        peft = json.loads(args.peft) if args.peft.lstrip().startswith("{") else args.peft
    else:
        peft = (payload or {}).get("method", "linear_probe")
    in_chans = args.in_chans or int((payload or {}).get("in_chans", 3))
    size = None
    if args.image_size:
        size = tuple(args.image_size) if len(args.image_size) == 2 else (args.image_size[0],) * 2
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    backbone = FrozenBackbone(name, weights=args.weights, image_size=size, in_chans=in_chans, model_kwargs=kwargs)
    try:
        config = apply_peft(backbone, peft)
        if payload is not None:
            _load_backbone_adapter(backbone, payload, args.adapter)
    except PeftError as err:
        raise SystemExit(f"error: {err}") from err
    backbone.to(args.device)
    cfg = getattr(backbone.model, "pretrained_cfg", {}) or {}
    paths = _image_paths(args.images, args.num_images)
    images = load_images(paths, backbone.image_size, in_chans, cfg.get("mean", (0.485, 0.456, 0.406)),
                         cfg.get("std", (0.229, 0.224, 0.225)))
    erf, centre = effective_receptive_field(backbone, images, batch_size=args.batch_size, layer=args.layer,
                                            return_centre=True)
    figures = erf_summary(erf, args.thresholds, args.fractions, centre)
    method = config.method
    save_erf_png(erf, args.out, title=f"ERF {name} + {method} ({len(paths)} images)", log_scale=args.log_scale)
    result = {"backbone": name, "method": method, "images": len(paths), "image_size": list(backbone.image_size),
              "layer": args.layer, "png": os.path.abspath(args.out), **figures}
    for k, v in figures.items():
        print(f"{k:>12}: {v:.4f}")
    print(f"wrote {args.out}")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
