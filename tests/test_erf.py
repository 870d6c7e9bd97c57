"""Effective receptive field: definition checks, DKA widens it, PNG and CLI."""

from __future__ import annotations

import json

import pytest
import torch

import medpeft_monai.peft.dka  # noqa: F401  (registers the "dka" method)
from medpeft_monai.backbones import FrozenBackbone
from medpeft_monai.erf import (
    effective_receptive_field,
    erf_area,
    erf_coverage,
    erf_summary,
    load_images,
    main,
    sample_image_paths,
    save_erf_png,
)
from medpeft_monai.nets.classifier import PeftClassifier
from medpeft_monai.peft import apply_peft, peft_state_dict, save_atomic

NAME, KWARGS, SIZE = "vit_tiny_patch16_224", {"depth": 2, "patch_size": 8}, 64  # 8x8 token grid


def make(peft) -> FrozenBackbone:
    torch.manual_seed(0)
    b = FrozenBackbone(NAME, image_size=SIZE, model_kwargs=KWARGS)
    apply_peft(b, peft)
    return b


def trained_like(b: torch.nn.Module, up_std: float = 0.3, conv_std: float = 0.1) -> None:
    """Non-zero up-projections and large kernels, and open gates (DKA's zero-initialised ``gamma``), as after
    training."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in b.named_parameters():
            if p.requires_grad and n.endswith(("up.weight", "large.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * (up_std if "up" in n else conv_std))
            elif p.requires_grad and n.endswith(".gate"):
                p.fill_(1.0)


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_area_and_coverage_on_known_maps():
    m = torch.zeros(10, 10, dtype=torch.float64)
    m[4:6, 4:6] = 1.0
    assert erf_area(m, 0.5) == pytest.approx(0.04)
    assert erf_coverage(m, 0.99) == pytest.approx(0.04)  # the central 2x2 square holds everything
    flat = torch.ones(10, 10)
    assert erf_area(flat, 0.2) == 1.0
    assert erf_coverage(flat, 1.0) == pytest.approx(1.0)
    assert erf_coverage(flat, 0.5) < erf_coverage(flat, 0.9)
    assert erf_coverage(m, 0.5, centre=(0.0, 0.0)) > 0.04  # a square at the corner must grow to reach it


def test_erf_is_a_normalised_gradient_map(images):
    b = make("linear_probe")
    erf, centre = effective_receptive_field(b, images, batch_size=2, return_centre=True)
    assert erf.shape == (SIZE, SIZE) and erf.max() == 1.0 and erf.min() >= 0
    assert centre == (35.5, 35.5)  # unit (4, 4) of the 8x8 grid covers pixels 32..39
    # the unit's own patch holds the maximum contribution
    row, col = divmod(int(erf.argmax()), SIZE)
    assert 32 <= row < 40 and 32 <= col < 40
    assert not any(p.grad is not None for p in b.parameters())
    # one batch or many: the same average
    assert torch.allclose(erf, effective_receptive_field(b, images, batch_size=4), atol=1e-6)


def test_dka_widens_the_erf_over_linear_probing(images):
    lp = make("linear_probe")
    dka = make({"method": "dka"})
    erf_lp, c = effective_receptive_field(lp, images, return_centre=True)
    assert torch.equal(effective_receptive_field(dka, images), erf_lp), "zero-initialised DKA is the identity"
    trained_like(dka)
    erf_dka = effective_receptive_field(dka, images)
    for fraction in (0.3, 0.5):
        assert erf_coverage(erf_dka, fraction, c) > 3 * erf_coverage(erf_lp, fraction, c)
    assert erf_area(erf_dka, 0.05) > erf_area(erf_lp, 0.05)
    summary = erf_summary(erf_dka, centre=c)
    assert set(summary) == {"area>0.2", "area>0.3", "area>0.5", "cover0.2", "cover0.3", "cover0.5", "cover0.99"}


def test_png_is_written_atomically(tmp_path, images):
    erf = effective_receptive_field(make("linear_probe"), images[:1])
    out = save_erf_png(erf, tmp_path / "sub" / "erf.png", title="lp", log_scale=True)
    data = (tmp_path / "sub" / "erf.png").read_bytes()
    assert out.endswith("erf.png") and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["erf.png"]


def test_sample_images_are_real_and_local():
    paths = sample_image_paths()
    assert len(paths) >= 4
    x = load_images(paths[:3], (32, 48), in_chans=1)
    assert x.shape == (3, 1, 32, 48) and torch.isfinite(x).all()


def test_cli_with_adapter_from_a_classifier(tmp_path, capsys):
    torch.manual_seed(0)
    net = PeftClassifier(NAME, num_classes=2, peft={"method": "dka", "hidden": 8}, image_size=SIZE,
                         model_kwargs=KWARGS)
    trained_like(net)
    save_atomic(peft_state_dict(net), tmp_path / "adapter.pt")
    out = tmp_path / "erf.png"
    result = main(["--adapter", str(tmp_path / "adapter.pt"), "--model-kwargs", json.dumps(KWARGS),
                   "--image-size", str(SIZE), "--num-images", "3", "--out", str(out),
                   "--json", str(tmp_path / "erf.json")])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert result["backbone"] == NAME and result["method"] == "dka" and result["images"] == 3
    assert json.loads((tmp_path / "erf.json").read_text())["cover0.5"] == result["cover0.5"]
    assert "cover0.5" in capsys.readouterr().out
    # the adapter weights were loaded: a linear probe of the same backbone has a smaller ERF
    lp = main(["--backbone", NAME, "--model-kwargs", json.dumps(KWARGS), "--image-size", str(SIZE),
               "--num-images", "3", "--out", str(tmp_path / "lp.png")])
    assert result["cover0.5"] > lp["cover0.5"]


def test_cli_help():
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
