"""Implicit-function-theorem hypergradient with a truncated Neumann series for the inverse Hessian."""

from __future__ import annotations

from ._base import HypergradientEstimator, HypergradientProblem, HypergradientResult, grads_or_zeros, leaves
from ._hvp import gradient_vector_product


class Neumann(HypergradientEstimator):
    """Implicit-function-theorem (IFT) hypergradient with the inverse Hessian approximated by a truncated Neumann
    series (Lorraine, Vicol, Duvenaud, "Optimizing Millions of Hyperparameters by Implicit Differentiation",
    AISTATS 2020, Algorithms 2-3; the "N.IFT" baseline of HyperDistill).

    Treating the current weights as a minimiser of the training loss, `d theta* / d lambda = -H^-1 d^2 L_train /
    d theta d lambda`, so

        `hypergradient = d L_meta / d lambda - (d^2 L_train / d lambda d theta) . p`,   `p ~= H^-1 grad_theta L_meta`,

    with `p = alpha * sum_{j=0}^{J} (I - alpha H)^j grad_theta L_meta` (`J = terms`): one Hessian-vector product per
    term and one mixed product, all through one second-order graph of the training loss. The series converges to
    `H^-1 v` for a positive definite Hessian when `alpha < 2 / lambda_max(H)`.

    Args:
        terms (`int`, *optional*, defaults to 10):
            Number of Neumann terms `J` (Hessian-vector products); 0 gives `p = alpha * grad_theta L_meta`, which is
            the one-step lookahead with step `alpha` up to its second-order terms.
        alpha (`float`, *optional*):
            Step size of the series. Defaults to the inner step size `lr` of each call.
    """

    name = "neumann"
    second_order = True

    def __init__(self, terms: int = 10, alpha: float | None = None):
        if isinstance(terms, bool) or not isinstance(terms, int) or terms < 0:
            raise ValueError(f"neumann option `terms` must be an integer >= 0, got terms={terms!r}.")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
            raise ValueError(f"neumann option `alpha` must be a number > 0 or None (the lr), got alpha={alpha!r}.")
        self.terms = terms
        self.alpha = None if alpha is None else float(alpha)

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        alpha = self.alpha if self.alpha is not None else self._check_lr(problem.lr)
        meta_params = problem.meta_params
        theta = leaves(problem.params)
        weights = list(theta.values())
        loss = problem.meta_loss(theta, problem.meta_batch)
        grads = grads_or_zeros(loss, [*weights, *meta_params])
        v, direct = grads[: len(weights)], grads[len(weights) :]
        train_grads = grads_or_zeros(problem.train_loss(theta, problem.train_batch), weights, create_graph=True)
        term, series = list(v), list(v)
        for _ in range(self.terms):
            hessian_term = gradient_vector_product(train_grads, weights, term)
            term = [t - alpha * h for t, h in zip(term, hessian_term)]
            series = [s + t for s, t in zip(series, term)]
        p = [alpha * s for s in series]
        indirect = gradient_vector_product(train_grads, meta_params, p)
        return HypergradientResult(tuple(d - i for d, i in zip(direct, indirect)), loss.detach())
