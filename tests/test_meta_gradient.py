"""Meta-gradients of :class:`~medpeft_monai.engines.bilevel.BilevelTrainer` against known answers.

A tiny float64 linear model ``pred = inner(x[:, :2]) + outer(x[:, 2:])`` (no DCRM modules, so the trainer
uses its fixed ``inner_lr`` ``alpha``); ``inner_params`` selects ``phi`` = ``inner.weight, inner.bias``,
``outer.weight`` is trained by the outer loop only. With ``theta`` all parameters, ``P`` the projection
on ``phi`` and tasks ``T`` (support ``s``, query ``q``) from the batch's ``domain_id``:

* inner loop:   ``theta'_T = theta - alpha P grad L_s(theta)`` (N steps: repeated at the adapted theta);
* outer loss:   ``F(theta) = mean_T [ w_s L_s(theta) + L_q(theta'_T) ]``;
* second order: ``grad F = mean_T [ w_s g_s + (I - alpha H_s P) g_q(theta'_T) ]`` (``H_s`` the support Hessian);
* first order (``first_order=True``, FOMAML): ``mean_T [ w_s g_s + g_q(theta'_T) ]``;
* so ``grad_2nd - grad_1st = -alpha mean_T H_s P g_q(theta'_T)``, the term FOMAML drops.

For least squares ``L = mean (A theta - y)^2`` with design ``A = [x_inner, 1, x_outer]``,
``g = 2/n A^T (A theta - y)`` and ``H = 2/n A^T A``: the closed forms above are checked exactly. Second
order is also checked against central finite differences of ``F`` (inner gradient by ``torch.autograd``,
independent of the trainer), for least squares and for softmax regression (cross-entropy), with 1 and 2
inner steps; the first/second-order difference is checked against an autograd Hessian on both problems.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medpeft_monai.engines.bilevel import BilevelTrainer, split_tasks

D_IN, D_OUT_EXTRA = 2, 1  # features seen by the inner (adapted) / outer-only linear maps
ALPHA = 0.3
INNER = r"^inner\."
# domain 0 at [1, 2, 4, 6, 7, 9], domain 1 at [0, 3, 5, 8]; query_fraction 0.5 -> first half = support
DOMAINS = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 0])
TASKS = [([1, 2, 4], [6, 7, 9]), ([0, 3], [5, 8])]
NAMES = ("inner.weight", "inner.bias", "outer.weight")


class TinyNet(nn.Module):
    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.inner = nn.Linear(D_IN, n_out)
        self.outer = nn.Linear(D_OUT_EXTRA, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, :D_IN]) + self.outer(x[:, D_IN:])


def _problem(kind: str):
    """``(net, x, y, loss_function)`` for ``"lsq"`` (MSE, one output) or ``"ce"`` (3-class cross-entropy)."""
    g = torch.Generator().manual_seed(0)
    n_out = 1 if kind == "lsq" else 3
    net = TinyNet(n_out).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(len(DOMAINS), D_IN + D_OUT_EXTRA, generator=g, dtype=torch.float64)
    if kind == "lsq":
        y = torch.randn(len(DOMAINS), 1, generator=g, dtype=torch.float64)
        return net, x, y, nn.MSELoss()
    y = torch.randint(0, n_out, (len(DOMAINS),), generator=g)
    return net, x, y, nn.CrossEntropyLoss()


def _trainer(net, x, y, loss_fn, **kwargs) -> BilevelTrainer:
    batch = {"image": x, "label": y, "domain_id": DOMAINS.clone()}
    return BilevelTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=net,
                          optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=loss_fn,
                          inner_params=INNER, inner_lr=ALPHA, query_fraction=0.5, decollate=False, **kwargs)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _theta(net: nn.Module) -> torch.Tensor:
    params = dict(net.named_parameters())
    return _flat(params[n].detach() for n in NAMES).clone()


def _inner_mask(net: nn.Module) -> torch.Tensor:
    params = dict(net.named_parameters())
    return _flat(torch.full_like(params[n], float(n.startswith("inner."))) for n in NAMES)


def _unpack(theta: torch.Tensor, net: nn.Module) -> list[torch.Tensor]:
    params = dict(net.named_parameters())
    out, i = [], 0
    for n in NAMES:
        k = params[n].numel()
        out.append(theta[i:i + k].view_as(params[n]))
        i += k
    return out


def _trainer_step(kind: str, **kwargs) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 nn.Module]:
    """Run one bi-level episode through ``BilevelTrainer.run()``; ``(grad, loss, theta, x, y, net)``.

    The optimizer has ``lr=0`` so the parameters stay at ``theta``; ``.grad`` keeps the episode's outer gradient.
    """
    net, x, y, loss_fn = _problem(kind)
    theta = _theta(net)
    trainer = _trainer(net, x, y, loss_fn, **kwargs)
    trainer.run()
    assert trainer.state.iteration == 1
    torch.testing.assert_close(_theta(net), theta, rtol=0, atol=0)
    params = dict(net.named_parameters())
    assert all(params[n].grad is not None for n in NAMES)
    grad = _flat(params[n].grad for n in NAMES).clone()
    return grad, float(trainer.state.output["loss"]), theta, x, y, net


# ---------------------------------------------------------------------------------------------- references


def _loss_at(theta: torch.Tensor, net: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w, b, v = _unpack(theta, net)
    pred = x[:, :D_IN] @ w.T + b + x[:, D_IN:] @ v.T
    return ((pred - y) ** 2).mean() if kind == "lsq" else nn.functional.cross_entropy(pred, y)


def _adapted(theta, net, kind, x, y, steps: int = 1) -> torch.Tensor:
    """``theta'`` after ``steps`` inner steps on (x, y), inner gradient by autograd (values only)."""
    mask = _inner_mask(net)
    for _ in range(steps):
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_loss_at(t, net, kind, x, y), t)
        theta = theta - ALPHA * mask * g
    return theta


def _objective(theta, net, kind, x, y, support_weight: float, steps: int = 1) -> torch.Tensor:
    """The true bi-level objective ``F(theta) = mean_T [w_s L_s(theta) + L_q(theta'_T)]``."""
    total = theta.new_zeros(())
    for s, q in TASKS:
        adapted = _adapted(theta, net, kind, x[s], y[s], steps)
        total = total + support_weight * _loss_at(theta, net, kind, x[s], y[s]) + _loss_at(adapted, net, kind,
                                                                                          x[q], y[q])
    return total / len(TASKS)


def _finite_difference(theta, net, kind, x, y, support_weight, steps, h=1e-6) -> torch.Tensor:
    grad = torch.empty_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        grad[i] = (_objective(theta + e, net, kind, x, y, support_weight, steps)
                   - _objective(theta - e, net, kind, x, y, support_weight, steps)) / (2 * h)
    return grad


def _design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, :D_IN], torch.ones(len(x), 1, dtype=x.dtype), x[:, D_IN:]], dim=1)


def _lsq_grad(theta, x, y) -> torch.Tensor:
    a = _design(x)
    return 2.0 / len(x) * a.T @ (a @ theta - y.view(-1))


def _lsq_hessian(x) -> torch.Tensor:
    a = _design(x)
    return 2.0 / len(x) * a.T @ a


def _lsq_closed_form(theta, mask, x, y, support_weight):
    """``(F, grad 2nd order, grad 1st order, alpha mean_T H_s P g_q(theta'))`` for least squares, no autograd."""
    f, g2, g1, hess_term = theta.new_zeros(()), torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(
        theta)
    for s, q in TASKS:
        a_s, a_q = _design(x[s]), _design(x[q])
        g_s = _lsq_grad(theta, x[s], y[s])
        adapted = theta - ALPHA * mask * g_s
        g_q = _lsq_grad(adapted, x[q], y[q])
        h_term = ALPHA * _lsq_hessian(x[s]) @ (mask * g_q)
        f = f + support_weight * ((a_s @ theta - y[s].view(-1)) ** 2).mean() + ((a_q @ adapted - y[q].view(-1)) ** 2
                                                                                 ).mean()
        g2 = g2 + support_weight * g_s + g_q - h_term
        g1 = g1 + support_weight * g_s + g_q
        hess_term = hess_term + h_term
    n = len(TASKS)
    return f / n, g2 / n, g1 / n, hess_term / n


def _autograd_hessian_term(theta, net, kind, x, y) -> torch.Tensor:
    """``alpha mean_T H_s P g_q(theta'_T)`` with autograd Hessians (any twice-differentiable loss)."""
    mask = _inner_mask(net)
    out = torch.zeros_like(theta)
    for s, q in TASKS:
        hess = torch.autograd.functional.hessian(lambda t: _loss_at(t, net, kind, x[s], y[s]), theta)
        adapted = _adapted(theta, net, kind, x[s], y[s]).detach().requires_grad_(True)
        (g_q,) = torch.autograd.grad(_loss_at(adapted, net, kind, x[q], y[q]), adapted)
        out = out + ALPHA * hess @ (mask * g_q)
    return out / len(TASKS)


# ---------------------------------------------------------------------------------------------- tests


def test_batch_split_is_the_assumed_one():
    """The references assume this support/query split of ``DOMAINS``; fail loudly if ``split_tasks`` changes."""
    got = sorted((s.tolist(), None if q is None else q.tolist()) for s, q in split_tasks(DOMAINS, 0.5))
    assert got == sorted(TASKS)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_inner_loop_adapts_only_selected_parameters(steps, first_order):
    """``_adapt`` returns ``phi - alpha grad L_s`` (N steps) for the ``inner_params`` only; ``net`` is untouched."""
    net, x, y, loss_fn = _problem("lsq")
    theta = _theta(net)
    trainer = _trainer(net, x, y, loss_fn, first_order=first_order, inner_steps=steps)
    s = torch.tensor(TASKS[0][0])
    adapted = trainer._adapt(net, x[s], y[s], loss_fn(net(x[s]), y[s]))
    assert set(adapted) == {"inner.weight", "inner.bias"}  # outer.weight is not adapted
    mask = _inner_mask(net)
    expected = theta.clone()
    for _ in range(steps):
        expected = expected - ALPHA * mask * _lsq_grad(expected, x[s], y[s])
    w, b, _ = _unpack(expected, net)
    torch.testing.assert_close(adapted["inner.weight"].detach(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapted["inner.bias"].detach(), b, rtol=1e-12, atol=1e-12)
    params = dict(net.named_parameters())
    for n in ("inner.weight", "inner.bias"):
        assert (adapted[n].detach() - params[n].detach()).abs().min() > 1e-6, f"{n} was not updated"
    torch.testing.assert_close(_theta(net), theta, rtol=0, atol=0)  # functional: the module is not modified
    # d phi'/d phi: (I - alpha P H_s)^N in 2nd order, I in 1st order (inner gradients detached)
    jac = torch.autograd.grad(adapted["inner.bias"].sum(), params["inner.bias"])[0]
    step_jac = torch.eye(len(theta), dtype=theta.dtype)
    if not first_order:
        step_jac = step_jac - ALPHA * torch.diag(mask) @ _lsq_hessian(x[s])
    expected_jac = torch.linalg.matrix_power(step_jac, steps)[D_IN, D_IN]  # d b' / d b (index D_IN is the bias)
    torch.testing.assert_close(jac, expected_jac.view_as(jac), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("support_weight", [0.0, 1.0])
def test_least_squares_closed_form(support_weight):
    """Outer loss and gradients equal the hand-derived ones; 2nd - 1st order = -alpha mean_T H_s P g_q(phi')."""
    g2, loss2, theta, x, y, net = _trainer_step("lsq", support_weight=support_weight)
    g1, loss1, *_ = _trainer_step("lsq", support_weight=support_weight, first_order=True)
    f, ref2, ref1, hess_term = _lsq_closed_form(theta, _inner_mask(net), x, y, support_weight)
    assert loss2 == pytest.approx(float(f), rel=1e-12) and loss1 == pytest.approx(float(f), rel=1e-12)
    torch.testing.assert_close(g2, ref2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, ref1, rtol=1e-10, atol=1e-12)
    # the dropped term is large here, so the two checks above tell the modes apart
    assert hess_term.norm() > 0.1 * ref2.norm()
    torch.testing.assert_close(g1 - g2, hess_term, rtol=1e-10, atol=1e-12)
    # outer.weight is outer-only, yet the Hessian term reaches it through the support cross-term H_s[outer, inner]
    assert hess_term[-1].abs() > 1e-3


@pytest.mark.parametrize("kind", ["lsq", "ce"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("support_weight", [0.0, 1.0])
def test_second_order_matches_finite_differences(kind, steps, support_weight):
    """Second order (default) is the exact gradient of the true bi-level objective F."""
    grad, loss, theta, x, y, net = _trainer_step(kind, support_weight=support_weight, inner_steps=steps)
    f = _objective(theta, net, kind, x, y, support_weight, steps)
    assert loss == pytest.approx(float(f), rel=1e-12)
    fd = _finite_difference(theta, net, kind, x, y, support_weight, steps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["lsq", "ce"])
@pytest.mark.parametrize("support_weight", [0.0, 1.0])
def test_first_order_drops_exactly_the_hessian_term(kind, support_weight):
    """FOMAML = 2nd order + alpha mean_T H_s P g_q(phi'), and is not the gradient of F."""
    g2, *_ = _trainer_step(kind, support_weight=support_weight)
    g1, _, theta, x, y, net = _trainer_step(kind, support_weight=support_weight, first_order=True)
    hess_term = _autograd_hessian_term(theta, net, kind, x, y)
    assert hess_term.norm() > 0.02 * g2.norm()  # a non-negligible term (softmax curvature is small)
    torch.testing.assert_close(g1 - g2, hess_term, rtol=1e-8, atol=1e-10)
    fd = _finite_difference(theta, net, kind, x, y, support_weight, 1)
    assert (g1 - fd).norm() > 0.01 * fd.norm()
