"""MLflow tracking: every bundle (each train<suffix>.json of its variants) wires its params and adapter
artefact into MONAI's `--tracking mlflow`, and a real `mlflow server` (127.0.0.1, sqlite backend, temp dir)
receives a tiny bundle's run."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

from tests.conftest import TINY_ARGS, TINY_PRESET, VARIANTS, copy_bundle, free_port, run_bundle, running_server

TINY_BUNDLE = "lora_segmentation"
REQUIRED_PARAMS = ("method", "backbone", "data_fraction")
LOGGER_TARGET = "medpeft_monai.tracking.MLflowBundleLogger"


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no background job workers
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "mlartifacts")]
    uri = f"http://127.0.0.1:{port}"
    with running_server(cmd, uri + "/health", tmp_path / "mlflow_server.log", "mlflow server", timeout=180,
                        cwd=tmp_path, env=env):
        yield uri


def _train_config(train_config: Path, tmp_path):
    """A train config parsed the way `monai.bundle run --tracking mlflow` patches it (outputs under tmp_path)."""
    parser = ConfigParser()
    parser.read_config(str(train_config))
    parser["bundle_root"] = str(tmp_path)
    ConfigWorkflow.patch_bundle_tracking(parser=parser, settings=DEFAULT_MLFLOW_SETTINGS)
    return parser


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_tracking_params_and_adapter_artifact_are_wired(variant, tmp_path):
    train = variant.config("train")
    parser = _train_config(train, tmp_path)
    assert "tracking_params" in parser, (
        f"{variant.bundle.name}/configs/{train.name} needs a top-level 'tracking_params' dict "
        "(see docs/bundle_conventions.md)")
    params = parser.get_parsed_content("tracking_params", lazy=False)
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    assert not missing, f"{variant.name}: tracking_params lacks {missing}"
    lrs = [k for k in params if re.search(r"learning_rate|(^|_)lr($|_)", k)]
    assert lrs, f"{variant.name}: tracking_params needs the learning rate(s): learning_rate or *_lr keys"

    handlers = parser.get("train#handlers")
    loggers = [i for i, h in enumerate(handlers) if isinstance(h, dict) and h.get("_target_") == LOGGER_TARGET]
    assert len(loggers) == 1, f"{variant.name}: train#handlers needs one {LOGGER_TARGET}"
    i = loggers[0]
    assert parser.get(f"train#handlers#{i}#params") == "@tracking_params"
    artifacts = parser.get_parsed_content(f"train#handlers#{i}#artifacts", lazy=False)
    ckpt_dir = parser.get_parsed_content("ckpt_dir")
    assert os.path.join(ckpt_dir, variant.adapter_file.name) in [os.path.normpath(a) for a in artifacts]
    # MONAI's tracking patch found the standard engine IDs and added its handlers to them
    assert handlers[-1]["_target_"] == "MLFlowHandler"
    assert parser.get("validate#handlers")[-1]["_target_"] == "MLFlowHandler"


def test_mlflow_server_receives_params_metrics_config_and_adapter(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from medpeft_monai.peft import load_peft_state_dict

    bundle = copy_bundle(TINY_BUNDLE, tmp_path)
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    run_bundle(bundle, ["train.json"], "--epochs", "2", "--data_fraction", "0.5", *TINY_ARGS,
               "--tracking", "mlflow", "--tracking_uri", mlflow_server, "--experiment_name", "medpeft_test",
               timeout=900, env=env)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("medpeft_test")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["method"] == "lora" and params["peft.rank"] == "8"
    assert params["backbone"] == "vit_tiny_patch16_224" and params["backbone_kwargs.depth"] == "2"
    assert params["data_fraction"] == "0.5"
    assert float(params["learning_rate"]) == 1e-3 and float(params["initial_lr_group_0"]) == 1e-3
    assert params["epoch_length"] == "1"  # 8 of 16 training images, batch 8
    assert 0 < int(params["params_trainable"]) < int(params["params_total"])

    for key in ("val_mean_dice", "train_mean_dice"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key  # one value per epoch
    assert client.get_metric_history(run.info.run_id, "train_loss")

    top = [a.path for a in client.list_artifacts(run.info.run_id)]
    configs = [p for p in top if p.startswith("config_") and p.endswith(".json")]
    assert configs, top
    # the adapter and the record of the save it belongs to (run, epoch, metric, checksums)
    models = sorted(a.path for a in client.list_artifacts(run.info.run_id, "models"))
    assert models == ["models/adapter.pt", "models/checkpoint.json"]

    dst = tmp_path / "download"
    dst.mkdir()
    executed = json.loads(Path(client.download_artifacts(run.info.run_id, configs[0], str(dst))).read_text())
    assert executed["data_fraction"] == 0.5 and executed["backbone"] == "vit_tiny_patch16_224"
    adapter = Path(client.download_artifacts(run.info.run_id, "models/adapter.pt", str(dst)))
    assert adapter.read_bytes() == (bundle / "models" / "adapter.pt").read_bytes()

    # the tracked adapter is usable on its own: it loads onto a fresh network built from the bundle
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for key, value in TINY_PRESET.items():
        parser[key] = value
    net = parser.get_parsed_content("network_def", lazy=False)
    load_peft_state_dict(net, adapter)
    payload = torch.load(adapter, map_location="cpu", weights_only=True)
    assert payload["backbone"] == "vit_tiny_patch16_224" and payload["method"]["method"] == "lora"
