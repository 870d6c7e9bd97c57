"""Decoupled cross-modal transfer: PSST (stage 1) and TP-MoME (stage 2) mechanisms on a tiny SAM2 Hiera."""

import math

import pytest
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader

from medpeft_monai.engines import EMATeacher, PSSTTrainer, complexity_scores
from medpeft_monai.losses import DINOLoss, error_weights, masked_patch_loss, patchify
from medpeft_monai.nets import CrossModalSegmenter, MoME, PSSTNetwork
from medpeft_monai.peft import adapter_parameters, peft_state_dict, save_atomic
from medpeft_monai.peft.prompts import WindowPromptAttention
from tests.conftest import TINY_SAM2

NAME, KW = TINY_SAM2
SMALL = dict(backbone=NAME, model_kwargs=KW, image_size=64)
HEAD = dict(head_dim=32, head_hidden=32, head_bottleneck=16, decoder_channels=16)


def tiny_psst(**kw):
    return PSSTNetwork(**SMALL, lora={"method": "lora", "rank": 4, "alpha": 4.0, "qkv_parts": "qv"}, **HEAD, **kw)


def tiny_segmenter(**kw):
    kw.setdefault("mome_channels", 16)
    return CrossModalSegmenter(**SMALL, num_classes=2, decoder_channels=16, **kw)


# ------------------------------------------------------------------------------------------------ losses


def test_mae_loss_counts_hidden_patches_only():
    torch.manual_seed(0)
    image, pred = torch.rand(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True  # top half hidden
    loss, err = masked_patch_loss(pred, image, mask, (4, 4))
    assert err.shape == (2, 16)
    edited = pred.clone()
    edited[:, :, 8:] += 5.0  # visible (bottom) half only
    assert torch.equal(masked_patch_loss(edited, image, mask, (4, 4))[0], loss)
    edited[:, :, :4] += 5.0  # a hidden row of patches
    assert masked_patch_loss(edited, image, mask, (4, 4))[0] > loss
    # the target is the per-patch-normalised image: predicting it exactly gives zero loss
    t = patchify(image, (4, 4))
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    exact = t.view(2, 4, 4, 1, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(2, 1, 16, 16)
    assert masked_patch_loss(exact, image, mask, (4, 4))[0] < 1e-8


def test_error_weights_grow_with_error_and_are_a_distribution_over_hidden_patches():
    err = torch.tensor([[0.1, 0.5, 0.9, 2.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = error_weights(err, mask, alpha=2.0)
    assert w[0, 3] == 0 and torch.isclose(w.sum(), torch.tensor(1.0))
    assert w[0, 0] < w[0, 1] < w[0, 2]
    assert torch.isclose(w[0, 2] / w[0, 0], torch.tensor(math.exp(2.0 * 0.8)))
    torch.testing.assert_close(error_weights(err, mask, alpha=0.0)[0, :3], torch.full((3,), 1 / 3))
    assert error_weights(err.requires_grad_(), mask, 1.0).grad_fn is None  # no gradient through the weights


def test_dino_loss_centre_follows_ema_rule_and_sharpening():
    loss = DINOLoss(4, student_temp=0.1, center_momentum=0.9)
    teacher = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 2.0]])
    loss.update_center(teacher)
    torch.testing.assert_close(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    loss.update_center(teacher)
    mean = teacher.mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, 0.9 * 0.1 * mean + 0.1 * mean)
    # a student that agrees with the sharpened teacher scores lower than one that disagrees
    s_good, s_bad = teacher.clone(), teacher.flip(-1)
    assert loss(s_good, teacher, 0.04) < loss(s_bad, teacher, 0.04)
    w = torch.tensor([1.0, 0.0])  # weighted: only the first position counts
    assert torch.isclose(loss(s_bad, teacher, 0.04, weights=w),
                         loss(s_bad[:1], teacher[:1], 0.04) / 2)


# ------------------------------------------------------------------------------------------------ stage 1


def test_psst_network_masks_with_the_mask_token_and_trains_only_lora_and_heads():
    net = tiny_psst()
    assert net.unit_grid == (8, 8) and net.unit_pixels == (8, 8)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all(not n.startswith("backbone.") or "lora_" in n for n in trainable)
    assert set(adapter_parameters(net, "modality_mri")) == {n for n in trainable if "lora_" in n}
    x = torch.rand(2, 1, 64, 64)
    mask = net.random_mask(2, 0.5)
    assert mask.shape == (2, 8, 8) and int(mask[0].sum()) == 32
    out = net(x, mask)
    assert out.reconstruction.shape == x.shape and out.patch_logits.shape == (2, 64, 32)
    # hidden pixels never reach the encoder (not even through overlapping patch kernels); visible ones do
    hidden_px = net.token_mask(mask).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    edited = torch.where(hidden_px, torch.rand_like(x), x)
    torch.testing.assert_close(net(edited, mask).image_logits, out.image_logits)
    assert not torch.allclose(net(torch.where(hidden_px, x, torch.rand_like(x)), mask).image_logits,
                              out.image_logits)


def test_ema_teacher_gets_no_gradients_and_moves_by_the_momentum_rule():
    net = tiny_psst()
    teacher = EMATeacher(net)
    names = set(teacher.params)
    assert names == {n for n, p in net.named_parameters() if p.requires_grad}
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in names)  # backbone shared, not copied
    before = {n: t.clone() for n, t in teacher.params.items()}
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    teacher.update(net, 0.9)
    current = dict(net.named_parameters())
    for n, t in teacher.params.items():
        assert not t.requires_grad
        torch.testing.assert_close(t, 0.9 * before[n] + 0.1 * current[n].detach())
    x = torch.rand(2, 1, 64, 64)
    out = teacher(net, x)
    assert out.image_logits.grad_fn is None
    assert not torch.allclose(out.image_logits, net(x).image_logits)


def _views(n=6):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(1, 64, 64, generator=g), "view2": torch.rand(1, 64, 64, generator=g)}
            for _ in range(n)]


def test_psst_trainer_warms_up_with_mae_then_distils_on_the_complex_subset():
    torch.manual_seed(0)
    net = tiny_psst()
    loader = DataLoader(_views(6), batch_size=3, shuffle=True)
    frozen = {n: p.clone() for n, p in net.backbone.named_parameters() if not p.requires_grad}
    lora = {n: p.clone() for n, p in adapter_parameters(net, "modality_mri").items()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    seen = []
    trainer = PSSTTrainer("cpu", 2, loader, net, opt, warmup_epochs=1, complexity_fraction=0.5,
                          teacher_temp_warmup_epochs=1)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(
        (e.state.epoch, float(e.state.output[0]["loss_image"]), float(e.state.output[0]["loss_patch"]))))
    scores_at_start = {}
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: e.state.epoch == 2 and scores_at_start.update(
        s=complexity_scores(net, DataLoader(loader.dataset, batch_size=3), trainer.mask_ratio)))
    trainer.run()
    assert [s[1] for s in seen if s[0] == 1] == [0.0, 0.0]  # warm-up: MAE only
    assert all(s[1] > 0 and s[2] > 0 for s in seen if s[0] == 2)  # joint: image and patch distillation
    # the joint stage ran on the half of the images with the highest MAE error variance
    assert trainer.joint_subset == sorted(torch.argsort(scores_at_start["s"], descending=True)[:3].tolist())
    assert trainer.teacher is not None
    assert all(torch.equal(p, frozen[n]) for n, p in net.backbone.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, lora[n]) for n, p in adapter_parameters(net, "modality_mri").items())


def _psst_run(folder, stop_after=None, resume=False):
    """PSST on 5 images, batch 2, 4 epochs (1 MAE warm-up), saved by the bundle's checkpointer; ``stop_after``
    ends the run after that epoch (as a kill at an epoch boundary would), ``resume`` continues it."""
    import random

    from medpeft_monai.handlers import BundleCheckpointer

    torch.manual_seed(0)
    random.seed(0)
    net = tiny_psst()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    trainer = PSSTTrainer("cpu", 4, DataLoader(_views(5), batch_size=2, shuffle=True), net, opt,
                          warmup_epochs=1, complexity_fraction=0.5)
    if stop_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    BundleCheckpointer(net, str(folder), model_file=None, adapter="modality_mri", resume=resume).attach(trainer)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    trainer.run()
    return trainer, losses


def test_psst_resumed_in_the_joint_stage_ends_as_the_uninterrupted_run(tmp_path):
    full, full_losses = _psst_run(tmp_path / "A")
    stopped, first = _psst_run(tmp_path / "B", stop_after=2)  # warm-up and one joint epoch, then stopped
    assert stopped.state.epoch == 2 and stopped.teacher is not None
    saved = torch.load(tmp_path / "B" / "last.pt", weights_only=True)["trainer"]["psst"]
    assert saved["joint_subset"] == full.joint_subset and saved["teacher"] is not None
    resumed, rest = _psst_run(tmp_path / "B", resume=True)
    assert first + rest == full_losses  # every step's loss, so the data order, teacher and centres too
    for name, t in full.teacher.params.items():
        assert torch.equal(resumed.teacher.params[name], t), name
    assert torch.equal(resumed.image_loss.center, full.image_loss.center)
    assert torch.equal(resumed.patch_loss.center, full.patch_loss.center)
    a, b = (torch.load(tmp_path / d / "adapter.pt", weights_only=True)["state_dict"] for d in "AB")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_psst_without_dino_is_mae_only():
    net = tiny_psst()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    trainer = PSSTTrainer("cpu", 2, DataLoader(_views(3), batch_size=3), net, opt, dino=False)
    trainer.run()
    assert trainer.teacher is None and float(trainer.state.output[0]["loss_image"]) == 0.0
    with pytest.raises(ValueError, match="warmup_epochs"):
        PSSTTrainer("cpu", 1, DataLoader(_views(3)), net, opt, warmup_epochs=1)
    with pytest.raises(TypeError, match="--dino False"):  # bool("false") would silently be True
        PSSTTrainer("cpu", 2, DataLoader(_views(3)), net, opt, dino="false")


# ------------------------------------------------------------------------------------------------ stage 2


def test_window_prompts_on_tinyvit_attend_with_zero_bias_to_the_prompts():
    from medpeft_monai.backbones import FrozenBackbone
    from medpeft_monai.peft import apply_peft

    bb = FrozenBackbone("tiny_vit_5m_224", image_size=64)
    apply_peft(bb, {"method": "window_prompt", "num_prompts": 3})
    site = next(m for m in bb.modules() if isinstance(m, WindowPromptAttention))
    base = site.attn
    x = torch.randn(2, 49, base.qkv.in_features)
    split = [base.key_dim, base.key_dim, base.val_dim]
    q, k, v = base.qkv(base.norm(x)).view(2, 49, base.num_heads, -1).split(split, dim=3)
    _, kp, vp = base.qkv(base.norm(site.prompts)).view(3, base.num_heads, -1).split(split, dim=2)
    keys = torch.cat([k, kp.expand(2, -1, -1, -1)], 1).transpose(1, 2)
    values = torch.cat([v, vp.expand(2, -1, -1, -1)], 1).transpose(1, 2)
    logits = q.transpose(1, 2) @ keys.transpose(-1, -2) * base.key_dim ** -0.5
    logits[..., :49] += base.attention_biases[:, base.attention_bias_idxs]
    ref = base.proj((logits.softmax(-1) @ values).transpose(1, 2).reshape(2, 49, -1))
    torch.testing.assert_close(site(x), ref, rtol=1e-4, atol=1e-5)


def test_window_prompts_are_extra_keys_and_values_of_every_window():
    net = tiny_segmenter()
    sites = [m for m in net.modules() if isinstance(m, WindowPromptAttention)]
    assert len(sites) == len(net.backbone.blocks)
    for site in (sites[0], sites[1]):  # a plain and a q-pool block
        base = site.attn
        x = torch.randn(2, 4, 4, base.dim)
        b, h, w, _ = x.shape
        q, k, v = base.qkv(x).reshape(b, h * w, 3, base.num_heads, -1).unbind(2)
        if base.q_pool is not None:
            q = base.q_pool(q.reshape(b, h, w, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, base.num_heads, -1)
        _, kp, vp = base.qkv(site.prompts).reshape(-1, 3, base.num_heads, k.shape[-1]).unbind(1)
        keys = torch.cat([k, kp.expand(b, -1, -1, -1)], 1).transpose(1, 2)
        values = torch.cat([v, vp.expand(b, -1, -1, -1)], 1).transpose(1, 2)
        attn = (q.transpose(1, 2) @ keys.transpose(-1, -2) * k.shape[-1] ** -0.5).softmax(-1)
        ref = base.proj((attn @ values).transpose(1, 2).reshape(b, h, w, -1))
        torch.testing.assert_close(site(x), ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def modality_lora(tmp_path_factory):
    torch.manual_seed(1)
    net = tiny_psst()
    with torch.no_grad():  # a "trained" modality LoRA: non-zero B
        for n, p in adapter_parameters(net, "modality_mri").items():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("psst") / "modality_lora_mri.pt"
    save_atomic(peft_state_dict(net, "modality_mri"), path)
    return path


def test_stage1_lora_loads_frozen_and_is_bit_identical_after_stage2(modality_lora):
    torch.manual_seed(0)
    net = tiny_segmenter(modality_lora={"mri": modality_lora})
    saved = torch.load(modality_lora, weights_only=True)["state_dict"]
    lora = adapter_parameters(net, "modality_mri")
    assert set(lora) == set(saved) and all(torch.equal(lora[n], saved[n]) for n in saved)
    assert not any(p.requires_grad for p in lora.values())
    task = adapter_parameters(net, "default")
    assert any(n.startswith("mome.") for n in task) and any(n.startswith("decoder.") for n in task)
    assert any(n.endswith("attn.prompts") for n in task)
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in task.values()}
    before = {n: p.clone() for n, p in task.items()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.rand(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.7).long()
    net.train()
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        prompts = [p for n, p in task.items() if n.endswith("attn.prompts")]
        experts = [p for n, p in task.items() if ".experts." in n or ".general." in n]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)
        assert all(p.grad is not None for p in experts)
        opt.step()
    assert all(torch.equal(lora[n], saved[n]) for n in saved)  # bit-identical
    assert all(not torch.equal(before[n], p) for n, p in task.items() if n.endswith("attn.prompts"))


def test_missing_modality_lora_file_names_stage_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="crossmodal_pretrain"):
        tiny_segmenter(modality_lora={"mri": tmp_path / "nope.pt"})


def test_gate_is_a_distribution_over_available_experts_and_changes_when_a_modality_is_masked():
    torch.manual_seed(0)
    mome = MoME(8, 3, channels=8)
    feats = [torch.randn(2, 8, 4, 4) for _ in range(3)]
    all_present = torch.ones(2, 3, dtype=torch.bool)
    _, beta = mome(feats, all_present)
    torch.testing.assert_close(beta.sum(1), torch.ones(2, 4, 4))
    assert (beta > 0).all()
    masked = all_present.clone()
    masked[:, 2] = False
    _, beta_masked = mome(feats, masked)
    torch.testing.assert_close(beta_masked.sum(1), torch.ones(2, 4, 4))
    assert (beta_masked[:, 3] == 0).all() and not torch.allclose(beta_masked[:, :3], beta[:, :3])


def test_a_dropped_modality_contributes_nothing():
    torch.manual_seed(0)
    net = tiny_segmenter().eval()
    x = torch.rand(2, 3, 64, 64)
    present = torch.tensor([[True, False, True], [True, True, True]])
    other = x.clone()
    other[0, 1] = torch.rand(64, 64)  # change the missing modality of sample 0 only
    with torch.no_grad():
        a, b = net(x, present, return_outputs=True), net(other, present, return_outputs=True)
    assert torch.equal(a.pred[0], b.pred[0])
    x0 = x.clone()
    x0[0, 1] = 0  # an all-zero channel is a missing modality when `present` is not given
    with torch.no_grad():
        assert torch.equal(net(x0)[0], a.pred[0])
        assert net(x0, return_outputs=True).present[0].tolist() == [True, False, True]
    with pytest.raises(Exception, match="one channel per modality"):
        net(torch.rand(1, 2, 64, 64))


def test_masked_modality_training_samples_non_empty_subsets_of_present_modalities():
    net = tiny_segmenter(modality_dropout=1.0)
    present = torch.ones(500, 3, dtype=torch.bool)
    present[:100, 0] = False
    sampled = net.sample_present(present)
    assert sampled.any(1).all() and not (sampled & ~present).any()
    assert (sampled.sum(1) < 3).float().mean() > 0.5  # most samples lose something
    assert len({tuple(r) for r in sampled.tolist()}) == 7  # every non-empty subset occurs
