"""DrMAD against exact reverse mode: equal where the trajectory is a straight line, and its backward pass equal to
reverse mode when given the true weights."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import WeightedMLP
from torch import nn
from torch.func import functional_call

from metatrain.estimators import DrMAD, HypergradientProblem, create_estimator
from metatrain.estimators._reverse_pass import reverse_pass
from metatrain.estimators.functional import grads_or_zeros, leaves, sgd_unroll
from metatrain.estimators.t1t2 import T1T2


def straight_line_problem():
    """`L = l1 w1 + l2 w2^2 (1 + w1^2) / 2 + 3 l3 w2` at `l3 = 0` from `w2 = 0`: the training gradient is `(l1, 0)`
    all along the trajectory, which is a straight line, but the curvature `l2 (1 + w1^2)` in `w2` changes along it
    and the meta loss depends on `w2`, so the interpolated Jacobians must be taken at the right points."""
    lam = torch.tensor([0.5, 0.8, 0.0], dtype=torch.float64, requires_grad=True)

    def train_loss(p, batch):
        w1, w2 = p["w"][0], p["w"][1]
        return lam[0] * w1 + 0.5 * lam[1] * w2**2 * (1 + w1**2) + 3 * lam[2] * w2

    def meta_loss(p, batch):
        return (p["w"][0] + 0.3) ** 2 + (p["w"][1] - 1.0) ** 2 + 0.1 * lam[0] ** 2

    return lam, train_loss, meta_loss


def exact(start, lam, train_loss, meta_loss, batches, lrs, meta_batch=None):
    end = sgd_unroll(start, train_loss, batches, lrs, create_graph=True)
    return torch.autograd.grad(meta_loss(end, meta_batch), [lam])


def test_exact_reverse_mode_on_a_straight_trajectory():
    lam, train_loss, meta_loss = straight_line_problem()
    start, lr, steps = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}, 0.2, 12
    est, weights = DrMAD(horizon=steps), start
    for t in range(1, steps + 1):
        got = est.estimate(HypergradientProblem(weights, [lam], train_loss, meta_loss, None, None, lr)).grads
        (reference,) = exact(start, lam, train_loss, meta_loss, [None] * t, [lr] * t)
        torch.testing.assert_close(got[0], reference, rtol=1e-10, atol=1e-12)
        assert reference[2].abs() > 0.1  # the curvature-dependent part is there
        weights = {"w": sgd_unroll(weights, train_loss, [None], [lr], create_graph=False)["w"].detach()}
    # the same start with a step size that changes is no straight line in t: DrMAD is then an approximation
    est, weights, lrs = DrMAD(), start, [0.05, 0.4, 0.1, 0.3]
    for lr in lrs:
        got = est.estimate(HypergradientProblem(weights, [lam], train_loss, meta_loss, None, None, lr)).grads
        weights = {"w": sgd_unroll(weights, train_loss, [None], [lr], create_graph=False)["w"].detach()}
    (reference,) = exact(start, lam, train_loss, meta_loss, [None] * 4, lrs)
    assert (got[0] - reference).abs().max() > 1e-4


def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = WeightedMLP().double()
    logits = torch.randn(40, dtype=torch.float64, requires_grad=True)

    def train_loss(p, batch):
        per_example = nn.functional.cross_entropy(
            functional_call(model, p, (batch["x"],)), batch["y"], reduction="none"
        )
        return (torch.sigmoid(logits[batch["idx"]]) * per_example).mean()

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, p, (batch[0],)), batch[1])

    gen = torch.Generator().manual_seed(seed)
    batches = [
        {"x": torch.randn(8, 4, generator=gen, dtype=torch.float64), "y": torch.randint(0, 3, (8,), generator=gen),
         "idx": torch.randperm(40, generator=gen)[:8]}
        for _ in range(6)
    ]  # fmt: skip
    meta = (torch.randn(10, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen))
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    return logits, train_loss, meta_loss, batches, meta, start


def test_backward_pass_over_the_true_weights_is_exact_reverse_mode():
    """The shared backward pass (Algorithm 1) over the stored trajectory equals autograd through the unroll on a
    nonlinear problem; over the interpolated one (DrMAD) it does not."""
    lam, train_loss, meta_loss, batches, meta, start = mlp_problem()
    lrs = [0.5, 0.4, 0.6, 0.5, 0.3, 0.5]
    trajectory, weights = [], start
    for batch, lr in zip(batches, lrs):
        trajectory.append(weights)
        weights = {k: w.detach() for k, w in sgd_unroll(weights, train_loss, [batch], [lr], False).items()}
    end = leaves(weights)
    alpha = grads_or_zeros(meta_loss(end, meta), list(end.values()))
    for given, matches in ((trajectory, True), (None, False)):
        steps = list(reverse_pass(train_loss, [lam], alpha, batches, lrs, start, weights, trajectory=given))
        g_so = steps[-1][1]
        (reference,) = exact(start, lam, train_loss, meta_loss, batches, lrs, meta)
        assert torch.allclose(g_so[0], reference, rtol=1e-9, atol=1e-12) == matches


def test_first_call_is_t1t2_and_the_trajectory_restarts_after_horizon():
    lam, train_loss, meta_loss, batches, meta, start = mlp_problem()
    est, weights = DrMAD(horizon=2), start
    for t, batch in enumerate(batches[:3], start=1):
        problem = HypergradientProblem(weights, [lam], train_loss, meta_loss, batch, meta, 0.5)
        got, one_step = est.estimate(problem).grads, T1T2().estimate(problem).grads
        assert torch.allclose(got[0], one_step[0], rtol=1e-10, atol=1e-13) == (t != 2)
        weights = {k: w.detach() for k, w in sgd_unroll(weights, train_loss, [batch], [0.5], False).items()}
    assert len(est.state_dict()["batches"]) == 1


def test_state_dict_round_trip_and_bad_input():
    lam, train_loss, meta_loss, batches, meta, start = mlp_problem()
    est = create_estimator("drmad", horizon=5)
    problems = [HypergradientProblem(start, [lam], train_loss, meta_loss, b, meta, 0.5) for b in batches]
    for problem in problems[:3]:
        est.estimate(problem)
    buffer = io.BytesIO()
    torch.save(est.state_dict(), buffer)
    buffer.seek(0)
    resumed = DrMAD(horizon=5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(est.estimate(problems[3]).grads[0], resumed.estimate(problems[3]).grads[0])
    with pytest.raises(ValueError, match="longer horizon"):
        DrMAD(horizon=2).load_state_dict(est.state_dict())
    with pytest.raises(ValueError, match="horizon"):
        DrMAD(horizon=0)
    with pytest.raises(ValueError, match="lr"):
        DrMAD().estimate(HypergradientProblem(start, [lam], train_loss, meta_loss, batches[0], meta))
