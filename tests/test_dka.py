"""DKA (Dual-Kernel Adapter): equation, placements, merged fast path, training, prefix bypass, lr groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import medpeft_monai.peft.dka  # noqa: F401  (registers the "dka" method)
from medpeft_monai.backbones import FrozenBackbone
from medpeft_monai.nets.classifier import PeftClassifier
from medpeft_monai.peft import (
    PeftError,
    apply_peft,
    load_peft_state_dict,
    merge_peft,
    param_groups,
    peft_config,
    peft_state_dict,
    unmerge_peft,
)
from medpeft_monai.peft.dka import (
    DKAAdapter,
    DKABlock,
    DKAConfig,
    DualKernelConv,
    cropped_kernel_size,
)
from tests.conftest import perturb_trainable

VIT = ("vit_tiny_patch16_224", {"depth": 2}, 64)
VIT_WIDE = ("vit_tiny_patch16_224", {"depth": 2}, (64, 96))
SWIN = ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}, 64)
SAM2 = ("sam2_hiera_tiny", {"stages": (1, 1, 1, 1)}, 64)
HIERA = ("hiera_tiny_224", {"stages": (1, 1, 1, 1)}, 64)
DINO_REG = ("vit_small_patch14_reg4_dinov2", {"depth": 1}, 56)


def backbone(spec, peft=None) -> FrozenBackbone:
    name, kwargs, size = spec
    torch.manual_seed(0)
    b = FrozenBackbone(name, image_size=size, model_kwargs=kwargs).eval()
    if peft is not None:
        apply_peft(b, peft)
        b.eval()
    return b


def image(b: FrozenBackbone, n: int = 2) -> torch.Tensor:
    return torch.randn(n, b.in_chans, *b.image_size, generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------------------- DualKernelConv
def random_conv(m=4, large=51, small=5, seed=0, std=0.02, dtype=torch.float32) -> DualKernelConv:
    """Random non-zero weights at the scale of a trained kernel (outputs of order 1)."""
    torch.manual_seed(seed)
    conv = DualKernelConv(m, large, small).to(dtype)
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_(0, std)
    return conv


# square and non-square, smaller than the 51x51 reach (cropped kernel) and larger than it (full kernel)
GRIDS = [(4, 4), (4, 6), (7, 3), (1, 5), (3, 40), (26, 26), (60, 60), (30, 70)]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's scale (gradients of kernels sum over B*H*W terms)."""
    return (a - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def forward_backward(conv: DualKernelConv, z: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and gradients of ``sum(conv(z) * grad_out)`` for the input and every branch parameter."""
    conv.zero_grad(set_to_none=True)
    z = z.detach().clone().requires_grad_()
    out = conv(z)
    (out * grad_out).sum().backward()
    return {"output": out.detach(), "input": z.grad, **{n: p.grad for n, p in conv.named_parameters()}}


def count_branch_calls(conv: DualKernelConv) -> list:
    calls = []
    for name in ("large", "small"):
        getattr(conv, name).register_forward_hook(lambda mod, inp, out, name=name: calls.append(name))
    return calls


def test_auto_path_takes_the_single_kernel_where_the_grid_crops_it():
    conv = random_conv()
    assert conv.path == "auto"
    single = {g: conv.uses_single_kernel(g) for g in GRIDS + [(14, 14), (24, 24), (25, 25), (40, 24)]}
    # cropped kernels (fewer multiply-adds) -> single; grids reaching the full 51x51 kernel -> two branches
    assert single == {(4, 4): True, (4, 6): True, (7, 3): True, (1, 5): True, (3, 40): True, (14, 14): True,
                      (24, 24): True, (25, 25): True, (40, 24): True,
                      (26, 26): False, (60, 60): False, (30, 70): False}
    conv.path = "single"
    assert conv.uses_single_kernel((60, 60))
    conv.path = "two_branch"
    assert not conv.uses_single_kernel((4, 4))
    with pytest.raises(PeftError, match="path must be one of"):
        conv.path = "merged"
    with pytest.raises(PeftError, match="path must be one of"):
        DualKernelConv(4, path="fast")
    assert "path='auto'" in repr(DualKernelConv(4))


@pytest.mark.parametrize("path", ["auto", "single"])
@pytest.mark.parametrize("grid", GRIDS)
def test_training_path_equals_two_branch_reference(grid, path):
    """The training path (default "auto", and the single kernel forced on every grid): outputs and the
    gradients of input, both weights and both biases are those of the two-branch form."""
    conv = random_conv()
    conv.path = path
    calls = count_branch_calls(conv)
    gen = torch.Generator().manual_seed(1)
    z, g = torch.randn(2, 4, *grid, generator=gen), torch.randn(2, 4, *grid, generator=gen)
    fast = forward_backward(conv, z, g)
    single = conv.uses_single_kernel(grid)
    assert single == (path == "single" or cropped_kernel_size(51, grid) != (51, 51))
    assert calls == ([] if single else ["large", "small"]), "the single kernel runs neither branch convolution"
    conv.path = "two_branch"
    ref = forward_backward(conv, z, g)
    assert calls[-2:] == ["large", "small"], "the reference runs the two branches"
    assert set(fast) == {"output", "input", "large.weight", "large.bias", "small.weight", "small.bias"}
    assert ref["output"].abs().max() > 0.1
    for name in fast:
        assert fast[name].shape == ref[name].shape, name
        assert rel_err(fast[name], ref[name]) <= 1e-5, name
    assert (fast["output"] - ref["output"]).abs().max().item() <= 1e-5
    assert (fast["input"] - ref["input"]).abs().max().item() <= 1e-5
    # offsets the grid cannot reach get exactly no gradient in either form
    kh, kw = cropped_kernel_size(51, grid)
    outside = torch.ones(51, 51, dtype=torch.bool)
    outside[(51 - kh) // 2:(51 + kh) // 2, (51 - kw) // 2:(51 + kw) // 2] = False
    assert not fast["large.weight"][..., outside].any() and not ref["large.weight"][..., outside].any()


@pytest.mark.parametrize("grid", [(4, 6), (1, 5), (3, 40), (30, 30)])
def test_training_path_gradients_are_exact_in_float64(grid):
    conv = random_conv(std=0.5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, *grid, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 4, *grid, generator=gen, dtype=torch.float64)
    conv.path = "single"
    fast = forward_backward(conv, z, g)
    conv.path = "two_branch"
    ref = forward_backward(conv, z, g)
    for name in fast:
        assert rel_err(fast[name], ref[name]) <= 1e-12, name


@pytest.mark.parametrize("grid", GRIDS)
def test_dual_kernel_merged_equals_two_branches(grid):
    conv = random_conv()
    z = torch.randn(2, 4, *grid)
    ref = conv.two_branch(z)
    assert ref.abs().max() > 0.1
    assert torch.equal(ref, conv.large(z) + conv.small(z))
    train_path = conv(z)
    assert (train_path - ref).abs().max().item() <= 1e-5
    conv.path = "single"
    single = conv(z)
    conv.merge()
    with torch.no_grad():
        fast = conv(z)  # cached kernel
    assert fast.shape == ref.shape
    assert (fast - ref).abs().max().item() <= 1e-5
    fast_grad = conv(z)  # differentiable merged path
    assert fast_grad.grad_fn is not None and torch.equal(fast_grad, single)
    conv.unmerge()
    assert torch.equal(conv(z), single)
    conv.path = "two_branch"
    assert torch.equal(conv(z), ref)
    conv.merge()  # merged wins over the path: inference uses the cached kernel
    with torch.no_grad():
        assert torch.equal(conv(z), fast)


@pytest.mark.parametrize("grid", GRIDS)
def test_dual_kernel_merge_is_exact_in_float64(grid):
    conv = random_conv(std=0.5, dtype=torch.float64)
    z = torch.randn(2, 4, *grid, dtype=torch.float64)
    with torch.no_grad():
        ref = conv.two_branch(z)
        conv.merge()
        fast = conv(z)
    assert (fast - ref).abs().max().item() <= 1e-10 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("grid, expected", [((4, 4), (7, 7)), ((4, 6), (7, 11)), ((2, 40), (3, 51)),
                                            ((26, 26), (51, 51)), ((40, 40), (51, 51)), ((60, 60), (51, 51))])
def test_cropped_kernel_size(grid, expected):
    conv = random_conv()
    assert cropped_kernel_size(51, grid) == expected
    w, b = conv.merged_kernel(grid)
    assert tuple(w.shape) == (4, 1, *expected) and tuple(b.shape) == (4,)


def test_merged_kernel_is_padded_sum():
    conv = random_conv(large=9, small=3)
    w, b = conv.merged_kernel()
    expected = conv.large.weight.clone()
    expected[:, :, 3:6, 3:6] += conv.small.weight
    assert torch.allclose(w, expected) and torch.allclose(b, conv.large.bias + conv.small.bias)
    # cropping keeps the centre, also when the crop is smaller than the small kernel
    wc, _ = conv.merged_kernel((2, 3))
    assert torch.equal(wc, w[:, :, 3:6, 2:7])
    w1, _ = conv.merged_kernel((1, 2))
    assert torch.equal(w1, w[:, :, 4:5, 3:6])


def test_merged_cache_follows_parameter_updates():
    conv = random_conv()
    z = torch.randn(1, 4, 5, 5)
    conv.merge()
    with torch.no_grad():
        conv(z)
        conv.large.weight.add_(1.0)  # an optimizer step changes the parameters in place
        fast = conv(z)
    conv.unmerge()
    assert (fast - conv(z)).abs().max().item() <= 1e-4
    # loading a state dict changes them too
    other = random_conv(seed=3)
    conv.merge()
    with torch.no_grad():
        conv(z)
        conv.load_state_dict(other.state_dict())
        loaded = conv(z)
        assert (loaded - other.two_branch(z)).abs().max().item() <= 1e-5
    assert conv._kernel_cache._entry is not None  # one entry (ParameterCache), replaced when parameters change


def test_optimizer_steps_on_the_training_path_match_the_reference():
    """A few AdamW steps on the single-kernel path move the branch parameters as on the two-branch path."""
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1))
    finals = []
    for path in ("single", "two_branch"):
        conv = random_conv()
        conv.path = path
        opt = torch.optim.AdamW(conv.parameters(), lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            conv(z).square().sum().backward()
            opt.step()
        finals.append([p.detach().clone() for p in conv.parameters()])
    for fast, ref in zip(*finals):
        assert (fast - ref).abs().max().item() <= 1e-6


def test_merged_training_gradients_match_reference():
    conv = random_conv()
    z = torch.randn(2, 4, 5, 7)
    conv.path = "two_branch"
    conv(z).square().sum().backward()
    ref = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    conv.merge()
    conv(z).square().sum().backward()
    for g_ref, p in zip(ref, conv.parameters()):
        assert rel_err(p.grad, g_ref) <= 1e-5


def test_whole_model_training_step_matches_two_branch_reference():
    """Every adapter of a classifier on the single-kernel path gives the reference loss and gradients."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 64, 64, generator=gen), torch.tensor([0, 1, 2, 0])
    grads = []
    for path in ("auto", "two_branch"):
        model = perturb_trainable(tiny_classifier(dropout=0.0), seed=1).train()
        convs = [m for m in model.modules() if isinstance(m, DualKernelConv)]
        assert len(convs) == 2 and all(c.path == "auto" and c.uses_single_kernel((4, 4)) for c in convs)
        for c in convs:
            c.path = path
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, fast), (loss_ref, ref) = grads
    assert abs(loss.item() - loss_ref.item()) <= 1e-5
    assert fast.keys() == ref.keys() and any("small.weight" in n for n in fast)
    for n in fast:
        assert rel_err(fast[n], ref[n]) <= 1e-5, n


def test_config_validation():
    assert isinstance(peft_config({"method": "dka"}), DKAConfig)
    cfg = DKAConfig()
    assert (cfg.hidden, cfg.large_kernel, cfg.small_kernel, cfg.position, cfg.scale) == (16, 51, 5, "block", 1.0)
    with pytest.raises(PeftError, match="position"):
        DKAConfig(position="everywhere")
    with pytest.raises(PeftError, match="odd"):
        DKAConfig(large_kernel=50)
    with pytest.raises(PeftError, match="exceed"):
        DKAConfig(large_kernel=5, small_kernel=7)
    with pytest.raises(PeftError, match="ViT-family"):
        backbone(SWIN, {"method": "dka", "position": "attn"})


# --------------------------------------------------------------------------------------- whole backbones
@pytest.mark.parametrize("spec, position", [(VIT, "block"), (VIT, "mlp"), (VIT, "both"), (VIT_WIDE, "block"),
                                            (VIT_WIDE, "attn"), (SWIN, "block"), (SWIN, "mlp"), (SAM2, "block"),
                                            (SAM2, "mlp"), (HIERA, "block"), (DINO_REG, "block")])
def test_identity_at_init_and_merge_round_trip(spec, position):
    b = backbone(spec)
    x = image(b)
    with torch.no_grad():
        ref = b(x)  # the frozen backbone, before injection
    apply_peft(b, {"method": "dka", "position": position})
    b.eval()
    with torch.no_grad():
        assert torch.equal(b(x), ref), "zero-initialised up-projection must leave the backbone unchanged"
        perturb_trainable(b, seed=1)
        adapted = b(x)
        assert (adapted - ref).abs().max().item() > 1e-3
        merge_peft(b)
        assert all(m.merged for m in b.modules() if isinstance(m, DualKernelConv))
        fast = b(x)
        unmerge_peft(b)
        back = b(x)
    assert (fast - adapted).abs().max().item() <= 1e-5
    assert torch.equal(back, adapted)


def test_injected_modules_and_cropped_kernels():
    b = backbone(VIT_WIDE, {"method": "dka"})
    wrappers = [b.block_module(i) for i in range(len(b.blocks))]
    assert all(isinstance(w, DKABlock) for w in wrappers)
    assert wrappers[0].attn is wrappers[0].inner.attn  # attributes are read through the wrapper
    merge_peft(b)
    convs = [m for m in b.modules() if isinstance(m, DualKernelConv)]
    assert len(convs) == 2
    for conv in convs:
        w, _ = conv._kernel_cache._entry[1]
        assert tuple(w.shape[-2:]) == (7, 11)  # (2H-1, 2W-1) on the 4x6 grid instead of 51x51


def test_hiera_unrolled_tokens_are_convolved_in_raster_order():
    b = backbone(HIERA, {"method": "dka"})
    perturb_trainable(b, seed=1)
    index = 1  # a stage opener: 16x16 input, 8x8 output
    wrapper = b.block_module(index)
    adapter: DKAAdapter = wrapper.adapter
    y = torch.randn(2, 64, adapter.down.in_features)
    with torch.no_grad():
        unrolled = b.model.reroll(adapter(y), index)  # adapter on unrolled tokens, then rerolled
        spatial = b.model.reroll(y, index)  # rerolled first, adapter applied on the (B, H, W, C) grid
        z = F.gelu(adapter.down(spatial)).permute(0, 3, 1, 2)
        z = F.gelu(adapter.dual_conv(z)).permute(0, 2, 3, 1)
        expected = adapter.up(z) * adapter.gate
    assert unrolled.shape == (2, 8, 8, adapter.down.in_features)
    assert (unrolled - expected).abs().max().item() <= 1e-5


def test_prefix_tokens_bypass_the_convolution():
    b = backbone(DINO_REG, {"method": "dka", "dropout": 0.0})
    info = b.blocks[0]
    assert info.num_prefix_tokens == 5 and info.grid == (4, 4)
    perturb_trainable(b, std=0.2, seed=1)
    adapter = b.block_module(0).adapter
    p = info.num_prefix_tokens
    h = torch.randn(1, p + 16, info.width)
    with torch.no_grad():
        base = adapter(h)
        far = h.clone()
        far[:, p + 15] += 3.0  # bottom-right patch token
        moved = adapter(far)
        pre = h.clone()
        pre[:, 2] += 3.0  # one register token
        moved_pre = adapter(pre)
    changed = (moved - base).abs().amax(dim=-1)[0]
    assert changed[p] > 1e-4, "the top-left patch must see the far bottom-right patch through the 51x51 kernel"
    assert changed[p:].gt(1e-4).all()
    assert torch.equal(moved[:, :p], base[:, :p]), "prefix tokens must not see patch tokens"
    changed_pre = (moved_pre - base).abs().amax(dim=-1)[0]
    assert changed_pre[2] > 1e-4
    assert torch.equal(moved_pre[:, [0, 1, 3, 4]], base[:, [0, 1, 3, 4]])
    assert torch.equal(moved_pre[:, p:], base[:, p:]), "patch tokens must not see prefix tokens"


# --------------------------------------------------------------------------------------- training
def tiny_classifier(**peft) -> PeftClassifier:
    # Average pooling: with class-token pooling the last block's convolution cannot reach the logits
    # (prefix tokens bypass it and nothing mixes tokens after it), so it would get no gradient.
    name, kwargs, size = VIT
    torch.manual_seed(0)
    return PeftClassifier(name, num_classes=3, peft={"method": "dka", **peft}, image_size=size,
                          model_kwargs={**kwargs, "global_pool": "avg"})


def test_training_updates_only_adapter_and_head():
    model = tiny_classifier()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert all(".adapter." in n or n.startswith("head.") for n in trainable)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 64, 64, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW(param_groups(model), weight_decay=0.0)
    model.train()
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
        else:
            assert not torch.equal(p, trainable[n]), f"{n} did not train"


def test_param_groups_split_adapter_and_head():
    model = tiny_classifier()
    groups = param_groups(model)
    assert [g["name"] for g in groups] == ["adapter", "head"]
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.head.parameters()}
    groups = param_groups(model, 5e-3, 5e-4, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05]
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [5e-3, 5e-4]


def test_adapter_checkpoint_round_trip_and_deepcopy():
    model = tiny_classifier().eval()
    perturb_trainable(model, seed=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    payload = peft_state_dict(model)
    assert payload["method"]["method"] == "dka"
    assert not any("perm" in k or "inverse" in k for k in payload["state_dict"])
    fresh = tiny_classifier().eval()
    load_peft_state_dict(fresh, payload)
    twin = copy.deepcopy(fresh)
    merge_peft(twin)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
        assert (twin(x) - ref).abs().max().item() <= 1e-5
