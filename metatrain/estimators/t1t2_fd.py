"""One-step lookahead hypergradient with a finite-difference mixed second derivative (DARTS)."""

from __future__ import annotations

from typing import Any

import torch

from ._base import HypergradientEstimator, HypergradientProblem, HypergradientResult, ParamDict, grads_or_zeros, leaves
from ._lookahead import sgd_lookahead


class T1T2FiniteDifference(HypergradientEstimator):
    """The one-step lookahead hypergradient of [`T1T2`] with its second-order term replaced by a central finite
    difference, as in DARTS (Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR 2019, Eq. 7-8).

    With `theta' = theta - lr * grad_theta L_train(theta, lambda)` (no graph kept) and `v = grad_theta' L_meta`,

        `hypergradient = d L_meta(theta') / d lambda - lr * (g(theta + r v) - g(theta - r v)) / (2 r)`,

    where `g(w) = grad_lambda L_train(w, lambda)` and `r = epsilon / ||v||`. The finite difference replaces the
    Hessian-vector product `d^2 L_train / d lambda d theta . v` of the exact lookahead: two extra training-loss
    gradients w.r.t. `lambda`, first order only, no second-order graph. Its error is `O(r^2)` (exact for losses
    quadratic in `theta`).

    Args:
        epsilon (`float`, *optional*, defaults to 0.01):
            Size of the finite-difference step along `v`, relative to `||v||` (DARTS' value).
    """

    name = "t1t2_fd"
    uses_held_train_loss = True

    def __init__(self, epsilon: float = 0.01):
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError(f"t1t2_fd option `epsilon` must be a number > 0, got epsilon={epsilon!r}.")
        self.epsilon = float(epsilon)

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        lr, meta_params = self._check_lr(problem.lr), problem.meta_params

        def held_train_loss(weights: ParamDict, _batch: Any) -> torch.Tensor:
            # the lookahead from theta, like the shifted evaluations below, holds a loss weighter's input at theta
            return problem.held_train_loss(weights)

        stepped = sgd_lookahead(problem.params, held_train_loss, problem.train_batch, lr, create_graph=False)
        theta_next = leaves(stepped)
        loss = problem.meta_loss(theta_next, problem.meta_batch)
        grads = grads_or_zeros(loss, [*theta_next.values(), *meta_params])
        v, direct = grads[: len(theta_next)], grads[len(theta_next) :]
        v_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in v]))
        if lr == 0 or v_norm == 0:
            return HypergradientResult(direct, loss.detach())
        r = self.epsilon / v_norm.item()
        theta = {name: p.detach() for name, p in problem.params.items()}

        def train_grad(sign: float) -> tuple[torch.Tensor, ...]:
            shifted = {name: p + sign * r * g for (name, p), g in zip(theta.items(), v)}
            return grads_or_zeros(problem.held_train_loss(shifted), meta_params)

        plus, minus = train_grad(1.0), train_grad(-1.0)
        hyper = tuple(d - lr * (gp - gm) / (2 * r) for d, gp, gm in zip(direct, plus, minus))
        return HypergradientResult(hyper, loss.detach())
