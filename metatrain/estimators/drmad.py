"""DrMAD: reverse mode through a whole inner optimisation over a linearly interpolated trajectory."""

from __future__ import annotations

import collections
from typing import Any

import torch

from ._base import (
    HypergradientEstimator,
    HypergradientProblem,
    HypergradientResult,
    detached_copy,
)
from ._lookahead import sgd_lookahead
from ._reverse_pass import meta_gradients, reverse_pass

STATE_KEYS = ("start", "batches", "lrs")


class DrMAD(HypergradientEstimator):
    """DrMAD (Fu, Luo, Zhu, Liu, "DrMAD: Distilling Reverse-Mode Automatic Differentiation for Optimizing
    Hyperparameters of Deep Neural Networks", IJCAI 2016), as HyperDistill's Algorithm 2 states it: reverse-mode
    differentiation through every SGD step since the start of the inner optimisation, with the weights in between
    replaced by the straight line from the first weights `w_0` to the last `w_T`.

    The estimator remembers `w_0` (the weights at its first call after construction or [`~DrMAD.reset`]) and the
    training batch and step size of every call since. Call `t` takes the lookahead `w_t` of the current step as the
    last weights and returns `d L_meta(w_t) / d lambda + g^SO`, with `g^SO` from the backward pass over the `t`
    interpolated steps: `t` double backwards, `2t - 1` JVPs. With a straight trajectory (a constant training gradient)
    it is exact reverse mode; its first call is [`T1T2`]. The steps are replayed as plain SGD with the current
    meta-parameters.

    After `horizon` calls the next call starts a new trajectory (as `reset()` does), which bounds memory and time in a
    run without inner optimisations. The paper's baseline is offline: one hypergradient at the end of each inner
    optimisation of `T` steps (call `reset()` at each start; a meta step every `T` steps gives that use).

    Args:
        horizon (`int`, *optional*, defaults to 100):
            Calls after which the remembered trajectory restarts (the paper's inner optimisation length `T`).
    """

    name = "drmad"
    second_order = True

    def __init__(self, horizon: int = 100):
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"drmad option `horizon` must be an integer >= 1, got horizon={horizon!r}.")
        self.horizon = horizon
        self.reset()

    def reset(self) -> None:
        """Starts a new trajectory at the next call."""
        self._start: dict[str, torch.Tensor] | None = None
        self._batches: list[Any] = []
        self._lrs: list[float] = []

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        lr = self._check_lr(problem.lr)
        if len(self._batches) >= self.horizon:
            self.reset()
        if self._start is None:
            self._start = {k: w.detach().clone() for k, w in problem.params.items()}
        elif list(self._start) != list(problem.params):
            raise ValueError("DrMAD got weights with other names than at the start of its trajectory; call reset().")
        self._batches, self._lrs = [*self._batches, detached_copy(problem.train_batch)], [*self._lrs, lr]
        w_end = sgd_lookahead(problem.params, problem.train_loss, problem.train_batch, lr, create_graph=False)
        w_end = {k: w.detach() for k, w in w_end.items()}
        alpha, direct, loss = meta_gradients(problem, w_end)
        w_0 = {k: self._start[k].to(device=w.device, dtype=w.dtype) for k, w in w_end.items()}
        # the pass's last value holds g^SO over every step; earlier ones are dropped as it goes
        steps = reverse_pass(problem.train_loss, problem.meta_params, alpha, self._batches, self._lrs, w_0, w_end)
        (_, g_so) = collections.deque(steps, maxlen=1)[0]
        return HypergradientResult(tuple(d + g for d, g in zip(direct, g_so)), loss)

    def state_dict(self) -> dict[str, Any]:
        """The first weights of the trajectory and the batches and step sizes since."""
        return {
            "start": None if self._start is None else dict(self._start),
            "batches": list(self._batches),
            "lrs": list(self._lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.reset()
            return
        if sorted(state) != sorted(STATE_KEYS) or len(state["batches"]) != len(state["lrs"]):
            raise ValueError(
                f"DrMAD state must have the keys {sorted(STATE_KEYS)}, one lr per batch; got {sorted(state)}."
            )
        if len(state["batches"]) > self.horizon:
            raise ValueError(
                f"DrMAD state holds {len(state['batches'])} steps, more than horizon={self.horizon}: it was saved "
                "with a longer horizon."
            )
        self._start = None if state["start"] is None else dict(state["start"])
        self._batches, self._lrs = list(state["batches"]), [float(lr) for lr in state["lrs"]]
