"""Ignite metrics for bundles: accuracy overall and per domain."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.handlers import MeanDice as _MonaiMeanDice
from monai.utils.enums import CommonKeys as Keys

from medpeft_monai.backbones import as_plain_tensor
from medpeft_monai.distributed import get_rank, get_world_size
from medpeft_monai.handlers import output_items
from medpeft_monai.utils import write_csv_atomic

__all__ = ["DomainAccuracy", "MeanDice"]


def _index(value) -> int:
    """A class/domain index from a scalar, an index tensor or a probability / one-hot vector."""
    t = torch.as_tensor(as_plain_tensor(value) if isinstance(value, torch.Tensor) else value)
    return int(t.reshape(-1)[0]) if t.numel() == 1 else int(t.reshape(t.shape[0], -1).sum(1).argmax())


def _pred_label_domain(output) -> tuple[list, list, list]:
    items = output_items(output)
    return ([o[Keys.PRED] for o in items], [o.get(Keys.LABEL) for o in items], [o.get("domain_id") for o in items])


class DomainAccuracy(Metric):
    """Classification accuracy overall (the metric value) and per domain.

    At the end of each run it also stores ``<name>_<domain>`` for every domain seen and
    ``<name>_domain_mean`` (mean over domains) in ``engine.state.metrics``, and, with ``save_dir``, writes
    ``filename`` (columns ``domain, domain_id, n, correct, accuracy``, last row ``all``) atomically.
    Under ``torch.distributed`` the counts of all processes are summed first and only rank 0 writes.

    Args:
        domain_names: names indexed by domain id (default: the ids).
        save_dir: folder for the CSV (none written if ``None``).
        filename: CSV name.
        output_transform: engine output -> ``(preds, labels, domain_ids)`` (default: the ``pred``,
            ``label`` and ``domain_id`` of every output item; see :class:`DomainOutputs`). ``pred`` may
            be logits, probabilities, one-hot or an index.
    """

    def __init__(self, domain_names: Sequence[str] | None = None, save_dir: str | None = None,
                 filename: str = "per_domain_accuracy.csv", output_transform: Callable = _pred_label_domain,
                 device: str | torch.device = "cpu") -> None:
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.save_dir, self.filename = save_dir, filename
        self.per_domain: dict[int, tuple[int, int]] = {}
        super().__init__(output_transform=output_transform, device=device)

    def iteration_completed(self, engine: Engine) -> None:
        self.update(self._output_transform(engine.state.output))

    def reset(self) -> None:
        self._correct: dict[int, int] = defaultdict(int)
        self._total: dict[int, int] = defaultdict(int)

    def update(self, output) -> None:
        preds, labels, domains = output
        for pred, label, dom in zip(preds, labels, domains):
            if label is None:
                continue
            d = -1 if dom is None else _index(dom)
            self._total[d] += 1
            self._correct[d] += int(_index(pred) == _index(label))

    def _name(self, d: int) -> str:
        if d < 0:
            return "unknown"
        return self.domain_names[d] if self.domain_names is not None and d < len(self.domain_names) else str(d)

    def _counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """``(correct, total)`` per domain id, summed over all processes under ``torch.distributed``."""
        if get_world_size() == 1:
            return dict(self._correct), dict(self._total)
        gathered: list = [None] * get_world_size()
        dist.all_gather_object(gathered, (dict(self._correct), dict(self._total)))
        correct: dict[int, int] = defaultdict(int)
        total: dict[int, int] = defaultdict(int)
        for rank_correct, rank_total in gathered:
            for d, n in rank_total.items():
                total[d] += n
                correct[d] += rank_correct.get(d, 0)
        return dict(correct), dict(total)

    def compute(self) -> float:
        correct, total = self._counts()
        if sum(total.values()) == 0:
            raise RuntimeError("DomainAccuracy needs at least one labelled example before compute().")
        self.per_domain = {d: (correct.get(d, 0), total[d]) for d in sorted(total)}
        return sum(correct.values()) / sum(total.values())

    def completed(self, engine: Engine, name: str) -> None:
        value = self.compute()
        engine.state.metrics[name] = value
        accs = {self._name(d): c / n for d, (c, n) in self.per_domain.items()}
        for dom, acc in accs.items():
            engine.state.metrics[f"{name}_{dom}"] = acc
        engine.state.metrics[f"{name}_domain_mean"] = float(np.mean(list(accs.values())))
        if self.save_dir is not None and get_rank() == 0:
            rows = [[self._name(d), d, n, c, c / n] for d, (c, n) in self.per_domain.items()]
            rows.append(["all", "", sum(n for _, n in self.per_domain.values()),
                         sum(c for c, _ in self.per_domain.values()), value])
            write_csv_atomic(os.path.join(self.save_dir, self.filename),
                              ["domain", "domain_id", "n", "correct", "accuracy"], rows)


class MeanDice(_MonaiMeanDice):
    """MONAI's ``MeanDice`` handler with the Dice convention for absent classes as an argument.

    ``ignore_empty`` (MONAI's ``DiceMetric`` default ``True``): an image whose label lacks a class gives no
    score for it; ``False``: it scores 0 if the class is predicted there, 1 if not. The bundles set it from
    their config key ``dice_ignore_empty`` (see docs/reliability.md, "What the Dice figures measure").
    """

    def __init__(self, ignore_empty: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.metric_fn.ignore_empty = bool(ignore_empty)
