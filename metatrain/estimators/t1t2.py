"""Exact one-step lookahead hypergradient (T1-T2)."""

from __future__ import annotations

from ._base import HypergradientEstimator, HypergradientProblem, HypergradientResult, grads_or_zeros
from ._lookahead import sgd_lookahead


class T1T2(HypergradientEstimator):
    """One-step lookahead: differentiate the meta loss through one plain SGD step of the base weights.

    `theta' = theta - lr * d train_loss(theta, lambda) / d theta` is built with `create_graph=True`, and the
    hypergradient is `d meta_loss(theta') / d lambda`, exact second order through that step (Luketina et al.,
    "Scalable Gradient-Based Tuning of Continuous Regularization Hyperparameters", ICML 2016; the lookahead used
    by Meta-Weight-Net and MetaXL). Plain SGD, no momentum, at the current learning rate.
    """

    name = "t1t2"
    second_order = True

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        lr = self._check_lr(problem.lr)
        theta_next = sgd_lookahead(problem.params, problem.train_loss, problem.train_batch, lr, create_graph=True)
        loss = problem.meta_loss(theta_next, problem.meta_batch)
        return HypergradientResult(grads_or_zeros(loss, problem.meta_params), loss.detach())
