"""Multi-process training: every bundle ships configs/multi_gpu_train.json in MONAI's pattern (DDP,
DistributedSampler, rank-0-only output handlers), and a tiny bundle trains under
`torchrun --nproc_per_node 2` with the gloo backend on the CPU with identical weights on both ranks."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from medpeft_monai.distributed import backend, handlers_for_rank, is_rank_zero_only
from medpeft_monai.utils import BundleVariant
from tests.conftest import TINY_ARGS, TINY_PRESET, VARIANTS, copy_bundle, free_port

# DDP through its reducer (lora_segmentation) and the bi-level trainer's own gradient averaging (DCRM,
# episode sampler for classification, DistributedSampler for the segmentation variant)
TORCHRUN_VARIANTS = [v for v in VARIANTS
                     if v.name in ("lora_segmentation", "dcrm_vit_multidomain", "dcrm_vit_multidomain_seg")]


def _multi_gpu_parser(variant):
    """The variant's train<suffix>.json with its torchrun layer multi_gpu_train<suffix>.json merged on top."""
    bundle, train, mg = variant.bundle, variant.config("train"), variant.config("multi_gpu_train")
    readme = (bundle / "docs" / "README.md").read_text()
    section = re.search(r"^## Multi-GPU training \(torchrun\)(.*?)(?=^## |\Z)", readme, flags=re.DOTALL | re.MULTILINE)
    assert section, f"{bundle.name}/docs/README.md needs a '## Multi-GPU training (torchrun)' section"
    assert mg.name in section.group(1), f"{bundle.name}: the section must show the torchrun command with {mg.name}"
    assert mg.is_file(), (
        f"{bundle.name} has no configs/{mg.name}: every training config needs one for torchrun training "
        "(copy bundles/lora_segmentation/configs/multi_gpu_train.json; see docs/bundle_conventions.md)")
    parser = ConfigParser()
    parser.read_config([str(train), str(mg)])
    return parser


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_multi_gpu_config_follows_monai_pattern(variant):
    parser = _multi_gpu_parser(variant)
    assert parser.get("network#_target_") in ("torch.nn.parallel.DistributedDataParallel", "DistributedDataParallel")
    assert "@network_def" in str(parser.get("network#module"))
    stages = ["train", "validate"]
    if parser.get("train#dataloader#batch_sampler") == "@train#sampler":
        # an episode loader (DCRM): its batch sampler shards the episodes by rank instead
        stages.remove("train")
        assert parser.get("train#sampler#_target_").endswith("DomainEpisodeSampler")
        assert parser.get("train#sampler#num_replicas") == "$dist.get_world_size()"
        assert parser.get("train#sampler#rank") == "$dist.get_rank()"
    else:
        assert parser.get("train#dataloader#shuffle") is False  # the sampler shuffles
    for stage in stages:
        sampler = parser.get(f"{stage}#sampler")
        assert sampler is not None and sampler["_target_"].endswith("DistributedSampler"), stage
        assert sampler["dataset"] == f"@{stage}#dataset"
        assert parser.get(f"{stage}#dataloader#sampler") == f"@{stage}#sampler", stage
    assert "handlers_for_rank(@train#handlers)" in parser.get("train#trainer#train_handlers")
    assert "handlers_for_rank(@validate#handlers)" in parser.get("validate#evaluator#val_handlers")
    init = " ".join(parser.get("initialize"))
    assert "init_process_group" in init and "backend()" in init
    assert "destroy_process_group" in " ".join(parser.get("finalize"))
    assert parser.get("run") == ["$@train#trainer.run()"]
    # merged imports keep train.json's and add dist
    imports = parser.get("imports")
    assert "$import torch.distributed as dist" in imports and "$import medpeft_monai" in imports


def test_handlers_for_rank_keeps_collective_and_state_handlers():
    from monai.handlers import CheckpointSaver, MetricsSaver, StatsHandler, ValidationHandler

    from medpeft_monai.handlers import BundleCheckpointer
    from medpeft_monai.tracking import MLflowBundleLogger

    net = torch.nn.Linear(2, 2)
    # every rank resumes from last.pt; only rank 0 locks and writes (inside the handler)
    keep = [ValidationHandler(validator=None, interval=1), MetricsSaver(save_dir="."), BundleCheckpointer(net, ".")]
    drop = [StatsHandler(), CheckpointSaver(save_dir=".", save_dict={"m": net}), MLflowBundleLogger()]
    handlers = drop[:2] + keep + drop[2:]
    assert handlers_for_rank(handlers, rank=0) == handlers
    assert handlers_for_rank(handlers, rank=1) == keep
    assert all(is_rank_zero_only(h) for h in drop) and not any(is_rank_zero_only(h) for h in keep)
    assert handlers_for_rank(None, rank=1) == []
    assert backend() == ("nccl" if torch.cuda.is_available() else "gloo")


def _torchrun(tmp_path, bundle, copy, *args):
    """The variant's train + multi_gpu_train configs under torchrun (2 processes, gloo, CPU), with an extra config
    layered on top (MONAI merges config files in order) that makes every rank save its weights; returns the log."""
    save_ranks = tmp_path / "save_every_rank.json"
    save_ranks.write_text(json.dumps({"finalize": [
        "$torch.save(@network.module.state_dict(), @ckpt_dir + '/rank' + str(dist.get_rank()) + '.pt')",
        "$dist.is_initialized() and dist.destroy_process_group()"]}))
    configs = [str(copy.config("train")), str(copy.config("multi_gpu_train")), str(save_ranks)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "monai.bundle", "run", "--config_file", json.dumps(configs), "--bundle_root", str(bundle),
           *args, *TINY_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU even on a GPU machine
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-8000:]
    return out


def _rank_weights_agree(models):
    rank0 = torch.load(models / "rank0.pt", map_location="cpu", weights_only=True)
    rank1 = torch.load(models / "rank1.pt", map_location="cpu", weights_only=True)
    assert rank0.keys() == rank1.keys()
    differing = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differing, f"ranks disagree on {differing[:5]}"
    return rank0


@pytest.mark.parametrize("variant", TORCHRUN_VARIANTS, ids=lambda v: v.name)
def test_torchrun_two_processes_gloo_cpu(tmp_path, variant):
    """Both ranks finish with identical weights. The ranks train on different data (DistributedSampler
    shards, or DomainEpisodeSampler episodes), so identical weights mean the gradients were averaged."""
    bundle = copy_bundle(variant.bundle.name, tmp_path)
    copy = BundleVariant(bundle, variant.suffix)
    _torchrun(tmp_path, bundle, copy, "--epochs", "2")
    rank0 = _rank_weights_agree(bundle / "models")
    # rank 0 wrote the usual artefacts (once): full model and adapter (model_seg.pt for train_seg.json)
    assert copy.model_file.is_file() and copy.adapter_file.is_file()
    # and training did change the trainable weights
    parser = ConfigParser()
    parser.read_config(str(copy.config("train")))
    for key, value in TINY_PRESET.items():
        parser[key] = value
    fresh = parser.get_parsed_content("network_def", lazy=False)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert any(not torch.equal(fresh.state_dict()[n], rank0[n]) for n in trainable)
    frozen = [n for n, p in fresh.named_parameters() if not p.requires_grad]
    assert all(torch.equal(fresh.state_dict()[n], rank0[n]) for n in frozen)


def test_torchrun_resume_every_rank_continues_and_rank_zero_alone_writes(tmp_path):
    """--resume True under torchrun: every rank loads models/last.pt (their weights agree after the resumed
    epoch); only rank 0 takes the folder's lock and writes the pair, its record and last.pt."""
    bundle = copy_bundle("lora_segmentation", tmp_path)
    copy = BundleVariant(bundle)
    out = _torchrun(tmp_path, bundle, copy, "--epochs", "1")
    assert out.count("is in use by another run") == 0 and out.count("saved model.pt + adapter.pt") == 1
    out = _torchrun(tmp_path, bundle, copy, "--epochs", "2", "--resume", "True")
    assert out.count("resuming run") == 2 and out.count("epoch 1 of 2 done") == 2  # both ranks
    _rank_weights_agree(bundle / "models")
    state = torch.load(bundle / "models" / "last.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]
    assert (bundle / "models" / "train.lock").read_text() == ""  # released


def _domain_accuracy_rank(rank, port, out_dir):
    import torch.distributed as dist

    from medpeft_monai.metrics import DomainAccuracy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metric = DomainAccuracy(domain_names=["a", "b"], save_dir=out_dir, filename=f"acc{rank}.csv")
        metric.reset()
        # rank 0: domain a 2/2 correct; rank 1: domain a 0/1, domain b 1/1
        shard = ([1, 0], [1, 0], [0, 0]) if rank == 0 else ([1, 1], [0, 1], [0, 1])
        metric.update(shard)
        engine = type("E", (), {"state": type("S", (), {"metrics": {}})()})()
        metric.completed(engine, "acc")
        torch.save(engine.state.metrics, f"{out_dir}/metrics{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_domain_accuracy_sums_counts_over_processes(tmp_path):
    torch.multiprocessing.spawn(_domain_accuracy_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        metrics = torch.load(tmp_path / f"metrics{rank}.pt", weights_only=True)
        assert metrics["acc"] == 3 / 4 and metrics["acc_a"] == 2 / 3 and metrics["acc_b"] == 1.0
    assert (tmp_path / "acc0.csv").is_file() and not (tmp_path / "acc1.csv").exists()  # rank 0 writes
