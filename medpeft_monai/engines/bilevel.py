"""Bi-level (MAML-style) training of DCRM-ViT as a MONAI/Ignite engine, plus the helpers its bundles use.

:class:`BilevelTrainer` is a MONAI ``SupervisedTrainer`` (handlers, metrics, ``run()``, StatsHandler
output) whose iteration is one *episode*:

1. the batch is split into tasks by domain (:func:`split_tasks`; one task per domain id, domains with a
   single image in the batch are pooled into one mixed task), and each task into a support half
   ``D_T^task`` and a query half ``D_T^dom``;
2. **inner loop**: ``N`` gradient steps on the modulator parameters ``phi`` (every TALer: bank, static
   coefficients and biases, ``r``) on the support half, ``phi'_T = phi - alpha grad_phi L_task``, done
   functionally (``torch.func.functional_call``) so the outer gradient flows through the update.
   ``alpha = exp(log_inner_lr)`` is learned. Second order (default) keeps the graph of the inner
   gradient (``create_graph=True``; attention then runs on PyTorch's math SDPA kernel, the only one with
   a double backward); ``first_order=True`` detaches the inner gradients (FOMAML);
3. **outer loop**: ``L_outer = mean_T [ w_s * L(support; phi) + L(query; phi'_T) ]`` with
   ``L = L_task + beta * L_domain + reg_weight * L_reg`` (:class:`DCRMLoss`), back-propagated to the
   router, the PSN, the modulator initialisation ``phi``, ``alpha``, the DAB biases and the head, then one
   optimizer step.

Why the support term ``w_s * L(support; phi)`` (default ``w_s = 1``): inference is a single forward
pass with the *unadapted* ``phi`` (no test-time updates), so the outer objective must also score
``phi`` itself. With it the update is the MLDG form (Li et al., AAAI 2018) of the same bi-level
problem, ``grad[L_s(phi) + L_q(phi - alpha grad L_s(phi))]``, whose second-order term rewards
agreement between support and query gradients, i.e. it penalises the gradient interference the
paper's bi-level scheme is meant to remove. ``support_weight=0`` gives the plain MAML outer loss.

``mode="joint"`` is the "no meta-learning" ablation: one ordinary step on ``L`` over the whole batch.

Bundle helpers: :class:`DomainEpisodeSampler` (batches of ``tasks x shots`` images from distinct
domains, class-balanced across tasks), :class:`DomainOutputs` (adds the router's ``domain_prob`` and
the batch's ``domain_id`` to an evaluator's output), :class:`DomainAccuracy` (accuracy overall and per
domain, as metrics and a CSV) and :func:`datalist_domains`. Per-image class and domain probabilities
are written by :class:`medpeft_monai.handlers.PredictionWriter`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.func import functional_call
from torch.utils.data import Sampler

from medpeft_monai.backbones import as_plain_tensor
from medpeft_monai.distributed import get_rank, get_world_size
from medpeft_monai.handlers import output_items
from medpeft_monai.peft.dcrm import TALer, find_controller
from medpeft_monai.utils import write_csv_atomic

__all__ = [
    "BilevelTrainer",
    "DCRMLoss",
    "DomainAccuracy",
    "DomainEpisodeSampler",
    "DomainOutputs",
    "datalist_domains",
    "dcrm_total_loss",
    "modulator_parameter_names",
    "split_tasks",
]

MODES = ("bilevel", "joint")
logger = logging.getLogger(__name__)


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network


# ---------------------------------------------------------------------------------------------- loss


def dcrm_total_loss(task: torch.Tensor, domain_logits: torch.Tensor | None = None,
                    domain_target: torch.Tensor | None = None, synth_reg: torch.Tensor | None = None,
                    beta: float = 0.1, reg_weight: float = 1e-3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_total = L_task + beta * CE(domain_logits, domain_target) + reg_weight * L_reg``.

    The domain term is 0 without router logits (ablation w/o DR) or targets; the regulariser is 0
    without a PSN. Returns ``(total, {"task", "domain", "reg"})``.
    """
    zero = task.new_zeros(())
    domain = zero
    if domain_logits is not None and domain_target is not None and beta:
        domain = F.cross_entropy(domain_logits.float(), domain_target.long().view(-1).to(domain_logits.device))
    reg = synth_reg.to(task.dtype) if synth_reg is not None else zero
    total = task + beta * domain + reg_weight * reg
    return total, {"task": task.detach(), "domain": domain.detach(), "reg": reg.detach()}


class DCRMLoss(nn.Module):
    """The total DCRM loss around a task loss (``CrossEntropyLoss``, ``DiceCELoss``, ...).

    ``forward(pred, target, domain_logits=None, domain_target=None, synth_reg=None)`` returns
    ``L_task + beta * L_domain + reg_weight * L_reg``; the parts of the last call are in ``last_parts``.
    """

    def __init__(self, task_loss: Callable, beta: float = 0.1, reg_weight: float = 1e-3) -> None:
        super().__init__()
        self.task_loss, self.beta, self.reg_weight = task_loss, float(beta), float(reg_weight)
        self.last_parts: dict[str, torch.Tensor] = {}

    def task(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.task_loss(pred, target).mean()

    def forward(self, pred: torch.Tensor, target: torch.Tensor, domain_logits: torch.Tensor | None = None,
                domain_target: torch.Tensor | None = None, synth_reg: torch.Tensor | None = None) -> torch.Tensor:
        total, self.last_parts = dcrm_total_loss(self.task(pred, target), domain_logits, domain_target, synth_reg,
                                                 self.beta, self.reg_weight)
        return total


# ---------------------------------------------------------------------------------------------- tasks


def split_tasks(domains: torch.Tensor, query_fraction: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Split a batch into tasks by domain id: ``[(support indices, query indices or None), ...]``.

    Each domain with at least two images is a task; its first ``round(n * (1 - query_fraction))``
    images (at least one, at most ``n - 1``) are the support set, the rest the query set. Domains with
    one image are pooled into one mixed task (support only if the pool holds a single image).
    """
    domains = domains.view(-1).cpu()
    tasks, singles = [], []

    def split(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = idx.numel()
        if n < 2:
            return idx, None
        k = min(n - 1, max(1, round(n * (1.0 - query_fraction))))
        return idx[:k], idx[k:]

    for dom in torch.unique(domains, sorted=True):
        idx = torch.nonzero(domains == dom).view(-1)
        if idx.numel() >= 2:
            tasks.append(split(idx))
        else:
            singles.append(idx)
    if singles:
        tasks.append(split(torch.cat(singles)))
    return tasks


class DomainEpisodeSampler(Sampler):
    """Batch sampler of episodes: ``tasks_per_episode`` distinct domains x up to ``shots`` images each.

    Args:
        domain_ids: domain id of every dataset item.
        tasks_per_episode: domains per batch.
        shots: images drawn per domain (without replacement; all of them if the domain has fewer).
        num_episodes: batches per epoch (default: ``ceil(len(domain_ids) / (tasks_per_episode * shots))``).
        class_ids: class label of every item; if given, the domains of an episode are drawn round-robin
            over the classes (by each domain's majority class), so a binary task sees both classes.
        seed: base seed; epoch ``e`` uses ``seed + e``, so runs are reproducible.
        num_replicas, rank: for multi-process training (``torchrun``): every process draws the same
            ``ceil(num_episodes / num_replicas) * num_replicas`` episodes and keeps every
            ``num_replicas``-th one from ``rank`` on, so the processes train on different episodes and
            run the same number of iterations. Default: the ``torch.distributed`` world size and rank
            when a process group is initialised, else 1 and 0.

    Use as ``DataLoader(dataset, batch_sampler=DomainEpisodeSampler(...))``.
    """

    def __init__(self, domain_ids: Sequence[int], tasks_per_episode: int = 2, shots: int = 4,
                 num_episodes: int | None = None, class_ids: Sequence[int] | None = None, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        self.domain_ids = [int(d) for d in domain_ids]
        if not self.domain_ids:
            raise ValueError("DomainEpisodeSampler needs at least one item.")
        if tasks_per_episode < 1 or shots < 1:
            raise ValueError(f"tasks_per_episode and shots must be >= 1, got {tasks_per_episode}, {shots}.")
        self.by_domain: dict[int, list[int]] = defaultdict(list)
        for i, d in enumerate(self.domain_ids):
            self.by_domain[d].append(i)
        self.tasks = min(int(tasks_per_episode), len(self.by_domain))
        self.shots = int(shots)
        self.num_episodes = int(num_episodes or math.ceil(len(self.domain_ids) / (self.tasks * self.shots)))
        self.by_class: dict[int, list[int]] | None = None
        if class_ids is not None:
            if len(class_ids) != len(self.domain_ids):
                raise ValueError("class_ids and domain_ids must have the same length.")
            self.by_class = defaultdict(list)
            for d, items in self.by_domain.items():
                labels = [int(class_ids[i]) for i in items]
                self.by_class[max(set(labels), key=labels.count)].append(d)
        self.seed, self.epoch = int(seed), 0
        self.num_replicas = int(num_replicas if num_replicas is not None else get_world_size())
        self.rank = int(rank if rank is not None else get_rank())
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={self.rank}, "
                             f"num_replicas={self.num_replicas}.")

    def __len__(self) -> int:
        """Episodes this process runs per epoch."""
        return math.ceil(self.num_episodes / self.num_replicas)

    def _domains(self, rng: np.random.Generator) -> list[int]:
        if self.by_class is None:
            return [int(d) for d in rng.choice(sorted(self.by_domain), size=self.tasks, replace=False)]
        classes = sorted(self.by_class)
        start = int(rng.integers(len(classes)))
        chosen: list[int] = []
        for j in range(self.tasks):
            pool = [d for d in self.by_class[classes[(start + j) % len(classes)]] if d not in chosen]
            pool = pool or [d for d in self.by_domain if d not in chosen]
            chosen.append(int(rng.choice(sorted(pool))))
        return chosen

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        for episode in range(len(self) * self.num_replicas):
            batch: list[int] = []
            for d in self._domains(rng):
                items = self.by_domain[d]
                batch += [items[i] for i in rng.permutation(len(items))[:self.shots]]
            if episode % self.num_replicas == self.rank:
                yield batch


def modulator_parameter_names(network: nn.Module) -> list[str]:
    """Names (in ``network.named_parameters()``) of the trainable TALer parameters: the inner-loop set ``phi``."""
    names = []
    for mod_name, module in network.named_modules():
        if isinstance(module, TALer):
            for p_name, p in module.named_parameters():
                if p.requires_grad:
                    names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


# ---------------------------------------------------------------------------------------------- trainer


class BilevelTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` running DCRM's bi-level (or joint) episodes.

    Args:
        device, max_epochs, train_data_loader, network, optimizer: as in ``SupervisedTrainer``. The
            optimizer must hold the trainable network parameters (it then also holds ``log_inner_lr``).
        loss_function: the task loss (e.g. ``CrossEntropyLoss``, ``DiceCELoss``) or a :class:`DCRMLoss`
            (then its ``beta`` / ``reg_weight`` are used).
        mode: ``"bilevel"`` (default) or ``"joint"`` (ablation "no meta-learning").
        inner_steps: ``N`` inner gradient steps per task.
        first_order: detach inner gradients (FOMAML) instead of differentiating through them.
        beta: weight of the router's domain cross-entropy.
        reg_weight: weight of ``L_reg`` (mean squared synthesised parameter delta).
        support_weight: ``w_s``, weight of the support loss at the unadapted ``phi`` in the outer loss.
        query_fraction: share of each task's images used as its query set.
        domain_key: batch key with the integer domain id; a batch without it is one domain (id 0).
        inner_params: regex on parameter names selecting ``phi`` (default: every TALer parameter).
        inner_lr: inner learning rate for networks without a DCRM controller (a DCRM network's own
            learnable ``alpha`` is used otherwise).
        kwargs: further ``SupervisedTrainer`` arguments (``epoch_length``, ``key_train_metric``,
            ``train_handlers``, ``postprocessing``, ``decollate``, ...). ``amp`` only in joint mode.

    ``engine.state.output``: ``image``, ``label``, ``pred`` (support images with ``phi``, query images with
    their task's ``phi'``), ``loss`` (``L_outer``), ``loss_task``, ``loss_domain``, ``loss_reg``,
    ``inner_lr``, ``domain_id``.

    The inferer argument is not used (the network is called directly, or through ``functional_call`` with
    the adapted modulators). Multi-process (``torchrun``): wrap the network in
    ``DistributedDataParallel`` (it broadcasts rank 0's initial weights; the evaluator runs through it)
    and give the data loader a :class:`DomainEpisodeSampler`, which shards episodes by rank; both
    modes run the unwrapped network and average the gradients across processes before each step
    (:meth:`_average_gradients`).
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader, network: nn.Module,
                 optimizer: torch.optim.Optimizer, loss_function: Callable, mode: str = "bilevel",
                 inner_steps: int = 1, first_order: bool = False, beta: float = 0.1, reg_weight: float = 1e-3,
                 support_weight: float = 1.0, query_fraction: float = 0.5, domain_key: str = "domain_id",
                 inner_params: str | None = None, inner_lr: float = 0.01, **kwargs) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if mode == "bilevel" and kwargs.get("amp", False):
            raise ValueError("amp is not supported by the bilevel loop; use amp=False or mode='joint'.")
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}.")
        if not 0.0 < query_fraction < 1.0:
            raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}.")
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, loss_function=loss_function, **kwargs)
        self.mode, self.inner_steps, self.first_order = mode, int(inner_steps), bool(first_order)
        self.dcrm_loss = (loss_function if isinstance(loss_function, DCRMLoss)
                          else DCRMLoss(loss_function, beta=beta, reg_weight=reg_weight))
        self.support_weight, self.query_fraction = float(support_weight), float(query_fraction)
        self.domain_key = domain_key
        net = _unwrap(network)
        if inner_params is None:
            self.inner_names = modulator_parameter_names(net)
        else:
            regex = re.compile(inner_params)
            self.inner_names = [n for n, p in net.named_parameters() if p.requires_grad and regex.search(n)]
        try:
            self.controller = find_controller(net)
        except ValueError:
            self.controller = None
        self.fixed_inner_lr = float(inner_lr)
        self._warned_no_domain = False

    # -- helpers
    def _inner_lr(self) -> torch.Tensor | float:
        return self.controller.inner_lr if self.controller is not None else self.fixed_inner_lr

    def _domains(self, batchdata, n: int, device: torch.device) -> torch.Tensor:
        value = batchdata.get(self.domain_key) if isinstance(batchdata, dict) else None
        if value is None:
            if not self._warned_no_domain:
                logger.warning(f"batches have no {self.domain_key!r}; every image is treated as domain 0.")
                self._warned_no_domain = True
            return torch.zeros(n, dtype=torch.long, device=device)
        return torch.as_tensor(as_plain_tensor(value) if isinstance(value, torch.Tensor) else value,
                               dtype=torch.long).view(-1).to(device)

    def _loss(self, net: nn.Module, pred: torch.Tensor, target: torch.Tensor,
              domains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(L_task with graph, L_total, detached parts)`` of the forward pass that just ran."""
        ctx = self.controller.context if self.controller is not None else None
        logits = ctx.domain_logits if ctx is not None else None
        reg = ctx.synth_reg if ctx is not None else None
        task = self.dcrm_loss.task(pred, target)
        total, parts = dcrm_total_loss(task, logits, domains, reg, self.dcrm_loss.beta, self.dcrm_loss.reg_weight)
        return task, total, parts

    def _adapt(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, task_loss: torch.Tensor) -> dict:
        """``N`` functional inner steps from the current ``phi``; returns ``{name: phi'}``."""
        params = dict(net.named_parameters())
        names = self.inner_names
        weights = [params[n] for n in names]
        alpha = self._inner_lr()
        loss = task_loss
        for step in range(self.inner_steps):
            if step > 0:
                loss = self.dcrm_loss.task(functional_call(net, dict(zip(names, weights)), (x,)), y)
            grads = torch.autograd.grad(loss, weights, create_graph=not self.first_order, retain_graph=True,
                                        allow_unused=True)
            weights = [w if g is None else w - alpha * (g.detach() if self.first_order else g)
                       for w, g in zip(weights, grads)]
        return dict(zip(names, weights))

    def _bilevel(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, domains: torch.Tensor):
        """One episode: ``(L_outer, mean parts, pred in batch order)``."""
        tasks = split_tasks(domains, self.query_fraction)
        order, preds, parts = [], [], []
        outer = x.new_zeros(())
        for support, query in tasks:
            s = support.to(x.device)
            pred_s = net(x[s])
            task_s, loss_s, parts_s = self._loss(net, pred_s, y[s], domains[s])
            order.append(s)
            preds.append(pred_s.detach())
            parts.append(parts_s)
            if query is None:  # a lone image: scored with phi only
                outer = outer + loss_s
                continue
            q = query.to(x.device)
            if self.inner_names:
                pred_q = functional_call(net, self._adapt(net, x[s], y[s], task_s), (x[q],))
            else:  # nothing to adapt (e.g. ablation w/o RMB): the query is scored with phi
                pred_q = net(x[q])
            _, loss_q, parts_q = self._loss(net, pred_q, y[q], domains[q])
            order.append(q)
            preds.append(pred_q.detach())
            parts.append(parts_q)
            outer = outer + self.support_weight * loss_s + loss_q
        pred = torch.cat(preds)[torch.argsort(torch.cat(order))]
        mean_parts = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
        return outer / len(tasks), mean_parts, pred

    @staticmethod
    def _average_gradients(net: nn.Module) -> None:
        """Multi-process training: ``grad <- (1 / world_size) * sum_ranks grad`` for every trainable parameter.

        Both loops run the unwrapped network (the functional inner loop bypasses
        ``DistributedDataParallel``'s gradient hooks), so the outer gradients are averaged here, in one
        all-reduce, before the optimizer step; every process then takes the same step. A parameter
        that has no gradient on any process keeps ``grad = None``. Does nothing in a single process.
        """
        if get_world_size() == 1:
            return
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            return
        device = params[0].device
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=device)
        flat = torch.cat(grads + [has_grad])
        dist.all_reduce(flat)
        flat /= get_world_size()
        offset = 0
        for p, seen in zip(params, flat[-len(params):].tolist()):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if seen > 0 else None
            offset += n

    # -- iteration
    def _iteration(self, engine: BilevelTrainer, batchdata) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = as_plain_tensor(batch[0]), as_plain_tensor(batch[1])
        domains = engine._domains(batchdata, inputs.shape[0], inputs.device)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        net = _unwrap(engine.network)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.mode == "joint":
            with torch.autocast(inputs.device.type, **engine.amp_kwargs) if engine.amp else contextlib.nullcontext():
                pred = net(inputs)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                _, loss, parts = engine._loss(net, pred, targets, domains)
        else:
            second_order = not engine.first_order
            kernel = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if second_order
                      else contextlib.nullcontext())
            with kernel:
                loss, parts, pred = engine._bilevel(net, inputs, targets, domains)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.PRED] = pred
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine._average_gradients(net)
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine._average_gradients(net)
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        lr = engine._inner_lr()
        engine.state.output.update({
            "loss_task": parts["task"], "loss_domain": parts["domain"], "loss_reg": parts["reg"],
            "inner_lr": float(lr.detach()) if isinstance(lr, torch.Tensor) else float(lr),
            "domain_id": domains.detach(),
        })
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


# ---------------------------------------------------------------------------------------------- eval helpers


def datalist_domains(datalist: str | os.PathLike) -> list[str]:
    """The top-level ``"domains"`` list of a datalist JSON (index = ``domain_id``)."""
    with open(datalist, encoding="utf-8") as f:
        data = json.load(f)
    domains = data.get("domains") if isinstance(data, dict) else None
    if not isinstance(domains, list) or not domains:
        raise ValueError(f"Datalist {datalist} has no top-level 'domains' list; add one (names indexed by the "
                         "entries' domain_id) or set num_domains / domain names in the config.")
    return [str(d) for d in domains]


class DomainOutputs:
    """Add the router's ``domain_prob`` ``(B, K)`` and the batch's ``domain_id`` to an evaluator's output.

    Attach to a MONAI ``SupervisedEvaluator`` (``val_handlers``); runs at ``FORWARD_COMPLETED``, before the
    output is decollated, so every item then carries its own ``domain_prob`` / ``domain_id``.
    """

    def __init__(self, network: nn.Module, domain_key: str = "domain_id") -> None:
        self.network, self.domain_key = network, domain_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        net = _unwrap(self.network)
        probs = getattr(net, "last_domain_probs", None)
        pred = out.get(Keys.PRED) if isinstance(out, dict) else None
        if probs is not None and pred is not None and probs.shape[0] == pred.shape[0]:
            out["domain_prob"] = probs.detach()
        batch = engine.state.batch
        if isinstance(batch, dict) and self.domain_key in batch:
            out["domain_id"] = torch.as_tensor(as_plain_tensor(batch[self.domain_key])).view(-1)


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


