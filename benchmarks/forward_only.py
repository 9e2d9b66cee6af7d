"""EvoGrad without the meta backward pass, tried for issue 6 and kept out of the library: it did not hold up.

Through the softmax only the differences between `d L_meta / d w_k = grad L_meta(theta*) . theta_k` matter, and to
first order in `sigma` they are `L_meta(theta_k) - L_meta(theta*)`. So the meta loss is evaluated at every copy and
at `theta*` without a graph (K + 1 forward passes, no activations stored for the meta step, one perturbation held
at a time), and the hypergradient is `direct + sum_k (L_meta(theta_k) - L_meta(theta*)) d w_k / d lambda`. Exact
when the meta loss is linear in the weights; otherwise off by the curvature along `theta_k - theta*`, and by float32
rounding of loss differences of order `sigma`. Measured against the standard path in `docs/benchmarks.md`
(`benchmarks/evograd_forward_agreement.py`).

`register()` registers it as `"evograd_forward"` (`metatrain.estimators.register_estimator`), in the calling process
only.
"""

from __future__ import annotations

import torch

from metatrain.estimators import EvoGrad, HypergradientProblem, register_estimator
from metatrain.estimators.evograd_noise import NoiseDraw
from metatrain.estimators.functional import grads_or_zeros

NAME = "evograd_forward"


class ForwardOnlyEvoGrad(EvoGrad):
    """[`~metatrain.estimators.EvoGrad`] (same options; the memory-path options are ignored: it always takes this
    class's `_estimate`) with the meta backward pass replaced by K + 1 forward passes."""

    name = NAME

    @property
    def path(self) -> str:
        return "all_at_once"

    def _estimate(self, problem: HypergradientProblem, draw: NoiseDraw):
        """No meta backward: `d L_meta / d lambda = direct + sum_k (L_meta(theta_k) - L_meta(theta*)) d w_k / d lambda`
        (the softmax weights sum to one, so the baseline `L_meta(theta*)` only removes the common part). Returns
        `(direct, indirect, meta loss)`, as EvoGrad's own paths."""
        theta, names, meta_params = draw.theta, draw.names, problem.meta_params
        losses, meta_losses = [], []
        for k in range(self.population):
            eps = draw.perturbation(k)
            copy = {**theta, **{n: theta[n] + e for n, e in eps.items()}}
            # the training loss with a loss weighter's input held at theta, as EvoGrad's own paths score the copies
            losses.append(problem.held_train_loss(copy).reshape(()))
            with torch.no_grad():
                meta_losses.append(problem.meta_loss(copy, problem.meta_batch).reshape(()))
            del eps, copy
        weights = self._softmax_weights(torch.stack(losses))
        moved = {name: theta[name].clone() for name in names}
        for k, w in enumerate(weights.detach().tolist()):
            eps = draw.perturbation(k)
            torch._foreach_add_([moved[n] for n in names], [eps[n] for n in names], alpha=w)
            del eps
        # grad mode stays on: a meta loss that depends on lambda directly keeps (only) that graph
        loss = problem.meta_loss({**theta, **moved}, problem.meta_batch).reshape(())
        differences = torch.stack(meta_losses).to(weights.dtype) - loss.detach().to(weights.dtype)
        surrogate = (weights * differences).sum()
        through_weights = grads_or_zeros(surrogate, meta_params)
        direct = grads_or_zeros(loss, meta_params)
        return direct, tuple(b.to(a.dtype) for a, b in zip(direct, through_weights)), loss.detach()


def register() -> None:
    """Makes `hypergradient="evograd_forward"` available to `MetaTrainer` in this process."""
    register_estimator(NAME, ForwardOnlyEvoGrad, overwrite=True)
