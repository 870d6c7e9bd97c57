"""Bi-level (MAML-style) training of DCRM-ViT as a MONAI/Ignite engine.

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

The losses of a pass come from the network's explicit outputs (:func:`network_outputs`: task logits,
router logits, ``L_reg``), never from state left on the network.

The bundles' other DCRM pieces live with their kind: :class:`~medpeft_monai.data.samplers.DomainEpisodeSampler`
(episodes of ``tasks x shots`` images from distinct domains), :class:`~medpeft_monai.losses.DCRMLoss`,
:class:`~medpeft_monai.metrics.DomainAccuracy` (accuracy overall and per domain),
:class:`~medpeft_monai.handlers.DomainOutputs` and :class:`~medpeft_monai.inferers.OutputsInferer`
(router outputs in an evaluator) and :func:`~medpeft_monai.data.datalist_domains`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.func import functional_call

from medpeft_monai.backbones import as_plain_tensor
from medpeft_monai.distributed import average_gradients, unwrap_ddp
from medpeft_monai.losses import DCRMLoss, dcrm_total_loss
from medpeft_monai.nets.dcrm import DCRMOutput
from medpeft_monai.peft.dcrm import TALer, find_controller

__all__ = ["BilevelTrainer", "modulator_parameter_names", "network_outputs", "split_tasks"]

MODES = ("bilevel", "joint")
logger = logging.getLogger(__name__)



def network_outputs(net: nn.Module, x: torch.Tensor, params: dict | None = None) -> DCRMOutput:
    """One forward pass as a :class:`~medpeft_monai.nets.dcrm.DCRMOutput`.

    DCRM networks are asked for their outputs (``return_outputs=True``); any other network's tensor output
    becomes ``DCRMOutput(pred)``. With ``params`` the pass uses them (``torch.func.functional_call``).
    """
    kwargs = {"return_outputs": True} if "return_outputs" in inspect.signature(net.forward).parameters else {}
    out = net(x, **kwargs) if params is None else functional_call(net, params, (x,), kwargs)
    return out if kwargs else DCRMOutput(out)


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
    (:func:`~medpeft_monai.distributed.average_gradients`).
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
        net = unwrap_ddp(network)
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

    def _loss(self, out: DCRMOutput, target: torch.Tensor,
              domains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(L_task with graph, L_total, detached parts)`` of one forward pass's outputs."""
        task = self.dcrm_loss.task(out.pred, target)
        total, parts = dcrm_total_loss(task, out.domain_logits, domains, out.synth_reg, self.dcrm_loss.beta,
                                       self.dcrm_loss.reg_weight)
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
                loss = self.dcrm_loss.task(network_outputs(net, x, dict(zip(names, weights))).pred, y)
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
            out_s = network_outputs(net, x[s])
            task_s, loss_s, parts_s = self._loss(out_s, y[s], domains[s])
            order.append(s)
            preds.append(out_s.pred.detach())
            parts.append(parts_s)
            if query is None:  # a lone image: scored with phi only
                outer = outer + loss_s
                continue
            q = query.to(x.device)
            # nothing to adapt (e.g. ablation w/o RMB): the query is scored with phi
            adapted = self._adapt(net, x[s], y[s], task_s) if self.inner_names else None
            out_q = network_outputs(net, x[q], adapted)
            _, loss_q, parts_q = self._loss(out_q, y[q], domains[q])
            order.append(q)
            preds.append(out_q.pred.detach())
            parts.append(parts_q)
            outer = outer + self.support_weight * loss_s + loss_q
        pred = torch.cat(preds)[torch.argsort(torch.cat(order))]
        mean_parts = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
        return outer / len(tasks), mean_parts, pred

    # -- iteration
    def _iteration(self, engine: BilevelTrainer, batchdata) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = as_plain_tensor(batch[0]), as_plain_tensor(batch[1])
        domains = engine._domains(batchdata, inputs.shape[0], inputs.device)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        net = unwrap_ddp(engine.network)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.mode == "joint":
            with torch.autocast(inputs.device.type, **engine.amp_kwargs) if engine.amp else contextlib.nullcontext():
                out = network_outputs(net, inputs)
                pred = out.pred
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                _, loss, parts = engine._loss(out, targets, domains)
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
            average_gradients(net)
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            average_gradients(net)
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


