"""First-order hypergradient: the direct term only."""

from __future__ import annotations

from ._base import HypergradientEstimator, HypergradientProblem, HypergradientResult, grads_or_zeros


class FirstOrder(HypergradientEstimator):
    """Only the direct term `d meta_loss(theta, lambda) / d lambda` at the current weights.

    The indirect term through the base weights is dropped. When the meta loss does not depend on `lambda`
    directly (a loss-weighting net, a regularizer used only in training), this estimate is exactly zero and
    the meta-parameters do not move. It is the "FO" baseline of HyperDistill (Lee et al., ICLR 2022).
    """

    name = "first_order"

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        loss = problem.meta_loss({name: p.detach() for name, p in problem.params.items()}, problem.meta_batch)
        return HypergradientResult(grads_or_zeros(loss, problem.meta_params), loss.detach())
