"""TorchScript export: `python -m monai.bundle ckpt_export ... --use_trace True` works for every bundle's
`network_def`, for each variant with its own inference config and metadata (or the bundle README's
"Export" section says why not), and the exported model reproduces the eager outputs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export
from monai.data import load_net_with_metadata

from medpeft_monai.utils import BundleVariant
from tests.conftest import TINY_ARGS, TINY_PRESET, VARIANTS, copy_bundle, example_input, trained_like_checkpoint

TINY_BUNDLE = "lora_segmentation"
NOT_SUPPORTED = "torchscript export is not supported"


def export_section(bundle: Path) -> str:
    text = (bundle / "docs" / "README.md").read_text()
    match = re.search(r"^## Export\b(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    assert match, f"{bundle.name}/docs/README.md needs an '## Export' section (see docs/bundle_conventions.md)"
    return match.group(1)


def check_reproduces(net: torch.nn.Module, ts_file: Path, x: torch.Tensor, config: str = "inference.json") -> None:
    """The exported file holds the metadata and ``config`` and gives the eager outputs of ``net`` on ``x``."""
    ts, meta, extra = load_net_with_metadata(str(ts_file), more_extra_files=[config])
    assert meta["version"] and "network_def" in json.loads(extra[config])
    with torch.no_grad():
        eager, exported = net(x), ts(x)
    torch.testing.assert_close(exported, eager, rtol=1e-4, atol=1e-5)
    if eager.ndim > 2:  # segmentation: identical labels
        assert torch.equal(exported.argmax(1), eager.argmax(1))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_ckpt_export_reproduces_eager_outputs(variant, tmp_path):
    section = export_section(variant.bundle)
    if NOT_SUPPORTED in section.lower():
        pytest.skip(f"{variant.name}: README documents why TorchScript export is not supported: "
                    f"{section.strip()[:300]}")
    config, meta = f"configs/{variant.config('inference').name}", f"configs/{variant.metadata.name}"
    assert "ckpt_export" in section and "--use_trace True" in section, section
    assert f"--config_file {config}" in section and f"--meta_file {meta}" in section, (
        f"{variant.bundle.name}/docs/README.md: the Export section needs the command for {variant.name} "
        f"(--config_file {config} --meta_file {meta})")
    copy = BundleVariant(copy_bundle(variant.bundle.name, tmp_path), variant.suffix)
    ckpt = copy.model_file
    net = trained_like_checkpoint(copy, ckpt)
    ts_file = ckpt.with_suffix(".ts")
    # the Python entry point behind `python -m monai.bundle ckpt_export`
    ckpt_export(net_id="network_def", filepath=str(ts_file), ckpt_file=str(ckpt), meta_file=str(copy.metadata),
                config_file=str(copy.config("inference")), use_trace=True, bundle_root=str(copy.bundle))
    check_reproduces(net, ts_file, example_input(variant, batch=2), variant.config("inference").name)


def test_ckpt_export_command_line(tmp_path):
    """The README command, run as a user would, on a copy of the tiny bundle."""
    bundle = copy_bundle(TINY_BUNDLE, tmp_path)
    net = trained_like_checkpoint(BundleVariant(bundle), bundle / "models" / "model.pt", **TINY_PRESET)
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
           "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
           "--bundle_root", ".", "--use_trace", "True", *TINY_ARGS]
    res = subprocess.run(cmd, check=False, cwd=bundle, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_reproduces(net, bundle / "models" / "model.ts", example_input(bundle, batch=3))
