"""The PEFT core's second edition: named stackable adapters with their own artefacts and identity, merges that
survive checkpoint loading, explicit per-forward state (thread safety), injection into plain modules and the
backbone stepping API."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from medpeft_monai.backbones import BackboneError, FrozenBackbone
from medpeft_monai.nets import PeftClassifier, PeftSegmenter
from medpeft_monai.nets.dcrm import DCRMClassifier
from medpeft_monai.peft import (
    LoRALinear,
    PeftError,
    PromptedBlock,
    adapter_parameters,
    apply_peft,
    get_registry,
    load_peft_state_dict,
    merge_peft,
    peft_state_dict,
    set_trainable,
    unload,
)
from tests.conftest import TINY_SAM2, TINY_SWIN, TINY_VIT, TINY_VIT4, perturb_trainable

SIZE = 32
X = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
Y = torch.tensor([0, 1, 1])


def classifier(peft="linear_probe", spec=TINY_VIT, weights=None):
    name, kwargs = spec
    return PeftClassifier(name, 2, peft=peft, image_size=SIZE, model_kwargs=kwargs, weights=weights)


def step(model, n=2, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    return model.eval()


def stacked(modality_trainable=False):
    """A frozen 'modality' LoRA under a trainable 'task' VPT-deep adapter (which also owns the head)."""
    net = classifier()  # adapter "default": linear probe + head
    unload(net, "default")
    apply_peft(net, {"method": "lora", "rank": 4}, name="modality", trainable=modality_trainable)
    apply_peft(net, {"method": "vpt", "num_prompts": 2, "deep": True}, name="task", modules=("head",))
    return net


# ---------------------------------------------------------------------------------------------- stacking


def test_stacked_adapters_train_only_the_trainable_one_and_save_separately(tmp_path):
    net = stacked()
    assert list(get_registry(net).adapters) == ["modality", "task"]
    modality, task = adapter_parameters(net, "modality"), adapter_parameters(net, "task")
    assert modality and task and not set(modality) & set(task)
    assert all("lora_" in n for n in modality) and all(n.endswith("prompts") or n.startswith("head.") for n in task)
    # the LoRA sits inside blocks the prompts wrap: its canonical names do not show the wrapper
    assert all(".block." not in n for n in modality)
    perturb_trainable(net, seed=3)  # give the (zero-initialised) task parts values
    set_trainable(net, "modality", True)
    perturb_trainable(net, seed=4, skip=lambda n: "lora_" not in n)  # a "trained" modality LoRA
    set_trainable(net, "modality", False)
    lora_before = {n: p.detach().clone() for n, p in modality.items()}
    frozen_before = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    opt.zero_grad()
    F.cross_entropy(net(X), Y).backward()
    assert all(p.grad is None for p in modality.values())                       # frozen: no gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.values())
    opt.step()
    assert all(torch.equal(p, lora_before[n]) for n, p in modality.items())     # bit-identical after training
    assert all(torch.equal(p, frozen_before[n]) for n, p in net.named_parameters() if not p.requires_grad)

    paths = {}
    for name in ("modality", "task"):
        payload = peft_state_dict(net, name)
        assert payload["name"] == name and payload["trainable"] == (name == "task")
        assert set(payload["state_dict"]) == set(adapter_parameters(net, name))
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(payload, paths[name])
    fresh = stacked()
    net.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(X), net(X))
        load_peft_state_dict(fresh, paths["modality"], "modality")
        assert not torch.allclose(fresh(X), net(X))  # the task adapter is still untrained
        load_peft_state_dict(fresh, paths["task"], "task")
        assert torch.equal(fresh(X), net(X))
    assert not any(p.requires_grad for p in adapter_parameters(fresh, "modality").values())

    # the modality LoRA alone (no prompts around its blocks) reads the same file: names are canonical
    alone = classifier()
    unload(alone, "default")
    apply_peft(alone, {"method": "lora", "rank": 4}, name="modality", trainable=False)
    load_peft_state_dict(alone, paths["modality"], "modality")
    assert all(torch.equal(p, modality[n]) for n, p in adapter_parameters(alone, "modality").items())


def test_a_lora_trained_with_a_head_is_reused_as_a_named_frozen_adapter():
    single = classifier({"method": "lora", "rank": 4})      # adapter "default" owns LoRA + head
    perturb_trainable(single, seed=8)
    payload = peft_state_dict(single)
    assert payload["modules"] == ["head"] and any(k.startswith("head.") for k in payload["state_dict"])
    net = stacked()
    load_peft_state_dict(net, payload, "modality")           # the head tensors are not the modality adapter's
    lora = {k: v for k, v in adapter_parameters(single).items() if "lora_" in k}
    assert lora.keys() == adapter_parameters(net, "modality").keys()
    assert all(torch.equal(p, lora[k]) for k, p in adapter_parameters(net, "modality").items())


def test_loading_into_a_wrong_name_other_weights_backbone_or_config_is_refused(tmp_path):
    net = stacked()
    perturb_trainable(net, seed=3)
    path = tmp_path / "modality.pt"
    torch.save(peft_state_dict(net, "modality"), path)
    with pytest.raises(PeftError, match=r"holds a 'lora' adapter.*adapter 'task'.*with that config: \['modality'\]"):
        load_peft_state_dict(stacked(), path, "task")
    with pytest.raises(PeftError, match=r"no adapter named 'nope'; its adapters are \['modality', 'task'\]"):
        load_peft_state_dict(stacked(), path, "nope")
    # other backbone weights: a local file with different values for the same architecture
    other = FrozenBackbone(TINY_VIT[0], image_size=SIZE, model_kwargs=TINY_VIT[1])
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(1.01)
    weights = tmp_path / "other.pth"
    torch.save(other.model.state_dict(), weights)
    moved = classifier(weights=str(weights))
    unload(moved, "default")
    apply_peft(moved, {"method": "lora", "rank": 4}, name="modality", trainable=False)
    with pytest.raises(PeftError, match=r"other backbone weights: it expects .*'random\(seed=0\)' .*fingerprint .*"
                                        r"weights 'other.pth'.*Build the network with weights='random\(seed=0\)'"):
        load_peft_state_dict(moved, path, "modality")
    wrong = PeftClassifier(TINY_SWIN[0], 2, peft={"method": "lora", "rank": 4}, image_size=SIZE,
                           model_kwargs=TINY_SWIN[1])
    with pytest.raises(PeftError, match="trained on backbone 'vit_tiny_patch16_224'.*uses 'swin"):
        load_peft_state_dict(wrong, path)
    with pytest.raises(PeftError, match=r"made with config.*'rank': 4.*'rank': 8"):
        load_peft_state_dict(classifier({"method": "lora", "rank": 8}), {**torch.load(path, weights_only=True),
                                                                         "name": "default"})
    one_channel = PeftClassifier(TINY_VIT[0], 2, peft={"method": "lora", "rank": 4}, image_size=SIZE, in_chans=1,
                                 model_kwargs=TINY_VIT[1])
    with pytest.raises(PeftError, match="in_chans=3.*in_chans=1"):
        load_peft_state_dict(one_channel, path)
    with pytest.raises(PeftError, match="already has an adapter named 'task'"):
        apply_peft(net, "lora", name="task")


def test_unload_restores_the_frozen_network():
    ref = classifier().eval()
    net = classifier({"method": "adaptformer", "hidden": 8})
    apply_peft(net, {"method": "lora", "rank": 2}, name="extra")
    perturb_trainable(net, seed=1)
    with torch.no_grad():
        assert not torch.allclose(net.eval()(X), ref(X))
        unload(net, "extra")
        unload(net, "default")
        assert not any(isinstance(m, LoRALinear) for m in net.modules())
        net.head.load_state_dict(ref.head.state_dict())
        assert torch.allclose(net(X), ref(X), atol=1e-6)
    assert list(get_registry(net).adapters) == []


def test_lora_on_a_plain_module_by_name_pattern():
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16),
                              attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                              norm_num_groups=8)
    perturb_trainable(unet, std=0.1)  # stand-in for a trained DDPM (MONAI zero-initialises the output conv)
    ref = copy.deepcopy(unet).eval()
    apply_peft(unet, {"method": "lora", "rank": 2, "target": r".*attn\.to_[qv]"}, name="target_domain")
    wrapped = [n for n, m in unet.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(n.endswith(("to_q", "to_v")) for n in wrapped)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    unet.eval()
    with torch.no_grad():
        assert torch.equal(unet(x, t), ref(x, t))  # B = 0 at initialisation
        perturb_trainable(unet, seed=2)
        assert not torch.allclose(unet(x, t), ref(x, t))
    payload = peft_state_dict(unet, "target_domain")
    assert payload["backbone"] == "DiffusionModelUNet" and payload["fingerprint"]
    with pytest.raises(PeftError, match="No module of DiffusionModelUNet matches"):
        apply_peft(unet, {"method": "lora", "target": "nothing"}, name="x")
    with pytest.raises(PeftError, match="needs a FrozenBackbone"):
        apply_peft(unet, "dka", name="y")


# ---------------------------------------------------------------------------------------------- merge


def _trained(peft):
    net = classifier(peft)
    perturb_trainable(net, seed=5)
    return net.eval()


@pytest.mark.parametrize("peft", [{"method": "lora", "rank": 4}, {"method": "dka", "hidden": 8}], ids=["lora", "dka"])
def test_merge_survives_checkpoint_loading_in_either_order(peft):
    trained = _trained(peft)
    state = copy.deepcopy(trained.state_dict())
    with torch.no_grad():
        expected = trained(X)
        a = merge_peft(classifier(peft).eval())          # merge -> load -> forward
        a.load_state_dict(state)
        b = classifier(peft).eval()                       # load -> merge -> forward
        b.load_state_dict(state)
        merge_peft(b)
        for net in (a, b):
            assert (net(X) - expected).abs().max() <= 1e-5
        merged_state = b.state_dict()
    assert all(torch.equal(merged_state[k], v) for k, v in state.items())  # merging changes no tensor


def test_merged_lora_serves_the_folded_weight_and_follows_updates():
    net = _trained({"method": "lora", "rank": 4})
    layer = next(m for m in net.modules() if isinstance(m, LoRALinear))
    frozen = layer.base.weight.detach().clone()
    merge_peft(net)
    with torch.no_grad():
        before = net(X)
        layer.lora_B["q"].add_(0.5)   # an in-place update (e.g. an optimizer step) invalidates the cache
        after = net(X)
        layer.lora_B["q"].sub_(0.5)
        assert torch.allclose(net(X), before, atol=1e-6)
    assert not torch.allclose(before, after)
    assert torch.equal(layer.base.weight, frozen)  # the frozen weight is never modified


def test_non_default_mergeable_method_in_a_dka_inference_config(tmp_path):
    from monai.bundle import ConfigParser

    from medpeft_monai.utils import BundleVariant
    from tests.conftest import BUNDLES, example_input, trained_like_checkpoint

    bundle = next(b for b in BUNDLES if b.name == "dka_segmentation")
    variant = BundleVariant(bundle)
    overrides = {"peft": {"method": "lora", "rank": 4}}  # on the config's own (LiteMedSAM TinyViT) encoder
    trained = trained_like_checkpoint(variant, tmp_path / "model.pt", **overrides)
    parser = ConfigParser()
    parser.read_config(str(variant.config("inference")))
    for k, v in overrides.items():
        parser[k] = v
    parser["device"] = "$torch.device('cpu')"
    served = parser.get_parsed_content("network", lazy=False)  # the config's merged network
    assert all(m.merged for m in served.modules() if isinstance(m, LoRALinear))
    served.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # as the CheckpointLoader does
    x = example_input(variant, batch=1)
    with torch.no_grad():
        assert (served.eval()(x) - trained(x)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- explicit state


@pytest.mark.parametrize("kind", ["dcrm", "vpt_shallow", "dka_merged"])
def test_two_threads_get_the_results_of_running_one_after_the_other(kind):
    name, kwargs = TINY_VIT4
    torch.manual_seed(0)
    if kind == "dcrm":
        net = DCRMClassifier(name, 2, num_domains=3, image_size=SIZE, model_kwargs=kwargs)
        run = lambda x: net(x, return_outputs=True)  # noqa: E731
    else:
        peft = {"method": "vpt", "num_prompts": 3} if kind == "vpt_shallow" else {"method": "dka", "hidden": 8}
        net = PeftClassifier(name, 2, peft=peft, image_size=SIZE, model_kwargs=kwargs)
        run = net
    perturb_trainable(net, std=0.2, seed=1)
    net.eval()
    if kind == "dka_merged":
        merge_peft(net)
    inputs = [torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(b)) for b in (1, 4)]
    with torch.no_grad():
        expected = [run(x) for x in inputs]
    results: dict = {}
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        with torch.no_grad():
            results[i] = [run(inputs[i]) for _ in range(5)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, exp in enumerate(expected):
        for got in results[i]:
            for g, e in zip(got if kind == "dcrm" else [got], exp if kind == "dcrm" else [exp]):
                if e is not None:
                    assert torch.allclose(g, e, atol=1e-6)
    assert not any(hasattr(m, "carry") or hasattr(m, "context") for m in net.modules())


# ---------------------------------------------------------------------------------------------- stepping API


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_SWIN, TINY_SAM2, ("hiera_tiny_224", {"stages": (1, 1, 1, 1)})],
                         ids=["vit", "swin", "sam2", "hiera"])
def test_stepping_api_reproduces_timm(spec):
    name, kwargs = spec
    size = 224 if name.startswith("hiera") else 64
    b = FrozenBackbone(name, image_size=size, model_kwargs=kwargs).eval()
    x = torch.randn(2, 3, *b.image_size)
    n = len(b.blocks)
    with torch.no_grad():
        ref = b.model.forward_features(x)
        tokens = b.embed(x)
        for i in range(n):  # one block at a time
            tokens = b.run_blocks(tokens, i, i + 1)
        assert torch.equal(b.finish(tokens), ref)
        assert torch.equal(b.encode(x).tokens, ref)
        levels = b.forward_levels(x, list(range(n)))
        assert len(levels) == n and all(f.ndim == 4 and f.shape[0] == 2 for f in levels)
        if b.family == "vit":
            timm_levels = b.model.forward_intermediates(x, indices=list(range(n)), output_fmt="NCHW",
                                                        intermediates_only=True)
            assert all(torch.equal(a, c) for a, c in zip(levels, timm_levels))


def test_embed_masks_patches_with_a_mask_token_or_drops_them():
    b = FrozenBackbone(TINY_VIT[0], image_size=SIZE, model_kwargs=TINY_VIT[1]).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = mask[1, 1, 0] = True
    token = torch.randn(b.num_features)
    with torch.no_grad():
        plain, masked = b.embed(x), b.embed(x, mask, token)
        pos = b.model.pos_embed[0, b.num_prefix_tokens:]
        assert torch.allclose(masked[0, 1 + 1], token + pos[1], atol=1e-6)  # hidden patch = token + position
        assert torch.equal(masked[0, 1 + 0], plain[0, 1 + 0])
        dropped = b.embed(x, mask)
        assert dropped.shape == (2, 1 + 3, b.num_features)
        assert torch.equal(dropped[0], plain[0, [0, 1, 3, 4]])
    sam = FrozenBackbone(TINY_SAM2[0], image_size=64, model_kwargs=TINY_SAM2[1])
    with pytest.raises(BackboneError, match="cannot drop tokens.*mask_token"):
        sam.embed(torch.randn(1, 3, 64, 64), torch.zeros(1, 16, 16, dtype=torch.bool))
    with pytest.raises(BackboneError, match=r"boolean \(B, 2, 2\)"):
        b.embed(x, torch.zeros(2, 3, 3, dtype=torch.bool), token)


def test_shallow_prompts_travel_between_blocks_and_dense_levels_keep_the_grid():
    name, kwargs = TINY_VIT4
    seg = PeftSegmenter(name, 2, peft={"method": "vpt", "num_prompts": 3}, image_size=SIZE, model_kwargs=kwargs)
    wrapped = [m for m in seg.modules() if isinstance(m, PromptedBlock)]
    assert [(m.prompts is not None, m.remove) for m in wrapped] == [(True, False), (False, True)]
    b = seg.backbone
    with torch.no_grad():
        tokens = b.run_blocks(b.embed(X), 0, 2)
        assert tokens.shape[1] == 1 + 3 + 4  # class token, prompts in flight, 2x2 patches
        assert [f.shape for f in b.forward_levels(X, [0, 1, 2, 3])] == [(3, 192, 2, 2)] * 4
        assert seg(X).shape == (3, 2, SIZE, SIZE)


def test_saved_artefact_bytes_do_not_depend_on_the_file_name(tmp_path):
    """Identical adapters give byte-identical files (torch.save would record the temporary file name)."""
    from medpeft_monai.peft.core import save_atomic

    name, kwargs = TINY_VIT
    payload = peft_state_dict(PeftClassifier(name, 2, peft={"method": "lora", "rank": 2}, image_size=32,
                                             model_kwargs=kwargs))
    save_atomic(payload, tmp_path / "adapter.pt")
    save_atomic(payload, tmp_path / "run2" / "other_name.pt")
    assert (tmp_path / "adapter.pt").read_bytes() == (tmp_path / "run2" / "other_name.pt").read_bytes()
    assert torch.load(tmp_path / "adapter.pt", weights_only=True)["fingerprint"] == payload["fingerprint"]
