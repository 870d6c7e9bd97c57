"""The DKA bundles train and write predictions as the README runs them; the low-data script sweeps."""

import csv
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medpeft_monai.data import sample_dataset
from medpeft_monai.peft import DualKernelConv, load_peft_state_dict
from scripts.low_data import main as low_data_main
from scripts.low_data import subsample
from tests.conftest import ROOT, copy_bundle, run_bundle

SMALL = {"global_pool": "avg", "depth": 3}  # a 3-block backbone keeps the subprocess runs short


@pytest.mark.parametrize("name,dataset", [("dka_classification", "medical_vs_natural"),
                                          ("dka_segmentation", "ultrasound_lesion")])
def test_dka_bundle_trains_and_infers_with_the_merged_fast_path(name, dataset, tmp_path):
    bundle = copy_bundle(name, tmp_path)
    small = ["--backbone_kwargs", json.dumps(SMALL)]
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


def test_subsample_is_stratified_and_seeded():
    items = [{"image": f"{i}.png", "label": i % 2} for i in range(20)]
    sub = subsample(items, 0.1, seed=0)
    assert sorted(it["label"] for it in sub) == [0, 1]
    assert sub == subsample(items, 0.1, seed=0) and subsample(items, 0.5, seed=1) != subsample(items, 0.5, seed=2)
    with pytest.raises(ValueError, match="fractions must be in"):
        subsample(items, 0.0, seed=0)


def test_low_data_sweep_writes_csv_plot_and_table(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert low_data_main(["--bundle", str(ROOT / "bundles" / "dka_classification"), "--fractions", "0.1", "1.0",
                          "--folds", "1", "--methods", "linear_probe", "dka", "--epochs", "1", "--samples", "16",
                          "--override", json.dumps({"backbone_kwargs": SMALL}),
                          "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["method"], r["fraction"]) for r in rows} == {(m, f) for m in ("linear_probe", "dka")
                                                             for f in ("0.1", "1.0")}
    assert all(0.0 <= float(r["metric"]) <= 1.0 for r in rows)
    assert (out / "summary.csv").is_file() and (out / "low_data.png").stat().st_size > 1000
    assert "| linear_probe |" in capsys.readouterr().out
