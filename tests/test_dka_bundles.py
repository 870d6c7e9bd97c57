"""The DKA bundles train and write predictions as the README runs them; their compare.json sweeps methods."""

import csv
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medpeft_monai.data import sample_dataset
from medpeft_monai.peft import DualKernelConv, load_peft_state_dict, param_groups
from tests.conftest import ROOT, copy_bundle, run_bundle

SMALL = {"global_pool": "avg", "depth": 3}  # a 3-block backbone keeps the subprocess runs short


@pytest.mark.parametrize("name,dataset", [("dka_classification", "medical_vs_natural"),
                                          ("dka_segmentation", "ultrasound_lesion")])
def test_dka_bundle_trains_and_infers_with_the_merged_fast_path(name, dataset, tmp_path):
    """Classification on a 3-block random ViT; segmentation as shipped, on the pretrained LiteMedSAM encoder."""
    bundle = copy_bundle(name, tmp_path)
    small = ["--backbone_kwargs", json.dumps(SMALL)] if name == "dka_classification" else []
    run_bundle(bundle, ["train.json"], "--epochs", "1", *small)
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "adapter.pt").is_file()
    run_bundle(bundle, ["train.json", "evaluate.json"], *small)
    metric = "val_accuracy" if name == "dka_classification" else "val_mean_dice"
    summary = dict(line.split(",", 1) for line in (bundle / "eval" / "metrics.csv").read_text().splitlines())
    assert 0.0 <= float(summary[metric]) <= 1.0
    run_bundle(bundle, ["inference.json"], *small)
    n_test = len(json.loads((Path(sample_dataset(dataset)) / "datalist.json").read_text())["test"])
    if name == "dka_classification":
        rows = list(csv.DictReader((bundle / "eval" / "predictions.csv").open()))
        assert len(rows) == n_test
        for r in rows:
            p = [float(r["p_medical"]), float(r["p_natural"])]
            assert abs(sum(p) - 1) < 1e-5 and r["pred_name"] == ["medical", "natural"][int(r["pred_class"])]
            assert r["pred_class"] == str(int(p[1] > p[0])) and Path(r["image"]).is_file()
    else:
        assert len(list((bundle / "eval").glob("*_seg.nii.gz"))) == n_test

    # the inference network is the merged fast path and reproduces the trained two-branch network
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    if small:
        parser["backbone_kwargs"] = SMALL
    merged = parser.get_parsed_content("network", lazy=False)
    convs = [m for m in merged.modules() if isinstance(m, DualKernelConv)]
    assert convs and all(c.merged for c in convs)
    reference = parser.get_parsed_content("network_def", lazy=False)
    load_peft_state_dict(reference, bundle / "models" / "adapter.pt")
    merged.load_state_dict(reference.state_dict())
    x = torch.rand(2, parser["in_chans"], *parser["image_size"])
    merged.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(merged(x), reference(x), atol=1e-5)


def _sci(value: float) -> str:
    """How the docs write a learning rate: 0.001 -> '1e-3', 0.0003 -> '3e-4'."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


@pytest.mark.parametrize("name", ["dka_classification", "dka_segmentation"])
def test_dka_bundle_defaults_to_asynchronous_learning_rates_stated_everywhere(name):
    """The train config's adapter and head learning rates differ, the optimizer it builds has exactly those
    two groups, and metadata, MLflow parameters and README state the same values (no training)."""
    root = ROOT / "bundles" / name
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    parser["device"] = "$torch.device('cpu')"
    parser["backbone"], parser["backbone_weights"] = "vit_tiny_patch16_224", None  # cheap network, same groups
    parser["backbone_kwargs"] = {**parser["backbone_kwargs"], "depth": 2}
    adapter_lr, head_lr = parser.get_parsed_content("adapter_lr"), parser.get_parsed_content("head_lr")
    assert adapter_lr != head_lr, "the DKA bundles train adapter and head with asynchronous learning rates"
    assert float(_sci(adapter_lr)) == adapter_lr and float(_sci(head_lr)) == head_lr

    optimizer = parser.get_parsed_content("optimizer")
    network = parser.get_parsed_content("network")
    groups = optimizer.param_groups
    assert [g["name"] for g in groups] == ["adapter", "head"]
    assert [g["lr"] for g in groups] == [adapter_lr, head_lr]
    expected = param_groups(network, adapter_lr, head_lr)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in expected]
    names = {id(p): n for n, p in network.named_parameters()}
    assert groups[0]["params"] and all(".adapter." in names[id(p)] for p in groups[0]["params"])
    assert groups[1]["params"] and not any(".adapter." in names[id(p)] for p in groups[1]["params"])

    tracking = parser.get_parsed_content("tracking_params")
    assert (tracking["adapter_lr"], tracking["head_lr"]) == (adapter_lr, head_lr)

    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["optimizer"] == {"name": "AdamW", "adapter_lr": adapter_lr, "head_lr": head_lr,
                                 "weight_decay": groups[0]["weight_decay"]}
    assert f"adapter lr {_sci(adapter_lr)}, head lr {_sci(head_lr)}" in meta["description"]
    readme = (root / "docs" / "README.md").read_text()
    assert f"| learning rates | adapter `{_sci(adapter_lr)}`, head `{_sci(head_lr)}`" in readme
    assert "--adapter_lr 0.001 --head_lr 0.0001" in readme, "the paper's 1e-3 / 1e-4 stays documented as override"


def test_bundle_compare_config_sweeps_methods_on_the_bundles_data(tmp_path):
    """compare.json on top of train.json: the bundle's datalist (classification sample), backbone and settings
    drive medpeft_monai.compare; the report lands in the bundle."""
    bundle = copy_bundle("dka_classification", tmp_path)
    run_bundle(bundle, ["train.json", "compare.json"], "--backbone_kwargs", json.dumps(SMALL),
               "--compare_methods", "['linear_probe', 'dka']", "--compare_fractions", "[0.1, 1.0]",
               "--compare_folds", "1", "--compare_steps", "4")
    report = json.loads((bundle / "compare" / "report.json").read_text())
    assert report["task"] == "classification" and report["settings"]["backbone_kwargs"] == SMALL
    datalist = json.loads(Path(report["settings"]["datalist"]).read_text())
    labels = [it["label"] for it in datalist["training"]]
    rows = list(csv.DictReader((bundle / "compare" / "results.csv").open()))
    assert {(r["method"], r["fraction"]) for r in rows} == {(m, f) for m in ("linear_probe", "dka")
                                                             for f in ("0.1", "1.0")}
    n_small = sum(max(1, round(0.1 * labels.count(c))) for c in set(labels))   # stratified per class
    assert {r["n_train"] for r in rows if r["fraction"] == "0.1"} == {str(n_small)}
    assert {r["n_train"] for r in rows if r["fraction"] == "1.0"} == {str(len(labels))}
    assert all(0.0 <= float(r["metric"]) <= 1.0 for r in rows)
    assert (bundle / "compare" / "report.html").stat().st_size > 10_000
