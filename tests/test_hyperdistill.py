"""HyperDistill against exact references: T1-T2 at gamma = 0, the closed form of the running average, a by-hand
Algorithm 4 on a 1-D problem, and exact reverse mode through a whole inner optimisation."""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
from helpers import WeightedMLP, one_dim_problem
from torch import nn
from torch.func import functional_call

from metatrain.estimators import HypergradientProblem
from metatrain.estimators.first_order import FirstOrder
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


def unit(grads):
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return tuple(g / norm for g in grads)


@pytest.mark.parametrize("batch_mixing", ["subsample", "replace"])
def test_gamma_zero_with_a_fixed_size_is_the_unit_t1t2_direction(batch_mixing):
    """Without a direct term (the meta loss does not depend on lambda), gamma = 0 distills the last step only and a
    fixed pi sets the norm: pi * T1T2 / ||T1T2||."""
    model, meta_params, train_loss, meta_loss = mlp_problem()
    est, reference = HyperDistill(gamma=0.0, pi=2.0, batch_mixing=batch_mixing), T1T2()
    for params, batch, meta, lr in mlp_calls(model, steps=4):
        problem = HypergradientProblem(params, meta_params, train_loss, meta_loss, batch, meta, lr)
        got, ref = est.estimate(problem), reference.estimate(problem)
        torch.testing.assert_close(got.grads, tuple(2.0 * g for g in unit(ref.grads)), rtol=1e-10, atol=1e-12)
        assert got.meta_loss.item() == ref.meta_loss.item()
    assert all(p.grad is None for p in model.parameters()) and all(m.grad is None for m in meta_params)


def test_gamma_zero_with_the_fitted_size_is_t1t2_times_theta():
    """With pi=None the distilled term is theta * S_t * v_t (Eq. 15); at gamma = 0, S_t = 1 and v_t is T1-T2's
    second-order term, so on a problem without direct term the estimate is theta times T1-T2's."""
    model, meta_params, train_loss, meta_loss = mlp_problem()
    calls = mlp_calls(model, steps=6)
    est = HyperDistill(gamma=0.0, horizon=3, seed=0)
    for params, batch, meta, lr in calls[:3]:
        problem = HypergradientProblem(
            params, meta_params, train_loss, meta_loss, batch, meta, lr, train_batches=batch_source(calls)
        )
        got, ref = est.estimate(problem).grads, T1T2().estimate(problem).grads
        assert est.theta is not None and est.theta > 0
        torch.testing.assert_close(got, tuple(est.theta * g for g in ref), rtol=1e-10, atol=1e-14)


def batch_source(calls):
    """`train_batches` for a problem: the training batches of `calls`, in order, again and again."""
    state = {"next": 0}

    def draw(n):
        out = []
        for _ in range(n):
            out.append(calls[state["next"] % len(calls)][1])
            state["next"] += 1
        return out

    return draw


def test_first_call_is_t1t2_for_any_gamma():
    """At t = 1, w*_1 = w_0 and D*_1 = D_1 (Eq. 13-14): the distilled term has the one-step lookahead's direction."""
    model, meta_params, train_loss, meta_loss = mlp_problem()
    params, batch, meta, lr = mlp_calls(model, steps=1)[0]
    problem = HypergradientProblem(params, meta_params, train_loss, meta_loss, batch, meta, lr)
    got, ref = HyperDistill(gamma=0.9, pi=1.0).estimate(problem).grads, T1T2().estimate(problem).grads
    torch.testing.assert_close(got, unit(ref), rtol=1e-10, atol=1e-12)


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
    est = HyperDistill(gamma=gamma, pi=1.0)
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

    est = HyperDistill(gamma=gamma, pi=1.0, seed=0)
    seen = []
    for t in range(1, 5):
        est.estimate(HypergradientProblem(x, [lam], train_loss, meta_loss, batch(t), lr=0.1))
        d_star = est.state_dict()["d_star"]
        assert set(d_star) == {"x", "idx"} and d_star["idx"].shape == (n,) and d_star["x"].shape == (n, 3)
        assert torch.equal(d_star["x"], d_star["idx"].double()[:, None].expand(n, 3) * 2.0)
        assert len(set(d_star["idx"].tolist())) == n
        seen.append(d_star["idx"] // 100)
    p_2, p_4 = (gamma - gamma**2) / (1 - gamma**2), (gamma - gamma**4) / (1 - gamma**4)
    assert seen[0].tolist() == [1] * n
    assert n * p_2 == pytest.approx(3) and (seen[1] == 1).sum().item() == 3  # n p_t whole: no rounding
    assert (seen[3] == 4).sum().item() in (n - math.floor(n * p_4), n - math.ceil(n * p_4))


def test_distilled_batch_keeps_taking_new_rows_in_a_long_run():
    """At gamma = 0.99 and n = 32, n (1 - p_t) < 0.5 from call 101 on, where rounding Eq. 14 to the nearest would
    take no new row ever again. Stochastic rounding takes n (1 - p_t) ~ 0.32 new rows per call on average."""
    n, calls = 32, 400
    lam = torch.tensor(0.3, requires_grad=True)
    train_loss = lambda p, batch: ((p["x"] - batch.float().mean()) ** 2) + lam * p["x"] ** 2  # noqa: E731
    meta_loss = lambda p, batch: p["x"] ** 2  # noqa: E731
    est = HyperDistill(gamma=0.99, pi=1.0, seed=0)
    newest = []
    for t in range(1, calls + 1):
        batch = torch.arange(n) + 1000 * t
        est.estimate(HypergradientProblem({"x": torch.tensor(0.2)}, [lam], train_loss, meta_loss, batch, lr=0.1))
        newest.append(int(est.state_dict()["d_star"].max()) // 1000)
    # n (1 - p_t) ~ 0.32 < 1: a call's batch enters D* with one row, with probability ~ 0.32
    taken = sum(newest[t] == t + 1 for t in range(200, calls))
    assert 0.5 * 0.32 * (calls - 200) < taken < 1.5 * 0.32 * (calls - 200), taken


def test_replace_mode_keeps_whole_batches_and_subsample_rejects_opaque_batches():
    lam = torch.tensor(0.3, requires_grad=True)
    train_loss = lambda p, batch: (p["x"] - 1) ** 2 + lam * p["x"] ** 2  # noqa: E731
    meta_loss = lambda p, batch: p["x"] ** 2  # noqa: E731
    x = {"x": torch.tensor(0.2)}
    est = HyperDistill(gamma=0.9, pi=1.0, batch_mixing="replace", seed=0)
    batches = [("example", torch.full((4,), float(t))) for t in range(6)]
    for b in batches:
        est.estimate(HypergradientProblem(x, [lam], train_loss, meta_loss, b, lr=0.1))
        d_star = est.state_dict()["d_star"]
        assert any(d_star[0] == o[0] and torch.equal(d_star[1], o[1]) for o in batches)
    est = HyperDistill(gamma=0.9, pi=1.0)
    est.estimate(HypergradientProblem(x, [lam], train_loss, meta_loss, batches[0], lr=0.1))
    with pytest.raises(ValueError, match="batch_mixing='replace'"):
        est.estimate(HypergradientProblem(x, [lam], train_loss, meta_loss, batches[1], lr=0.1))


def test_linear_estimator_matches_algorithm_4_by_hand():
    """On (x - 1)^2 + lambda x^2 every Jacobian is a scalar: Phi = x - lr (2 (x - 1) + 2 lambda x), A = 1 - 2 lr (1 +
    lambda), B(x) = -2 lr x. Algorithm 4 before the first call (a rollout of T steps from the current weight, DrMAD's
    backward pass over it, one sample per horizon s), written out with these formulas; then the estimates of Eq. 15
    with the fitted theta, a refit at the next inner optimisation that is due, none in between, and theta kept across
    reset()."""
    gamma, horizon, lam_value, lr = 0.6, 4, 0.4, 0.1
    lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
    est = HyperDistill(gamma=gamma, horizon=horizon, estimation_period=2)
    source = lambda n: [None] * n  # noqa: E731 (the 1-D losses ignore the batch)

    def estimate(x):
        x = {"x": torch.tensor(x, dtype=torch.float64)}
        return est.estimate(HypergradientProblem(x, [lam], *one_dim_problem(lam), lr=lr, train_batches=source))

    def phi(x):
        return x - lr * (2 * (x - 1) + 2 * lam_value * x)

    def decay_sum(t):
        return (1 - gamma**t) / (1 - gamma)

    def running_average(points):  # Eq. 12, newest last
        weights = [gamma ** (len(points) - i) for i in range(1, len(points) + 1)]
        return sum(w * p for w, p in zip(weights, points)) / sum(weights)

    def algorithm_4(w_0):
        w_end = w_0
        for _ in range(horizon):
            w_end = phi(w_end)
        alpha_end = alpha = 2 * (w_end - 0.5)
        g_so, w_hats, samples = 0.0, [], []
        for t in range(horizon, 0, -1):
            w_hat = (1 - (t - 1) / horizon) * w_0 + (t - 1) / horizon * w_end
            g_so += alpha * (-2 * lr * w_hat)
            alpha *= 1 - 2 * lr * (1 + lam_value)
            w_hats.insert(0, w_hat)  # oldest first: w^_{t-1}, ..., w^_{T-1}
            s = horizon - t + 1
            v = alpha_end * (-2 * lr * running_average(w_hats))
            samples.append((abs(v) * decay_sum(s), math.copysign(1.0, v) * g_so))
        return sum(x * y for x, y in samples) / sum(x * x for x, _ in samples)

    def expected(theta, xs):  # Eq. 15 at call t = len(xs): theta S_t alpha_t B(w*_t)
        return theta * decay_sum(len(xs)) * 2 * (phi(xs[-1]) - 0.5) * (-2 * lr * running_average(xs))

    xs = [0.9, 0.7, 0.55, 0.45, 0.3, 0.2, 0.15, 0.1, 0.05, 0.0]
    theta_1 = algorithm_4(xs[0])
    assert abs(theta_1 - 1) > 0.01
    for t in range(1, 9):  # inner optimisations 1 (fit), 2 (none: period 2), 3 (fit from its first weight, xs[8])
        grads = estimate(xs[t - 1]).grads
        theta = theta_1 if t <= 8 else algorithm_4(xs[8])
        assert abs(est.theta - theta) < 1e-12
        assert abs(grads[0].item() - expected(theta, xs[:t])) < 1e-12
    grads = estimate(xs[8]).grads
    theta_3 = algorithm_4(xs[8])
    assert abs(est.theta - theta_3) < 1e-12 and abs(theta_3 - theta_1) > 1e-6
    assert abs(grads[0].item() - expected(theta_3, xs[:9])) < 1e-12
    est.reset()  # inner optimisation 4: no fit, theta kept, the trajectory starts again
    assert abs(estimate(xs[9]).grads[0].item() - expected(theta_3, xs[9:])) < 1e-12


def test_fitting_theta_needs_fresh_training_batches():
    lam = torch.tensor(0.5, requires_grad=True)
    problem = HypergradientProblem({"x": torch.tensor(0.1)}, [lam], *one_dim_problem(lam), lr=0.1)
    with pytest.raises(ValueError, match="train_batches.*pi"):
        HyperDistill().estimate(problem)
    HyperDistill(pi=1.0).estimate(problem)  # a fixed size needs none


def test_state_dict_round_trip_gives_identical_estimates():
    model, meta_params, train_loss, meta_loss = mlp_problem()
    calls = mlp_calls(model, steps=9)
    est = HyperDistill(gamma=0.8, horizon=2, estimation_period=2)
    source = batch_source(calls)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for params, batch, meta, lr in calls[:4]:
            est.estimate(HypergradientProblem(params, meta_params, train_loss, meta_loss, batch, meta, lr,
                                              train_batches=source))  # fmt: skip
    theta_before = est.theta
    assert theta_before is not None and est.state_dict()["inner"] == 2
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(est.state_dict()), buffer)
    buffer.seek(0)
    resumed = HyperDistill(gamma=0.8, horizon=2, estimation_period=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for params, batch, meta, lr in calls[4:]:
        # a new source per estimator and call: both estimators' fits (if any) draw the same batches
        problems = [
            HypergradientProblem(
                params, meta_params, train_loss, meta_loss, batch, meta, lr, train_batches=batch_source(calls)
            )  # fmt: skip
            for _ in range(2)
        ]
        expected, got = est.estimate(problems[0]).grads, resumed.estimate(problems[1]).grads
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    assert est.theta == resumed.theta != theta_before  # refitted at call 5 (inner optimisation 3)
    assert torch.equal(est.state_dict()["d_star"]["idx"], resumed.state_dict()["d_star"]["idx"])
    resumed.load_state_dict({})
    assert resumed.state_dict()["step"] == 0 and resumed.theta is None
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


def anil_task(seed, d=6, k=4, c=2, n=16):
    """A small smooth ANIL-like task: the hyperparameter is a bottom layer `lam` (tanh features), the weights a linear
    head trained from zero by SGD; a teacher on true features gives the targets. The meta loss (the same regression
    on a held-out batch of the task) depends on `lam` directly, so first-order is not zero."""
    gen = torch.Generator().manual_seed(seed)
    lam_true = torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    lam = (lam_true + 0.3 * torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(d)).requires_grad_()
    teacher = torch.randn(c, k, generator=gen, dtype=torch.float64)

    def draw(m=n):
        x = torch.randn(m, d, generator=gen, dtype=torch.float64)
        return x, torch.tanh(x @ lam_true.T) @ teacher.T + 0.1 * torch.randn(m, c, generator=gen, dtype=torch.float64)

    def loss(p, batch):
        x, y = batch
        return 0.5 * ((torch.tanh(x @ lam.T) @ p["w"].T - y) ** 2).sum(1).mean()

    return lam, loss, draw, {"w": torch.zeros(c, k, dtype=torch.float64)}


def fresh_batches(draw, n):
    return [draw() for _ in range(n)]


def test_defaults_are_closer_to_exact_reverse_mode_than_t1t2_and_first_order():
    """The paper's Fig. 3a claim, on 12 seeds of a small smooth problem: along one inner optimisation of 100 SGD steps,
    the cosine of HyperDistill's total hypergradient (its defaults: gamma = 0.99, theta fitted before the first call)
    to exact reverse mode through every step so far beats T1-T2's and first-order's at t = 25, 50 and 100, paired
    over seeds, by more than 2 standard errors."""
    checks, lr, cosines = (25, 50, 100), 0.1, []
    for seed in range(12):
        lam, loss, draw, start = anil_task(seed)
        meta, batches = draw(50), [draw() for _ in range(max(checks))]
        estimators = {"hd": HyperDistill(seed=seed), "t1t2": T1T2(), "fo": FirstOrder()}
        weights, row = start, {}
        for t in range(1, max(checks) + 1):
            fresh = functools.partial(fresh_batches, draw)
            problem = HypergradientProblem(weights, [lam], loss, loss, batches[t - 1], meta, lr, train_batches=fresh)
            grads = {name: est.estimate(problem).grads[0] for name, est in estimators.items()}
            if t in checks:
                end = sgd_unroll(start, loss, batches[:t], [lr] * t, create_graph=True)
                (exact,) = torch.autograd.grad(loss(end, meta), [lam])
                row[t] = {name: float(torch.nn.functional.cosine_similarity(g.flatten(), exact.flatten(), 0))
                          for name, g in grads.items()}  # fmt: skip
            weights = {"w": sgd_unroll(weights, loss, [batches[t - 1]], [lr], create_graph=False)["w"].detach()}
        cosines.append(row)
    for t in checks:
        for baseline in ("t1t2", "fo"):
            diffs = torch.tensor([row[t]["hd"] - row[t][baseline] for row in cosines])
            error = diffs.std() / math.sqrt(len(diffs))
            assert diffs.mean() > 2 * error, f"t={t}: HyperDistill - {baseline} {diffs.mean():.4f} +/- {error:.4f}"


def test_a_non_finite_fit_keeps_the_last_theta():
    """A rollout over a batch with an inf gives a fit that is not finite; theta must stay what it was, or every later
    estimate would be NaN until the next fit. (`MetaTrainer` also puts the whole state back after a skipped meta
    step: `tests/test_trainer.py`.)"""
    w, lam = torch.tensor([1.0, -2.0]), torch.tensor([0.3, 0.1], requires_grad=True)

    def train(p, b):
        return 0.5 * (b * (p["w"] - lam) ** 2).sum()

    def meta(p, b):
        return 0.5 * (p["w"] ** 2).sum()

    est = HyperDistill(gamma=0.9, horizon=2, estimation_period=1, batch_mixing="replace", seed=0)
    est.estimate(HypergradientProblem({"w": w}, [lam], train, meta, torch.ones(2), lr=0.1,
                                      train_batches=lambda n: [torch.ones(2)] * n))  # fmt: skip
    fitted = est.theta
    assert fitted is not None and math.isfinite(fitted)
    bad = [torch.tensor([float("inf"), 1.0]), torch.ones(2)]
    est.estimate(HypergradientProblem({"w": w}, [lam], train, meta, torch.ones(2), lr=0.1))  # call 2: no fit due
    result = est.estimate(HypergradientProblem({"w": w}, [lam], train, meta, torch.ones(2), lr=0.1,
                                               train_batches=lambda n: bad[:n]))  # fmt: skip
    assert est.theta == fitted and all(torch.isfinite(g).all() for g in result.grads)


def test_a_fixed_pi_sets_the_size_of_the_unit_direction():
    """`pi` is the size of the unit direction f_t (the paper's convention for Meta-Weight-Net): on a problem without
    direct term, pi = 2.5 gives 2.5 times the estimates of pi = 1, and those have norm 1."""
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
        assert float(torch.sqrt(sum((g**2).sum() for g in one))) == pytest.approx(1.0, rel=1e-12)
        torch.testing.assert_close(scaled, tuple(2.5 * g for g in one), rtol=1e-12, atol=1e-14)
