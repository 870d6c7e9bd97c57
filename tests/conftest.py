"""Shared test helpers: tiny backbones (real timm architectures with few blocks so the suite runs on 2 CPU
cores), the bundles of this checkout, bundle runs in a subprocess, and real servers on 127.0.0.1."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from medpeft_monai.utils import BundleVariant, bundle_folders, bundle_variants

#: every bundle's random tiny preset (one override away from the pretrained defaults), for fast tests
TINY_PRESET = {"backbone": "vit_tiny_patch16_224", "backbone_weights": None, "backbone_kwargs": {"depth": 2}}
TINY_ARGS = ["--backbone", "vit_tiny_patch16_224", "--backbone_weights", "none", "--backbone_kwargs", "{'depth': 2}"]
TINY_VIT = ("vit_tiny_patch16_224", {"depth": 2})
TINY_VIT4 = ("vit_tiny_patch16_224", {"depth": 4})
TINY_REG = ("vit_small_patch14_reg4_dinov2", {"depth": 1})
TINY_SWIN = ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)})
TINY_SAM2 = ("sam2_hiera_tiny", {"stages": (1, 1, 1, 1)})

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = bundle_folders(ROOT / "bundles")
# every model the bundles train and serve: one per configs/inference<suffix>.json (e.g. DCRM-ViT's "_seg")
VARIANTS = [v for b in BUNDLES for v in bundle_variants(b)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sample_data_dir(tmp_path_factory, monkeypatch):
    """Build sample data once per session into a temp cache, never into the user's home."""
    root = tmp_path_factory.getbasetemp() / "sample_data"
    monkeypatch.setenv("MEDPEFT_DATA_DIR", str(root))


def perturb_trainable(model: torch.nn.Module, std: float = 0.05, seed: int = 0,
                      skip: Callable[[str], bool] = lambda name: False) -> torch.nn.Module:
    """Stand-in for training: add ``N(0, std^2)`` noise to every trainable parameter not ``skip``-ped, so
    zero-initialised adapters and heads give non-trivial outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not skip(name):
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def trained_like_checkpoint(variant: BundleVariant, path: Path, **overrides) -> torch.nn.Module:
    """``network_def`` of the variant's inference config (with ``overrides``) with its trainable (PEFT + head)
    weights moved off their init by :func:`perturb_trainable`, saved as a flat state dict to ``path``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(variant.config("inference")))
    parser["bundle_root"] = str(variant.bundle)
    for k, v in overrides.items():
        parser[k] = v
    net = perturb_trainable(parser.get_parsed_content("network_def", lazy=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


def example_input(bundle: Path | BundleVariant, batch: int = 2) -> torch.Tensor:
    """A seeded random batch shaped as the input in the bundle's (or variant's) metadata."""
    variant = bundle if isinstance(bundle, BundleVariant) else BundleVariant(bundle)
    meta = json.loads(variant.metadata.read_text())
    image = next(iter(meta["network_data_format"]["inputs"].values()))
    shape = [int(s) for s in image["spatial_shape"]]
    return torch.rand(batch, int(image["num_channels"]), *shape, generator=torch.Generator().manual_seed(1))


#: bundles that read another bundle's artefact (stage 2 -> its stage-1 bundle, found at ``<bundle_root>/../<name>``)
STAGE1_BUNDLE = {"crossmodal_segmentation": "crossmodal_pretrain"}


def write_stage1_artefact(pretrain_bundle: Path) -> Path:
    """What a stage-1 run leaves: the bundle's modality LoRA artefact (untrained network, LoRA moved off its init
    by :func:`perturb_trainable`), at the path its ``train.json`` writes to."""
    from monai.bundle import ConfigParser

    from medpeft_monai.peft import peft_state_dict, save_atomic

    parser = ConfigParser()
    parser.read_config(str(pretrain_bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(pretrain_bundle)
    net = perturb_trainable(parser.get_parsed_content("network_def", lazy=False))
    path = Path(parser.get_parsed_content("adapter_file"))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(peft_state_dict(net, net.adapter_name), path)
    return path


def write_identity_translations(bundle: Path) -> Path:
    """What an ``mfmda_fundus`` translation run leaves, with the identity as translation: ``translated/datalist.json``
    pairing every training/validation image with itself (``image`` = ``source``), so that stage 2 runs."""
    from monai.bundle import ConfigParser

    from medpeft_monai.data import load_datalist, write_datalist

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    datalist = parser.get_parsed_content("datalist")
    sections = {s: [{**e, "source": e["image"]} for e in load_datalist(datalist, s)]
                for s in ("training", "validation")}
    return Path(write_datalist(parser.get_parsed_content("translated_datalist"), sections))


#: bundles whose stage 2 reads a file their own earlier stages write, and how a test makes it
OWN_STAGE1 = {"mfmda_fundus": write_identity_translations}


def copy_bundle(name: str, dst_dir: Path) -> Path:
    """A copy of ``bundles/<name>`` in ``dst_dir`` without trained models or outputs. A bundle that reads a
    stage-1 bundle's artefact gets that bundle beside it, with an artefact (:func:`write_stage1_artefact`); one
    that reads its own stage-1 output gets it made (``OWN_STAGE1``)."""
    dst = dst_dir / name
    shutil.copytree(ROOT / "bundles" / name, dst, ignore=shutil.ignore_patterns("models", "eval", "translated"))
    if name in STAGE1_BUNDLE and not (dst_dir / STAGE1_BUNDLE[name]).exists():
        write_stage1_artefact(copy_bundle(STAGE1_BUNDLE[name], dst_dir))
    if name in OWN_STAGE1:
        OWN_STAGE1[name](dst)
    return dst


def run_bundle(bundle_root: Path, configs: list[str], *overrides: str, timeout: int = 600, env=None) -> str:
    """``python -m monai.bundle run`` with ``configs`` (names under ``configs/``, merged in order); asserts
    success and returns stdout + stderr."""
    files = [str(bundle_root / "configs" / c) for c in configs]
    arg = files[0] if len(files) == 1 else json.dumps(files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", arg, "--bundle_root", str(bundle_root),
           *overrides]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server's process group (it forks workers), then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlive the leader
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@contextmanager
def running_server(cmd: list[str], health_url: str, log_path: Path, what: str, timeout: float,
                   poll: float = 0.5, grace: float = 20.0, **popen_kwargs) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own process group, wait until ``health_url`` answers 200 (failing the test with
    the log's tail if the server exits or is not up within ``timeout`` s), and stop it afterwards."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen_kwargs)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not up after {timeout} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(poll)
        yield proc
    finally:
        stop_process_group(proc, grace)
