import pytest
import torch
from safetensors.torch import save_file

from medpeft_monai.backbones import BackboneError, FrozenBackbone
from tests.conftest import TINY_REG, TINY_SAM2, TINY_SWIN, TINY_VIT


def make(spec, **kw):
    name, model_kwargs = spec
    kw.setdefault("image_size", 64)
    return FrozenBackbone(name, model_kwargs=model_kwargs, **kw)


def test_unknown_backbone_names_the_fix():
    with pytest.raises(BackboneError, match="Unknown timm backbone 'vit_tinyy_patch16'.*timm.list_models"):
        FrozenBackbone("vit_tinyy_patch16")


def test_frozen_by_default_and_layout_of_register_vit_with_non_square_grid():
    b = make(TINY_REG, image_size=(56, 84))
    assert not any(p.requires_grad for p in b.parameters())
    assert b.patch_size == (14, 14)
    assert b.num_prefix_tokens == 5  # class + 4 registers
    assert b.grid_size == (4, 6)
    assert b.blocks[0].token_format == "nlc" and b.blocks[0].width == 384
    feats = b.forward_levels(torch.randn(2, 3, 56, 84), [-1])
    assert feats[0].shape == (2, 384, 4, 6)


@pytest.mark.parametrize("spec,fmt,widths", [(TINY_SWIN, "nhwc", [96, 192, 384, 768]),
                                             (TINY_SAM2, "nhwc", [96, 96, 192, 384])])
def test_hierarchical_layout_and_multilevel_features(spec, fmt, widths):
    b = make(spec)
    assert [i.token_format for i in b.blocks] == [fmt] * 4
    assert b.stage_widths == widths  # width entering each block
    feats = b.forward_levels(torch.randn(1, 3, 64, 64), [0, 3])
    assert feats[0].shape == (1, 96, 16, 16)
    assert feats[1].shape == (1, 768, 2, 2)


def test_one_channel_input_and_wrong_channel_count():
    b = make(TINY_VIT, in_chans=1)
    assert b(torch.randn(2, 1, 64, 64)).shape == (2, 192)
    with pytest.raises(BackboneError, match="built for 1 input channel.*got 3.*in_chans=3"):
        b(torch.randn(2, 3, 64, 64))


def test_local_weights_roundtrip_resample_and_channel_folding(tmp_path):
    src = FrozenBackbone("vit_tiny_patch16_224", model_kwargs={"depth": 2})  # 224 px, RGB
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))

    same = FrozenBackbone("vit_tiny_patch16_224", weights=path, model_kwargs={"depth": 2})
    for k, v in src.model.state_dict().items():
        assert torch.equal(v, same.model.state_dict()[k]), k

    # 64 px, one channel: position embedding resampled to the 4x4 grid; the grey channel is repeated into
    # the RGB kernel the weights have (tests/test_tinyvit.py checks the repetition and normalisation)
    small = FrozenBackbone("vit_tiny_patch16_224", weights=path, image_size=64, in_chans=1,
                           model_kwargs={"depth": 2})
    assert small.model.pos_embed.shape == (1, 1 + 16, 192)
    w_rgb = src.model.patch_embed.proj.weight
    assert small.model_in_chans == 3 and torch.equal(small.model.patch_embed.proj.weight, w_rgb)
    assert torch.equal(small.model.blocks[1].attn.qkv.weight, src.model.blocks[1].attn.qkv.weight)
    # other channel counts: timm adapts the RGB kernel (two channels: repeated and rescaled by 3/2)
    two = FrozenBackbone("vit_tiny_patch16_224", weights=path, image_size=64, in_chans=2, model_kwargs={"depth": 2})
    assert two.model.patch_embed.proj.weight.shape == (192, 2, 16, 16) and len(two.norm_mean.flatten()) == 2

    # a .pth checkpoint wrapped in {"state_dict": ...} loads too
    pth = tmp_path / "vit.pth"
    torch.save({"state_dict": src.model.state_dict(), "epoch": 3}, pth)
    FrozenBackbone("vit_tiny_patch16_224", weights=pth, model_kwargs={"depth": 2})


def test_weights_for_another_architecture_are_refused(tmp_path):
    src = FrozenBackbone("vit_tiny_patch16_224", model_kwargs={"depth": 2})
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="does not match backbone 'vit_small_patch16_224'.*shape mismatch"):
        FrozenBackbone("vit_small_patch16_224", weights=path, model_kwargs={"depth": 2})
    with pytest.raises(BackboneError, match="missing keys.*blocks.2"):
        FrozenBackbone("vit_tiny_patch16_224", weights=path, model_kwargs={"depth": 3})
    with pytest.raises(BackboneError, match="not found"):
        FrozenBackbone("vit_tiny_patch16_224", weights=tmp_path / "nope.pth")
    with pytest.raises(BackboneError, match="Unsupported weights file"):
        (tmp_path / "w.txt").write_text("x")
        FrozenBackbone("vit_tiny_patch16_224", weights=tmp_path / "w.txt")


def test_image_size_must_tile_into_patches():
    with pytest.raises(BackboneError, match=r"not a multiple of .* patch size \(16, 16\).*image_size=\[64, 64\]"):
        FrozenBackbone("vit_tiny_patch16_224", image_size=60, model_kwargs={"depth": 1})
    assert FrozenBackbone("vit_tiny_patch16_224", image_size=(48, 64), model_kwargs={"depth": 1}).grid_size == (3, 4)
