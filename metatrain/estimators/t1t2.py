"""Exact one-step lookahead hypergradient (T1-T2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import HypergradientEstimator, HypergradientResult, LossFn, ParamDict, grads_or_zeros
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

    def estimate(
        self,
        params: ParamDict,
        meta_params: Sequence[torch.Tensor],
        train_loss: LossFn,
        meta_loss: LossFn,
        train_batch: Any = None,
        meta_batch: Any = None,
        lr: float | None = None,
    ) -> HypergradientResult:
        lr = self._check_lr(lr)
        theta_next = sgd_lookahead(params, train_loss, train_batch, lr, create_graph=True)
        loss = meta_loss(theta_next, meta_batch)
        return HypergradientResult(grads_or_zeros(loss, meta_params), loss.detach())
