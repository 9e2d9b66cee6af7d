"""Estimators against exact references: closed forms and full autograd through an unrolled SGD step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metatrain.estimators import ESTIMATORS, EvoGrad, create_estimator


def closed_form_hypergradient(lam: float) -> float:
    """d/d lambda of (x*(lambda) - 0.5)^2 with x*(lambda) = argmin (x - 1)^2 + lambda x^2 = 1 / (1 + lambda)."""
    return (lam - 1) / (lam + 1) ** 3


def one_dim_problem(lam):
    train_loss = lambda p, batch: (p["x"] - 1) ** 2 + lam * p["x"] ** 2  # noqa: E731
    meta_loss = lambda p, batch: (p["x"] - 0.5) ** 2  # noqa: E731
    return train_loss, meta_loss


def test_create_estimator_names_and_options():
    assert set(ESTIMATORS) >= {"evograd", "t1t2", "first_order"}
    est = create_estimator("evograd", population=10, sigma=1.0, temperature=0.5, noise="gaussian")
    assert isinstance(est, EvoGrad) and est.population == 10 and est.noise == "gaussian"
    with pytest.raises(ValueError, match=r"'evgrad'.*evograd"):
        create_estimator("evgrad")
    with pytest.raises(ValueError, match=r"popsize.*population"):
        create_estimator("evograd", popsize=3)
    with pytest.raises(ValueError, match=r"noise.*sign.*gaussian"):
        create_estimator("evograd", noise="uniform")
    with pytest.raises(ValueError, match=r"population"):
        create_estimator("evograd", population=1)
    with pytest.raises(ValueError, match=r"sigma"):
        create_estimator("evograd", sigma=0.0)
    with pytest.raises(ValueError, match=r"temperature"):
        create_estimator("evograd", temperature=-1)
    with pytest.raises(ValueError, match=r"t1t2.*no options"):
        create_estimator("t1t2", sigma=0.1)


def test_issue_call_shape():
    torch.manual_seed(0)
    x = torch.tensor(0.3)
    lam = torch.tensor(0.5, requires_grad=True)
    est = create_estimator("evograd", population=10, sigma=1.0, temperature=0.5, noise="gaussian")
    grads = est.hypergradient(
        params={"x": x},
        meta_params=[lam],
        train_loss=lambda p, batch: (p["x"] - 1) ** 2 + lam * p["x"] ** 2,
        meta_loss=lambda p, batch: (p["x"] - 0.5) ** 2,
        train_batch=None,
        meta_batch=None,
        lr=0.1,
    )
    assert isinstance(grads, tuple) and len(grads) == 1 and grads[0].shape == lam.shape
    assert torch.isfinite(grads[0]) and lam.grad is None


@pytest.mark.parametrize("lam_value", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("x_value", [-0.5, 0.3, 1.2])
def test_t1t2_matches_closed_form_one_step(lam_value, x_value):
    # x' = x - lr * (2 (x - 1) + 2 lam x); d (x' - 0.5)^2 / d lam = 2 (x' - 0.5) * (-2 lr x)
    lr = 0.1
    x = torch.tensor(x_value, dtype=torch.float64)
    lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
    train_loss, meta_loss = one_dim_problem(lam)
    (g,) = create_estimator("t1t2").hypergradient({"x": x}, [lam], train_loss, meta_loss, lr=lr)
    x_next = x_value - lr * (2 * (x_value - 1) + 2 * lam_value * x_value)
    expected = 2 * (x_next - 0.5) * (-2 * lr * x_value)
    assert abs(g.item() - expected) < 1e-6


def test_t1t2_needs_lr():
    lam = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        create_estimator("t1t2").hypergradient({"x": torch.tensor(0.1)}, [lam], *one_dim_problem(lam))
    with pytest.raises(ValueError, match="lr` >= 0, got lr=-0.1"):
        create_estimator("t1t2").hypergradient({"x": torch.tensor(0.1)}, [lam], *one_dim_problem(lam), lr=-0.1)


def test_zero_step_lookahead_is_the_direct_term():
    """lr = 0 (the first step of a warmup) is a valid lookahead: theta' = theta, only the direct term remains."""
    lam = torch.tensor(0.5, requires_grad=True)
    train_loss, _ = one_dim_problem(lam)
    direct = lambda p, batch: (p["x"] - 0.5) ** 2 + lam**2  # noqa: E731
    x = {"x": torch.tensor(0.2)}
    (t1t2,) = create_estimator("t1t2").hypergradient(x, [lam], train_loss, direct, lr=0.0)
    (first,) = create_estimator("first_order").hypergradient(x, [lam], train_loss, direct)
    assert t1t2.item() == first.item() == 1.0
    (evo,) = create_estimator("evograd", sigma="auto").hypergradient(x, [lam], train_loss, direct, lr=0.0)
    assert evo.item() == 1.0


class WeightedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def test_t1t2_equals_autograd_through_unrolled_sgd_step():
    torch.manual_seed(0)
    model = WeightedMLP().double()
    xb, yb = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    xm, ym = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    # meta-parameters: per-sample logits of loss weights and a weight-decay strength
    logits = torch.randn(16, dtype=torch.float64, requires_grad=True)
    decay = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    lr = 0.3

    def train_loss(p, batch):
        per_sample = nn.functional.cross_entropy(functional_call(model, p, (batch[0],)), batch[1], reduction="none")
        return (torch.sigmoid(logits) * per_sample).mean() + decay * sum((w**2).sum() for w in p.values())

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, p, (batch[0],)), batch[1])

    params = dict(model.named_parameters())
    grads = create_estimator("t1t2").hypergradient(
        params, [logits, decay], train_loss, meta_loss, (xb, yb), (xm, ym), lr
    )

    # reference: write the forward by hand, unroll one SGD step and differentiate through it
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in params.values())

    def forward(ws, x):
        return torch.tanh(x @ ws[0].T + ws[1]) @ ws[2].T + ws[3]

    ce = nn.functional.cross_entropy(forward([w1, b1, w2, b2], xb), yb, reduction="none")
    inner = (torch.sigmoid(logits) * ce).mean() + decay * sum((w**2).sum() for w in (w1, b1, w2, b2))
    inner_grads = torch.autograd.grad(inner, [w1, b1, w2, b2], create_graph=True)
    stepped = [w - lr * g for w, g in zip((w1, b1, w2, b2), inner_grads)]
    outer = nn.functional.cross_entropy(forward(stepped, xm), ym)
    expected = torch.autograd.grad(outer, [logits, decay])
    for got, ref in zip(grads, expected):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_evograd_tracks_closed_form_hypergradient():
    """Paper Sec. 4.1 / Fig. 2: tau = 0.5, eps ~ N(0, 1), mean over repetitions with random x."""
    torch.manual_seed(0)
    est = create_estimator("evograd", population=100, sigma=1.0, temperature=0.5, noise="gaussian")
    grid = [0.0, 0.25, 0.5, 0.75, 1.25, 1.5, 2.0]
    means = []
    for lam_value in grid:
        lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
        train_loss, meta_loss = one_dim_problem(lam)
        estimates = [
            est.hypergradient({"x": torch.rand((), dtype=torch.float64)}, [lam], train_loss, meta_loss)[0].item()
            for _ in range(100)
        ]
        means.append(sum(estimates) / len(estimates))
    truth = [closed_form_hypergradient(v) for v in grid]
    for lam_value, m, t in zip(grid, means, truth):
        assert (m > 0) == (t > 0), f"sign differs at lambda={lam_value}: evograd {m:.4f} vs closed form {t:.4f}"
    corr = torch.corrcoef(torch.tensor([means, truth]))[0, 1]
    assert corr > 0.9, f"evograd means {means} do not follow the closed form {truth} (corr {corr:.3f})"


def test_evograd_builds_no_second_order_graph(monkeypatch):
    calls = []
    real_grad = torch.autograd.grad

    def recording_grad(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    torch.manual_seed(0)
    model = WeightedMLP()
    logits = torch.zeros(16, requires_grad=True)
    xb, yb = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def train_loss(p, batch):
        assert not any(w.requires_grad for w in p.values()), "EvoGrad must score detached weight copies"
        ce = nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb, reduction="none")
        return (torch.sigmoid(logits) * ce).mean()

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    (g,) = create_estimator("evograd", population=4, sigma=0.01).hypergradient(
        dict(model.named_parameters()), [logits], train_loss, meta_loss
    )
    assert calls == [False]
    assert g.shape == logits.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_first_order_is_direct_term_only():
    lam = torch.tensor(0.7, requires_grad=True)
    train_loss, meta_loss = one_dim_problem(lam)
    (g,) = create_estimator("first_order").hypergradient({"x": torch.tensor(0.2)}, [lam], train_loss, meta_loss)
    assert g.item() == 0.0
    direct = lambda p, batch: (p["x"] - 0.5) ** 2 + lam**2  # noqa: E731
    (g,) = create_estimator("first_order").hypergradient({"x": torch.tensor(0.2)}, [lam], train_loss, direct)
    assert abs(g.item() - 1.4) < 1e-6


@pytest.mark.parametrize("population,sigma,antithetic", [(2, 0.01, False), (4, 0.003, False), (4, 0.007, True)])
def test_evograd_mean_equals_t1t2_at_its_effective_step(population, sigma, antithetic):
    """Linearised softmax: E[theta*] = theta - (K-1) sigma^2 / (K tau) grad, so the mean EvoGrad hypergradient is
    the exact one-step lookahead hypergradient at that step size."""
    torch.manual_seed(0)
    model = WeightedMLP().double()
    xb, yb = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    xm, ym = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    logits = torch.zeros(32, dtype=torch.float64, requires_grad=True)

    def train_loss(p, batch):
        ce = nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb, reduction="none")
        return (torch.sigmoid(logits) * ce).mean()

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, p, (xm,)), ym)

    params = dict(model.named_parameters())
    est = create_estimator("evograd", population=population, sigma=sigma, temperature=0.05, antithetic=antithetic)
    (ref,) = create_estimator("t1t2").hypergradient(
        params, [logits], train_loss, meta_loss, lr=est.effective_lr(sigma)
    )
    mean = torch.stack([est.hypergradient(params, [logits], train_loss, meta_loss)[0] for _ in range(1000)]).mean(0)
    assert nn.functional.cosine_similarity(mean, ref, dim=0) > 0.98
    assert 0.85 < mean.norm() / ref.norm() < 1.15


def test_evograd_auto_sigma_matches_the_learning_rate():
    est = create_estimator("evograd", population=2, sigma="auto", temperature=0.05)
    assert abs(est.resolve_sigma(0.1) - 0.1) < 1e-12
    assert abs(est.effective_lr(est.resolve_sigma(0.03)) - 0.03) < 1e-12
    lam = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        est.hypergradient({"x": torch.tensor(0.1)}, [lam], *one_dim_problem(lam))
    with pytest.raises(ValueError, match='sigma.*"auto"'):
        create_estimator("evograd", sigma="big")


def test_evograd_antithetic_pairs():
    est = create_estimator("evograd", population=4, sigma=0.5, antithetic=True)
    eps = est._perturbation(torch.zeros(3, 5), 0.5)
    assert eps.shape == (4, 3, 5) and torch.equal(eps[:2], -eps[2:]) and torch.all(eps.abs() == 0.5)
    assert abs(est.effective_lr(0.5) - 0.25 / 0.05) < 1e-12
    assert (
        abs(est.effective_lr(create_estimator("evograd", sigma="auto", antithetic=True).resolve_sigma(0.1)) - 0.1)
        < 1e-9
    )
    with pytest.raises(ValueError, match="even `population`"):
        create_estimator("evograd", population=3, antithetic=True)
    with pytest.raises(ValueError, match="antithetic"):
        create_estimator("evograd", antithetic="yes")


def test_evograd_perturbing_a_subset_is_the_lookahead_over_that_subset():
    """With `perturb`, the mean estimate is T1-T2's lookahead over the matching weights, the others held fixed."""
    torch.manual_seed(0)
    model = WeightedMLP().double()
    xb, yb = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    xm, ym = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    logits = torch.zeros(32, dtype=torch.float64, requires_grad=True)
    params = {name: p.detach() for name, p in model.named_parameters()}
    head = [name for name in params if name.startswith("net.2.")]
    assert head and len(head) < len(params)

    def train_loss(p, batch):
        ce = nn.functional.cross_entropy(functional_call(model, {**params, **p}, (xb,)), yb, reduction="none")
        return (torch.sigmoid(logits) * ce).mean()

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, {**params, **p}, (xm,)), ym)

    est = create_estimator("evograd", population=2, sigma=0.01, temperature=0.05, perturb=r"^net\.2\.")
    ref_params = {name: params[name] for name in head}
    (ref,) = create_estimator("t1t2").hypergradient(
        ref_params, [logits], train_loss, meta_loss, lr=est.effective_lr(0.01)
    )
    mean = torch.stack([est.hypergradient(params, [logits], train_loss, meta_loss)[0] for _ in range(1000)]).mean(0)
    assert nn.functional.cosine_similarity(mean, ref, dim=0) > 0.98
    assert 0.85 < mean.norm() / ref.norm() < 1.15

    with pytest.raises(ValueError, match="perturb='nope' matches no parameter name"):
        create_estimator("evograd", perturb="nope").hypergradient(params, [logits], train_loss, meta_loss)
    with pytest.raises(ValueError, match="perturb"):
        create_estimator("evograd", perturb="(")
