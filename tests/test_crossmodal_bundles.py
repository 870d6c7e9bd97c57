"""The cross-modal bundles as a new user runs them (tiny SAM2 Hiera, shortened schedules): stage 1 writes the
modality LoRA, one artefact serves two stage-2 tasks (lesion and tissue segmentation) and stays bit-identical,
evaluation and inference run; stage 1 trains under torchrun with identical ranks."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import torch
from monai.bundle import ConfigParser

from medpeft_monai.peft import adapter_parameters
from tests.conftest import copy_bundle, free_port, run_bundle

# a random 4-block SAM2 Hiera instead of the default LiteMedSAM encoder (both bundles must use the same one)
TINY = ["--backbone", "sam2_hiera_tiny", "--backbone_weights", "none", "--backbone_kwargs", "{'stages': (1, 1, 1, 1)}"]
TINY_PRETRAIN = [*TINY, "--mask_unit", "2"]
TINY_TASK = [*TINY, "--prompts", "{'method': 'window_prompt', 'num_prompts': 2}"]
TINY_NET = {"backbone": "sam2_hiera_tiny", "backbone_weights": None, "backbone_kwargs": {"stages": (1, 1, 1, 1)},
            "prompts": {"method": "window_prompt", "num_prompts": 2}}


def _network(bundle, config, **overrides):
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser["bundle_root"] = str(bundle)
    for k, v in {**TINY_NET, **overrides}.items():
        parser[k] = v
    return parser.get_parsed_content("network_def", lazy=False)


def test_one_stage1_artefact_serves_two_tasks_and_stays_bit_identical(tmp_path):
    seg = copy_bundle("crossmodal_segmentation", tmp_path)
    pre = tmp_path / "crossmodal_pretrain"
    shutil.rmtree(pre / "models")  # the real stage 1, not the test stand-in
    log = run_bundle(pre, ["train.json"], "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "48", *TINY_PRETRAIN)
    assert "joint stage" in log
    artefact = pre / "models" / "modality_lora_mri.pt"
    payload = torch.load(artefact, map_location="cpu", weights_only=True)
    assert payload["name"] == "modality_mri" and payload["method"]["rank"] == 32
    assert all(".lora_" in n for n in payload["state_dict"])  # the LoRA only, no decoder or DINO head
    record = json.loads((pre / "models" / "modality_lora_mri.json").read_text())  # its record, written last
    assert list(record["files"]) == ["modality_lora_mri.pt"] and record["epoch"] == 2

    for label_key, classes, folder in (("label", 2, "models"), ("tissue", 4, "models/tissue")):
        run_bundle(seg, ["train.json"], "--epochs", "1", "--label_key", label_key, "--num_classes", str(classes),
                   "--ckpt_dir", str(seg / folder), *TINY_TASK)
        net = _network(seg, "inference.json", num_classes=classes)
        net.load_state_dict(torch.load(seg / folder / "model.pt", map_location="cpu", weights_only=True))
        lora = adapter_parameters(net, "modality_mri")
        assert set(lora) == set(payload["state_dict"])
        assert all(torch.equal(lora[n], t) for n, t in payload["state_dict"].items()), label_key
        assert (seg / folder / "adapter.pt").is_file()

    run_bundle(seg, ["train.json", "evaluate.json"], *TINY_TASK)
    assert (seg / "eval" / "metrics.csv").read_text().startswith("val_mean_dice")
    run_bundle(seg, ["inference.json"], *TINY_TASK)
    masks = sorted((seg / "eval").glob("*_seg.nii.gz"))
    assert len(masks) == 16
    mask = nib.load(masks[0])
    source = nib.load(os.path.join(os.environ["MEDPEFT_DATA_DIR"], "multiseq_lesion", "imagesTs",
                                   masks[0].name.replace("_seg", "")))
    assert mask.shape[:3] == source.shape[:3]
    assert (abs(mask.affine - source.affine) < 1e-4).all()


def test_stage1_under_torchrun_keeps_ranks_identical(tmp_path):
    pre = copy_bundle("crossmodal_pretrain", tmp_path)
    save_ranks = tmp_path / "save_every_rank.json"
    save_ranks.write_text(json.dumps({"finalize": [  # rank 1 may get here before rank 0 has made models/
        "$os.makedirs(@ckpt_dir, exist_ok=True)",
        "$torch.save(@network.module.state_dict(), @ckpt_dir + '/rank' + str(dist.get_rank()) + '.pt')",
        "$dist.is_initialized() and dist.destroy_process_group()"]}))
    configs = [str(pre / "configs" / "train.json"), str(pre / "configs" / "multi_gpu_train.json"), str(save_ranks)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "monai.bundle", "run", "--config_file", json.dumps(configs), "--bundle_root", str(pre),
           "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "24", *TINY_PRETRAIN]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rank0 = torch.load(pre / "models" / "rank0.pt", map_location="cpu", weights_only=True)
    rank1 = torch.load(pre / "models" / "rank1.pt", map_location="cpu", weights_only=True)
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    fresh = _network(pre, "train.json", mask_unit=2, prompts=None)
    lora = [n for n, p in fresh.named_parameters() if p.requires_grad and ".lora_" in n]
    assert any(not torch.equal(fresh.state_dict()[n], rank0[n]) for n in lora)  # it trained
    assert (pre / "models" / "modality_lora_mri.pt").is_file()  # written once, by rank 0
