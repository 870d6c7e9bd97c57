"""The comparison command: the user's datalist drives it, frozen-prefix reuse changes nothing but time, a
killed sweep continues, and the report renders in headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpeft_monai.backbones import BackboneError, FrozenBackbone
from medpeft_monai.compare import method_specs, run
from medpeft_monai.compare.cache import PrefixCache, cacheable_start
from medpeft_monai.compare.methods import parse_setting
from medpeft_monai.peft import apply_peft
from tests.conftest import TINY_VIT4

TINY = {"backbone": "vit_tiny_patch16_224", "weights": "none", "backbone_kwargs": {"depth": 3},
        "image_size": [32, 32], "in_chans": 1}
CLI_TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "none", "--backbone-kwargs", '{"depth": 3}',
            "--image-size", "32", "32", "--in-chans", "1"]


def write_user_datalist(folder: Path, n_train: int = 10, n_test: int = 4) -> Path:
    """A user's own segmentation set outside the sample folder: grey PNGs with one bright disc (label 1),
    a datalist with ``training`` and ``test`` but no ``validation``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    sections = {"training": [], "test": []}
    for i in range(n_train + n_test):
        cy, cx, r = rng.integers(12, 28), rng.integers(12, 28), rng.integers(5, 9)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        img = np.clip(60 + 120 * mask + rng.normal(0, 20, mask.shape), 0, 255).astype(np.uint8)
        (folder / "img").mkdir(parents=True, exist_ok=True)
        (folder / "seg").mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / "img" / f"case{i:02d}.png")
        Image.fromarray(mask).save(folder / "seg" / f"case{i:02d}.png")
        section = "training" if i < n_train else "test"
        sections[section].append({"image": f"img/case{i:02d}.png", "label": f"seg/case{i:02d}.png"})
    path = folder / "my_datalist.json"
    path.write_text(json.dumps(sections))
    return path


def test_frozen_prefix_then_rest_equals_one_pass_and_first_adapted_block():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    bb = FrozenBackbone(TINY_VIT4[0], image_size=64, model_kwargs=TINY_VIT4[1]).eval()
    with torch.no_grad():
        whole = bb.encode(x, levels=[0, 2, 3])
        for k in range(5):
            part = bb.encode_from(bb.frozen_prefix(x, k, [0, 2, 3]), [0, 2, 3])
            assert torch.allclose(part.tokens, whole.tokens, atol=1e-6)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(part.levels, whole.levels))
        for j in range(5):                                       # a later prefix continues an earlier one
            for k in range(j, 5):
                a = bb.extend_prefix(bb.frozen_prefix(x, j, [0, 2, 3]), k, [0, 2, 3])
                b = bb.frozen_prefix(x, k, [0, 2, 3])
                assert a.start == k and sorted(a.levels) == sorted(b.levels) == [i for i in (0, 2, 3) if i < k]
                assert torch.allclose(a.tokens, b.tokens, atol=1e-6)
                assert all(torch.allclose(a.levels[i], b.levels[i], atol=1e-6) for i in b.levels)
        with pytest.raises(BackboneError, match="start must be a block index in 3..4"):
            bb.extend_prefix(bb.frozen_prefix(x, 3), 2)
    assert bb.first_adapted_block() == 4                                  # nothing adapted: all reusable
    for peft, k in [({"method": "lora", "blocks": [-2, -1]}, 2), ({"method": "dka", "blocks": [-1]}, 3),
                    ({"method": "adapter"}, 0), ({"method": "vpt", "num_prompts": 2}, 0), ("bitfit", 0)]:
        model = torch.nn.Module()
        model.backbone = FrozenBackbone(TINY_VIT4[0], image_size=64, model_kwargs=TINY_VIT4[1])
        apply_peft(model, peft)
        assert model.backbone.first_adapted_block() == k, peft
        assert cacheable_start(model)[0] == k                     # an adapter's own dropout does not matter
    model = torch.nn.Module()                                     # random frozen layers before k do
    model.backbone = FrozenBackbone(TINY_VIT4[0], image_size=64, model_kwargs={**TINY_VIT4[1], "drop_path_rate": 0.1})
    apply_peft(model, {"method": "lora", "blocks": [-1]})
    k, reason = cacheable_start(model)
    assert k == 0 and reason.startswith("the frozen backbone has random layers (blocks.1.drop_path1")


def test_cache_continues_from_a_held_earlier_prefix_and_runs_share_one_loaded_backbone(tmp_path):
    from medpeft_monai.compare.sweep import Split, SweepData, SweepSettings, build_model, frozen_backbone
    from medpeft_monai.nets import PeftSegmenter

    settings = SweepSettings(datalist="unused", **TINY)
    frozen = frozen_backbone(settings)
    empty = Split([], torch.zeros(0), torch.zeros(0))
    data = SweepData("segmentation", 2, empty, empty, empty, "")
    torch.manual_seed(3)
    copied = build_model(settings, data, {"method": "lora", "blocks": [-1]}, frozen)
    torch.manual_seed(3)
    fresh = build_model(settings, data, {"method": "lora", "blocks": [-1]})
    assert copied.backbone is not frozen and not any(n for n, _ in frozen.named_modules() if "lora" in n)
    for (name, a), b in zip(copied.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name                      # same weights, same seeded adapter and decoder
    with pytest.raises(BackboneError, match="do not also pass weights"):
        PeftSegmenter(frozen, 2, weights="litemedsam")

    images = torch.rand(5, 1, 32, 32)
    calls = []
    first = copied.backbone.model.get_submodule(copied.backbone.blocks[0].name)
    first.register_forward_hook(lambda *_: calls.append(1))
    cache = PrefixCache(tmp_path / "pc")
    cache.fill(copied.backbone, 2, "train", images, [0, 1, 2])
    assert len(calls) == 1                                                  # one batch through block 0
    cache.fill(copied.backbone, 3, "train", images, [0, 1, 2])
    assert len(calls) == 1                                    # k = 3 continued from k = 2: block 2 only
    with torch.no_grad():
        direct = copied.backbone.eval().frozen_prefix(images, 3, [0, 1, 2])
    held = cache.batch(3, "train", range(5))
    assert torch.allclose(held.tokens, direct.tokens, atol=1e-6)
    assert all(torch.allclose(held.levels[i], direct.levels[i], atol=1e-6) for i in (0, 1, 2))


def test_method_settings_are_explicit_per_method():
    specs = {s.name: s for s in method_specs(["linear_probe", "lora", "dka"],
                                             ["dka.hidden=48", "lora.rank=4", "lora.adapter_lr=0.01"], 2)}
    assert specs["dka"].peft == {"method": "dka", "hidden": 48, "blocks": [-2, -1]}
    assert specs["lora"].peft["rank"] == 4 and specs["lora"].adapter_lr == 0.01
    assert specs["dka"].adapter_lr == 3e-3 and specs["lora"].head_lr == 1e-3     # others keep their defaults
    assert specs["linear_probe"].peft == {"method": "linear_probe"}
    with pytest.raises(ValueError, match="not in this sweep"):
        method_specs(["lora"], ["dka.hidden=8"])
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_setting("hidden=8")


def test_cached_sweep_equals_uncached(tmp_path):
    datalist = write_user_datalist(tmp_path / "data", n_train=6, n_test=3)
    common = dict(datalist=datalist, methods=["linear_probe", "lora"], last_blocks=1, fractions=[1.0], folds=1,
                  steps=6, batch_size=4, evals=2, progress=False, **TINY)
    cached = run(out=tmp_path / "cached", cache=True, **common)
    plain = run(out=tmp_path / "plain", cache=False, **common)
    on_disk = run(out=tmp_path / "disk", cache=True, cache_memory_gb=0.0, **common)   # memory bound 0: files
    assert on_disk["prefix_cache"]["entries_on_disk"] == 2 * (4 + 2 + 3)
    assert not (tmp_path / "disk" / "prefix_cache").exists()                  # scratch removed at the end
    for r, d in zip(cached["results"], on_disk["results"]):
        assert r["metric"] == d["metric"] and r["best_step"] == d["best_step"]
    for a, b in zip(cached["results"], plain["results"]):
        assert a["method"] == b["method"]
        assert a["prefix_reuse"]["start_block"] == (3 if a["method"] == "linear_probe" else 2)
        assert b["prefix_reuse"]["start_block"] == 0
        assert a["best_step"] == b["best_step"]
        assert a["metric"] == pytest.approx(b["metric"], abs=1e-5)
        wa = torch.load(tmp_path / "cached" / "runs" / a["method"] / "f1_fold0" / "adapter.pt", weights_only=False)
        wb = torch.load(tmp_path / "plain" / "runs" / b["method"] / "f1_fold0" / "adapter.pt", weights_only=False)
        for key, t in wa["state_dict"].items():
            assert torch.allclose(t, wb["state_dict"][key], atol=1e-5), key
    assert cached["prefix_cache"]["prefixes_computed"] == 2 * (4 + 2 + 3)  # k=3 and k=2, each image once


def test_augmentation_turns_reuse_off_and_the_report_says_so(tmp_path):
    datalist = write_user_datalist(tmp_path / "data", n_train=4, n_test=2)
    report = run(out=tmp_path / "aug", datalist=datalist, methods=["linear_probe"], fractions=[1.0], folds=1,
                 steps=2, batch_size=2, evals=1, augment=True, progress=False, **TINY)
    assert report["results"][0]["prefix_reuse"] == {"start_block": 0, "blocks": 3,
                                                    "reason": "augmentation changes the input every step"}
    assert report["prefix_cache"]["prefixes_computed"] == 0
    assert "Augmentation was on" in (tmp_path / "aug" / "report.html").read_text()


def test_time_budget_sets_one_step_count_that_grows_with_the_budget(tmp_path):
    from medpeft_monai.compare.sweep import SweepSettings, calibrate_steps, load_data

    datalist = write_user_datalist(tmp_path / "data", n_train=6, n_test=3)
    specs = method_specs(["linear_probe", "lora"], last_blocks=1)
    steps = {}
    for budget in (5.0, 200.0):
        settings = SweepSettings(datalist=str(datalist), fractions=[1.0], folds=1, time_budget_s=budget,
                                 batch_size=4, **{k: v for k, v in TINY.items() if k != "weights"}, weights=None)
        steps[budget] = calibrate_steps(settings, load_data(settings), specs, None, torch.device("cpu"), 1)
    assert 1 <= steps[5.0] < steps[200.0]


@pytest.fixture(scope="module")
def killed_and_resumed_sweep(tmp_path_factory):
    """The CLI on a user-style datalist, killed after its first finished run, then run again to the end."""
    root = tmp_path_factory.mktemp("compare")
    datalist = write_user_datalist(root / "user_data")
    out = root / "out"
    cmd = [sys.executable, "-m", "medpeft_monai.compare", "--datalist", str(datalist), *CLI_TINY,
           "--methods", "linear_probe", "dka", "--last-blocks", "1", "--fractions", "0.5", "1", "--folds", "2",
           "--steps", "24", "--batch-size", "4", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.glob("runs/*/*/result.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("runs/*/*/result.json")}
    log = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert log.returncode == 0, log.stdout + log.stderr
    return {"root": root, "out": out, "datalist": datalist, "before": first, "log": log.stdout + log.stderr}


def test_compare_uses_the_users_datalist(killed_and_resumed_sweep):
    s = killed_and_resumed_sweep
    report = json.loads((s["out"] / "report.json").read_text())
    assert report["sections"] == {"training": 8, "validation": 2, "test": 4}   # 20 % of 10 carved for validation
    training = {str(s["datalist"].parent / "img" / f"case{i:02d}.png") for i in range(10)}
    for r in report["results"]:
        assert r["n_train"] == {0.5: 4, 1.0: 8}[r["fraction"]]
        assert len(set(r["train_files"])) == r["n_train"] and set(r["train_files"]) <= training
        assert set(r["per_image"]) == {str(s["datalist"].parent / "img" / f"case{i:02d}.png") for i in range(10, 14)}
    used = {f for r in report["results"] for f in r["train_files"]}
    assert len(used) == 8                                            # the validation images never train
    methods = {m["name"]: m for m in report["methods"]}
    assert methods["dka"]["peft"]["hidden"] == 16 and methods["dka"]["adapter_lr"] == 3e-3
    assert "dka" in (s["out"] / "summary.csv").read_text()


def test_killed_sweep_continues_without_redoing_finished_runs(killed_and_resumed_sweep):
    s = killed_and_resumed_sweep
    assert 1 <= len(s["before"]) < 8, "the kill should land mid-sweep"
    for path, (mtime, data) in s["before"].items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    report = json.loads((s["out"] / "report.json").read_text())
    assert report["runs_this_invocation"] == 8 - len(s["before"])
    cells = {(r["method"], r["fraction"], r["fold"]) for r in report["results"]}
    assert cells == {(m, f, k) for m in ("linear_probe", "dka") for f in (0.5, 1.0) for k in (0, 1)}
    assert {r["fraction"] for r in report["recommendation"]} == {0.5, 1.0}


def test_report_renders_in_chromium_with_its_figures(killed_and_resumed_sweep):
    from tests.browser import render_in_chromium

    page = render_in_chromium(killed_and_resumed_sweep["out"] / "report.html")
    assert page["console_errors"] == [] and page["page_errors"] == [] and page["failed_requests"] == []
    alts = [img["alt"] for img in page["images"]]
    assert any(a.startswith("test mean Dice") for a in alts)
    assert {"predictions of linear_probe", "predictions of dka", "ERF of dka", "ERF of linear_probe"} <= set(alts)
    assert all(img["src_is_data_uri"] and img["natural_width"] > 0 for img in page["images"])
    assert "Recommendation" in page["text"] and "frozen-prefix reuse" in page["text"]
