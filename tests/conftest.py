"""Shared tiny backbones: real timm architectures with few blocks so the suite runs on 2 CPU cores."""

import pytest
import torch

TINY_VIT = ("vit_tiny_patch16_224", {"depth": 2})
TINY_VIT4 = ("vit_tiny_patch16_224", {"depth": 4})
TINY_REG = ("vit_small_patch14_reg4_dinov2", {"depth": 1})
TINY_SWIN = ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)})
TINY_SAM2 = ("sam2_hiera_tiny", {"stages": (1, 1, 1, 1)})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sample_data_dir(tmp_path_factory, monkeypatch):
    """Build sample data once per session into a temp cache, never into the user's home."""
    root = tmp_path_factory.getbasetemp() / "sample_data"
    monkeypatch.setenv("MEDPEFT_DATA_DIR", str(root))
