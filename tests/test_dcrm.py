"""Mechanism tests of DCRM-ViT: RMB on Q/V only, router/PSN/DAB, ablation switches, the bi-level trainer,
adapter round trip, the PSN cost model, and the dcrm_vit_multidomain bundle end to end."""

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from medpeft_monai.data import DomainEpisodeSampler
from medpeft_monai.engines import BilevelTrainer, modulator_parameter_names, split_tasks
from medpeft_monai.nets import PeftClassifier
from medpeft_monai.nets.dcrm import DCRMClassifier, DCRMSegmenter
from medpeft_monai.peft import PeftError, load_peft_state_dict, peft_state_dict
from medpeft_monai.peft.dcrm import (
    DCRMBlock,
    DomainAwareBias,
    ResidualModulation,
    TALer,
    find_controller,
    psn_flops,
)
from tests.conftest import TINY_VIT, TINY_VIT4, copy_bundle, perturb_trainable
from tests.conftest import run_bundle as _run_bundle

BUNDLE = "dcrm_vit_multidomain"
SIZE = 32
K = 3


def build(num_domains=K, seed=0, spec=TINY_VIT, **peft):
    """Tiny DCRM classifier; with the 2-block ViT the router reads block 0 and block 1 is modulated."""
    name, kwargs = spec
    torch.manual_seed(seed)
    return DCRMClassifier(name, 2, num_domains=num_domains, peft=peft, image_size=SIZE, model_kwargs=kwargs)


def routing(model, x):
    """The routing of one forward pass, as the network computes it (``encode``'s context)."""
    return model.backbone.encode(x).context["default"]


def perturb(model, std=0.05, seed=1):
    """Give every zero-initialised DCRM parameter a random value (so corrections are non-zero)."""
    return perturb_trainable(model, std, seed, skip=lambda name: name.endswith("log_inner_lr"))


def run_bundle(bundle_root, configs, *overrides):
    return _run_bundle(bundle_root, configs, *overrides, timeout=900)


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g)


def frozen_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# ---------------------------------------------------------------------------------------------- RMB / K


def _qkv_pairs(model, x):
    """``(frozen qkv output, modulated qkv)`` of every modulated block for one forward pass."""
    seen = []
    for m in model.modules():
        if isinstance(m, DCRMBlock):
            frozen = []
            m.block.attn.qkv.register_forward_hook(lambda mod, inp, out, f=frozen: f.append(out.clone()))
            m.rmb.register_forward_hook(lambda mod, inp, out, f=frozen: seen.append((f[-1], out.clone())))
    with torch.no_grad():
        model(x)
    return seen


def test_k_output_is_the_frozen_projection_bit_for_bit():
    model = perturb(build(spec=TINY_VIT4)).eval()
    seen = _qkv_pairs(model, images())
    assert len(seen) == 2  # blocks 2 and 3 (the router reads block 1, mid-depth of 4)
    for ref, out in seen:
        d = ref.shape[-1] // 3
        assert torch.equal(out[..., d:2 * d], ref[..., d:2 * d])       # K untouched
        assert not torch.allclose(out[..., :d], ref[..., :d])           # Q corrected
        assert not torch.allclose(out[..., 2 * d:], ref[..., 2 * d:])   # V corrected


@pytest.mark.parametrize("k", [0, 2])
def test_routing_from_block_k_modulates_only_later_blocks_per_input(k):
    model = perturb(build(spec=TINY_VIT4, route_from_block=k), std=0.2).eval()
    bb = model.backbone
    modulated = [i for i in range(4) if isinstance(bb.block_module(i), DCRMBlock)]
    assert modulated == list(range(k + 1, 4)) and find_controller(model).route_from_block == k
    a, b = images(2, seed=1), images(2, seed=2)
    with torch.no_grad():
        ra, rb = routing(model, a), routing(model, b)
        # the router reads the output of block k: recompute it by stepping through the frozen blocks
        tokens = bb.run_blocks(bb.embed(a), 0, k + 1)
        direct = find_controller(model)(tokens)
    torch.testing.assert_close(direct.domain_probs, ra.domain_probs, rtol=0, atol=0)
    assert not torch.allclose(ra.domain_probs, rb.domain_probs)                      # D(x) follows the input
    assert all(not torch.allclose(ra.synth[key], rb.synth[key]) for key in ra.synth)  # so do the corrections
    assert {key.split(".")[1] for key in ra.synth} == {str(i) for i in modulated}
    for x in (a, b):  # K is the frozen projection's own output in every modulated block, whatever the input
        for ref, out in _qkv_pairs(model, x):
            d = ref.shape[-1] // 3
            assert torch.equal(out[..., d:2 * d], ref[..., d:2 * d])
    with pytest.raises(PeftError, match="route_from_block=3 must leave at least one block"):
        build(spec=TINY_VIT4, route_from_block=3)
    with pytest.raises(PeftError, match=r"Blocks \[1\] run before the router"):
        build(spec=TINY_VIT4, route_from_block=1, blocks=[1, 2])


def test_k_target_is_refused():
    with pytest.raises(PeftError, match="K stays frozen"):
        build(targets="qk")


def test_at_init_output_equals_frozen_backbone_plus_head():
    x = images()
    name, kwargs = TINY_VIT
    torch.manual_seed(0)
    ref = PeftClassifier(name, 2, image_size=SIZE, model_kwargs=kwargs).eval()
    for use_dab in (False, True):
        model = build(use_dab=use_dab).eval()
        model.head.load_state_dict(ref.head.state_dict())
        with torch.no_grad():
            out, expected = model(x), ref(x)
        if use_dab:  # a zero float mask may take another attention kernel
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------- DR + PSN


def _synth_vector(ctrl, embedding, probs):
    return torch.cat([v.reshape(v.shape[0], -1) for v in ctrl.synthesize(embedding, probs).values()], dim=1)


def test_synthesised_parameters_differ_by_input_and_move_smoothly_with_domain_probs():
    model = perturb(build(), std=0.2).eval()
    ctrl = find_controller(model)
    # a grey speckle ("medical-like") image and a colourful smooth ("natural-like") one
    g = torch.Generator().manual_seed(3)
    grey = torch.rand(1, 1, SIZE, SIZE, generator=g).repeat(1, 3, 1, 1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    colour = torch.stack([yy, xx, 1 - yy]).unsqueeze(0)
    with torch.no_grad():
        r = routing(model, torch.cat([grey, colour]))
        synth = r.synth
        a, b = (torch.cat([v[i] for v in synth.values()]) for i in (0, 1))
        assert not torch.allclose(a, b, atol=1e-4)
        taler = next(m for m in model.modules() if isinstance(m, TALer))
        key = next(iter(synth))
        w = taler.parameters_for(synth[key])["W_DS_T"]
        assert not torch.allclose(w[0], w[1], atol=1e-5)

        # interpolate D(x) between one-hot domains at a fixed embedding
        emb = r.embedding[:1]
        ts = torch.linspace(0, 1, 21)
        e0, e1 = torch.eye(K)[0], torch.eye(K)[1]
        thetas = torch.cat([_synth_vector(ctrl, emb, ((1 - t) * e0 + t * e1)[None]) for t in ts])
        steps = (thetas[1:] - thetas[:-1]).norm(dim=1)
        dist = (thetas - thetas[0]).norm(dim=1)
        assert dist[-1] > 0
        # Lipschitz bound of FC2 . GELU . FC1 restricted to the D(x) input (|GELU'| <= 1.13)
        w1p = ctrl.psn.fc1.weight[:, -K:]
        lip = torch.linalg.matrix_norm(ctrl.psn.fc2.weight, 2) * 1.13 * torch.linalg.matrix_norm(w1p, 2)
        dp = ((e1 - e0) * (ts[1] - ts[0])).norm()
        assert (steps <= lip * dp + 1e-6).all()
        assert (dist[1:] >= dist[:-1] - 1e-6).all()  # monotone away from the start
        assert steps.max() <= 2.0 * steps.mean()      # no jumps


def test_router_outputs_and_medical_subdomains():
    model = build(num_domains=5).eval()
    out = model(images(3), return_outputs=True)
    assert out.pred.shape == (3, 2) and out.domain_logits.shape == (3, 5)
    torch.testing.assert_close(out.domain_probs.sum(1), torch.ones(3))
    torch.testing.assert_close(out.domain_probs, torch.softmax(out.domain_logits, 1))
    torch.testing.assert_close(out.pred, model(images(3)), rtol=0, atol=0)
    with pytest.raises(PeftError, match="num_domains"):
        build(num_domains=1)


# ---------------------------------------------------------------------------------------------- DAB


@pytest.mark.parametrize("form", ["relative", "full"])
def test_bias_mixing_is_sum_of_domain_matrices(form):
    torch.manual_seed(0)
    bias = DomainAwareBias(num_domains=4, num_heads=3, grid=(2, 3), num_prefix_tokens=1, form=form)
    with torch.no_grad():
        for p in bias.parameters():
            p.normal_()
    probs = torch.softmax(torch.randn(5, 4), dim=1)
    mats = bias.matrices()
    assert mats.shape == (4, 3, 7, 7)
    expected = sum(probs[:, k, None, None, None] * mats[k] for k in range(4))
    torch.testing.assert_close(bias(probs), expected, rtol=1e-6, atol=1e-6)
    onehot = torch.eye(4)[2:3]
    assert torch.equal(bias(onehot)[0], mats[2])
    with torch.no_grad():  # the inference cache follows parameter updates
        cached = bias(probs)
        bias.table.add_(1.0)
        assert not torch.allclose(bias(probs), cached)
        bias.table.sub_(1.0)
        torch.testing.assert_close(bias(probs), cached)
    if form == "relative":  # patch pairs with the same offset share an entry
        m = mats[0, 0, 1:, 1:]
        assert m[0, 1] == m[3, 4] and m[1, 0] == m[4, 3]


def test_modulated_attention_is_softmax_of_logits_plus_mixed_bias():
    # float64: the fused attention kernel and the explicit softmax then agree to rounding on any CPU
    model = perturb(build(), std=0.2).double().eval()
    blk = next(m for m in model.modules() if isinstance(m, DCRMBlock))
    x = images(2).double()
    r = routing(model, x)
    attn = blk.block.attn
    h = torch.randn(2, blk.bias.num_tokens, attn.qkv.in_features, dtype=torch.float64)
    with torch.no_grad():
        got = blk.attention(h, r)
        qkv = blk.rmb(attn.qkv(h), h, r.synth)
        q, k, v = qkv.reshape(2, h.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * attn.scale + blk.bias(r.domain_probs)
        ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, h.shape[1], -1))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        blk.bias.table.zero_()
        assert not torch.allclose(blk.attention(h, r), got)  # the bias really enters the logits


# ---------------------------------------------------------------------------------------------- ablations


def test_each_ablation_switch_removes_its_component():
    full = build()
    names = {n for n, p in full.named_parameters() if p.requires_grad}
    assert any(".talers." in n for n in names) and any(".router." in n for n in names)
    assert any(".psn." in n for n in names) and any(".bias." in n for n in names)
    assert any(n.endswith("rescale") for n in names)

    m = build(use_rmb=False)
    assert not any(isinstance(x, (ResidualModulation, TALer)) for x in m.modules()) and find_controller(m).psn is None
    assert all(b.rmb is None for b in m.modules() if isinstance(b, DCRMBlock))

    m = build(use_router=False).eval()
    assert find_controller(m).router is None
    out = m(images(2), return_outputs=True)
    assert out.domain_logits is None and torch.equal(out.domain_probs, torch.full((2, K), 1.0 / K))

    m = perturb(build(use_psn=False)).eval()
    assert find_controller(m).psn is None
    with torch.no_grad():
        r = routing(m, images(3))
    assert r.synth is None and float(r.synth_reg) == 0.0

    m = build(use_dab=False)
    assert not any(isinstance(x, DomainAwareBias) for x in m.modules())
    assert all(b.bias is None for b in m.modules() if isinstance(b, DCRMBlock))

    m = build(use_rescale=False)
    talers = [x for x in m.modules() if isinstance(x, TALer)]
    assert all(t.rescale is None for t in talers)
    assert talers[0].synth_size == next(t for t in build().modules() if isinstance(t, TALer)).synth_size - 1


def test_optimizer_groups_keep_meta_and_bias_parameters_out_of_weight_decay():
    from medpeft_monai.peft import param_groups

    model = build()
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 1e-3, weight_decay=0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0.05 for p in g["params"]}
    assert any(n.endswith("log_inner_lr") for n in no_decay)
    assert any(".bias.table" in n for n in no_decay) and any(n.endswith("coef_down") for n in no_decay)
    assert any(n.endswith("coef_up") for n in no_decay)
    assert any(".bank_down" in n for n in decay) and any(".psn." in n for n in decay)
    assert not any(n.endswith(("log_inner_lr", "coef_down", "coef_up")) or ".bias.table" in n for n in decay)
    assert no_decay | decay == {n for n, p in model.named_parameters() if p.requires_grad}


def test_no_meta_learning_runs_no_inner_loop(monkeypatch):
    model = build()
    trainer = _trainer(model, _toy_loader(), mode="joint")
    monkeypatch.setattr(trainer, "_adapt", lambda *a, **k: (_ for _ in ()).throw(AssertionError("inner loop ran")))
    trainer.run()
    assert math.isfinite(float(trainer.state.output[0]["loss"]))


# ---------------------------------------------------------------------------------------------- bi-level


def _toy_data(n=16, seed=0):
    """Two domains; the class is the domain, visible as a brightness offset."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        d = i % 2
        out.append({"image": torch.randn(3, SIZE, SIZE, generator=g) * 0.5 + (1.0 if d else -1.0),
                    "label": torch.tensor(d), "domain_id": d})
    return out


def _toy_loader(n=16, batch=8):
    return torch.utils.data.DataLoader(_toy_data(n), batch_size=batch, shuffle=False)


def _trainer(model, loader, epochs=1, lr=1e-2, **kw):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return BilevelTrainer("cpu", epochs, loader, model, opt, torch.nn.CrossEntropyLoss(), **kw)


def test_inner_loop_changes_modulators_and_never_the_backbone():
    model = perturb(build())
    trainer = _trainer(model, _toy_loader())
    batch = next(iter(_toy_loader()))
    x, y = batch["image"][:4], batch["label"][:4]
    before = frozen_params(model)
    params = dict(model.named_parameters())
    phi = {n: params[n].detach().clone() for n in trainer.inner_names}
    assert trainer.inner_names == modulator_parameter_names(model) and trainer.inner_names
    assert all(".talers." in n for n in trainer.inner_names)
    loss = trainer.dcrm_loss.task(model(x), y)
    fast = trainer._adapt(model, x, y, loss)
    assert set(fast) == set(phi)
    assert any(not torch.equal(fast[n], phi[n]) for n in phi)
    for n, value in phi.items():  # the inner loop is functional: phi itself is untouched
        assert torch.equal(params[n], value)
    trainer.run()  # full episodes with the outer update
    after = frozen_params(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert any(not torch.equal(params[n].detach(), phi[n]) for n in phi)


@pytest.mark.parametrize("first_order", [False, True])
def test_outer_gradient_reaches_router_psn_and_inner_lr(first_order):
    model = build()
    loader = _toy_loader()
    trainer = _trainer(model, loader, first_order=first_order)
    trainer.run()  # two episodes: the zero-initialised PSN output layer moves off zero
    batch = next(iter(loader))
    ctrl = find_controller(model)
    model.zero_grad()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        loss, _, _ = trainer._bilevel(model, batch["image"], batch["label"], torch.as_tensor(batch["domain_id"]))
    loss.backward()
    for part in (ctrl.router, ctrl.psn):
        for n, p in part.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert ctrl.log_inner_lr.grad is not None and ctrl.log_inner_lr.grad != 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_outer_loop_reduces_the_loss_on_a_toy_problem():
    model = build()
    loader = _toy_loader(16, 8)
    data = next(iter(torch.utils.data.DataLoader(_toy_data(16), batch_size=16)))

    def task_loss():
        model.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(data["image"]), data["label"]))

    start = task_loss()
    _trainer(model, loader, epochs=4, lr=3e-3).run()
    assert task_loss() < 0.8 * start


def test_split_tasks_and_episode_sampler():
    tasks = split_tasks(torch.tensor([2, 0, 2, 5, 0, 2, 7]))
    assert [(s.tolist(), None if q is None else q.tolist()) for s, q in tasks] == [
        ([1], [4]), ([0, 2], [5]), ([3], [6])]
    domains = [0] * 6 + [1] * 3 + [2] * 5 + [3] * 2
    classes = [0] * 9 + [1] * 7
    sampler = DomainEpisodeSampler(domains, tasks_per_episode=2, shots=3, class_ids=classes, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    for b in batches:
        doms = {domains[i] for i in b}
        assert len(doms) == 2 and {classes[i] for i in b} == {0, 1}
        assert len(set(b)) == len(b)
    assert batches != list(sampler)  # a new draw each epoch


def test_episode_sampler_shards_episodes_across_ranks():
    domains = [0] * 6 + [1] * 3 + [2] * 5 + [3] * 2
    single = list(DomainEpisodeSampler(domains, tasks_per_episode=2, shots=2, num_episodes=5, seed=3))
    ranks = [DomainEpisodeSampler(domains, tasks_per_episode=2, shots=2, num_episodes=5, seed=3, num_replicas=2,
                                  rank=r) for r in (0, 1)]
    shards = [list(r) for r in ranks]
    assert [len(r) for r in ranks] == [len(s) for s in shards] == [3, 3]  # ceil(5 / 2): same iterations per rank
    assert shards[0] == single[0::2] and shards[1][:2] == single[1::2]  # interleaved draws of one sequence
    assert shards[0] != shards[1]
    assert [list(r) for r in ranks] != shards  # both ranks move on to the next epoch's draw
    with pytest.raises(ValueError, match="rank must be in"):
        DomainEpisodeSampler(domains, num_replicas=2, rank=2)


# ---------------------------------------------------------------------------------------------- artefacts / cost


def test_peft_state_dict_round_trip_reproduces_outputs():
    model = perturb(build()).eval()
    payload = peft_state_dict(model)
    assert payload["method"]["method"] == "dcrm"
    state = payload["state_dict"]
    assert any(".routers.dcrm.router." in n for n in state) and any(".psn." in n for n in state)
    assert not any(n.endswith("qkv.weight") for n in state)
    fresh = build().eval()
    load_peft_state_dict(fresh, copy.deepcopy(payload))
    x = images(3)
    with torch.no_grad():
        a, b = model(x, return_outputs=True), fresh(x, return_outputs=True)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.domain_logits, b.domain_logits)
    with pytest.raises(PeftError, match="made with config"):
        load_peft_state_dict(build(use_dab=False), payload)


def test_psn_flops_match_the_flop_counter():
    model = build()
    ctrl = find_controller(model)
    talers = [m for m in model.modules() if isinstance(m, TALer)]
    width = talers[0].width
    cost = psn_flops(width, K, len(talers), rank=8, bank_size=4, bottleneck=120)
    assert cost["params"] == sum(p.numel() for p in ctrl.psn.parameters())
    emb, probs = torch.randn(1, width), torch.softmax(torch.randn(1, K), 1)
    with FlopCounterMode(display=False) as fc:
        synth = ctrl.synthesize(emb, probs)
    assert fc.get_total_flops() == cost["mlp"]
    with FlopCounterMode(display=False) as fc:
        for t, s in zip(talers, synth.values()):
            t.parameters_for(s)
    assert fc.get_total_flops() == cost["materialise"]


def test_domain_dice_averages_per_image_dice_by_domain(tmp_path):
    from medpeft_monai.metrics import DomainDice

    def one_hot(mask):
        return torch.stack([1 - mask, mask]).float()

    truth = torch.zeros(4, 4)
    truth[:2] = 1                                     # 8 foreground pixels
    half = torch.zeros(4, 4)
    half[:1] = 1                                      # 4 of them predicted: Dice 2*4 / (4 + 8) = 2/3
    empty = torch.zeros(4, 4)                         # no foreground in the label: not scored
    metric = DomainDice(domain_names=["us", "ct"], save_dir=str(tmp_path))
    metric.reset()
    metric.update(([one_hot(half), one_hot(truth), one_hot(truth), one_hot(half)],
                   [one_hot(truth), one_hot(truth), one_hot(empty), one_hot(empty)], [0, 0, 1, 1]))
    assert metric.compute() == pytest.approx((2 / 3 + 1) / 2)
    assert metric.per_domain == {0: (pytest.approx(2 / 3 + 1), 2)}   # domain 1: only empty labels
    engine = type("E", (), {"state": type("S", (), {"metrics": {}})()})()
    metric.completed(engine, "dice")
    assert engine.state.metrics["dice_us"] == pytest.approx(5 / 6)
    rows = list(csv.DictReader((tmp_path / "per_domain_dice.csv").open()))
    assert [r["domain"] for r in rows] == ["us", "all"] and list(rows[0]) == ["domain", "domain_id", "n", "dice"]
    # dice_ignore_empty = False: an empty label scores 1 where nothing is predicted, 0 where something is
    strict = DomainDice(ignore_empty=False)
    strict.reset()
    strict.update(([one_hot(empty), one_hot(half)], [one_hot(empty), one_hot(empty)], [1, 1]))
    assert strict.compute() == pytest.approx(0.5) and strict.per_domain == {1: (pytest.approx(1.0), 2)}


def test_segmenter_returns_logits_and_domain_logits():
    name, kwargs = TINY_VIT
    seg = DCRMSegmenter(name, 3, num_domains=2, image_size=SIZE, model_kwargs=kwargs).eval()
    with torch.no_grad():
        out = seg(images(2), return_outputs=True)
        assert torch.equal(out.pred, seg(images(2)))
    assert out.pred.shape == (2, 3, SIZE, SIZE) and out.domain_logits.shape == (2, 2)


# ---------------------------------------------------------------------------------------------- bundle


def test_dcrm_bundle_train_evaluate_infer(tmp_path):
    bundle = copy_bundle(BUNDLE, tmp_path)
    small = ("--backbone_kwargs", "{'depth': 2}")
    out = run_bundle(bundle, ["train.json"], "--epochs", "2", *small)
    assert "train_loss" in out and "val_acc_natural" in out
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "adapter.pt").is_file()

    out = run_bundle(bundle, ["train.json", "evaluate.json"], *small)
    rows = list(csv.DictReader((bundle / "eval" / "per_domain_accuracy.csv").open()))
    from medpeft_monai.data import sample_dataset

    datalist = json.loads((Path(sample_dataset("multidomain_lesion")) / "datalist.json").read_text())
    test_domains = {e["domain"] for e in datalist["test"]}
    assert {r["domain"] for r in rows} == test_domains | {"all"}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert int(next(r for r in rows if r["domain"] == "all")["n"]) == len(datalist["test"])

    run_bundle(bundle, ["inference.json"], *small)
    preds = list(csv.DictReader((bundle / "eval" / "predictions.csv").open()))
    assert len(preds) == len(datalist["test"])
    row = preds[0]
    assert abs(float(row["p_normal"]) + float(row["p_lesion"]) - 1) < 1e-4
    dom_cols = [c for c in row if c.startswith("p_domain_")]
    assert len(dom_cols) == len(datalist["domains"])
    assert abs(sum(float(row[c]) for c in dom_cols) - 1) < 1e-4


def test_dcrm_segmentation_variant_trains_and_writes_masks(tmp_path):
    import numpy as np
    from PIL import Image

    from medpeft_monai.data import sample_dataset

    bundle = copy_bundle(BUNDLE, tmp_path)
    small = ("--backbone_kwargs", "{'depth': 2}")
    run_bundle(bundle, ["train_seg.json"], "--epochs", "1", *small)
    assert (bundle / "models" / "model_seg.pt").is_file() and (bundle / "models" / "adapter_seg.pt").is_file()
    run_bundle(bundle, ["inference_seg.json"], *small)

    folder = Path(sample_dataset("multidomain_segmentation"))
    datalist = json.loads((folder / "datalist.json").read_text())
    test = datalist["test"]
    masks = sorted((bundle / "eval" / "seg").glob("*_seg.png"))
    assert len(masks) == len(test)
    for item in test:
        image = np.asarray(Image.open(folder / item["image"]))
        mask = np.asarray(Image.open(bundle / "eval" / "seg" / f"{Path(item['image']).stem}_seg.png"))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1}
    assert not list((bundle / "eval" / "seg").glob(".tmp-*"))  # atomic writes leave no temporary files
    rows = list(csv.DictReader((bundle / "eval" / "seg" / "domains.csv").open()))
    assert len(rows) == len(test) and all(r["pred_domain_name"] in datalist["domains"] for r in rows)

    # test-set evaluation: Dice per domain (DomainDice) equals the mean of MONAI's per-image Dice over that
    # domain's images, and the overall figure equals MONAI's MeanDice; all in eval/seg, so the classification
    # variant's eval/metrics.csv is never overwritten
    run_bundle(bundle, ["train_seg.json", "evaluate_seg.json"], *small)
    assert not (bundle / "eval" / "metrics.csv").exists()
    seg_eval = bundle / "eval" / "seg"
    per_image = {Path(r["filename"]).name: float(r["mean"])
                 for r in csv.DictReader((seg_eval / "val_mean_dice_raw.csv").open())}
    domain_of = {Path(item["image"]).name: item["domain"] for item in test}
    assert set(per_image) == set(domain_of)
    by_domain = {r["domain"]: r for r in csv.DictReader((seg_eval / "per_domain_dice.csv").open())}
    assert set(by_domain) == set(domain_of.values()) | {"all"}
    for dom, row in by_domain.items():
        values = [v for name, v in per_image.items() if dom in ("all", domain_of[name]) and not math.isnan(v)]
        assert int(row["n"]) == len(values)
        assert abs(float(row["dice"]) - sum(values) / len(values)) < 1e-5
    metrics = dict(csv.reader((seg_eval / "metrics.csv").open()))
    assert abs(float(metrics["val_dice_by_domain"]) - float(metrics["val_mean_dice"])) < 1e-5
