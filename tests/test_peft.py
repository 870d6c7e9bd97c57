"""Mechanism tests of the PEFT core and the papers' baselines."""

import copy

import pytest
import torch
import torch.nn.functional as F

from medpeft_monai.nets import PeftClassifier
from medpeft_monai.peft import (
    LoRALinear,
    PeftError,
    PromptedBlock,
    count_parameters,
    load_peft_state_dict,
    merge_peft,
    peft_config,
    peft_state_dict,
    save_atomic,
    unmerge_peft,
)
from tests.conftest import TINY_SAM2, TINY_SWIN, TINY_VIT

X = torch.randn(4, 3, 64, 64)
Y = torch.tensor([0, 1, 2, 1])

# method -> predicate on parameter names (inside the backbone) that must be trainable
METHODS = {
    "linear_probe": lambda n: False,
    "full": lambda n: True,
    "bitfit": lambda n: n.endswith("bias") and ".blocks." in f".{n}",
    "lora": lambda n: "lora_" in n,
    "adapter": lambda n: ".adapter." in n,
    "adaptformer": lambda n: ".adapter." in n,
    "convpass": lambda n: ".adapter." in n,
    "vpt": lambda n: n.endswith("prompts"),
    "vpt_deep": lambda n: n.endswith("prompts"),
}


def build(method, spec=TINY_VIT, **kw):
    name, model_kwargs = spec
    cfg = {"method": "vpt", "deep": True} if method == "vpt_deep" else method
    torch.manual_seed(0)
    return PeftClassifier(name, 3, peft=cfg, image_size=64, model_kwargs=model_kwargs, **kw)


def frozen_reference(spec=TINY_VIT):
    return build("linear_probe", spec)


def train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()


@pytest.mark.parametrize("method", [m for m in METHODS if not m.startswith("vpt")])
@pytest.mark.parametrize("spec", [TINY_VIT, TINY_SWIN, TINY_SAM2], ids=["vit", "swin", "sam2hiera"])
def test_identity_at_initialisation(method, spec):
    if method == "convpass" and spec is not TINY_VIT:
        pytest.skip("Convpass is defined for ViT-family (B, N, C) tokens")
    ref, model = frozen_reference(spec).eval(), build(method, spec).eval()
    model.head.load_state_dict(ref.head.state_dict())  # the backbone is built from the same seed
    with torch.no_grad():
        assert torch.allclose(ref(X), model(X), atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_only_intended_parameters_train_and_frozen_weights_are_bit_identical(method):
    model = build(method)
    backbone_trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.backbone.named_parameters() if METHODS[method](n)}
    assert backbone_trainable == expected and (method == "linear_probe" or expected)
    assert all(p.requires_grad for p in model.head.parameters())

    before = copy.deepcopy(model.state_dict())
    train_steps(model)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None and not changed, f"frozen {n} changed or got a gradient"
    assert any(not torch.equal(p, before[f"backbone.{n}"]) for n, p in model.backbone.named_parameters()
               if p.requires_grad) or method == "linear_probe"


def test_lora_leaves_k_untouched_and_merges_exactly():
    model = build({"method": "lora", "rank": 4}).eval()
    train_steps(model)
    model.eval()
    layer = model.backbone.model.blocks[0].attn.qkv
    assert isinstance(layer, LoRALinear) and set(layer.slices) == {"q", "v"}
    d = layer.base.out_features // 3
    tokens = torch.randn(2, 17, layer.base.in_features)
    with torch.no_grad():
        out, base = layer(tokens), layer.base(tokens)
    assert torch.equal(out[..., d:2 * d], base[..., d:2 * d])  # K output identical to the frozen projection
    assert not torch.allclose(out[..., :d], base[..., :d]) and not torch.allclose(out[..., 2 * d:], base[..., 2 * d:])

    k_rows = layer.base.weight[d:2 * d].clone()
    with torch.no_grad():
        unmerged = model(X)
        merge_peft(model)
        merged = model(X)
        assert torch.equal(layer.base.weight[d:2 * d], k_rows)
        unmerge_peft(model)
        again = model(X)
    assert torch.allclose(unmerged, merged, atol=1e-5)
    assert torch.allclose(unmerged, again, atol=1e-5)


def test_non_linear_adapters_refuse_to_merge():
    with pytest.raises(PeftError, match="Bottleneck.*not linear"):
        merge_peft(build("adapter"))


def test_vpt_keeps_token_layout_and_deep_has_prompts_per_block():
    shallow, deep = build("vpt"), build("vpt_deep")
    wrapped = [m for m in shallow.modules() if isinstance(m, PromptedBlock)]
    assert [m.prompts is not None for m in wrapped] == [True, False]  # prompts enter once, then are carried
    assert all(m.prompts is not None for m in deep.modules() if isinstance(m, PromptedBlock))
    feats = deep.backbone.forward_levels(X, [0, 1])
    assert all(f.shape == (4, 192, 4, 4) for f in feats)
    # prompts influence the output (they attend with the patch tokens)
    with torch.no_grad():
        out = deep(X)
        for m in deep.modules():
            if isinstance(m, PromptedBlock):
                m.prompts.add_(torch.randn_like(m.prompts))  # (a constant shift would vanish in LayerNorm)
        assert not torch.allclose(out, deep(X))


def test_block_selection_and_config_errors():
    model = build({"method": "lora", "blocks": [-1]})
    assert not isinstance(model.backbone.model.blocks[0].attn.qkv, LoRALinear)
    assert isinstance(model.backbone.model.blocks[1].attn.qkv, LoRALinear)
    with pytest.raises(PeftError, match="Block index 5 is out of range.*2 blocks"):
        build({"method": "adapter", "blocks": [5]})
    with pytest.raises(PeftError, match="Unknown PEFT method 'lorra'.*lora"):
        peft_config("lorra")
    with pytest.raises(PeftError, match="no option.*'rnak'"):
        peft_config({"method": "lora", "rnak": 4})
    with pytest.raises(PeftError, match="No module matches .*nothing.*named like"):
        build({"method": "lora", "target": r"attn\.nothing"})


def test_parameter_counts():
    trainable, total = count_parameters(build({"method": "lora", "rank": 4}))
    # Q and V of 2 blocks: 2 * 2 * (4*192 + 192*4) plus a 192->3 head
    assert trainable == 2 * 2 * (2 * 4 * 192) + 192 * 3 + 3
    assert total > 500_000


def test_adapter_state_dict_roundtrip_and_refusals(tmp_path):
    model = build("adaptformer")
    train_steps(model)
    payload = peft_state_dict(model)
    assert set(payload["state_dict"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert payload["backbone"] == "vit_tiny_patch16_224" and payload["method"]["method"] == "adaptformer"
    path = tmp_path / "adapter.pt"
    save_atomic(payload, path)

    fresh = build("adaptformer")  # same seed => same frozen backbone
    load_peft_state_dict(fresh, path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(X), fresh(X))

    with pytest.raises(PeftError, match="trained on backbone 'vit_tiny_patch16_224'.*uses 'swin"):
        load_peft_state_dict(build("adaptformer", TINY_SWIN), path)
    with pytest.raises(PeftError, match="made with config.*adaptformer.*lora"):
        load_peft_state_dict(build("lora"), path)
    with pytest.raises(PeftError, match="hidden"):
        load_peft_state_dict(build({"method": "adaptformer", "hidden": 8}), path)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(PeftError, match="not a medpeft_monai adapter artefact"):
        load_peft_state_dict(fresh, tmp_path / "other.pt")
    with pytest.raises(PeftError, match="head.1.weight.*num_classes"):
        wrong = PeftClassifier("vit_tiny_patch16_224", 5, peft="adaptformer", image_size=64,
                               model_kwargs={"depth": 2})
        load_peft_state_dict(wrong, path)


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "adapter.pt"
    save_atomic({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Boom()}, path)
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]
