"""Crash-safe, protected and resumable checkpoints (issue 15): a kill at any point of a save leaves one
consistent model.pt/adapter.pt pair; loaders refuse a damaged or mismatched file, naming it and the fix; a new
run replaces an earlier model only when it beats it; a second run into a folder is refused (a dead run's lock
is taken over); and --resume after a kill ends exactly as the uninterrupted run."""

import json
import logging
import multiprocessing
import os
import signal
import time

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from medpeft_monai.checkpoint import (
    CheckpointError,
    RunLock,
    RunLockError,
    checked_file,
    commit_files,
    complete_commit,
)
from tests.conftest import TINY_PRESET, copy_bundle

OLD = {"model.pt": b"model of epoch 1 " * 50, "adapter.pt": b"adapter of epoch 1 " * 5}
NEW = {"model.pt": b"model of epoch 2 " * 60, "adapter.pt": b"adapter of epoch 2 " * 6}
# commit_files: fsync + rename of .next-model.pt (1), .next-adapter.pt (2), .next-checkpoint.json (3: the commit
# point), then renames onto model.pt (4), adapter.pt (5), checkpoint.json (6)
KILL_POINTS = [("fsync", n) for n in (1, 2, 3)] + [("replace", n) for n in range(1, 7)]


def _save_and_die(folder: str, op: str, n: int) -> None:
    real, calls = getattr(os, op), [0]

    def die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os._exit(9)  # no cleanup, no finally: as kill -9
        return real(*args, **kwargs)

    setattr(os, op, die)
    commit_files(folder, NEW, "checkpoint.json", {"run": "b", "epoch": 2})
    os._exit(0)


@pytest.mark.parametrize("op,n", KILL_POINTS, ids=lambda x: str(x))
def test_a_kill_at_any_point_of_a_save_leaves_one_consistent_pair(tmp_path, op, n):
    commit_files(tmp_path, OLD, "checkpoint.json", {"run": "a", "epoch": 1})
    child = multiprocessing.get_context("fork").Process(target=_save_and_die, args=(str(tmp_path), op, n))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    # a loader after the kill (no live run holds the folder) completes a save killed after its commit point
    for name in OLD:
        checked_file(tmp_path / name)
    committed = op == "replace" and n > 3
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert (record["run"], record["epoch"]) == (("b", 2) if committed else ("a", 1))
    assert {name: (tmp_path / name).read_bytes() for name in OLD} == (NEW if committed else OLD)
    # the next run removes what a save killed before its commit point left (the earlier pair stays)
    lock = RunLock(tmp_path)
    lock.acquire()
    complete_commit(tmp_path)
    lock.release()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".next-", ".tmp-"))]
    assert {name: (tmp_path / name).read_bytes() for name in OLD} == (NEW if committed else OLD)


def test_loaders_refuse_a_damaged_or_mismatched_file_naming_it_and_the_fix(tmp_path):
    commit_files(tmp_path, OLD, "checkpoint.json", {"run": "a", "epoch": 1})
    (tmp_path / "adapter.pt").write_bytes(NEW["adapter.pt"])  # another save's adapter beside this model
    with pytest.raises(CheckpointError) as err:
        checked_file(tmp_path / "adapter.pt")
    msg = str(err.value)
    assert f"{tmp_path / 'adapter.pt'} does not match {tmp_path / 'checkpoint.json'}" in msg
    assert "epoch 1 of run a" in msg and "Fix:" in msg
    assert checked_file(tmp_path / "model.pt") == str(tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes(OLD["model.pt"][:100])
    with pytest.raises(CheckpointError, match=r"model\.pt does not match .*\(cut short\)"):
        checked_file(tmp_path / "model.pt")
    # a file no manifest names (e.g. trained elsewhere) is only checked to be a complete archive
    torch.save({"w": torch.ones(3)}, tmp_path / "other.pt")
    assert checked_file(tmp_path / "other.pt")
    data = (tmp_path / "other.pt").read_bytes()
    (tmp_path / "other.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"other\.pt is empty or cut short.*Fix"):
        checked_file(tmp_path / "other.pt")


def _hold(folder: str, ready) -> None:
    RunLock(folder).acquire()
    ready.set()
    time.sleep(120)


def test_a_second_run_into_a_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, caplog):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunLockError) as err:
            RunLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"{tmp_path} is in use by another run (PID {holder.pid}" in msg
        assert f"lock file {tmp_path / 'train.lock'}" in msg
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert f"taking over the lock left by PID {holder.pid}" in caplog.text
    lock.release()


class Killed(Exception):
    """Stands for a kill in the middle of an epoch."""


def _kill(engine):
    raise Killed(f"killed in epoch {engine.state.epoch}")


def _train(bundle, ckpt, epochs, resume=False, kill_in_epoch=None):
    """lora_segmentation's train.json on the tiny preset, in this process; returns the last validation metrics."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    for k, v in {**TINY_PRESET, "learning_rate": 3e-4, "epochs": epochs, "resume": resume,
                 "ckpt_dir": str(ckpt)}.items():
        parser[k] = v
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    if kill_in_epoch:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(event_filter=lambda e, _: e.state.epoch == kill_in_epoch),
                                  _kill)
    trainer.run()
    return dict(parser.get_parsed_content("validate#evaluator").state.metrics)


def _pair(models):
    return {name: (models / name).read_bytes() for name in ("model.pt", "adapter.pt")}


def test_resume_after_a_kill_ends_as_the_uninterrupted_run(tmp_path, caplog):
    bundle = copy_bundle("lora_segmentation", tmp_path)
    full = _train(bundle, tmp_path / "A", 3)
    with pytest.raises(Killed):
        _train(bundle, tmp_path / "B", 3, kill_in_epoch=2)  # models/last.pt holds epoch 1
    assert torch.load(tmp_path / "B" / "last.pt", weights_only=True)["trainer"]["iteration"] > 0
    with caplog.at_level(logging.INFO):
        resumed = _train(bundle, tmp_path / "B", 3, resume=True)
    assert "resuming run" in caplog.text and "epoch 1 of 3 done" in caplog.text
    assert resumed == full  # the same final validation metric
    a, b = (json.loads((tmp_path / d / "checkpoint.json").read_text()) for d in "AB")
    assert b["epoch"] >= 2  # the best pair was saved after the kill, by the resumed run
    assert (a["epoch"], a["value"], a["files"]) == (b["epoch"], b["value"], b["files"])  # byte-identical pair
    last_a, last_b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in "AB")
    assert last_a["network"].keys() == last_b["network"].keys()
    assert all(torch.equal(last_a["network"][k], last_b["network"][k]) for k in last_a["network"])
    with pytest.raises(CheckpointError, match="Nothing to resume.*Fix: start a new run without --resume"):
        _train(bundle, tmp_path / "C", 3, resume=True)


def test_a_run_never_replaces_a_better_model_and_a_failed_save_keeps_the_earlier_pair(tmp_path, monkeypatch, caplog):
    bundle = copy_bundle("lora_segmentation", tmp_path)
    models = tmp_path / "models"
    _train(bundle, models, 2)
    first, pair = json.loads((models / "checkpoint.json").read_text()), _pair(models)
    # a second run into the folder while another one holds it is refused at start
    lock = RunLock(models)
    lock.acquire()
    with pytest.raises(RunLockError, match="is in use by another run"):
        _train(bundle, models, 1)
    lock.release()
    # the same run again reaches the same best, not a better one: the earlier pair is kept
    with caplog.at_level(logging.INFO):
        _train(bundle, models, 2)
    assert "starting from the earlier best" in caplog.text and "that model is kept" in caplog.text
    assert json.loads((models / "checkpoint.json").read_text())["run"] == first["run"] and _pair(models) == pair

    # an earlier model worse than this run's is replaced; a save that dies before its commit point (here:
    # writing the manifest fails) leaves the earlier pair intact and consistent
    (models / "checkpoint.json").write_text(json.dumps({**first, "value": 0.0}))
    import medpeft_monai.checkpoint as ckpt

    real = ckpt.write_bytes_atomic

    def fail_on_manifest(path, data):
        if str(path).endswith(".next-checkpoint.json"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes_atomic", fail_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        _train(bundle, models, 2)
    monkeypatch.undo()
    for name in pair:
        checked_file(models / name)
    assert _pair(models) == pair and json.loads((models / "checkpoint.json").read_text())["value"] == 0.0
    _train(bundle, models, 2)  # the lock was released on the error; the next run replaces the worse pair
    record = json.loads((models / "checkpoint.json").read_text())
    assert record["run"] != first["run"] and record["value"] == first["value"]
    assert not [p.name for p in models.iterdir() if p.name.startswith((".next-", ".tmp-"))]
