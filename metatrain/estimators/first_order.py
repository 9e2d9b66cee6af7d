"""First-order hypergradient: the direct term only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import HypergradientEstimator, HypergradientResult, LossFn, ParamDict, grads_or_zeros


class FirstOrder(HypergradientEstimator):
    """Only the direct term `d meta_loss(theta, lambda) / d lambda` at the current weights.

    The indirect term through the base weights is dropped. When the meta loss does not depend on `lambda`
    directly (a loss-weighting net, a regularizer used only in training), this estimate is exactly zero and
    the meta-parameters do not move. It is the "FO" baseline of HyperDistill (Lee et al., ICLR 2022).
    """

    name = "first_order"

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
        loss = meta_loss({name: p.detach() for name, p in params.items()}, meta_batch)
        return HypergradientResult(grads_or_zeros(loss, meta_params), loss.detach())
