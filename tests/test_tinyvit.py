"""TinyViT family in FrozenBackbone, the PEFT methods on it, and input normalisation matched to the weights."""

import json

import pytest
import torch
from monai.bundle import ConfigParser
from safetensors.torch import save_file

from medpeft_monai.backbones import BackboneError, FrozenBackbone
from medpeft_monai.nets import PeftClassifier
from medpeft_monai.peft import PeftError, apply_peft, load_peft_state_dict, merge_peft, peft_state_dict
from medpeft_monai.peft.lora import LoRALinear
from tests.conftest import ROOT

NAME, SIZE = "tiny_vit_5m_224", 64


def images(n=2, c=3, seed=0):
    return torch.rand(n, c, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def backbone():
    return FrozenBackbone(NAME, image_size=SIZE)


def test_stepping_api_equals_timm(backbone):
    x = images()
    with torch.no_grad():
        out = backbone.encode(x, levels=[1, 7, 9])
        ref = backbone.model.forward_features(x)
        _, inter = backbone.model.forward_intermediates(x)
    assert backbone.family == "tinyvit" and len(backbone.blocks) == 10  # 2 + 6 + 2 attention blocks
    assert {b.token_format for b in backbone.blocks} == {"nhwc"}
    assert [b.grid for b in backbone.blocks[::4]] == [(8, 8), (4, 4), (2, 2)]
    assert torch.equal(out.tokens, ref)
    for level, stage in zip(out.levels, inter[1:]):  # blocks 1, 7, 9 end stages 1, 2, 3
        assert torch.equal(level, stage)
    # token masks cover the convolutional stage's output grid (stride 4), hidden tokens become the mask token
    assert backbone.embed_grid == (16, 16)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :8] = True
    token = torch.full((64,), 7.0)
    with torch.no_grad():
        masked, plain = backbone.embed(x, mask=mask, mask_token=token), backbone.embed(x)
    assert (masked[:, :8] == 7.0).all() and torch.equal(masked[:, 8:], plain[:, 8:])
    with pytest.raises(BackboneError, match="mask must be a boolean"):
        backbone.embed(x, mask=torch.zeros(2, 8, 8, dtype=torch.bool), mask_token=token)


def test_lora_adapts_q_and_v_of_every_head_and_never_k():
    bb = FrozenBackbone(NAME, image_size=SIZE)
    apply_peft(bb, {"method": "lora", "rank": 4})
    layers = [m for m in bb.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 10
    layer, attn = layers[0], bb.model.stages[1].blocks[0].attn
    with torch.no_grad():
        for p in layer.lora_B.values():
            p.normal_()
    h = torch.randn(5, layer.base.in_features)
    with torch.no_grad():
        delta = (layer(h) - layer.base(h)).view(5, attn.num_heads, -1)
    kd = attn.key_dim
    assert delta[..., kd:2 * kd].abs().max() == 0, "K columns of every head untouched"
    assert (delta[..., :kd].abs().amax(dim=(0, 2)) > 0).all() and (delta[..., 2 * kd:].abs().amax(dim=(0, 2)) > 0).all()
    with torch.no_grad():
        merged_w = layer.effective_weight()
    torch.testing.assert_close(h @ merged_w.t() + layer.base.bias, layer(h).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("peft", [{"method": "lora", "rank": 4}, {"method": "adapter", "hidden": 8},
                                  {"method": "adaptformer", "hidden": 8}, {"method": "dka", "hidden": 8},
                                  "linear_probe", "bitfit"])
def test_methods_on_tinyvit_train_only_their_parameters(peft):
    torch.manual_seed(0)
    net = PeftClassifier(NAME, 2, peft=peft, image_size=SIZE)
    x = images()
    with torch.no_grad():
        probe = PeftClassifier(NAME, 2, peft="linear_probe", image_size=SIZE)
        probe.head.load_state_dict(net.head.state_dict())
        if peft not in ("linear_probe", "bitfit"):  # zero-initialised updates: the frozen network's output
            torch.testing.assert_close(net(x), probe(x), rtol=1e-5, atol=1e-5)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1])).backward()
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(net.get_parameter(n).grad is not None for n in trainable if n.startswith("head"))
    assert all(dict(net.named_parameters())[n].grad is None for n in frozen)
    if isinstance(peft, dict) and peft["method"] in ("lora", "dka"):  # mergeable: merged == unmerged
        with torch.no_grad():
            for n in trainable:
                net.get_parameter(n).normal_(0, 0.02)
            net.eval()
            ref = net(x)
            merge_peft(net)
            torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["vpt", "convpass"])
def test_token_methods_refused_on_tinyvit(method):
    with pytest.raises(PeftError, match="tinyvit|nlc"):
        apply_peft(FrozenBackbone(NAME, image_size=SIZE), {"method": method})


def _seen_by_patch_embed(bb: FrozenBackbone, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = bb.model.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        bb.encode(x)
    handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A local weights file of a timm ViT (random values; what matters is that they are 'pretrained')."""
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    bb = FrozenBackbone("vit_tiny_patch16_224", image_size=32, model_kwargs={"depth": 2})
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return path


def test_pretrained_weights_see_normalised_input_and_grey_is_repeated(vit_file):
    kwargs = {"image_size": 32, "model_kwargs": {"depth": 2}}
    random = FrozenBackbone("vit_tiny_patch16_224", **kwargs)
    assert random.input_norm is None  # random weights were trained on nothing: [0, 1] as given
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(_seen_by_patch_embed(random, x), x)

    rgb = FrozenBackbone("vit_tiny_patch16_224", weights=str(vit_file), **kwargs)
    cfg = rgb.model.pretrained_cfg
    assert rgb.input_norm == (tuple(cfg["mean"]), tuple(cfg["std"]))
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(_seen_by_patch_embed(rgb, x), (x - mean) / std)

    grey = FrozenBackbone("vit_tiny_patch16_224", weights=str(vit_file), in_chans=1, **kwargs)
    g = torch.rand(2, 1, 32, 32)
    assert grey.model_in_chans == 3 and grey.fingerprint == rgb.fingerprint
    torch.testing.assert_close(_seen_by_patch_embed(grey, g), (g.expand(-1, 3, -1, -1) - mean) / std)
    with torch.no_grad():
        torch.testing.assert_close(grey.encode(g).tokens, rgb.encode(g.expand(-1, 3, -1, -1)).tokens)

    own = FrozenBackbone("vit_tiny_patch16_224", weights=str(vit_file), input_norm=([0.2] * 3, [0.5] * 3), **kwargs)
    torch.testing.assert_close(_seen_by_patch_embed(own, x), (x - 0.2) / 0.5)
    with pytest.raises(BackboneError, match="positive std"):
        FrozenBackbone("vit_tiny_patch16_224", weights=str(vit_file), input_norm=([0.2] * 3, [0.0] * 3), **kwargs)


def test_litemedsam_backbone_takes_grey_images_as_the_package_does():
    bb = FrozenBackbone(NAME, weights="litemedsam", image_size=SIZE, in_chans=1)
    assert bb.weights_source == "litemedsam" and bb.input_norm == ((0.0,) * 3, (1.0,) * 3)
    g = images(1, 1)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode(g).tokens, bb.model.forward_features(g.expand(-1, 3, -1, -1)))
    assert bb.fingerprint != FrozenBackbone(NAME, image_size=SIZE, in_chans=1).fingerprint
    with pytest.raises(BackboneError, match="are for backbone 'tiny_vit_5m_224'"):
        FrozenBackbone("vit_tiny_patch16_224", weights="litemedsam")
    with pytest.raises(BackboneError, match="named sources: none, hub, litemedsam"):
        FrozenBackbone(NAME, weights="litemedsam_v2")


def test_artefact_records_and_checks_normalisation(vit_file):
    kwargs = {"image_size": 32, "model_kwargs": {"depth": 2}, "weights": str(vit_file)}
    net = PeftClassifier("vit_tiny_patch16_224", 2, peft={"method": "lora", "rank": 2}, **kwargs)
    art = peft_state_dict(net)
    assert art["input_norm"] == [list(net.backbone.input_norm[0]), list(net.backbone.input_norm[1])]
    load_peft_state_dict(PeftClassifier("vit_tiny_patch16_224", 2, peft={"method": "lora", "rank": 2}, **kwargs), art)
    other = PeftClassifier("vit_tiny_patch16_224", 2, peft={"method": "lora", "rank": 2}, input_norm=None, **kwargs)
    with pytest.raises(PeftError, match="normalised with"):
        load_peft_state_dict(other, art)


def test_bundle_with_pretrained_weights_feeds_normalised_inputs(vit_file):
    """The DKA classification bundle's own preprocessing and network, given a weights file: what reaches the
    frozen patch embedding is the [0, 1] image normalised with the weights' mean and std."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "dka_classification" / "configs" / "inference.json"))
    parser["device"] = "$torch.device('cpu')"
    parser["backbone_weights"] = str(vit_file)
    parser["image_size"] = [32, 32]
    parser["backbone_kwargs"] = {"depth": 2}  # the architecture the file was saved from
    network = parser.get_parsed_content("network_def")
    item = json.loads(
        (ROOT / "bundles" / "dka_classification" / "configs" / "metadata.json").read_text())["network_data_format"]
    assert item["inputs"]["image"]["value_range"] == [0, 1]
    x = torch.rand(1, 3, 32, 32)
    cfg = network.backbone.model.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert not torch.allclose(mean, torch.zeros(3).view(1, 3, 1, 1))
    torch.testing.assert_close(_seen_by_patch_embed(network.backbone, x), (x - mean) / std)


def test_training_forward_leaves_frozen_batch_norm_statistics_alone():
    """TinyViT's convolutions carry batch norm: in train mode the frozen ones must not take the batch's
    statistics (that would change the frozen encoder); a method that unfreezes them (full) trains them."""
    net = PeftClassifier(NAME, 2, peft={"method": "lora", "rank": 2}, image_size=SIZE).train()
    before = {n: b.clone() for n, b in net.backbone.named_buffers() if "running" in n}
    assert before
    net(images())
    assert all(torch.equal(b, before[n]) for n, b in net.backbone.named_buffers() if "running" in n)
    full = PeftClassifier(NAME, 2, peft="full", image_size=SIZE).train()
    full(images())
    assert any(not torch.equal(b, before[n]) for n, b in full.backbone.named_buffers() if "running" in n)


def _feature_change_after_one_step(peft: dict) -> float:
    """Relative change of the last features of a pretrained (LiteMedSAM) encoder after one AdamW step at the
    paper's learning rates (adapter 1e-3, decoder 1e-4) on a tiny segmentation batch."""
    from monai.losses import DiceCELoss

    from medpeft_monai.nets import PeftSegmenter
    from medpeft_monai.peft import param_groups

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 1, 32, 32, generator=gen), (torch.rand(2, 1, 32, 32, generator=gen) > 0.7).long()
    torch.manual_seed(0)
    net = PeftSegmenter(NAME, 2, peft=peft, weights="litemedsam", image_size=32, in_chans=1)
    opt = torch.optim.AdamW(param_groups(net, 1e-3, 1e-4))

    def last_features():
        with torch.no_grad():
            return net.eval().backbone.encode(x, levels=[-1]).levels[0]

    before = last_features()
    net.train()
    DiceCELoss(to_onehot_y=True, softmax=True)(net(x), y).backward()
    opt.step()
    return ((last_features() - before).norm() / before.norm()).item()


def test_dka_first_step_on_a_pretrained_encoder_is_bounded():
    """At the paper's width (m = 192) and learning rates, a zero-initialised up-projection lets all ten
    adapters jump at once (Adam moves every entry by ~lr); the zero-initialised gate keeps the step small."""
    gated = _feature_change_after_one_step({"method": "dka", "hidden": 192})
    plain = _feature_change_after_one_step({"method": "dka", "hidden": 192, "gate": False})
    assert gated < 0.05, f"one step moved the features by {gated:.1%}"
    assert plain > 0.3, f"the ungated form moved them by only {plain:.1%}: the test no longer shows the failure"
