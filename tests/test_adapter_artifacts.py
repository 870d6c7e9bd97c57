"""Adapter artefacts: every bundle writes models/adapter.pt (PEFT + head parameters only, with the backbone
name and method config) beside models/model.pt (a variant: adapter<suffix>.pt beside model<suffix>.pt),
and the adapter loaded onto a freshly built frozen backbone reproduces the full model's predictions
exactly."""


import json

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from medpeft_monai.handlers import BundleCheckpointer
from medpeft_monai.peft import PEFT_FORMAT, find_backbone, load_peft_state_dict
from medpeft_monai.utils import BundleVariant
from tests.conftest import VARIANTS, copy_bundle, example_input, perturb_trainable


def _handlers(parser, key):
    return [h for h in (parser.get(key) or []) if isinstance(h, dict)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_train_config_saves_adapter_beside_full_model(variant):
    train, adapter, model = variant.config("train"), variant.adapter_file.name, variant.model_file.name
    parser = ConfigParser()
    parser.read_config(str(train))
    handlers = _handlers(parser, "validate#handlers") + _handlers(parser, "train#handlers")
    savers = [h for h in handlers if h.get("_target_", "").endswith("BundleCheckpointer")]
    assert len(savers) == 1, f"{variant.name}: {train.name} needs one medpeft_monai.handlers.BundleCheckpointer"
    saver = savers[0]
    # first among the trainer's handlers: it locks the folder (or resumes) before the others start
    assert parser.get("train#handlers")[0] == saver
    assert saver["save_dir"] == "@ckpt_dir" and saver["network"] == "@network"
    # model.pt (full network, for MONAI Label and ckpt_export) and adapter.pt: one pair, from the same network
    assert (saver.get("model_file", "model.pt"), saver.get("adapter_file", "adapter.pt")) == (model, adapter)
    assert saver["validator"] == "@validate#evaluator" and saver["resume"] == "@resume"
    assert parser.get("resume") is False
    assert not [h for h in handlers if h.get("_target_", "").endswith(("CheckpointSaver", "AdapterSaver"))]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_adapter_on_fresh_backbone_reproduces_predictions(variant, tmp_path):
    copy = BundleVariant(copy_bundle(variant.bundle.name, tmp_path / "bundles"), variant.suffix)
    parser = ConfigParser()
    parser.read_config(str(copy.config("inference")))
    parser["bundle_root"] = str(copy.bundle)
    # stand-in for training: move every trainable (PEFT + head) weight off its initial value
    trained = perturb_trainable(parser.get_parsed_content("network_def", lazy=False))
    models = tmp_path / "models"
    # the handler the bundle uses; without a validator it saves the pair when the run completes
    engine = Engine(lambda e, batch: None)
    BundleCheckpointer(trained, str(models), last_file=None).attach(engine)
    engine.run([0])
    record = json.loads((models / "checkpoint.json").read_text())
    assert sorted(record["files"]) == ["adapter.pt", "model.pt"] and record["epoch"] == 1

    payload = torch.load(models / "adapter.pt", map_location="cpu", weights_only=True)
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert payload["format"] == PEFT_FORMAT
    assert set(payload["state_dict"]) == trainable  # PEFT + head only, no frozen backbone tensor
    backbone = find_backbone(trained)
    assert payload["backbone"] == backbone.name and payload["method"] == trained.peft_config.to_dict()
    assert (models / "adapter.pt").stat().st_size < (models / "model.pt").stat().st_size

    fresh = parser.get_parsed_content("network_def", lazy=False)  # new frozen backbone, untrained adapter
    x = example_input(variant)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), trained(x))
        load_peft_state_dict(fresh, models / "adapter.pt")
        assert torch.equal(fresh(x), trained(x))
    full = trained.state_dict()
    assert all(torch.equal(t, full[k]) for k, t in fresh.state_dict().items())
