"""Estimators against exact references: closed forms and full autograd through an unrolled SGD step."""

from __future__ import annotations

import pytest
import torch
from helpers import WeightedMLP, closed_form_hypergradient, one_dim_problem, weighted_mlp_problem
from torch import nn
from torch.func import functional_call

from metatrain.estimators import (
    ESTIMATORS,
    EvoGrad,
    HypergradientEstimator,
    HypergradientProblem,
    HypergradientResult,
    create_estimator,
    evograd_noise,
)
from metatrain.estimators.evograd_noise import NoiseDraw
from metatrain.profiling import LiveTensorMeter


def test_register_estimator_adds_a_name_and_the_listing_is_read_only(tmp_path):
    from metatrain import MetaTrainingArguments
    from metatrain.estimators import FirstOrder, register_estimator, unregister_estimator

    class Scaled(FirstOrder):
        def __init__(self, scale: float = 2.0):
            self.scale = scale

    with pytest.raises(TypeError):
        ESTIMATORS["scaled"] = Scaled  # the listing is a read-only view
    with pytest.raises(ValueError, match="Unknown `hypergradient='scaled'`"):
        MetaTrainingArguments(output_dir=str(tmp_path), hypergradient="scaled", use_cpu=True, report_to=[])
    register_estimator("scaled", Scaled)
    try:
        assert ESTIMATORS["scaled"] is Scaled and create_estimator("scaled", scale=3.0).scale == 3.0
        MetaTrainingArguments(output_dir=str(tmp_path), hypergradient="scaled", use_cpu=True, report_to=[])
        with pytest.raises(ValueError, match="already registered as 'scaled'.*overwrite=True"):
            register_estimator("scaled", FirstOrder)
        with pytest.raises(ValueError, match="must subclass `metatrain.estimators.HypergradientEstimator`"):
            register_estimator("other", dict)
    finally:
        unregister_estimator("scaled")
    assert "scaled" not in ESTIMATORS
    with pytest.raises(ValueError, match="No estimator is registered as 'scaled'"):
        unregister_estimator("scaled")


def test_the_removed_hypergradient_alias_names_estimate():
    with pytest.raises(AttributeError, match=r"call `estimate\(HypergradientProblem\(\.\.\.\)\)`.*\.grads"):
        create_estimator("t1t2").hypergradient({}, [], None, None)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimate_called_with_the_old_seven_arguments_names_the_problem(name):
    lam = torch.tensor(0.5, requires_grad=True)
    train_loss, meta_loss = one_dim_problem(lam)
    est = create_estimator(name)
    with pytest.raises(TypeError, match=rf"{type(est).__name__}\.estimate takes one `HypergradientProblem`"):
        est.estimate({"x": torch.tensor(0.1)}, [lam], train_loss, meta_loss, None, None, 0.1)
    with pytest.raises(TypeError, match="HypergradientProblem"):
        est.estimate(params={"x": torch.tensor(0.1)}, meta_params=[lam], train_loss=train_loss, meta_loss=meta_loss)
    assert est.state_dict() == create_estimator(name).state_dict()  # refused before anything was remembered


def test_an_estimator_written_with_the_old_signature_is_refused_at_class_definition():
    with pytest.raises(TypeError, match=r"Old\.estimate must take one argument.*HypergradientProblem"):

        class Old(HypergradientEstimator):
            def estimate(self, params, meta_params, train_loss, meta_loss, train_batch=None, meta_batch=None, lr=None):
                raise NotImplementedError

    class New(HypergradientEstimator):
        def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
            loss = problem.meta_loss(problem.params, problem.meta_batch)
            return HypergradientResult(tuple(torch.zeros_like(m) for m in problem.meta_params), loss.detach())

    lam = torch.tensor(0.5, requires_grad=True)
    result = New().estimate(HypergradientProblem({"x": torch.tensor(0.1)}, [lam], *one_dim_problem(lam)))
    assert result.grads[0].item() == 0.0 and abs(result.meta_loss.item() - 0.16) < 1e-6


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
    grads = est.estimate(
        HypergradientProblem(
            params={"x": x},
            meta_params=[lam],
            train_loss=lambda p, batch: (p["x"] - 1) ** 2 + lam * p["x"] ** 2,
            meta_loss=lambda p, batch: (p["x"] - 0.5) ** 2,
            train_batch=None,
            meta_batch=None,
            lr=0.1,
        )
    ).grads
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
    (g,) = create_estimator("t1t2").estimate(HypergradientProblem({"x": x}, [lam], train_loss, meta_loss, lr=lr)).grads
    x_next = x_value - lr * (2 * (x_value - 1) + 2 * lam_value * x_value)
    expected = 2 * (x_next - 0.5) * (-2 * lr * x_value)
    assert abs(g.item() - expected) < 1e-6


def test_t1t2_needs_lr():
    lam = torch.tensor(0.5, requires_grad=True)
    x = {"x": torch.tensor(0.1)}
    with pytest.raises(ValueError, match="lr"):
        create_estimator("t1t2").estimate(HypergradientProblem(x, [lam], *one_dim_problem(lam)))
    with pytest.raises(ValueError, match="lr` >= 0, got lr=-0.1"):
        create_estimator("t1t2").estimate(HypergradientProblem(x, [lam], *one_dim_problem(lam), lr=-0.1))


def test_zero_step_lookahead_is_the_direct_term():
    """lr = 0 (the first step of a warmup) is a valid lookahead: theta' = theta, only the direct term remains."""
    lam = torch.tensor(0.5, requires_grad=True)
    train_loss, _ = one_dim_problem(lam)
    direct = lambda p, batch: (p["x"] - 0.5) ** 2 + lam**2  # noqa: E731
    x = {"x": torch.tensor(0.2)}
    problem = HypergradientProblem(x, [lam], train_loss, direct, lr=0.0)
    (t1t2,) = create_estimator("t1t2").estimate(problem).grads
    (first,) = create_estimator("first_order").estimate(problem).grads
    assert t1t2.item() == first.item() == 1.0
    (evo,) = create_estimator("evograd", sigma="auto").estimate(problem).grads
    assert evo.item() == 1.0


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
    problem = HypergradientProblem(params, [logits, decay], train_loss, meta_loss, (xb, yb), (xm, ym), lr)
    grads = create_estimator("t1t2").estimate(problem).grads

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


@pytest.mark.slow
def test_evograd_tracks_closed_form_hypergradient():
    """Paper Sec. 4.1 / Fig. 2: tau = 0.5, eps ~ N(0, 1), mean over repetitions with random x: the sign and the shape
    (correlation) of the closed form. EvoGrad's scale is not the closed form's at this sigma; it is checked against
    T1-T2 at its effective step in `test_evograd_mean_equals_t1t2_at_its_effective_step`."""
    torch.manual_seed(0)
    est = create_estimator("evograd", population=100, sigma=1.0, temperature=0.5, noise="gaussian")
    grid = [0.0, 0.25, 0.5, 0.75, 1.25, 1.5, 2.0]
    means = []
    for lam_value in grid:
        lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
        train_loss, meta_loss = one_dim_problem(lam)
        problems = (
            HypergradientProblem({"x": torch.rand((), dtype=torch.float64)}, [lam], train_loss, meta_loss)
            for _ in range(100)
        )
        estimates = [est.estimate(problem).grads[0].item() for problem in problems]
        means.append(sum(estimates) / len(estimates))
    truth = [closed_form_hypergradient(v) for v in grid]
    for lam_value, m, t in zip(grid, means, truth):
        assert (m > 0) == (t > 0), f"sign differs at lambda={lam_value}: evograd {m:.4f} vs closed form {t:.4f}"
    corr = torch.corrcoef(torch.tensor([means, truth]))[0, 1]
    assert corr > 0.9, f"evograd means {means} do not follow the closed form {truth} (corr {corr:.3f})"


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"memory_lean": False}, [False, False]),  # the meta loss to lambda and the softmax weights, then to lambda
        ({}, [False] * 4),  # one gradient per copy (K = 4: the lean path), the meta loss's taken by backward
        ({"forward_mode": True}, [False] * 4),  # one gradient per copy, the meta loss by JVPs
    ],
)
def test_evograd_builds_no_second_order_graph(monkeypatch, options, expected):
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

    problem = HypergradientProblem(dict(model.named_parameters()), [logits], train_loss, meta_loss)
    (g,) = create_estimator("evograd", population=4, sigma=0.01, **options).estimate(problem).grads
    assert calls == expected
    assert g.shape == logits.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_first_order_is_direct_term_only():
    lam = torch.tensor(0.7, requires_grad=True)
    train_loss, meta_loss = one_dim_problem(lam)
    x = {"x": torch.tensor(0.2)}
    (g,) = create_estimator("first_order").estimate(HypergradientProblem(x, [lam], train_loss, meta_loss)).grads
    assert g.item() == 0.0
    direct = lambda p, batch: (p["x"] - 0.5) ** 2 + lam**2  # noqa: E731
    (g,) = create_estimator("first_order").estimate(HypergradientProblem(x, [lam], train_loss, direct)).grads
    assert abs(g.item() - 1.4) < 1e-6


@pytest.mark.slow
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
    lookahead = HypergradientProblem(params, [logits], train_loss, meta_loss, lr=est.effective_lr(sigma))
    (ref,) = create_estimator("t1t2").estimate(lookahead).grads
    problem = HypergradientProblem(params, [logits], train_loss, meta_loss)
    mean = torch.stack([est.estimate(problem).grads[0] for _ in range(1000)]).mean(0)
    assert nn.functional.cosine_similarity(mean, ref, dim=0) > 0.98
    assert 0.85 < mean.norm() / ref.norm() < 1.15


def test_evograd_rescaled_mean_is_t1t2_at_the_learning_rate():
    """`rescale=True` multiplies by lr / effective step: the mean is the (linearised) lookahead hypergradient at lr,
    which is T1-T2's at a step small enough for T1-T2 to be linear in it."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    problem = HypergradientProblem(params, [lam], train_loss, meta_loss, lr=0.01)
    (ref,) = create_estimator("t1t2").estimate(problem).grads
    est = create_estimator("evograd", population=4, sigma=0.003, rescale=True)
    torch.manual_seed(0)
    draws = torch.stack([est.estimate(problem).grads[0] for _ in range(400)])
    mean = draws.mean(0)
    assert nn.functional.cosine_similarity(mean, ref, dim=0) > 0.99
    # the mean's distance to T1-T2 within 2.5 of its standard errors (which are about 7% of T1-T2's norm here; for
    # an unbiased mean over 32 coordinates that distance is about one standard error): here the mean times 1.2 is 4.1
    # standard errors away
    standard_error = (draws.var(0).sum() / len(draws)).sqrt()
    assert standard_error < 0.1 * ref.norm()
    assert (mean - ref).norm() < 2.5 * standard_error
    with pytest.raises(ValueError, match="lr"):
        est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss))


# the options of each EvoGrad path; "default" leaves them unset (forward for K = 2, lean otherwise)
EVOGRAD_PATHS = {
    "all_at_once": {"memory_lean": False},
    "default": {},
    "lean": {"memory_lean": True},
    "forward": {"forward_mode": True},
}


@pytest.mark.parametrize("path", sorted(EVOGRAD_PATHS))
def test_evograd_rescale_scales_only_the_indirect_term(path):
    """A meta loss that depends on lambda itself (`+ a . lambda`, direct term `a`): `rescale` multiplies what reaches
    lambda through the softmax weights, not `a`, so the rescaled estimate is `a + f (plain - a)` on the same noise."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    a = torch.linspace(-1.0, 1.0, len(lam), dtype=lam.dtype)

    def meta_loss_direct(p, batch):
        return meta_loss(p, batch) + (a * lam).sum()

    estimates = {}
    for rescale in (False, True):
        torch.manual_seed(3)
        est = create_estimator("evograd", population=3, sigma=0.01, rescale=rescale, **EVOGRAD_PATHS[path])
        problem = HypergradientProblem(params, [lam], train_loss, meta_loss_direct, lr=0.05)
        estimates[rescale] = est.estimate(problem).grads[0]
    factor = 0.05 / est.effective_lr(0.01)
    assert (estimates[False] - a).norm() > 1e-6 and factor > 10  # an indirect term, scaled by far more than 1
    torch.testing.assert_close(estimates[True], a + factor * (estimates[False] - a), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sigma", ["auto", "lr"])
@pytest.mark.parametrize("path", sorted(EVOGRAD_PATHS))
def test_evograd_rescaled_at_a_zero_learning_rate_is_the_direct_term(sigma, path):
    """A warmup starts at lr = 0, where sigma "auto" / "lr" resolves to 0: theta* = theta, no indirect term, and
    `rescale` must not divide by the zero effective step."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    a = torch.linspace(-1.0, 1.0, len(lam), dtype=lam.dtype)
    est = create_estimator("evograd", sigma=sigma, rescale=True, **EVOGRAD_PATHS[path])
    meta_loss_direct = lambda p, b: meta_loss(p, b) + (a * lam).sum()  # noqa: E731
    (grad,) = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss_direct, lr=0.0)).grads
    torch.testing.assert_close(grad, a, rtol=0, atol=1e-12)


def test_evograd_auto_sigma_matches_the_learning_rate():
    est = create_estimator("evograd", population=2, sigma="auto", temperature=0.05)
    assert abs(est.resolve_sigma(0.1) - 0.1) < 1e-12
    assert abs(est.effective_lr(est.resolve_sigma(0.03)) - 0.03) < 1e-12
    lam = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        est.estimate(HypergradientProblem({"x": torch.tensor(0.1)}, [lam], *one_dim_problem(lam)))
    with pytest.raises(ValueError, match='sigma.*"auto" or "lr"'):
        create_estimator("evograd", sigma="big")


def test_evograd_sigma_tied_to_the_learning_rate():
    """`sigma="lr"` (EvoGrad's LFT code): the perturbation scale is the inner learning rate of each call."""
    est = create_estimator("evograd", sigma="lr", noise="gaussian")
    assert est.resolve_sigma(1e-3) == 1e-3 and est.resolve_sigma(0.05) == 0.05
    x, lam = {"x": torch.tensor(0.3)}, torch.tensor(0.5, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        est.estimate(HypergradientProblem(x, [lam], *one_dim_problem(lam)))
    torch.manual_seed(0)
    tied = est.estimate(HypergradientProblem(x, [lam], *one_dim_problem(lam), lr=0.2)).grads
    torch.manual_seed(0)
    fixed_sigma = create_estimator("evograd", sigma=0.2, noise="gaussian")
    fixed = fixed_sigma.estimate(HypergradientProblem(x, [lam], *one_dim_problem(lam), lr=0.2)).grads
    assert tied[0].item() != 0 and torch.equal(tied[0], fixed[0])


def test_evograd_antithetic_pairs():
    est = create_estimator("evograd", population=4, sigma=0.5, antithetic=True)
    theta = {"w": torch.zeros(3, 5)}
    draw = est._noise_draw(theta, ["w"], 0.5, seed=7)
    eps = torch.stack([draw.perturbation(k)["w"] for k in range(4)])
    assert torch.equal(eps[:2], -eps[2:]) and torch.all(eps.abs() == 0.5) and not torch.equal(eps[0], eps[1])
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
    lookahead = HypergradientProblem(ref_params, [logits], train_loss, meta_loss, lr=est.effective_lr(0.01))
    (ref,) = create_estimator("t1t2").estimate(lookahead).grads
    problem = HypergradientProblem(params, [logits], train_loss, meta_loss)
    mean = torch.stack([est.estimate(problem).grads[0] for _ in range(1000)]).mean(0)
    assert nn.functional.cosine_similarity(mean, ref, dim=0) > 0.98
    assert 0.85 < mean.norm() / ref.norm() < 1.15

    with pytest.raises(ValueError, match="perturb='nope' matches no parameter name"):
        create_estimator("evograd", perturb="nope").estimate(problem)
    with pytest.raises(ValueError, match="perturb"):
        create_estimator("evograd", perturb="(")


# ------------------------------------------------------------------------------------- second-order estimators
def none_batches(n):
    """Fresh training batches of the problems below, whose losses take no batch (HyperDistill's fit draws them)."""
    return [None] * n


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_adds_the_meta_losss_direct_term_exactly(name):
    """A meta loss that depends on lambda itself (`+ a . lambda`) adds exactly `a` to every estimate: the direct term
    `d L_meta / d lambda` is part of the hypergradient whatever the estimator (the problems of the other tests have
    none, so an estimator that dropped it would pass them). Same RNG state for both calls."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    a = torch.linspace(-1.0, 1.0, len(lam), dtype=lam.dtype)
    grads = []
    for direct in (False, True):
        torch.manual_seed(4)
        loss = (lambda p, b: meta_loss(p, b) + (a * lam).sum()) if direct else meta_loss
        grads.append(
            create_estimator(name)
            .estimate(HypergradientProblem(params, [lam], train_loss, loss, lr=0.05, train_batches=none_batches))
            .grads[0]  # fmt: skip
        )
    assert grads[0].norm() > 0 or name == "first_order"  # an indirect part that must stay as it was
    torch.testing.assert_close(grads[1] - grads[0], a, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_only_the_estimators_that_perturb_the_weights_use_the_held_training_loss(name):
    """EvoGrad and t1t2_fd evaluate the training batch at weights near theta, so they call `held_train_loss` (where a
    loss weighter's input is held at theta) and never `train_loss`; the autograd estimators differentiate `train_loss`
    and never call `held_train_loss`. The default `held_train_loss` is `train_loss` on the training batch: the same
    estimate to the bit as an explicit one."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    calls = {"train_loss": 0, "held_train_loss": 0}

    def counted_train_loss(p, batch):
        calls["train_loss"] += 1
        return train_loss(p, batch)

    def held_train_loss(p):
        calls["held_train_loss"] += 1
        return train_loss(p, None)

    estimates = []
    for held in (None, held_train_loss):
        torch.manual_seed(4)
        calls.update(train_loss=0, held_train_loss=0)
        problem = HypergradientProblem(params, [lam], counted_train_loss, meta_loss, lr=0.05, held_train_loss=held,
                                       train_batches=none_batches)  # fmt: skip
        estimates.append(create_estimator(name).estimate(problem).grads[0])
    perturbs = name in ("evograd", "t1t2_fd")
    assert calls["held_train_loss"] > 0 if perturbs else calls["held_train_loss"] == 0
    assert calls["train_loss"] == 0 if perturbs or name == "first_order" else calls["train_loss"] > 0
    assert torch.equal(estimates[0], estimates[1])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_t1t2_fd_is_exact_when_the_training_loss_is_quadratic():
    for lam_value, x_value in [(0.5, 0.3), (2.0, -1.0), (0.0, 0.7)]:
        lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
        x = {"x": torch.tensor(x_value, dtype=torch.float64)}
        (fd,) = (
            create_estimator("t1t2_fd").estimate(HypergradientProblem(x, [lam], *one_dim_problem(lam), lr=0.1)).grads
        )
        (exact,) = (
            create_estimator("t1t2").estimate(HypergradientProblem(x, [lam], *one_dim_problem(lam), lr=0.1)).grads
        )
        assert abs(fd.item() - exact.item()) < 1e-10


def test_t1t2_fd_matches_t1t2_within_finite_difference_error():
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    problem = HypergradientProblem(params, [lam], train_loss, meta_loss, lr=0.5)
    (exact,) = create_estimator("t1t2").estimate(problem).grads
    errors = []
    for epsilon in (0.1, 0.01):
        (fd,) = create_estimator("t1t2_fd", epsilon=epsilon).estimate(problem).grads
        errors.append(relative_error(fd, exact))
    assert errors[1] < 3e-5
    assert errors[1] < errors[0] / 50  # central differences: the error falls with epsilon^2
    with pytest.raises(ValueError, match="epsilon"):
        create_estimator("t1t2_fd", epsilon=0)


def ridge_problem(seed: int = 0):
    """Strongly convex inner problem with a closed-form solution and implicit hypergradient.

    L_train = mean((X theta - y)^2) / 2 + sum_j exp(lambda_j) theta_j^2 / 2, L_meta = mean((X_v theta - y_v)^2) / 2.
    theta*(lambda) = H^-1 X^T y / n with H = X^T X / n + diag(exp(lambda)), and
    d L_meta(theta*) / d lambda_j = -(H^-1 v)_j exp(lambda_j) theta*_j with v = grad L_meta(theta*).
    """
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randn(40, 5, generator=g, dtype=torch.float64)
    y, yv = torch.randn(60, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    lam = torch.linspace(-1.0, 0.5, 5, dtype=torch.float64).requires_grad_()

    def train_loss(p, batch):
        return ((X @ p["theta"] - y) ** 2).mean() / 2 + (torch.exp(lam) * p["theta"] ** 2).sum() / 2

    def meta_loss(p, batch):
        return ((Xv @ p["theta"] - yv) ** 2).mean() / 2

    with torch.no_grad():
        H = X.T @ X / 60 + torch.diag(torch.exp(lam))
        theta = torch.linalg.solve(H, X.T @ y / 60)
        v = Xv.T @ (Xv @ theta - yv) / 40
        exact = -torch.linalg.solve(H, v) * torch.exp(lam) * theta
        lipschitz = torch.linalg.eigvalsh(H).max().item()
    return {"theta": theta}, lam, train_loss, meta_loss, exact, lipschitz


def test_neumann_converges_to_the_implicit_hypergradient():
    params, lam, train_loss, meta_loss, exact, lipschitz = ridge_problem()
    errors = []
    for terms in (0, 5, 20, 200):
        est = create_estimator("neumann", terms=terms, alpha=1.0 / lipschitz)
        (g,) = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads
        errors.append(relative_error(g, exact))
    assert errors[-1] < 1e-10
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1
    # alpha defaults to the inner step size
    problem = HypergradientProblem(params, [lam], train_loss, meta_loss, lr=0.2)
    default = create_estimator("neumann", terms=200).estimate(problem).grads[0]
    assert relative_error(default, exact) < 1e-8
    for bad in ({"terms": -1}, {"alpha": 0.0}, {"terms": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_estimator("neumann", **bad)


def test_neumann_with_no_terms_is_the_lookahead_to_first_order():
    """J = 0: p = alpha v, which is T1-T2's second-order term at step alpha (T1-T2 evaluates v at theta')."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    problem = HypergradientProblem(params, [lam], train_loss, meta_loss, lr=1e-4)
    (neu,) = create_estimator("neumann", terms=0).estimate(problem).grads
    (t1t2,) = create_estimator("t1t2").estimate(problem).grads
    assert relative_error(neu, t1t2) < 1e-3


def sgd_trajectory(params, train_loss, batches, lr):
    """Real SGD steps (no graph), as a trainer takes them."""
    theta = {k: v.clone() for k, v in params.items()}
    trajectory = [theta]
    for batch in batches:
        leaves_ = {k: v.detach().requires_grad_() for k, v in theta.items()}
        grads = torch.autograd.grad(train_loss(leaves_, batch), list(leaves_.values()))
        theta = {k: (v - lr * g).detach() for (k, v), g in zip(leaves_.items(), grads)}
        trajectory.append(theta)
    return trajectory


def test_reverse_equals_autograd_through_the_unrolled_steps():
    params, lam, train_loss, meta_loss = weighted_mlp_problem(n=24)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g))
               for _ in range(4)]  # fmt: skip
    lr = 0.3
    trajectory = sgd_trajectory(params, train_loss, batches, lr)
    est = create_estimator("reverse", horizon=3)
    problems = [HypergradientProblem(trajectory[t], [lam], train_loss, meta_loss, batches[t], lr=lr) for t in range(4)]
    estimates = [est.estimate(problem).grads[0] for problem in problems]

    # reference: autograd through the last three steps, written out from theta_1
    theta = {k: v.detach().requires_grad_() for k, v in trajectory[1].items()}
    for batch in batches[1:4]:
        grads = torch.autograd.grad(train_loss(theta, batch), list(theta.values()), create_graph=True)
        theta = {k: v - lr * gr for (k, v), gr in zip(theta.items(), grads)}
    (reference,) = torch.autograd.grad(meta_loss(theta, None), [lam])
    assert relative_error(estimates[3], reference) < 1e-12
    # the first call has no history: one step, which is T1-T2
    (t1t2,) = create_estimator("t1t2").estimate(problems[0]).grads
    assert relative_error(estimates[0], t1t2) < 1e-12
    # horizon 1 is T1-T2 at every call
    (one,) = create_estimator("reverse", horizon=1).estimate(problems[2]).grads
    (t1t2,) = create_estimator("t1t2").estimate(problems[2]).grads
    assert relative_error(one, t1t2) < 1e-12


def test_reverse_state_round_trip():
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    batches = [None, None, None]
    trajectory = sgd_trajectory(params, train_loss, batches, 0.3)
    est = create_estimator("reverse", horizon=3)
    for t in range(2):
        est.estimate(HypergradientProblem(trajectory[t], [lam], train_loss, meta_loss, batches[t], lr=0.3))
    restored = create_estimator("reverse", horizon=3)
    restored.load_state_dict(est.state_dict())
    problem = HypergradientProblem(trajectory[2], [lam], train_loss, meta_loss, lr=0.3)
    (a,), (b,) = est.estimate(problem).grads, restored.estimate(problem).grads
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="longer horizon"):
        create_estimator("reverse", horizon=2).load_state_dict(est.state_dict())
    with pytest.raises(ValueError, match="horizon"):
        create_estimator("reverse", horizon=0)


@pytest.mark.parametrize("population", [2, 6])
@pytest.mark.parametrize("options", [{}, {"antithetic": True}, {"perturb": r"^net\.2\."}, {"noise": "gaussian"}])
def test_evograd_memory_lean_and_forward_mode_give_the_same_estimate(options, population):
    """The lean path (copies one at a time, a hooked meta backward), forward mode (`K - 1` Jacobian-vector products
    of the meta loss instead of its backward) and the default give the all-at-once path's estimate for the same
    seed."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    estimates = {}
    for path, extra in EVOGRAD_PATHS.items():
        torch.manual_seed(5)
        est = create_estimator("evograd", population=population, sigma=0.05, **extra, **options)
        estimates[path] = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0]
    assert estimates["all_at_once"].norm() > 0
    for path in ("default", "lean", "forward"):
        torch.testing.assert_close(estimates[path], estimates["all_at_once"], rtol=1e-9, atol=1e-12)


def test_evograd_forward_mode_stores_no_activations_for_the_meta_loss():
    """With a batch of 512 the meta loss's activations dominate memory (the weights are detached in the copies'
    training losses, so those store only the loss weighting). The lean path keeps an activation of each of the 20
    layers for its meta backward; forward mode holds a few activation-sized primals, tangents and temporaries at a
    time (7 measured), whatever the depth. Same estimate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), *[m for _ in range(20) for m in (nn.Tanh(), nn.Linear(64, 64))]).double()
    lam = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(512, 8, dtype=torch.float64), torch.randint(0, 64, (512,))

    def train_loss(p, batch):
        ce = nn.functional.cross_entropy(functional_call(model, p, (x[:4],)), y[:4], reduction="none")
        return (torch.sigmoid(lam) * ce).mean()

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, p, (x + 1,)), y)

    params = {name: p.detach() for name, p in model.named_parameters()}
    layer = 512 * 64 * 8  # one activation, bytes
    peaks, estimates = {}, {}
    for path in ("lean", "forward"):
        torch.manual_seed(2)
        est = create_estimator("evograd", population=2, sigma=0.01, **EVOGRAD_PATHS[path])
        with LiveTensorMeter(layer // 2) as meter:
            estimates[path] = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0]
        peaks[path] = meter.peak_bytes / layer
    torch.testing.assert_close(estimates["forward"], estimates["lean"], rtol=1e-9, atol=1e-12)
    assert estimates["lean"].norm() > 0
    assert peaks["lean"] >= 20, peaks
    assert peaks["forward"] <= 8, peaks


@pytest.mark.parametrize("population", [2, 3, 5])
def test_evograd_forward_mode_with_dropout_and_attention_in_the_meta_loss(population):
    """A meta loss with dropout and `scaled_dot_product_attention` (whose fused CPU kernel has no forward-mode
    derivative): forward mode runs its `K - 1` products on the same dropout draws, so it gives the lean path's
    estimate for the same seed with any `K`, and leaves the RNG where the lean path leaves it."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    queries, keys = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)

    def random_meta_loss(p, batch):
        attended = nn.functional.scaled_dot_product_attention(queries @ p["net.2.weight"], keys, keys)
        return meta_loss(p, batch) + nn.functional.dropout(attended, 0.5).pow(2).mean()

    estimates, after = {}, {}
    for path in ("lean", "forward"):
        torch.manual_seed(5)
        est = create_estimator("evograd", population=population, sigma=0.05, **EVOGRAD_PATHS[path])
        estimates[path] = est.estimate(HypergradientProblem(params, [lam], train_loss, random_meta_loss)).grads[0]
        after[path] = torch.rand(3)
    assert estimates["lean"].norm() > 0
    torch.testing.assert_close(estimates["forward"], estimates["lean"], rtol=1e-9, atol=1e-12)
    assert torch.equal(after["forward"], after["lean"])


def test_evograd_paths_return_the_meta_loss_as_the_meta_loss_function_does():
    """A meta loss of shape `(1,)` comes back as `(1,)`, with the same value, whichever path computed it."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    results = {}
    for path, options in EVOGRAD_PATHS.items():
        torch.manual_seed(6)
        est = create_estimator("evograd", sigma=0.05, **options)
        shaped = HypergradientProblem(params, [lam], train_loss, lambda p, b: meta_loss(p, b).reshape(1))
        results[path] = est.estimate(shaped)
    for path, result in results.items():
        assert result.meta_loss.shape == (1,), path
        torch.testing.assert_close(result.meta_loss, results["all_at_once"].meta_loss, rtol=1e-12, atol=0)


class NoJvp(torch.autograd.Function):
    """An identity with a backward and no forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_evograd_forward_mode_names_an_operator_without_a_forward_derivative():
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    est = create_estimator("evograd", forward_mode=True)
    with pytest.raises(NotImplementedError, match="forward_mode=True.*Set forward_mode=False"):
        est.estimate(HypergradientProblem(params, [lam], train_loss, lambda p, b: NoJvp.apply(meta_loss(p, b))))
    with pytest.raises(ValueError, match="forward_mode"):
        create_estimator("evograd", forward_mode="yes")


def test_evograd_path_is_chosen_from_the_options_and_the_population():
    """Unset options take forward mode for K = 2 (one Jacobian-vector product) and the lean path for more copies;
    every path stays selectable, and a contradiction is refused at construction."""
    chosen = {
        (2, "default"): "forward",
        (4, "default"): "lean",
        (4, "all_at_once"): "all_at_once",
        (2, "lean"): "lean",
        (4, "forward"): "forward",
    }
    for (population, name), path in chosen.items():
        assert create_estimator("evograd", population=population, **EVOGRAD_PATHS[name]).path == path
    assert create_estimator("evograd", forward_mode=False).path == "lean"
    with pytest.raises(ValueError, match="memory_lean=False and forward_mode=True"):
        create_estimator("evograd", memory_lean=False, forward_mode=True)


def test_evograd_default_falls_back_to_the_lean_path_when_forward_mode_fails(caplog):
    """A meta loss with an operator that has no forward-mode derivative: the default (forward mode for K = 2) warns,
    takes the lean path from then on, and gives the lean path's estimate with the RNG where the lean path leaves it;
    asked for explicitly, forward mode raises instead (the test above)."""

    params, lam, train_loss, meta_loss = weighted_mlp_problem()

    def meta_loss_no_jvp(p, b):
        return NoJvp.apply(meta_loss(p, b) + 0.0 * torch.rand(()))  # consumes a draw before the failing operator

    problem = HypergradientProblem(params, [lam], train_loss, meta_loss_no_jvp)
    estimates, after = {}, {}
    for name in ("default", "lean"):
        torch.manual_seed(5)
        est = create_estimator("evograd", sigma=0.05, **EVOGRAD_PATHS[name])
        with caplog.at_level("WARNING", logger="metatrain.estimators.evograd"):
            estimates[name] = est.estimate(problem).grads[0]
        after[name] = torch.rand(3)
        assert est.path == "lean"
    assert "forward mode" in caplog.text and "memory_lean=True" in caplog.text
    assert estimates["lean"].norm() > 0
    torch.testing.assert_close(estimates["default"], estimates["lean"], rtol=0, atol=0)
    assert torch.equal(after["default"], after["lean"])


@pytest.mark.parametrize("antithetic", [False, True])
def test_evograd_sign_noise_is_packed_bits_unpacked_in_chunks(monkeypatch, antithetic):
    """Sign noise is drawn as random bytes, 8 signs each, and the lean path unpacks the kept bytes a chunk at a time.
    With chunks of 16 signs, the weights (3, 8, 24 and 32 elements) end in partial bytes and span up to two chunks,
    and the lean path still gives the default path's estimate; every draw is exactly +/- sigma (as float32 rounds it),
    the two signs about equally often, and an antithetic copy is its partner negated."""
    monkeypatch.setattr(evograd_noise, "SIGN_CHUNK", 2)
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    estimates = []
    for lean in (False, True):
        torch.manual_seed(4)
        est = create_estimator("evograd", population=4, sigma=0.05, antithetic=antithetic, memory_lean=lean)
        estimates.append(est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0])
    assert estimates[0].norm() > 0
    torch.testing.assert_close(estimates[1], estimates[0], rtol=1e-9, atol=1e-12)
    assert sorted(p.numel() for p in params.values()) == [3, 8, 24, 32]
    draw = est._noise_draw(params, list(params), 0.05, seed=9)
    draws = [torch.cat([e.flatten() for e in draw.perturbation(k).values()]) for k in range(4)]
    sigma = float(torch.tensor(0.05, dtype=torch.float32))
    for eps in draws:
        assert eps.dtype == torch.float64 and torch.all(eps.abs() == sigma)
    positive = torch.stack(draws).gt(0).double().mean()
    assert 0.4 < positive < 0.6  # 268 signs
    assert torch.equal(draws[0], -draws[2]) == antithetic and not torch.equal(draws[0], draws[1])


def deep_mlp_problem(layers: int = 8, width: int = 128):
    """A float64 MLP whose `layers` equal square weights dominate memory (batch of 4): `(params, lam, train_loss,
    meta_loss, bytes of one square weight)`."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, width), *[m for _ in range(layers) for m in (nn.Tanh(), nn.Linear(width, width))]
    ).double()
    lam = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randint(0, width, (4,))

    def train_loss(p, batch):
        ce = nn.functional.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
        return (torch.sigmoid(lam) * ce).mean()

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, p, (x + 1,)), y)

    params = {name: p.detach() for name, p in model.named_parameters()}
    return params, lam, train_loss, meta_loss, width * width * 8


@pytest.mark.parametrize("noise", ["sign", "gaussian"])
def test_evograd_memory_lean_holds_about_one_weight_copy(noise):
    """New weight-sized memory of the estimate, in copies of the 8 square float64 weights. The default path holds every
    copy's perturbation and graph at once (10 copies with K=4). The lean path draws each copy's noise one weight at a
    time straight into its perturbed copy, and with sign noise turns each weight's gradient w.r.t. theta* into the
    copies' dot products as the backward produces it: one perturbed copy or theta* at a time, K packed signs (one bit
    per weight, a 64th of a float64 copy each), and a few of one weight's temporaries. Gaussian noise, redrawn in
    order, still needs the whole gradient w.r.t. theta*. Before, the lean path also held a whole float noise draw and,
    with sign noise, that gradient: 2.6 copies with sign noise and 4.1 with Gaussian noise (measured), over these
    bounds; with int8 signs, 1.81 copies with sign noise (1.25 now)."""
    params, lam, train_loss, meta_loss, square = deep_mlp_problem()
    peaks, estimates = {}, {}
    for lean in (False, True):
        torch.manual_seed(2)
        est = create_estimator("evograd", population=4, sigma=0.01, noise=noise, memory_lean=lean)
        with LiveTensorMeter(square // 8) as meter:
            estimates[lean] = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0]
        peaks[lean] = meter.peak_bytes / (8 * square)
    torch.testing.assert_close(estimates[True], estimates[False], rtol=1e-9, atol=0)
    assert estimates[True].norm() > 0
    assert peaks[False] >= 4, peaks  # K perturbed copies at least
    held = 1.0 + 4 / 64 if noise == "sign" else 2.0
    assert peaks[True] <= held + 3 / 8, peaks  # plus at most three of one square weight's temporaries


def test_evograd_meta_backward_leaves_the_callers_grads():
    """The sign path's meta backward accumulates into `.grad` of the meta-parameters: what they held is put back."""
    params, lam, train_loss, meta_loss, _ = deep_mlp_problem(layers=2, width=16)
    lam.grad = torch.full_like(lam, 7.0)
    est = create_estimator("evograd", population=2, sigma=0.01, memory_lean=True)
    (grad,) = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads
    assert torch.equal(lam.grad, torch.full_like(lam, 7.0)) and grad.norm() > 0


def test_evograd_noise_is_replayed_from_the_global_rng_and_differs_per_rank(monkeypatch):
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    est = create_estimator("evograd", population=2, sigma=0.05)
    torch.manual_seed(1)
    a = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0]
    torch.manual_seed(1)
    b = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0]
    assert torch.equal(a, b)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects, src: None)  # as if on rank 0
    torch.manual_seed(1)
    other_rank = est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0]
    assert not torch.equal(a, other_rank)
    torch.manual_seed(1)
    shared = create_estimator("evograd", population=2, sigma=0.05, per_rank_noise=False)
    assert torch.equal(shared.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0], a)
    with pytest.raises(ValueError, match="memory_lean"):
        create_estimator("evograd", memory_lean=1)


def test_evograd_memory_lean_draws_sign_noise_once_per_copy(monkeypatch):
    """Sign perturbations are kept as the packed bits they were drawn as between the lean path's passes instead of
    being drawn three times: one draw per copy, and still the default path's estimate."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    calls = []
    real = NoiseDraw.with_bits
    monkeypatch.setattr(NoiseDraw, "with_bits", lambda self, k: calls.append(k) or real(self, k))
    estimates = []
    for lean in (False, True):
        calls.clear()
        torch.manual_seed(3)
        est = create_estimator("evograd", population=4, sigma=0.05, memory_lean=lean)
        estimates.append(est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)).grads[0])
        assert calls == [0, 1, 2, 3]
    torch.testing.assert_close(estimates[1], estimates[0], rtol=1e-9, atol=1e-12)
    calls.clear()
    problem = HypergradientProblem(params, [lam], train_loss, meta_loss)
    create_estimator("evograd", population=4, sigma=0.05, noise="gaussian", memory_lean=True).estimate(problem)
    assert calls == [0, 1, 2, 3] * 3  # Gaussian noise is regenerated from its seed
