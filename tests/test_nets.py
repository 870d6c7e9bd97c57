import pytest
import torch
from monai.inferers import SlidingWindowInferer

from medpeft_monai.backbones import BackboneError
from medpeft_monai.nets import PeftClassifier, PeftSegmenter, default_levels
from tests.conftest import TINY_SAM2, TINY_SWIN, TINY_VIT4


def seg(spec=TINY_VIT4, **kw):
    name, model_kwargs = spec
    kw.setdefault("image_size", 64)
    return PeftSegmenter(name, 3, model_kwargs=model_kwargs, **kw)


def test_default_levels_are_evenly_spaced_and_end_at_the_last_block():
    assert default_levels(12) == [2, 5, 8, 11]
    assert default_levels(4) == [0, 1, 2, 3]
    assert default_levels(2) == [0, 1]


@pytest.mark.parametrize("spec", [TINY_VIT4, TINY_SWIN, TINY_SAM2], ids=["vit", "swin", "sam2hiera"])
def test_segmenter_gives_full_resolution_logits_and_trains_only_decoder_and_peft(spec):
    net = seg(spec, peft="lora", in_chans=1)
    y = net(torch.randn(2, 1, 64, 64))
    assert y.shape == (2, 3, 64, 64)
    y.mean().backward()
    for n, p in net.named_parameters():
        if n.startswith("backbone.") and "lora_" not in n:
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.requires_grad and p.grad is not None, n


def test_volume_slice_wise_and_sliding_window_for_larger_inputs():
    net = seg(in_chans=1, spatial_dims=3).eval()
    vol = torch.randn(1, 1, 64, 64, 3)
    with torch.no_grad():
        y = net(vol)
        assert y.shape == (1, 3, 64, 64, 3)
        # slice-wise: each output slice equals the 2D prediction of that slice
        net2d = net.forward_2d(vol[..., 1])
        assert torch.allclose(y[..., 1], net2d, atol=1e-5)
        big = SlidingWindowInferer(roi_size=(64, 64, 3), sw_batch_size=2, overlap=0.25)(
            torch.randn(1, 1, 96, 80, 3), net)
    assert big.shape == (1, 3, 96, 80, 3)


def test_wrong_input_size_and_dims_are_clear_errors():
    net = seg()
    with pytest.raises(BackboneError, match="differs from the backbone's image_size.*SlidingWindowInferer"):
        net(torch.randn(1, 3, 96, 96))
    with pytest.raises(BackboneError, match="spatial_dims=3"):
        net(torch.randn(1, 3, 64, 64, 4))


def test_classifier_wrong_channel_count():
    net = PeftClassifier("vit_tiny_patch16_224", 2, image_size=64, in_chans=3, model_kwargs={"depth": 1})
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    with pytest.raises(BackboneError, match="3 input channel.*got 1"):
        net(torch.randn(2, 1, 64, 64))
