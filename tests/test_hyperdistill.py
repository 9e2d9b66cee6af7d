"""HyperDistill against exact references: T1-T2 at gamma = 0, the closed form of the running average, a by-hand
Algorithm 4 on a 1-D problem, and the exact multi-step hypergradient of a quadratic."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import WeightedMLP, one_dim_problem
from torch import nn
from torch.func import functional_call

from metatrain.estimators import HypergradientProblem
from metatrain.estimators.functional import sgd_unroll
from metatrain.estimators.hyperdistill import HyperDistill
from metatrain.estimators.t1t2 import T1T2


def mlp_problem(n_examples=40):
    """A float64 MLP whose training loss is reweighted per example (logits looked up by the index in the batch)
    and regularised by a learned weight decay; the meta loss is plain cross-entropy."""
    torch.manual_seed(0)
    model = WeightedMLP().double()
    logits = torch.randn(n_examples, dtype=torch.float64, requires_grad=True)
    decay = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def train_loss(p, batch):
        out = functional_call(model, p, (batch["x"],))
        per_example = nn.functional.cross_entropy(out, batch["y"], reduction="none")
        return (torch.sigmoid(logits[batch["idx"]]) * per_example).mean() + decay * sum(
            (w**2).sum() for w in p.values()
        )

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, p, (batch[0],)), batch[1])

    return model, [logits, decay], train_loss, meta_loss


def mlp_calls(model, steps, n_examples=40, batch_size=16, seed=1):
    """Weights, training batch, meta batch and step size of `steps` calls; the weights drift randomly."""
    gen = torch.Generator().manual_seed(seed)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    calls = []
    for t in range(steps):
        idx = torch.randperm(n_examples, generator=gen)[:batch_size]
        batch = {
            "x": torch.randn(batch_size, 4, generator=gen, dtype=torch.float64),
            "y": torch.randint(0, 3, (batch_size,), generator=gen),
            "idx": idx,
        }
        meta = (torch.randn(10, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen))
        calls.append((dict(params), batch, meta, 0.3 - 0.02 * t))
        params = {k: p + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    return calls


@pytest.mark.parametrize("batch_mixing", ["subsample", "replace"])
def test_gamma_zero_is_t1t2_on_one_dim_problem(batch_mixing):
    est, reference = HyperDistill(gamma=0.0, batch_mixing=batch_mixing), T1T2()
    for lam_value, x_value, lr in [(0.5, 0.3, 0.1), (2.0, -0.5, 0.2), (0.0, 1.2, 0.05), (1.0, 0.7, 0.0)]:
        lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
        x = {"x": torch.tensor(x_value, dtype=torch.float64)}
        problem = HypergradientProblem(x, [lam], *one_dim_problem(lam), lr=lr)
        got, ref = est.estimate(problem), reference.estimate(problem)
        torch.testing.assert_close(got.grads, ref.grads, rtol=0, atol=1e-10)
        assert got.meta_loss.item() == ref.meta_loss.item()


@pytest.mark.parametrize("batch_mixing", ["subsample", "replace"])
def test_gamma_zero_is_t1t2_on_mlp(batch_mixing):
    model, meta_params, train_loss, meta_loss = mlp_problem()
    est, reference = HyperDistill(gamma=0.0, batch_mixing=batch_mixing), T1T2()
    for params, batch, meta, lr in mlp_calls(model, steps=4):
        problem = HypergradientProblem(params, meta_params, train_loss, meta_loss, batch, meta, lr)
        got, ref = est.estimate(problem).grads, reference.estimate(problem).grads
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
        assert all(g.abs().sum() > 0 for g in got)
    assert all(p.grad is None for p in model.parameters()) and all(m.grad is None for m in meta_params)


def test_first_call_is_t1t2_for_any_gamma():
    """At t = 1, w*_1 = w_0 and D*_1 = D_1 (Eq. 13-14), so a fixed pi = 1 gives the one-step lookahead."""
    model, meta_params, train_loss, meta_loss = mlp_problem()
    params, batch, meta, lr = mlp_calls(model, steps=1)[0]
    problem = HypergradientProblem(params, meta_params, train_loss, meta_loss, batch, meta, lr)
    got, ref = HyperDistill(gamma=0.9).estimate(problem).grads, T1T2().estimate(problem).grads
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_running_average_matches_closed_form():
    """Eq. 13's online update equals Eq. 12: w*_t = sum_i gamma^(t-i) w_{i-1} / sum_i gamma^(t-i)."""
    gamma = 0.7
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    train_loss = lambda p, batch: ((p["a"] - 1) ** 2).sum() + lam * (p["b"] ** 2).sum()  # noqa: E731
    meta_loss = lambda p, batch: (p["a"] ** 2).sum() + (p["b"] - 0.5).pow(2).sum()  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    history = [
        {
            "a": torch.randn(3, generator=gen, dtype=torch.float64),
            "b": torch.randn(2, 2, generator=gen, dtype=torch.float64),
        }
        for _ in range(6)
    ]
    est = HyperDistill(gamma=gamma)
    for t, params in enumerate(history, start=1):
        est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss, lr=0.1))
        weights = [gamma ** (t - i) for i in range(1, t + 1)]
        for name in ("a", "b"):
            expected = sum(w * p[name] for w, p in zip(weights, history)) / sum(weights)
            torch.testing.assert_close(est.state_dict()["w_star"][name], expected, rtol=0, atol=1e-12)
        assert est.state_dict()["step"] == t
    # the stored average is a copy: changing the caller's weights in place does not move it
    kept = est.state_dict()["w_star"]["a"].clone()
    history[-1]["a"].add_(100.0)
    assert torch.equal(est.state_dict()["w_star"]["a"], kept)


def test_distilled_batch_subsamples_rows_jointly():
    """Eq. 14 on dict batches: round(n p_t) rows of D*_{t-1}, the rest from D_t, all tensors of a row together."""
    gamma, n = 0.5, 9
    lam = torch.tensor(0.3, requires_grad=True)
    train_loss = lambda p, batch: ((p["x"] - batch["x"].mean()) ** 2) + lam * p["x"] ** 2  # noqa: E731
    meta_loss = lambda p, batch: p["x"] ** 2  # noqa: E731
    x = {"x": torch.tensor(0.2)}

    def batch(t):
        idx = torch.arange(n) + 100 * t
        return {"x": idx.double()[:, None].expand(n, 3) * 2.0, "idx": idx}

    est = HyperDistill(gamma=gamma, seed=0)
    seen = []
    for t in range(1, 5):
        est.estimate(HypergradientProblem(x, [lam], train_loss, meta_loss, batch(t), lr=0.1))
        d_star = est.state_dict()["d_star"]
        assert set(d_star) == {"x", "idx"} and d_star["idx"].shape == (n,) and d_star["x"].shape == (n, 3)
        assert torch.equal(d_star["x"], d_star["idx"].double()[:, None].expand(n, 3) * 2.0)
        assert len(set(d_star["idx"].tolist())) == n
        seen.append(d_star["idx"] // 100)
    p_2 = (gamma - gamma**2) / (1 - gamma**2)
    assert seen[0].tolist() == [1] * n
    assert (seen[1] == 1).sum().item() == math.floor(n * p_2 + 0.5)
    assert (seen[3] == 4).sum().item() == n - math.floor(n * (gamma - gamma**4) / (1 - gamma**4) + 0.5)


def test_replace_mode_keeps_whole_batches_and_subsample_rejects_opaque_batches():
    lam = torch.tensor(0.3, requires_grad=True)
    train_loss = lambda p, batch: (p["x"] - 1) ** 2 + lam * p["x"] ** 2  # noqa: E731
    meta_loss = lambda p, batch: p["x"] ** 2  # noqa: E731
    x = {"x": torch.tensor(0.2)}
    est = HyperDistill(gamma=0.9, batch_mixing="replace", seed=0)
    batches = [("example", torch.full((4,), float(t))) for t in range(6)]
    for b in batches:
        est.estimate(HypergradientProblem(x, [lam], train_loss, meta_loss, b, lr=0.1))
        d_star = est.state_dict()["d_star"]
        assert any(d_star[0] == o[0] and torch.equal(d_star[1], o[1]) for o in batches)
    est = HyperDistill(gamma=0.9)
    est.estimate(HypergradientProblem(x, [lam], train_loss, meta_loss, batches[0], lr=0.1))
    with pytest.raises(ValueError, match="batch_mixing='replace'"):
        est.estimate(HypergradientProblem(x, [lam], train_loss, meta_loss, batches[1], lr=0.1))


def test_linear_estimator_matches_algorithm_4_by_hand():
    """On (x - 1)^2 + lambda x^2 every Jacobian is a scalar: Phi = x - lr (2 (x - 1) + 2 lambda x), A = 1 - 2 lr (1 +
    lambda), B(x) = -2 lr x. Algorithm 4 over the window of calls 1..T, written out with these formulas."""
    gamma, horizon, lam_value = 0.6, 4, 0.4
    xs, lrs = [0.9, 0.7, 0.55, 0.45, 0.3], [0.1, 0.12, 0.08, 0.1, 0.1]
    lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
    est = HyperDistill(gamma=gamma, pi=None, horizon=horizon, estimation_period=horizon)
    grads = []
    for x, lr in zip(xs, lrs):
        problem = HypergradientProblem(
            {"x": torch.tensor(x, dtype=torch.float64)}, [lam], *one_dim_problem(lam), lr=lr
        )
        grads.append(est.estimate(problem).grads)

    def phi(x, lr):
        return x - lr * (2 * (x - 1) + 2 * lam_value * x)

    def running_average(points):  # Eq. 12, newest last
        weights = [gamma ** (len(points) - i) for i in range(1, len(points) + 1)]
        return sum(w * p for w, p in zip(weights, points)) / sum(weights)

    def decay_sum(t):
        return (1 - gamma**t) / (1 - gamma)

    # calls 1..3 use theta = 1: g_t = theta * S_t * alpha_t * B(w*_t)
    for t in range(1, horizon):
        alpha = 2 * (phi(xs[t - 1], lrs[t - 1]) - 0.5)
        expected = decay_sum(t) * alpha * (-2 * lrs[t - 1] * running_average(xs[:t]))
        assert abs(grads[t - 1][0].item() - expected) < 1e-12

    # call 4 refits theta on the window w_0 = xs[0], D_1..D_4, w_T = lookahead of call 4
    w_0, w_end, big_t = xs[0], phi(xs[3], lrs[3]), horizon
    alpha_end = alpha = 2 * (w_end - 0.5)
    g_so, w_hats, samples = 0.0, [], []
    for t in range(big_t, 0, -1):
        w_hat = (1 - (t - 1) / big_t) * w_0 + (t - 1) / big_t * w_end
        g_so += alpha * (-2 * lrs[t - 1] * w_hat)
        alpha *= 1 - 2 * lrs[t - 1] * (1 + lam_value)
        w_hats.insert(0, w_hat)  # oldest first: w^_{t-1}, ..., w^_{T-1}
        s = big_t - t + 1
        v = alpha_end * (-2 * lrs[big_t - 1] * running_average(w_hats))
        samples.append((abs(v) * decay_sum(s), math.copysign(1.0, v) * g_so))
    theta = sum(x * y for x, y in samples) / sum(x * x for x, _ in samples)
    assert abs(est.theta - theta) < 1e-12 and abs(theta - 1) > 0.01
    expected = theta * decay_sum(4) * 2 * (phi(xs[3], lrs[3]) - 0.5) * (-2 * lrs[3] * running_average(xs[:4]))
    assert abs(grads[3][0].item() - expected) < 1e-12
    # call 5 opens a new window and keeps the fitted theta
    expected = theta * decay_sum(5) * 2 * (phi(xs[4], lrs[4]) - 0.5) * (-2 * lrs[4] * running_average(xs))
    assert abs(grads[4][0].item() - expected) < 1e-12
    assert len(est.state_dict()["window_batches"]) == 1


def test_state_dict_round_trip_gives_identical_estimates():
    model, meta_params, train_loss, meta_loss = mlp_problem()
    calls = mlp_calls(model, steps=9)
    est = HyperDistill(gamma=0.8, pi=None, horizon=2, estimation_period=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for params, batch, meta, lr in calls[:4]:
            est.estimate(HypergradientProblem(params, meta_params, train_loss, meta_loss, batch, meta, lr))
    assert est.theta != 1.0 and len(est.state_dict()["window_batches"]) == 1  # fitted once, mid-window now
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(est.state_dict()), buffer)
    buffer.seek(0)
    resumed = HyperDistill(gamma=0.8, pi=None, horizon=2, estimation_period=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    theta_before = est.theta
    for params, batch, meta, lr in calls[4:]:
        problem = HypergradientProblem(params, meta_params, train_loss, meta_loss, batch, meta, lr)
        expected, got = est.estimate(problem).grads, resumed.estimate(problem).grads
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    assert est.theta == resumed.theta != theta_before
    assert torch.equal(est.state_dict()["d_star"]["idx"], resumed.state_dict()["d_star"]["idx"])
    resumed.load_state_dict({})
    assert resumed.state_dict()["step"] == 0 and resumed.theta == 1.0
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"step": 3})


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": True}, "gamma"),
        ({"gamma": "0.9"}, "gamma"),
        ({"pi": 0.0}, "pi"),
        ({"pi": -1.0}, "pi"),
        ({"pi": math.inf}, "pi"),
        ({"pi": "auto"}, "pi"),
        ({"estimation_period": 0}, "estimation_period"),
        ({"estimation_period": 2.5}, "estimation_period"),
        ({"horizon": 0}, "horizon"),
        ({"horizon": True}, "horizon"),
        ({"horizon": 20, "estimation_period": 10}, "horizon"),
        ({"batch_mixing": "rows"}, "batch_mixing.*subsample.*replace"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options, option):
    with pytest.raises(ValueError, match=f"`?{option}"):
        HyperDistill(**options)


def test_needs_lr():
    lam = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        HyperDistill().estimate(HypergradientProblem({"x": torch.tensor(0.1)}, [lam], *one_dim_problem(lam)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closer_to_the_exact_multi_step_hypergradient_than_t1t2(seed):
    """A quadratic with per-coordinate curvature, noisy targets as batches of 4 rows and a learned per-coordinate
    weight decay. The exact answer at step t differentiates the meta loss through all t real SGD steps. The
    contraction factors 1 - lr (h_j + lambda_j) spread over [0.77, 0.98], so gamma = 0.9 is only an approximation
    (Eq. 7); pi is estimated every 10 calls over windows of 10 calls (Algorithm 4)."""
    gen = torch.Generator().manual_seed(seed)
    d, steps, lr = 5, 40, 0.1
    h = torch.rand(d, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    centre, target = (
        torch.randn(d, generator=gen, dtype=torch.float64),
        torch.randn(d, generator=gen, dtype=torch.float64),
    )
    lam = (torch.rand(d, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    batches = [centre + 0.3 * torch.randn(4, d, generator=gen, dtype=torch.float64) for _ in range(steps)]

    def train_loss(p, batch):
        return 0.5 * (h * (p["w"] - batch) ** 2).sum(1).mean() + 0.5 * (lam * p["w"] ** 2).sum()

    def meta_loss(p, batch):
        return 0.5 * ((p["w"] - target) ** 2).sum()

    start = {"w": torch.randn(d, generator=gen, dtype=torch.float64)}
    est = HyperDistill(gamma=0.9, pi=None, horizon=10, estimation_period=10, seed=seed)
    weights, errors_hd, errors_t1t2 = start, [], []
    for t in range(steps):
        problem = HypergradientProblem(weights, [lam], train_loss, meta_loss, batches[t], None, lr)
        (g_hd,), (g_t1t2,) = est.estimate(problem).grads, T1T2().estimate(problem).grads
        end = sgd_unroll(start, train_loss, batches[: t + 1], [lr] * (t + 1), create_graph=True)
        (exact,) = torch.autograd.grad(meta_loss(end, None), [lam])
        errors_hd.append(((g_hd - exact).norm() / exact.norm()).item())
        errors_t1t2.append(((g_t1t2 - exact).norm() / exact.norm()).item())
        weights = {"w": sgd_unroll(weights, train_loss, [batches[t]], [lr], create_graph=False)["w"].detach()}
    late_hd, late_t1t2 = sum(errors_hd[-10:]) / 10, sum(errors_t1t2[-10:]) / 10
    assert late_hd < 0.75 * late_t1t2, f"HyperDistill error {late_hd:.3f} vs T1-T2 {late_t1t2:.3f}"


def test_a_non_finite_step_in_the_refit_window_keeps_the_last_theta():
    """A training batch with an inf lands in the refit window; the refit over it is not finite, and theta must stay
    what it was, or every later estimate would be NaN until the next refit. (`MetaTrainer` also puts the whole state
    back after a skipped meta step: `tests/test_trainer.py`.)"""
    w, lam = torch.tensor([1.0, -2.0]), torch.tensor([0.3, 0.1], requires_grad=True)

    def train(p, b):
        return 0.5 * (b * (p["w"] - lam) ** 2).sum()

    def meta(p, b):
        return 0.5 * (p["w"] ** 2).sum()

    unfit = []
    for seed in range(4):
        est = HyperDistill(gamma=0.9, pi=None, horizon=2, estimation_period=50, batch_mixing="replace", seed=seed)
        before = est.theta
        est.estimate(HypergradientProblem({"w": w}, [lam], train, meta, torch.tensor([float("inf"), 1.0]), lr=0.1))
        # the refit, over the inf batch
        est.estimate(HypergradientProblem({"w": w}, [lam], train, meta, torch.ones(2), lr=0.1))
        assert math.isfinite(est.theta)
        unfit.append(est.theta == before)
    assert any(unfit)  # at least one refit was not finite and was dropped


def test_a_fixed_pi_scales_the_distilled_term():
    """`pi` multiplies the distilled term (Eq. 15 with a fixed scale): on a problem without direct term, pi = 2.5
    gives 2.5 times the estimates of pi = 1 along the same calls."""
    model, meta_params, train_loss, meta_loss = mlp_problem()
    runs = {}
    for pi in (1.0, 2.5):
        est = HyperDistill(gamma=0.9, pi=pi, seed=0)
        runs[pi] = [
            est.estimate(HypergradientProblem(params, meta_params, train_loss, meta_loss, batch, meta, lr)).grads
            for params, batch, meta, lr in mlp_calls(model, steps=3)
        ]
    for one, scaled in zip(runs[1.0], runs[2.5]):
        assert all(g.abs().sum() > 0 for g in one)
        torch.testing.assert_close(scaled, tuple(2.5 * g for g in one), rtol=1e-12, atol=1e-14)
