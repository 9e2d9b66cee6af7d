"""Differentiable SGD steps shared by the lookahead estimators (T1-T2, its finite-difference form, reverse mode,
HyperDistill)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import LossFn, ParamDict, grads_or_zeros, leaves


def sgd_unroll(
    params: ParamDict, train_loss: LossFn, train_batches: Sequence[Any], lrs: Sequence[float], create_graph: bool
) -> dict[str, torch.Tensor]:
    """Runs plain SGD steps `theta <- theta - lr_t * d train_loss(theta, batch_t) / d theta` from `params`.

    The start `params` is treated as a constant. With `create_graph=True` the result stays differentiable w.r.t. the
    meta-parameters that `train_loss` depends on, through every step (reverse-mode differentiation of the unroll).

    Args:
        params (`Mapping[str, torch.Tensor]`): the starting weights.
        train_loss (`Callable`): the training loss of a weight dict and a batch.
        train_batches (`Sequence`): one batch per step.
        lrs (`Sequence[float]`): one step size per step.
        create_graph (`bool`): whether to keep the graph through the gradients (second order).

    Returns:
        `dict[str, torch.Tensor]`: the weights after the last step.
    """
    if len(train_batches) != len(lrs):
        raise ValueError(f"sgd_unroll needs one lr per batch, got {len(train_batches)} batches and {len(lrs)} lrs.")
    theta = leaves(params)
    for batch, lr in zip(train_batches, lrs):
        grads = grads_or_zeros(train_loss(theta, batch), list(theta.values()), create_graph=create_graph)
        theta = {name: p - lr * g for (name, p), g in zip(theta.items(), grads)}
    return theta


def sgd_lookahead(
    params: ParamDict, train_loss: LossFn, train_batch: Any, lr: float, create_graph: bool
) -> dict[str, torch.Tensor]:
    """Returns `theta' = theta - lr * d train_loss / d theta` as a dict (one step of [`sgd_unroll`]).

    With `create_graph=True` the result stays differentiable w.r.t. the meta-parameters that `train_loss` depends on
    (through the gradient), which is what the exact one-step hypergradient needs.
    """
    return sgd_unroll(params, train_loss, [train_batch], [lr], create_graph)
