"""Tests for medpeft_monai.utils (atomic writes) and the prediction CSV handler."""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SaveImage
from monai.utils.enums import CommonKeys as Keys

from medpeft_monai.handlers import PredictionWriter
from medpeft_monai.utils import (
    AtomicNibabelWriter,
    BundleVariant,
    atomic_path,
    bundle_folders,
    bundle_variants,
    write_csv_atomic,
    write_text_atomic,
)


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "old")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"  # the earlier file survives a failed write
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temporary file left
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith("out.txt") and tmp != str(target)
        with open(tmp, "w") as f:
            f.write("new")
        assert target.read_text() == "old"  # readers see the old file until the rename
    assert target.read_text() == "new"
    mode = target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # ordinary permissions, not a private temporary file's


def test_write_csv_atomic(tmp_path):
    path = write_csv_atomic(tmp_path / "a.csv", ["x", "y"], [[1, "a,b"], [2, ""]])
    assert list(csv.reader(open(path))) == [["x", "y"], ["1", "a,b"], ["2", ""]]


def test_atomic_nibabel_writer_through_save_image(tmp_path, monkeypatch):
    img = MetaTensor(torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4), meta={"filename_or_obj": "case.nii.gz"})
    img.affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    saver = SaveImage(output_dir=tmp_path, output_postfix="seg", separate_folder=False,
                      writer="medpeft_monai.utils.AtomicNibabelWriter", output_dtype=np.float32)
    saver(img)
    out = tmp_path / "case_seg.nii.gz"
    back = nib.load(out)
    assert np.array_equal(back.get_fdata()[..., 0] if back.ndim == 4 else back.get_fdata(), img[0].numpy())
    assert np.allclose(np.diag(back.affine), [2, 3, 4, 1])

    # a failing write keeps the earlier mask and leaves no temporary file
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(Exception, match="No space left"):
        AtomicNibabelWriter.write(_writer_with(img), str(out))
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["case_seg.nii.gz"]


def _writer_with(img: MetaTensor) -> AtomicNibabelWriter:
    w = AtomicNibabelWriter()
    w.set_data_array(img, channel_dim=0)
    w.set_metadata({"affine": img.affine})
    return w


class _Engine:
    def __init__(self, output):
        self.state = type("State", (), {"output": output})()


def test_prediction_writer_rows_and_names(tmp_path):
    img = MetaTensor(torch.zeros(3, 4, 4), meta={"filename_or_obj": "/data/a.png"})
    writer = PredictionWriter(str(tmp_path), class_names=["benign", "malignant"])
    writer.collect(_Engine([{Keys.IMAGE: img, Keys.PRED: torch.tensor([0.2, 0.8])},
                            {Keys.IMAGE: img, Keys.PRED: torch.tensor([0.9, 0.1]),
                             "domain_prob": torch.tensor([0.7, 0.3])}]))
    writer.write()
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert rows[0]["image"] == "/data/a.png" and rows[0]["pred_name"] == "malignant"
    assert float(rows[0]["p_malignant"]) == pytest.approx(0.8) and rows[0]["pred_domain"] == ""
    assert rows[1]["pred_class"] == "0" and rows[1]["pred_domain"] == "0" and rows[1]["pred_domain_name"] == "0"

    three = PredictionWriter(str(tmp_path), filename="bad.csv", class_names=["a", "b"])
    three.collect(_Engine([{Keys.IMAGE: img, Keys.PRED: torch.tensor([0.2, 0.3, 0.5])}]))
    with pytest.raises(ValueError, match="2 class names .* for 3 predicted class.*--class_names"):
        three.write()
    assert not (tmp_path / "bad.csv").exists()


def test_atomic_metrics_saver_keeps_old_reports_on_failure(tmp_path, monkeypatch):
    import monai.handlers.metrics_saver as ms

    from medpeft_monai.handlers import AtomicMetricsSaver

    engine = _Engine(None)
    engine.state.metrics = {"val_mean_dice": 0.75}
    saver = AtomicMetricsSaver(save_dir=str(tmp_path), metrics=["val_mean_dice"])
    saver(engine)
    assert (tmp_path / "metrics.csv").read_text().strip() == "val_mean_dice,0.75"
    before = (tmp_path / "metrics.csv").read_text()

    real = ms.write_metrics_reports

    def half_then_fail(save_dir, **kwargs):
        with open(os.path.join(save_dir, "metrics.csv"), "w") as f:
            f.write("val_mean_")
        raise OSError("No space left on device")

    monkeypatch.setattr(ms, "write_metrics_reports", half_then_fail)
    engine.state.metrics = {"val_mean_dice": 0.5}
    with pytest.raises(OSError, match="No space left"):
        saver(engine)
    assert (tmp_path / "metrics.csv").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # staging folder removed
    assert saver.save_dir == str(tmp_path)

    monkeypatch.setattr(ms, "write_metrics_reports", real)
    saver(engine)
    assert "0.5" in (tmp_path / "metrics.csv").read_text()


def test_bundle_variants_share_a_suffix(tmp_path):
    bundle = tmp_path / "my_bundle"
    (bundle / "configs").mkdir(parents=True)
    for name in ("inference.json", "inference_seg.json", "train.json", "train_seg.json", "metadata.json",
                 "metadata_seg.json", "logging.conf"):
        (bundle / "configs" / name).write_text("{}")
    (tmp_path / "not_a_bundle").mkdir()  # no configs/metadata.json
    assert bundle_folders(tmp_path) == [bundle]
    main, seg = bundle_variants(bundle)  # one per inference config, the main one first
    assert (main, seg) == (BundleVariant(bundle, ""), BundleVariant(bundle, "_seg"))
    assert (main.name, seg.name) == ("my_bundle", "my_bundle_seg")
    assert seg.config("train") == bundle / "configs" / "train_seg.json"
    assert (seg.model_file.name, seg.adapter_file.name) == ("model_seg.pt", "adapter_seg.pt")
    assert (main.metadata.name, seg.metadata.name) == ("metadata.json", "metadata_seg.json")
    (bundle / "configs" / "metadata_seg.json").unlink()  # a variant without its own metadata uses the bundle's
    assert seg.metadata.name == "metadata.json"
    (bundle / "configs" / "metadata.json").write_text(
        '{"network_data_format": {"outputs": {"pred": {"format": "segmentation"}}}}')
    assert seg.output_format() == "segmentation"


def test_non_finite_loss_stops_training_before_anything_is_saved(tmp_path):
    """One NaN image: the run ends with an error that names the epoch and what to check, and a checkpoint
    saver attached after the guard (as in every bundle's train.json) never writes the broken network: here
    one that saves after every iteration keeps the finite weights of iteration 2."""
    from monai.engines import SupervisedTrainer
    from monai.handlers import CheckpointSaver

    from medpeft_monai.handlers import NonFiniteLossError, StopOnNonFiniteLoss

    images = torch.rand(6, 3)
    images[4, 1] = float("nan")
    data = [{"image": images[i:i + 2], "label": torch.zeros(2, 1)} for i in range(0, 6, 2)]
    net = torch.nn.Linear(3, 1)
    saver = CheckpointSaver(str(tmp_path), {"model": net}, save_interval=1, epoch_level=False, n_saved=1)
    trainer = SupervisedTrainer(torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
                                train_handlers=[StopOnNonFiniteLoss(), saver])
    with pytest.raises(NonFiniteLossError, match="epoch 1, iteration 3.*NaN or infinite values"):
        trainer.run()
    (saved,) = list(tmp_path.iterdir())
    assert saved.name.endswith("=2.pt")
    state = torch.load(saved, weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values())
