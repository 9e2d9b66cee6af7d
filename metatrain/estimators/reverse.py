"""Exact reverse-mode hypergradient through the last few real SGD steps: the reference for the other estimators."""

from __future__ import annotations

from typing import Any

import torch

from ._base import HypergradientEstimator, HypergradientProblem, HypergradientResult, detached_copy, grads_or_zeros
from ._lookahead import sgd_unroll


class ReverseMode(HypergradientEstimator):
    """Reverse-mode differentiation (RMD) through the last `horizon` SGD steps of the real training trajectory
    (Maclaurin, Duvenaud, Adams, "Gradient-based Hyperparameter Optimization through Reversible Learning",
    ICML 2015; the exact "RMD" reference of HyperDistill, Sec. 3).

    The estimator remembers the weights, training batch and step size of its previous `horizon - 1` calls. At each
    call it restarts from the oldest remembered weights, replays the remembered steps and the current one as plain
    SGD with the current meta-parameters, keeping the full second-order graph, and differentiates the meta loss at
    the end: `d L_meta(theta_{t+1}(lambda)) / d lambda` through `horizon` steps. `horizon=1` is [`T1T2`]. Until
    `horizon - 1` calls have been seen it uses as many steps as it has.

    The replay matches the real run when the base optimizer is plain SGD at the remembered learning rates and the
    meta-parameters did not move in between (they do; the replay uses their current value, which is what
    "differentiating through the last steps" means online). Memory and time grow linearly with `horizon`: it is
    meant for short horizons, as a reference.

    Args:
        horizon (`int`, *optional*, defaults to 3):
            Number of SGD steps differentiated through.
    """

    name = "reverse"
    second_order = True

    def __init__(self, horizon: int = 3):
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"reverse option `horizon` must be an integer >= 1, got horizon={horizon!r}.")
        self.horizon = horizon
        self._history: list[tuple[dict[str, torch.Tensor], Any, float]] = []

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        lr = self._check_lr(problem.lr)
        current = (detached_copy(dict(problem.params)), detached_copy(problem.train_batch), lr)
        steps = [*self._history, current]
        start = steps[0][0]
        final = sgd_unroll(start, problem.train_loss, [s[1] for s in steps], [s[2] for s in steps], create_graph=True)
        loss = problem.meta_loss(final, problem.meta_batch)
        grads = grads_or_zeros(loss, problem.meta_params)
        self._history = steps[1:] if len(steps) == self.horizon else steps
        return HypergradientResult(grads, loss.detach())

    def reset(self) -> None:
        """Forgets the remembered steps: the next call differentiates through its own step only."""
        self._history = []

    def state_dict(self) -> dict[str, Any]:
        """The remembered weights, batches and step sizes of the previous `horizon - 1` calls."""
        return {"history": [(dict(p), b, lr) for p, b, lr in self._history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = list(state.get("history", []))
        if len(history) >= self.horizon:
            raise ValueError(
                f"reverse state holds {len(history)} remembered steps, more than horizon - 1 = {self.horizon - 1}: "
                "it was saved with a longer horizon."
            )
        self._history = [(dict(p), b, float(lr)) for p, b, lr in history]
