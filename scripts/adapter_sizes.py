"""Adapter artefact (``models/adapter.pt``) against the full checkpoint (``models/model.pt``), per bundle variant.

For every bundle variant (``bundles/<name>/configs/inference<suffix>.json``, named ``<name><suffix>``; see
``medpeft_monai.utils.BundleVariant``) the script builds ``network_def``
(with optional overrides), serialises the two files exactly as training writes them
(``torch.save`` of ``medpeft_monai.peft.peft_state_dict(net)`` for the adapter, of ``net.state_dict()``
for the full model) and reports their sizes and trainable / total parameter counts. Weights do not change
sizes, so no training or download is needed (backbones are built with random weights unless a
bundle names a local file). Files a training run has already written under ``models/`` are listed too.

Examples::

    python scripts/adapter_sizes.py                                       # bundle presets
    python scripts/adapter_sizes.py --set backbone='"vit_base_patch16_224"' --set image_size='[224, 224]'
    python scripts/adapter_sizes.py --out BENCHMARKS_adapters.md          # both tables + the commands
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import traceback
from pathlib import Path

import torch

from medpeft_monai.utils import bundle_folders, bundle_variants, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
PAPER_SCALE = {"backbone": "vit_base_patch16_224", "image_size": [224, 224], "backbone_kwargs": {}}


def _bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def measure(config: Path, overrides: dict) -> dict:
    from monai.bundle import ConfigParser

    from medpeft_monai.peft import count_parameters, find_backbone, peft_state_dict

    parser = ConfigParser()
    parser.read_config(str(config))
    for key, value in overrides.items():
        if key not in parser:
            raise KeyError(f"{config.name} has no config key {key!r} to override")
        parser[key] = value
    net = parser.get_parsed_content("network_def", lazy=False)
    backbone = find_backbone(net)
    trainable, total = count_parameters(net)
    adapter, full = _bytes(peft_state_dict(net)), _bytes(net.state_dict())
    return {"backbone": backbone.name, "image_size": list(backbone.image_size),
            "method": net.peft_config.method, "trainable": trainable, "total": total,
            "adapter_bytes": adapter, "model_bytes": full}


def table(overrides: dict, bundles_dir: Path) -> tuple[str, list[dict]]:
    rows, lines = [], [
        "| bundle variant | backbone @ size | method | trainable / total params | adapter.pt | model.pt "
        "| adapter / model |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for bundle in bundle_folders(bundles_dir):
        for variant in bundle_variants(bundle):
            task = variant.name
            try:
                r = measure(variant.config("inference"), overrides)
            except Exception as err:  # report and go on: one bundle's override may not apply
                traceback.print_exc(file=sys.stderr)
                lines.append(f"| {task} | n/a: {type(err).__name__}: {str(err)[:80]} | | | | | |")
                continue
            r["task"] = task
            rows.append(r)
            size = "x".join(str(s) for s in r["image_size"])
            lines.append(
                f"| {task} | {r['backbone']} @ {size} | {r['method']} | {r['trainable']:,} / {r['total']:,} "
                f"({100 * r['trainable'] / r['total']:.1f}%) | {_human(r['adapter_bytes'])} | "
                f"{_human(r['model_bytes'])} | {100 * r['adapter_bytes'] / r['model_bytes']:.1f}% |")
    return "\n".join(lines), rows


def trained_files(bundles_dir: Path) -> str:
    lines = []
    for bundle in bundle_folders(bundles_dir):
        for variant in bundle_variants(bundle):
            adapter, model = variant.adapter_file, variant.model_file
            if adapter.is_file() and model.is_file():
                a, m = adapter.stat().st_size, model.stat().st_size
                lines.append(f"| {variant.name} | {_human(a)} | {_human(m)} | {100 * a / m:.1f}% |")
    if not lines:
        return ""
    return "\n".join(["| bundle variant (files written by training) | adapter.pt | model.pt | adapter / model |",
                      "|---|---:|---:|---:|", *lines])


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key or not _:
            raise SystemExit(f"--set expects KEY=JSON, got {item!r}")
        out[key] = json.loads(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a config key for every bundle, e.g. image_size='[224, 224]'")
    parser.add_argument("--bundles", type=Path, default=ROOT / "bundles")
    parser.add_argument("--out", type=Path, help="write a markdown report (bundle presets and paper scale)")
    args = parser.parse_args(argv)

    if args.out is None:
        print(table(parse_sets(args.set), args.bundles)[0])
        return
    preset, _ = table({}, args.bundles)
    paper, _ = table(PAPER_SCALE, args.bundles)
    trained = trained_files(args.bundles)
    paper_args = " ".join(f"--set {k}='{json.dumps(v)}'" for k, v in PAPER_SCALE.items())
    text = f"""## Adapter artefacts against full checkpoints

Command (from the repository root; no training, no download):

```
python scripts/adapter_sizes.py --out {args.out.as_posix()}
```

`adapter.pt` is the adapter artefact `medpeft_monai.handlers.BundleCheckpointer` writes (trainable PEFT + head
tensors, backbone name, PEFT config); `model.pt` is the full `network_def` state dict it writes beside it. Sizes are
of `torch.save` output, float32, measured in one run (torch {torch.__version__}, {platform.python_implementation()}
{platform.python_version()}). Weights do not change sizes, so random backbones stand in for pretrained ones.

### Bundle presets (what the bundles train by default on a CPU)

{preset}

### Paper scale: ViT-B/16 at 224 px

Same bundles with `{paper_args}` (the table alone: `python scripts/adapter_sizes.py {paper_args}`).

{paper}
"""
    if trained:
        text += f"\n### Files written by training runs in this checkout\n\n{trained}\n"
    text += """
Per task only the adapter needs to be stored and shared; the frozen backbone is rebuilt from its name
and weights, and `load_peft_state_dict` refuses an adapter made for another backbone or config.
"""
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
