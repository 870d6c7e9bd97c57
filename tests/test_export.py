"""TorchScript export: `python -m monai.bundle ckpt_export ... --use_trace True` works for every bundle's
`network_def` (or the bundle README's "Export" section says why not), and the exported model reproduces
the eager outputs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export
from monai.data import load_net_with_metadata

from tests.conftest import BUNDLES, copy_bundle, example_input, perturb_trainable

TINY_BUNDLE = "lora_segmentation"
NOT_SUPPORTED = "torchscript export is not supported"


def export_section(bundle: Path) -> str:
    text = (bundle / "docs" / "README.md").read_text()
    match = re.search(r"^## Export\b(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    assert match, f"{bundle.name}/docs/README.md needs an '## Export' section (see docs/bundle_conventions.md)"
    return match.group(1)


def trained_like_checkpoint(bundle: Path, path: Path, **overrides) -> torch.nn.Module:
    """``network_def`` of inference.json with its trainable (PEFT + head) weights moved off their init."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for k, v in overrides.items():
        parser[k] = v
    net = perturb_trainable(parser.get_parsed_content("network_def", lazy=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


def check_reproduces(net: torch.nn.Module, ts_file: Path, x: torch.Tensor) -> None:
    ts, meta, extra = load_net_with_metadata(str(ts_file), more_extra_files=["inference.json"])
    assert meta["version"] and "network_def" in json.loads(extra["inference.json"])
    with torch.no_grad():
        eager, exported = net(x), ts(x)
    torch.testing.assert_close(exported, eager, rtol=1e-4, atol=1e-5)
    if eager.ndim > 2:  # segmentation: identical labels
        assert torch.equal(exported.argmax(1), eager.argmax(1))


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_ckpt_export_reproduces_eager_outputs(bundle, tmp_path):
    section = export_section(bundle)
    if NOT_SUPPORTED in section.lower():
        pytest.skip(f"{bundle.name}: README documents why TorchScript export is not supported: {section.strip()[:300]}")
    assert "ckpt_export" in section and "--use_trace True" in section, section
    ckpt = tmp_path / "models" / "model.pt"
    net = trained_like_checkpoint(bundle, ckpt)
    ts_file = tmp_path / "models" / "model.ts"
    # the Python entry point behind `python -m monai.bundle ckpt_export`
    ckpt_export(net_id="network_def", filepath=str(ts_file), ckpt_file=str(ckpt),
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"), use_trace=True, bundle_root=str(tmp_path))
    check_reproduces(net, ts_file, example_input(bundle, batch=2))


def test_ckpt_export_command_line(tmp_path):
    """The README command, run as a user would, on a copy of the tiny bundle."""
    bundle = copy_bundle(TINY_BUNDLE, tmp_path)
    net = trained_like_checkpoint(bundle, bundle / "models" / "model.pt", backbone_kwargs={"depth": 2})
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
           "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
           "--bundle_root", ".", "--use_trace", "True", "--backbone_kwargs", "{'depth': 2}"]
    res = subprocess.run(cmd, check=False, cwd=bundle, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_reproduces(net, bundle / "models" / "model.ts", example_input(bundle, batch=3))
