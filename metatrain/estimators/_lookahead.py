"""The one-step SGD lookahead shared by lookahead estimators."""

from __future__ import annotations

from typing import Any

import torch

from ._base import LossFn, ParamDict, grads_or_zeros, leaves


def sgd_lookahead(
    params: ParamDict, train_loss: LossFn, train_batch: Any, lr: float, create_graph: bool
) -> dict[str, torch.Tensor]:
    """Returns `theta' = theta - lr * d train_loss / d theta` as a dict.

    With `create_graph=True` the result stays differentiable w.r.t. the meta-parameters that `train_loss`
    depends on (through the gradient), which is what the exact one-step hypergradient needs.
    """
    theta = leaves(params)
    loss = train_loss(theta, train_batch)
    grads = grads_or_zeros(loss, list(theta.values()), create_graph=create_graph)
    return {name: p - lr * g for (name, p), g in zip(theta.items(), grads)}
