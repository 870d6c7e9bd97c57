"""Ignite metrics for bundles: accuracy and Dice overall and per domain, Dice with its absent-class convention."""

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

__all__ = ["DomainAccuracy", "DomainDice", "MeanDice"]


def _index(value) -> int:
    """A class/domain index from a scalar, an index tensor or a probability / one-hot vector."""
    t = torch.as_tensor(as_plain_tensor(value) if isinstance(value, torch.Tensor) else value)
    return int(t.reshape(-1)[0]) if t.numel() == 1 else int(t.reshape(t.shape[0], -1).sum(1).argmax())


def _pred_label_domain(output) -> tuple[list, list, list]:
    items = output_items(output)
    return ([o[Keys.PRED] for o in items], [o.get(Keys.LABEL) for o in items], [o.get("domain_id") for o in items])


class _DomainMean(Metric):
    """Mean of a per-item score overall (the metric value) and per domain.

    At the end of each run it also stores ``<name>_<domain>`` for every domain seen and
    ``<name>_domain_mean`` (mean over domains) in ``engine.state.metrics``, and, with ``save_dir``, writes
    ``filename`` (columns ``domain, domain_id, n``, the subclass's sum column if it has one, then the score;
    last row ``all``) atomically. Under ``torch.distributed`` the sums of all processes are added first and
    only rank 0 writes. Subclasses define :meth:`score` (``None``: the item does not count).

    Args:
        domain_names: names indexed by domain id (default: the ids).
        save_dir: folder for the CSV (none written if ``None``).
        filename: CSV name.
        output_transform: engine output -> ``(preds, labels, domain_ids)`` (default: the ``pred``,
            ``label`` and ``domain_id`` of every output item; see :class:`DomainOutputs`).
    """

    score_name = "score"
    sum_name: str | None = None
    filename = "per_domain_score.csv"

    def __init__(self, domain_names: Sequence[str] | None = None, save_dir: str | None = None,
                 filename: str | None = None, output_transform: Callable = _pred_label_domain,
                 device: str | torch.device = "cpu") -> None:
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.save_dir, self.filename = save_dir, filename or type(self).filename
        self.per_domain: dict[int, tuple[float, int]] = {}
        super().__init__(output_transform=output_transform, device=device)

    def score(self, pred, label) -> float | None:
        raise NotImplementedError

    def iteration_completed(self, engine: Engine) -> None:
        self.update(self._output_transform(engine.state.output))

    def reset(self) -> None:
        self._sum: dict[int, float] = defaultdict(float)
        self._total: dict[int, int] = defaultdict(int)

    def update(self, output) -> None:
        preds, labels, domains = output
        for pred, label, dom in zip(preds, labels, domains):
            s = None if label is None else self.score(pred, label)
            if s is None:
                continue
            d = -1 if dom is None else _index(dom)
            self._total[d] += 1
            self._sum[d] += s

    def _name(self, d: int) -> str:
        if d < 0:
            return "unknown"
        return self.domain_names[d] if self.domain_names is not None and d < len(self.domain_names) else str(d)

    def _sums(self) -> tuple[dict[int, float], dict[int, int]]:
        """``(sum of scores, count)`` per domain id, added over all processes under ``torch.distributed``."""
        if get_world_size() == 1:
            return dict(self._sum), dict(self._total)
        gathered: list = [None] * get_world_size()
        dist.all_gather_object(gathered, (dict(self._sum), dict(self._total)))
        sums: dict[int, float] = defaultdict(float)
        total: dict[int, int] = defaultdict(int)
        for rank_sum, rank_total in gathered:
            for d, n in rank_total.items():
                total[d] += n
                sums[d] += rank_sum.get(d, 0)
        return dict(sums), dict(total)

    def compute(self) -> float:
        sums, total = self._sums()
        if sum(total.values()) == 0:
            raise RuntimeError(f"{type(self).__name__} needs at least one scored example before compute().")
        self.per_domain = {d: (sums.get(d, 0), total[d]) for d in sorted(total)}
        return sum(sums.values()) / sum(total.values())

    def completed(self, engine: Engine, name: str) -> None:
        value = self.compute()
        engine.state.metrics[name] = value
        means = {self._name(d): s / n for d, (s, n) in self.per_domain.items()}
        for dom, mean in means.items():
            engine.state.metrics[f"{name}_{dom}"] = mean
        engine.state.metrics[f"{name}_domain_mean"] = float(np.mean(list(means.values())))
        if self.save_dir is not None and get_rank() == 0:
            sum_col = [self.sum_name] if self.sum_name else []
            rows = [[self._name(d), d, n, *([s] if sum_col else []), s / n] for d, (s, n) in self.per_domain.items()]
            n_all = sum(n for _, n in self.per_domain.values())
            s_all = sum(s for s, _ in self.per_domain.values())
            rows.append(["all", "", n_all, *([s_all] if sum_col else []), value])
            write_csv_atomic(os.path.join(self.save_dir, self.filename),
                              ["domain", "domain_id", "n", *sum_col, self.score_name], rows)


class DomainAccuracy(_DomainMean):
    """Classification accuracy overall and per domain (:class:`_DomainMean`; CSV columns ``domain, domain_id,
    n, correct, accuracy``). ``pred`` may be logits, probabilities, one-hot or an index."""

    score_name, sum_name, filename = "accuracy", "correct", "per_domain_accuracy.csv"

    def score(self, pred, label) -> int:
        return int(_index(pred) == _index(label))


class DomainDice(_DomainMean):
    """Segmentation Dice overall and per domain (:class:`_DomainMean`; CSV ``per_domain_dice.csv``, columns
    ``domain, domain_id, n, dice``): each image's Dice ``2 |P_c ∩ G_c| / (|P_c| + |G_c|)`` averaged over the
    foreground classes ``c``, then averaged over the images. ``pred`` and ``label`` are one-hot
    ``(C, *spatial)`` (after ``AsDiscreted``). ``ignore_empty`` as in :class:`MeanDice`: with ``True`` a class
    absent from the label gives no score (an image without any foreground does not count), with ``False`` it
    scores 1 if it is not predicted either, else 0. Other arguments: :class:`_DomainMean`."""

    score_name, filename = "dice", "per_domain_dice.csv"

    def __init__(self, domain_names: Sequence[str] | None = None, save_dir: str | None = None,
                 filename: str | None = None, ignore_empty: bool = True, **kwargs) -> None:
        self.ignore_empty = bool(ignore_empty)
        super().__init__(domain_names, save_dir, filename, **kwargs)

    def score(self, pred, label) -> float | None:
        from monai.metrics import compute_dice

        dice = compute_dice(torch.as_tensor(pred)[None].float(), torch.as_tensor(label)[None].float(),
                            include_background=False, ignore_empty=self.ignore_empty)
        dice = dice[~torch.isnan(dice)]
        return float(dice.mean()) if dice.numel() else None


class MeanDice(_MonaiMeanDice):
    """MONAI's ``MeanDice`` handler with the Dice convention for absent classes as an argument.

    ``ignore_empty`` (MONAI's ``DiceMetric`` default ``True``): an image whose label lacks a class gives no
    score for it; ``False``: it scores 0 if the class is predicted there, 1 if not. The bundles set it from
    their config key ``dice_ignore_empty`` (see docs/reliability.md, "What the Dice figures measure").
    """

    def __init__(self, ignore_empty: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.metric_fn.ignore_empty = bool(ignore_empty)
