"""Experiment tracking for bundles: the bundle's own parameters and artefacts in MONAI's MLflow run.

``python -m monai.bundle run ... --tracking mlflow`` makes MONAI append an ``MLFlowHandler`` to the
trainer (it logs the loss per iteration, ``engine.state.metrics`` per epoch, ``max_epochs`` /
``epoch_length`` and the executed config) and another to the validator (validation metrics per
epoch). MONAI's handler does not know what a PEFT bundle is about, so every bundle also lists
:class:`MLflowBundleLogger` in ``train#handlers``. It does nothing unless an ``MLFlowHandler`` is
attached to the same engine (so runs without ``--tracking`` are unchanged, and in multi-process
runs only rank 0 logs, because MONAI disables the handler elsewhere). When one is attached it adds,
to the same MLflow run:

* the bundle's ``tracking_params`` (method, backbone, data fraction, learning rates, ...), nested
  dicts flattened as ``peft.rank``;
* the initial learning rate of every optimizer parameter group (``initial_lr_group_0``, ...);
* trainable / total parameter counts of the network;
* at the end of training, the files in ``artifacts`` (the adapter ``models/adapter.pt``) under the
  run's ``models/`` artefact folder.

Bundle config (``configs/train.json``)::

    "tracking_params": {"method": "$@peft['method']", "backbone": "@backbone",
                        "data_fraction": "@data_fraction", "learning_rate": "@learning_rate"},
    "train": {"handlers": [..., {"_target_": "medpeft_monai.tracking.MLflowBundleLogger",
                                 "params": "@tracking_params", "network": "@network",
                                 "artifacts": ["$@ckpt_dir + '/adapter.pt'"]}]}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events
from torch import nn

from medpeft_monai.distributed import unwrap_ddp
from medpeft_monai.peft import count_parameters

__all__ = ["MLflowBundleLogger", "find_mlflow_handler", "flatten_params"]

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"peft": {"method": "lora", "rank": 8}}`` -> ``{"peft.method": "lora", "peft.rank": "8"}``."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = str(value)
            out[name] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return out


def find_mlflow_handler(engine: Engine):
    """The ``monai.handlers.MLFlowHandler`` attached to ``engine`` (its ``start`` on ``STARTED``), or ``None``."""
    try:
        from monai.handlers import MLFlowHandler
    except ImportError:  # mlflow not installed: no tracking possible
        return None
    for entry in getattr(engine, "_event_handlers", {}).get(Events.STARTED, []):
        owner = getattr(entry[0], "__self__", None)
        if isinstance(owner, MLFlowHandler):
            return owner
    return None


class MLflowBundleLogger:
    """Log a bundle's parameters and artefacts into the MLflow run of MONAI's ``MLFlowHandler``.

    Args:
        params: parameters to record once per run (nested dicts are flattened with dots).
        artifacts: files to upload when the engine completes, e.g. the adapter ``models/adapter.pt``;
            missing files are reported in the log and skipped.
        network: if given, ``params_trainable`` and ``params_total`` are recorded.
        artifact_path: folder inside the run's artefacts, default ``models``.
        log_optimizer_lrs: record the initial lr of every optimizer parameter group of the engine.

    Attach it to the trainer (``train#handlers``). Without an ``MLFlowHandler`` on the same engine it is
    a no-op.
    """

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        artifacts: str | Sequence[str] | None = None,
        network: nn.Module | None = None,
        artifact_path: str = "models",
        log_optimizer_lrs: bool = True,
    ) -> None:
        self.params = dict(params or {})
        self.artifacts = [artifacts] if isinstance(artifacts, (str, os.PathLike)) else list(artifacts or [])
        self.network = network
        self.artifact_path = artifact_path
        self.log_optimizer_lrs = log_optimizer_lrs
        self.mlflow = None  # the MLFlowHandler found on the engine

    def attach(self, engine: Engine) -> None:
        # EPOCH_STARTED(once=1) runs after every STARTED handler, so MONAI's handler has opened its run.
        engine.add_event_handler(Events.EPOCH_STARTED(once=1), self.log_params)
        engine.add_event_handler(Events.COMPLETED, self.log_artifacts)

    def _run_id(self, engine: Engine) -> str | None:
        if self.mlflow is None:
            self.mlflow = find_mlflow_handler(engine)
        run = getattr(self.mlflow, "cur_run", None)
        return None if run is None else run.info.run_id

    def collect_params(self, engine: Engine) -> dict[str, str]:
        params = flatten_params(self.params)
        optimizer = getattr(engine, "optimizer", None)
        if self.log_optimizer_lrs and optimizer is not None:
            for i, group in enumerate(optimizer.param_groups):
                params[f"initial_lr_group_{i}"] = str(group.get("initial_lr", group["lr"]))
        if self.network is not None:
            net = unwrap_ddp(self.network)
            trainable, total = count_parameters(net)
            params["params_trainable"], params["params_total"] = str(trainable), str(total)
        return params

    def log_params(self, engine: Engine) -> None:
        run_id = self._run_id(engine)
        if run_id is None:
            return
        import mlflow

        client = self.mlflow.client
        logged = client.get_run(run_id).data.params
        params = self.collect_params(engine)
        new = {k: v for k, v in params.items() if k not in logged}
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:  # MLflow params are immutable within a run (e.g. a resumed run with new settings)
            logger.warning(f"MLflow run {run_id} already holds different values for {changed}; kept the old ones.")
        if new:
            client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in new.items()])

    def log_artifacts(self, engine: Engine) -> None:
        run_id = self._run_id(engine)
        if run_id is None:
            return
        for path in self.artifacts:
            path = os.fspath(path)
            if not os.path.isfile(path):
                logger.warning(f"MLflow artefact {path} does not exist (no validation improvement saved it); skipped.")
                continue
            self.mlflow.client.log_artifact(run_id, path, artifact_path=self.artifact_path)
            logger.info(f"logged {path} to MLflow run {run_id} under {self.artifact_path}/")
