"""Ignite handlers for bundles: the adapter artefact beside the full checkpoint, per-image predictions, and a
guard that stops training on a non-finite loss before anything is saved."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import MetricsSaver
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medpeft_monai.backbones import as_plain_tensor
from medpeft_monai.peft import peft_state_dict, save_atomic
from medpeft_monai.utils import write_csv_atomic

__all__ = [
    "AdapterSaver",
    "NonFiniteLossError",
    "StopOnNonFiniteLoss",
    "AtomicMetricsSaver",
    "DomainOutputs",
    "PredictionWriter",
    "output_items",
    "scores_and_labels",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class StopOnNonFiniteLoss:
    """Stop training with :class:`NonFiniteLossError` at the first iteration whose loss is NaN or infinite.

    Attached first among the trainer's handlers, it fires before validation and the checkpoint savers of
    that epoch, so the broken network is never saved over an earlier model, and the run exits with an
    error (Ignite's ``TerminateOnNan`` ends the run as a success instead).
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
            f"{engine.state.epoch}, iteration {engine.state.iteration}; training stopped and nothing was saved by "
            "this run (an earlier models/ folder is untouched). Check the training images for NaN or infinite "
            "values, then lower the learning rate(s) or turn off AMP.")


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


class AdapterSaver:
    """Write one adapter's artefact (:func:`~medpeft_monai.peft.peft_state_dict`: its tensors, config and
    backbone identity) atomically.

    Attach to the validation evaluator: the file is rewritten whenever the evaluator's key metric
    reaches a new best (MONAI's ``best_metric_epoch`` equals the current epoch); with ``on_best=False``
    it is written once when the engine completes.

    Args:
        network: the PEFT network being trained.
        save_dir: folder for the file (usually the bundle's ``models/``).
        filename: file name, default ``adapter.pt``.
        on_best: save on a new best key metric (attach to the evaluator).
        adapter: name of the adapter to save (default ``"default"``, the one a network's ``peft`` builds).
    """

    def __init__(self, network: nn.Module, save_dir: str, filename: str = "adapter.pt", on_best: bool = True,
                 adapter: str = "default") -> None:
        self.network, self.path, self.on_best = network, os.path.join(save_dir, filename), on_best
        self.adapter = adapter

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED if self.on_best else Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.on_best and getattr(engine.state, "best_metric_epoch", -1) != engine.state.epoch:
            return
        net = self.network.module if hasattr(self.network, "module") else self.network  # DDP
        save_atomic(peft_state_dict(net, self.adapter), self.path)
        logger.info(f"saved adapter artefact to {self.path}")


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
