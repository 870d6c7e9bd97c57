"""Ignite handlers for bundles: crash-safe, protected and resumable checkpoints (the full model and the adapter
artefact as one pair), per-image predictions, and a guard that stops training on a non-finite loss before
anything is saved."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.engines.utils import IterationEvents
from monai.handlers import MetricsSaver
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medpeft_monai.backbones import as_plain_tensor
from medpeft_monai.checkpoint import (
    CheckpointError,
    RunLock,
    commit_files,
    complete_commit,
    read_manifest,
    torch_bytes,
    write_bytes_atomic,
)
from medpeft_monai.distributed import get_rank, unwrap_ddp
from medpeft_monai.peft import peft_state_dict
from medpeft_monai.utils import write_csv_atomic

__all__ = [
    "BundleCheckpointer",
    "NonFiniteLossError",
    "StopOnNonFiniteLoss",
    "AtomicMetricsSaver",
    "DomainOutputs",
    "LabelClassesCheck",
    "PredictionWriter",
    "SkippedImagesError",
    "SkippedItemsReport",
    "output_items",
    "random_state",
    "scores_and_labels",
    "set_random_state",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class StopOnNonFiniteLoss:
    """Stop training with :class:`NonFiniteLossError` at the first iteration whose loss is NaN or infinite.

    Listed before ``ValidationHandler`` among the trainer's handlers, it fires before validation and the
    checkpoint saves of that epoch, so the broken network is never saved over an earlier model, and the run
    exits with an error (Ignite's ``TerminateOnNan`` ends the run as a success instead).
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, (list, tuple)):
            output = output[0]
        loss = output.get(Keys.LOSS) if isinstance(output, dict) else output
        if loss is None or bool(torch.isfinite(torch.as_tensor(loss).detach()).all()):
            return
        raise NonFiniteLossError(
            f"The training loss became {float(torch.as_tensor(loss).detach().float().mean())} at epoch "
            f"{engine.state.epoch}, iteration {engine.state.iteration}; training stopped before anything of this "
            "epoch was saved (models/ keeps the best model and last.pt of the epochs before). Check the training "
            "images for NaN or infinite values, then lower the learning rate(s) or turn off AMP.")


def output_items(output) -> list[dict]:
    """An engine's output as one dict per image, whether or not the engine decollated the batch."""
    if isinstance(output, list):
        return output
    if isinstance(output, dict):  # not decollated
        n = len(output[Keys.PRED])
        return [{k: (v[i] if isinstance(v, (torch.Tensor, list)) and len(v) == n else v) for k, v in output.items()}
                for i in range(n)]
    raise TypeError(f"Unexpected engine output type {type(output).__name__}.")


def scores_and_labels(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decollated classification output -> ``(scores (B, C), labels (B,))`` for ignite's ``Accuracy``.

    Use as ``"output_transform": "$medpeft_monai.handlers.scores_and_labels"`` on an ignite metric.
    """
    scores = torch.stack([torch.as_tensor(item["pred"]) for item in output])
    labels = torch.stack([torch.as_tensor(item["label"]).long().reshape(-1)[0] for item in output])
    return scores, labels


class BundleCheckpointer:
    """A bundle run's checkpoints: crash-safe, never replacing a better earlier model, one run per folder, and
    resumable. List it first in ``train#handlers`` (its start and failure handlers then run before the
    others'), with the validation evaluator as ``validator``.

    * **Start**: takes ``save_dir``'s :class:`~medpeft_monai.checkpoint.RunLock` (a second run into the
      folder is refused), completes a save a killed run left half done, then either resumes (``resume``)
      from ``last_file`` or starts a new run whose bar is the best key metric in ``manifest``: the model of
      an earlier run is replaced only by a better one.
    * **New best validation** (``>`` the bar, ``>=`` with ``greater_or_equal``): ``model_file`` (the
      network's state dict, for MONAI Label and ``ckpt_export``) and ``adapter_file`` (the adapter artefact,
      :func:`~medpeft_monai.peft.peft_state_dict`) are committed together with ``manifest``
      (:func:`~medpeft_monai.checkpoint.commit_files`: the earlier pair stays until the new one is complete).
    * **Every epoch end**, after validation: ``last_file``, the state to resume from (trainable network
      tensors, optimizer, ``lr_scheduler``, AMP scaler, epoch, best metric, random states), atomically.
    * Without a ``validator`` the files are committed once, when training completes (no metric).

    Under torchrun every rank resumes; only rank 0 locks and writes (keep it out of ``RANK_ZERO_ONLY``).

    Args:
        network: the PEFT network being trained.
        save_dir: the bundle's ``models/``.
        validator: the validation evaluator (its key metric decides the best pair).
        model_file, adapter_file: file names (``None`` leaves one out).
        adapter: name of the adapter to save.
        manifest: record of the committed pair (``checkpoint.json``).
        last_file: resume state (``None``: not kept, ``resume`` refused).
        resume: continue the run saved in ``last_file``.
        lr_scheduler: an LR scheduler to save and restore with the optimizer.
        greater_or_equal: a validation equal to the best also replaces the pair.
    """

    def __init__(self, network: nn.Module, save_dir: str, validator: Engine | None = None,
                 model_file: str | None = "model.pt", adapter_file: str | None = "adapter.pt",
                 adapter: str = "default", manifest: str = "checkpoint.json", last_file: str | None = "last.pt",
                 resume: bool = False, lr_scheduler=None, greater_or_equal: bool = False) -> None:
        if not isinstance(resume, bool):  # e.g. the string "false" from a command line, which bool() makes True
            raise TypeError(f"resume must be True or False, got {resume!r} ({type(resume).__name__}); on the bundle "
                            "command line write --resume True or --resume False.")
        self.network, self.save_dir, self.validator = network, os.fspath(save_dir), validator
        self.files = [f for f in (model_file, adapter_file) if f]
        self.model_file, self.adapter_file, self.adapter = model_file, adapter_file, adapter
        self.manifest, self.last_file, self.resume = manifest, last_file, resume
        self.lr_scheduler, self.greater_or_equal = lr_scheduler, bool(greater_or_equal)
        self.lock = RunLock(self.save_dir)
        self.run_id = ""
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.saved_epoch: int | None = None

    @property
    def metric(self) -> str | None:
        return None if self.validator is None else self.validator.state.key_metric_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.validated)

    # -- events
    def started(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            # added now, so it runs after every other epoch handler (validation, LR scheduler, ...)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        if get_rank() == 0:
            self.lock.acquire()
            complete_commit(self.save_dir)
        self.best = self.best_epoch = self.saved_epoch = None
        if self.resume:
            self._resume(engine)
        else:
            self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            self._warn_unfinished()
        self._raise_bar_to_earlier_best()
        if self.validator is not None and self.best is not None:  # MONAI's own "new best" log follows the bar
            self.validator.state.best_metric, self.validator.state.best_metric_epoch = self.best, self.best_epoch or 0

    def validated(self, evaluator: Engine) -> None:
        value = evaluator.state.metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        value, epoch = float(value), int(evaluator.state.epoch)
        if self.best is not None and not (value >= self.best if self.greater_or_equal else value > self.best):
            return
        self.best, self.best_epoch = value, epoch
        self._commit(epoch, value)

    def epoch_completed(self, engine: Engine) -> None:
        if self.last_file is None or get_rank() != 0:
            return
        state = {k: o.state_dict() for k, o in self._objects(engine).items()}
        state.update(format=RESUME_FORMAT, run=self.run_id, rng=random_state(_loader(engine)),
                     best={"metric": self.metric, "value": self.best, "epoch": self.best_epoch},
                     saved_epoch=self.saved_epoch)
        write_bytes_atomic(os.path.join(self.save_dir, self.last_file), torch_bytes(state))

    def completed(self, engine: Engine) -> None:
        try:
            if self.validator is None:
                self._commit(int(engine.state.epoch), None)
            elif get_rank() == 0 and self.saved_epoch is None and self.best is not None:
                logger.warning(f"this run did not beat {self.metric} {self.best:.4f} of the model already in "
                               f"{self.save_dir} (see {self.manifest}); that model is kept.")
        finally:
            self.lock.release()

    def failed(self, engine: Engine, err: BaseException) -> None:
        self.lock.release()
        raise err

    # -- helpers
    def _commit(self, epoch: int, value: float | None) -> None:
        self.saved_epoch = epoch
        if get_rank() != 0:
            return
        net = unwrap_ddp(self.network)
        files = {}
        if self.model_file:
            files[self.model_file] = torch_bytes(net.state_dict())
        if self.adapter_file:
            files[self.adapter_file] = torch_bytes(peft_state_dict(net, self.adapter))
        commit_files(self.save_dir, files, self.manifest,
                     {"run": self.run_id, "epoch": epoch, "metric": self.metric, "value": value})
        what = "" if value is None else f", {self.metric} {value:.4f}"
        logger.info(f"saved {' + '.join(files)} in {self.save_dir} (epoch {epoch}{what})")

    def _objects(self, engine: Engine) -> dict:
        objects = {"trainer": engine, "network": _TrainableState(self.network)}
        for key, obj in (("optimizer", getattr(engine, "optimizer", None)), ("lr_scheduler", self.lr_scheduler),
                         ("scaler", getattr(engine, "scaler", None))):
            if obj is not None:
                objects[key] = obj
        return objects

    def _raise_bar_to_earlier_best(self) -> None:
        """Run protection: the best metric recorded by an earlier run (or save of this one) is the bar."""
        record = read_manifest(self.save_dir, self.manifest)
        where = os.path.join(self.save_dir, self.manifest)
        if record is None:
            old = [f for f in self.files if os.path.isfile(os.path.join(self.save_dir, f))]
            if old and get_rank() == 0:
                logger.warning(f"{self.save_dir} holds {old} without {self.manifest} (not written by this saver; "
                               "their metric is unknown): they are replaced at this run's first save.")
            return
        if self.validator is None:
            if get_rank() == 0:
                logger.info(f"{where}: {self.files} of run {record.get('run')} are replaced when this run completes.")
            return
        if record.get("metric") != self.metric or record.get("value") is None:
            logger.warning(f"{where} records {record.get('metric')!r}, not {self.metric!r}: the earlier "
                           f"{self.files} are replaced at this run's first best {self.metric}.")
            return
        earlier = float(record["value"])
        if self.best is None or earlier > self.best:
            self.best, self.best_epoch = earlier, 0 if record.get("run") != self.run_id else record.get("epoch")
            if get_rank() == 0:
                logger.info(f"starting from the earlier best: {where} holds {self.metric} {earlier:.4f} (epoch "
                            f"{record.get('epoch')} of run {record.get('run')}); {self.files} are replaced only "
                            "when this run beats it.")

    def _warn_unfinished(self) -> None:
        path = os.path.join(self.save_dir, self.last_file or "")
        if self.last_file and get_rank() == 0 and os.path.isfile(path):
            logger.warning(f"{path} holds the last state of an earlier run; this new run replaces it after its first "
                           "epoch. To continue that run instead, pass --resume True.")

    def _resume(self, engine: Engine) -> None:
        path = os.path.join(self.save_dir, self.last_file or "last.pt")
        fix = "start a new run without --resume (the model in the folder is kept unless the new run beats it)"
        if self.last_file is None or not os.path.isfile(path):
            raise CheckpointError(f"Nothing to resume: {path} not found (it is written at the end of every epoch). "
                                  f"Fix: {fix}.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path} could not be read ({type(err).__name__}: {err}). Fix: {fix}.") from err
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise CheckpointError(f"{path} is not a resume state of this saver. Fix: {fix}.")
        max_epochs, length = engine.state.max_epochs, engine.state.epoch_length
        if length is not None and state["trainer"].get("epoch_length") != length:
            raise CheckpointError(f"{path} was saved with {state['trainer'].get('epoch_length')} iterations per epoch, "
                                  f"this run has {length}: resume with the same data and batch size, or {fix}.")
        try:
            Checkpoint.load_objects(to_load=self._objects(engine), checkpoint=state)
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path} does not fit this run ({err}). Fix: resume with the configuration of the "
                                  f"interrupted run, or {fix}.") from err
        if engine.state.epoch > max_epochs:
            raise CheckpointError(f"{path} is at epoch {engine.state.epoch}, beyond --epochs {max_epochs}. Fix: pass "
                                  f"--epochs {engine.state.epoch} or more.")
        engine.state.max_epochs = max_epochs
        set_random_state(state["rng"], _loader(engine))
        self.run_id, self.saved_epoch = state["run"], state.get("saved_epoch")
        best = state["best"]
        if best.get("value") is not None and best.get("metric") == self.metric:
            self.best, self.best_epoch = float(best["value"]), best.get("epoch")
        logger.info(f"resuming run {self.run_id} from {path}: epoch {engine.state.epoch} of {max_epochs} done"
                    + (f", best {self.metric} {self.best:.4f} at epoch {self.best_epoch}" if self.best is not None
                       else ""))


RESUME_FORMAT = "medpeft_monai.resume/1"



def _loader(engine: Engine):
    return getattr(engine, "data_loader", None) or getattr(engine.state, "dataloader", None)


class _TrainableState:
    """A network's state dict without its frozen parameters (the resume state of a PEFT run)."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def _frozen(self, net: nn.Module) -> set[str]:
        return {n for n, p in net.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def state_dict(self) -> dict:
        net = unwrap_ddp(self.network)
        frozen = self._frozen(net)
        return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k not in frozen}

    def load_state_dict(self, state: dict) -> None:
        net = unwrap_ddp(self.network)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in self._frozen(net)]
        if missing or unexpected:
            raise ValueError(f"network tensors missing {missing[:4]}, unexpected {unexpected[:4]}")


def _random_states(root) -> list[np.random.RandomState]:
    """The random states of every MONAI random transform in ``root`` (a dataset's transform chain)."""
    from monai.transforms import Randomizable, Transform

    found: dict[int, np.random.RandomState] = {}
    seen: set[int] = set()

    def walk(obj) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)
        elif isinstance(obj, (Transform, Randomizable)):
            if isinstance(getattr(obj, "R", None), np.random.RandomState):
                found.setdefault(id(obj.R), obj.R)
            for item in vars(obj).values():
                walk(item)

    walk(root)
    return list(found.values())


def _np_state(state: tuple) -> tuple:
    return (state[0], torch.from_numpy(state[1].astype(np.int64)), *state[2:])


def _np_restore(state: tuple) -> tuple:
    return (state[0], state[1].numpy().astype(np.uint32), *state[2:])


def random_state(loader=None) -> dict:
    """Every random state a training epoch draws from: torch (CPU, CUDA), numpy, Python, the random
    transforms of ``loader``'s dataset, and the epoch counter of its sampler(s) (e.g. ``DomainEpisodeSampler``)."""
    transforms = _random_states(getattr(getattr(loader, "dataset", None), "transform", None))
    samplers = [getattr(loader, k, None) for k in ("sampler", "batch_sampler")]
    state = {"torch": torch.get_rng_state(), "numpy": _np_state(np.random.get_state()), "python": random.getstate(),
             "transforms": [_np_state(r.get_state()) for r in transforms],
             "sampler_epochs": [getattr(s, "epoch", None) for s in samplers]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict, loader=None) -> None:
    """Restore what :func:`random_state` returned (same loader and transforms)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_restore(state["numpy"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    transforms = _random_states(getattr(getattr(loader, "dataset", None), "transform", None))
    if len(transforms) != len(state["transforms"]):
        raise CheckpointError(f"the resume state has {len(state['transforms'])} random transform states, this "
                              f"run's training transforms {len(transforms)}: resume with the same configuration.")
    for r, s in zip(transforms, state["transforms"]):
        r.set_state(_np_restore(s))
    for key, epoch in zip(("sampler", "batch_sampler"), state["sampler_epochs"]):
        sampler = getattr(loader, key, None)
        if epoch is not None and hasattr(sampler, "epoch"):
            sampler.epoch = epoch


class PredictionWriter:
    """Write one CSV row per image: predicted class and class probabilities, and, for DCRM-ViT, the
    router's domain probabilities ``D(x)``.

    Attach to an inference evaluator; ``pred`` should hold class probabilities (e.g. after
    ``Activationsd(softmax=True)``). Domain columns are written when the output items carry
    ``domain_prob`` (add :class:`medpeft_monai.engines.DomainOutputs`). For dense predictions
    (segmentation) the class columns are omitted. The file is written atomically when the run completes.

    Args:
        save_dir: output folder.
        filename: CSV name.
        class_names: names of the classes (default: indices).
        domain_names: names of the router's domains (default: indices).
        image_key: output key whose ``meta["filename_or_obj"]`` names the image.
    """

    def __init__(self, save_dir: str, filename: str = "predictions.csv", class_names: Sequence[str] | None = None,
                 domain_names: Sequence[str] | None = None, image_key: str = Keys.IMAGE) -> None:
        self.path = os.path.join(save_dir, filename)
        self.class_names = list(class_names) if class_names is not None else None
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.image_key = image_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        for item in output_items(engine.state.output):
            image = item.get(self.image_key)
            meta = getattr(image, "meta", {}) or {}
            name = meta.get("filename_or_obj", "")
            row: dict = {"image": os.fspath(name) if name else f"item_{len(self.rows)}"}
            pred = torch.as_tensor(as_plain_tensor(item[Keys.PRED])).detach().float().cpu()
            if pred.ndim == 1:
                row["class"] = int(pred.argmax())
                row["class_probs"] = pred.tolist()
            dp = item.get("domain_prob")
            if dp is not None:
                dp = torch.as_tensor(dp).detach().float().cpu().view(-1)
                row["domain"] = int(dp.argmax())
                row["domain_probs"] = dp.tolist()
            self.rows.append(row)

    def write(self, engine: Engine | None = None) -> None:
        n_cls = max((len(r.get("class_probs", [])) for r in self.rows), default=0)
        n_dom = max((len(r.get("domain_probs", [])) for r in self.rows), default=0)
        cls_names = self.class_names or [str(i) for i in range(n_cls)]
        dom_names = self.domain_names or [str(i) for i in range(n_dom)]
        for what, names, n in (("class", cls_names, n_cls), ("domain", dom_names, n_dom)):
            if len(names) < n:
                raise ValueError(f"{len(names)} {what} names {names} for {n} predicted {what} probabilities. "
                                 f"Fix: pass --{what}_names with one name per {what} (or null for indices).")
        header = ["image"]
        if n_cls:
            header += ["pred_class", "pred_name"] + [f"p_{cls_names[i]}" for i in range(n_cls)]
        if n_dom:
            header += ["pred_domain", "pred_domain_name"] + [f"p_domain_{dom_names[i]}" for i in range(n_dom)]
        rows = []
        for r in self.rows:
            row = [r["image"]]
            if n_cls:
                c = r.get("class")
                row += [c, cls_names[c] if c is not None else ""] + [f"{p:.6f}" for p in r.get("class_probs", [])]
            if n_dom:
                d = r.get("domain")
                row += [d, dom_names[d] if d is not None else ""] + [f"{p:.6f}" for p in r.get("domain_probs", [])]
            rows.append(row)
        write_csv_atomic(self.path, header, rows)
        logger.info(f"wrote {len(rows)} predictions to {self.path}")


class AtomicMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` whose report files (``metrics.csv``, ``<metric>_raw.csv``,
    ``<metric>_summary.csv``) are each written in full before replacing the previous ones.

    The reports are first written into a temporary folder inside ``save_dir``, then every file is renamed
    into ``save_dir``; same arguments as ``MetricsSaver``, plus ``class_labels``: names of the metric's classes
    in order (e.g. :func:`~medpeft_monai.utils.label_names` of the bundle's metadata), used instead of MONAI's
    ``class0, class1, ...`` in the per-image and summary reports (``class0`` is the first class the metric
    scores, i.e. label 1 when the background is left out).
    """

    def __init__(self, *args, class_labels: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.class_labels = list(class_labels) if class_labels is not None else None

    def _rename_classes(self, path: str) -> None:
        cells = {f"class{i}": str(n) for i, n in enumerate(self.class_labels)}
        with open(path, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split(self.deli) for line in f]
        text = "\n".join(self.deli.join(cells.get(c, c) for c in row) for row in rows) + "\n"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def __call__(self, engine: Engine) -> None:
        final = os.fspath(self.save_dir)
        os.makedirs(final, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".tmp-metrics-", dir=final)
        try:
            self.save_dir = staging
            super().__call__(engine)
            for name in sorted(os.listdir(staging)):
                if self.class_labels is not None and name.endswith(("_raw.csv", "_summary.csv")):
                    self._rename_classes(os.path.join(staging, name))
                os.replace(os.path.join(staging, name), os.path.join(final, name))
        finally:
            self.save_dir = final
            shutil.rmtree(staging, ignore_errors=True)


class DomainOutputs:
    """Unpack a DCRM network's outputs in an evaluator: ``pred`` = the task logits, plus the router's
    ``domain_prob`` ``(B, K)`` and the batch's ``domain_id``.

    The evaluator's inferer returns the network's :class:`~medpeft_monai.nets.dcrm.DCRMOutput` (use
    :class:`medpeft_monai.inferers.OutputsInferer`); this handler runs at ``FORWARD_COMPLETED``, before the
    output is decollated, so every item then carries its own ``pred``, ``domain_prob`` and ``domain_id``.
    A plain tensor ``pred`` is left as it is.
    """

    def __init__(self, domain_key: str = "domain_id") -> None:
        self.domain_key = domain_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        outputs = out.get(Keys.PRED)
        if hasattr(outputs, "domain_probs"):
            out[Keys.PRED] = outputs.pred
            if outputs.domain_probs is not None:
                out["domain_prob"] = outputs.domain_probs.detach()
        batch = engine.state.batch
        if isinstance(batch, dict) and self.domain_key in batch:
            out["domain_id"] = torch.as_tensor(as_plain_tensor(batch[self.domain_key])).view(-1)


class SkippedImagesError(RuntimeError):
    """An inference run skipped datalist items whose image could not be read or preprocessed."""


class SkippedItemsReport:
    """The end of an inference run over a :class:`medpeft_monai.data.SkippingDataset`: the datalist items that
    never reached the network (their loading or preprocessing failed and was logged) are listed in an error
    log and in a :class:`SkippedImagesError` raised at ``COMPLETED``, after every other item was processed and
    written, so the run exits non-zero and its last lines name the files and the fix.

    Attach it last (after the writers whose files are written at ``COMPLETED``). The items that were processed
    are recognised by the dataset's ``index_key`` in each batch, so workers do not hide a skipped file.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.seen: set[int] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.seen.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def collect(self, engine: Engine) -> None:
        key = self.dataset.index_key
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            if isinstance(item, dict) and key in item:
                self.seen.update(int(i) for i in torch.as_tensor(as_plain_tensor(item[key])).view(-1).tolist())

    def skipped(self) -> list[int]:
        return [i for i in range(len(self.dataset.data)) if i not in self.seen]

    def report(self, engine: Engine | None = None) -> None:
        from medpeft_monai.data.datasets import item_files

        missing = self.skipped()
        if not missing:
            return
        total = len(self.dataset.data)
        lines = [f"  {item_files(self.dataset.data[i])}: "
                 f"{self.dataset.skipped.get(i, 'failed in a DataLoader worker, see the error logged above')}"
                 for i in missing]
        message = (f"{len(missing)} of {total} datalist item(s) could not be read or preprocessed and were skipped; "
                   f"the other {total - len(missing)} were processed and their outputs written:\n" + "\n".join(lines)
                   + "\nFix: repair or replace these files (or remove their entries from the datalist) and run them "
                   "again; --on_error stop stops the run at the first such file instead.")
        logger.error(message)
        raise SkippedImagesError(message)


def _label_checks(transform) -> list:
    """The :class:`~medpeft_monai.data.transforms.CheckLabelRanged` inside a (nested) ``Compose``."""
    from medpeft_monai.data.transforms import CheckLabelRanged

    if isinstance(transform, CheckLabelRanged):
        return [transform]
    found = []
    for t in getattr(transform, "transforms", None) or []:
        found += _label_checks(t)
    return found


class LabelClassesCheck:
    """A warning (not an error) when the training labels use fewer classes than ``num_classes``: the network then
    learns output channels for classes that never occur (their Dice is empty or 0), usually because
    ``num_classes`` was set too high or labels were remapped.

    Reads what the :class:`~medpeft_monai.data.transforms.CheckLabelRanged` of the training ``transform`` recorded:
    at ``STARTED`` when every training label was already checked (the bundles' ``CacheDataset``), else after the
    run's first epoch (labels loaded in DataLoader workers are not seen; then nothing is reported). The warning
    names the values found, the number of label files and the fix (``option``: the bundle's setting). Rank 0 only.
    """

    def __init__(self, transform, option: str = "--num_classes") -> None:
        self.checks = _label_checks(transform)
        self.option = option
        self.done = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.report)

    def started(self, engine: Engine) -> None:
        self.done = False
        try:
            n = len(engine.data_loader.dataset)
        except (AttributeError, TypeError):
            return
        if self.checks and all(c.labels_seen >= n for c in self.checks):
            self.report(engine)

    def report(self, engine: Engine | None = None) -> None:
        if self.done:
            return
        self.done = True
        if get_rank() != 0:
            return
        for check in self.checks:
            if not check.labels_seen:
                logger.info("num_classes check: no training label was checked in this process (DataLoader workers?)")
                continue
            unused = check.unused_classes()
            if not unused:
                continue
            present = check.classes_present()
            top = max(present) if present else 0
            fix = (f"if these labels are complete, set {self.option} {top + 1} (background included)"
                   if top + 1 < check.num_classes else "check the label values (a class between them never occurs)")
            logger.warning(
                f"The training labels ({check.labels_seen} label files) hold the class values {present}, but "
                f"num_classes={check.num_classes}: class(es) {unused} never occur, so their output channels learn "
                f"only 'absent' and their Dice is empty (or 0). Fix: {fix}; otherwise add training images "
                "that show these classes.")
