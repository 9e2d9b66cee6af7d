"""The backward pass of reverse-mode differentiation through SGD steps, over stored or interpolated weights: shared by
DrMAD and HyperDistill's linear estimation (Algorithms 1, 2 and 4 of HyperDistill)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._base import HypergradientProblem, LossFn, ParamDict, grads_or_zeros, leaves
from ._hvp import gradient_vector_product


def meta_gradients(
    problem: HypergradientProblem, weights: ParamDict
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """`alpha = d L_meta / d w` (where a backward pass starts) and the direct term `d L_meta / d lambda` at
    `weights`, and the detached meta loss."""
    w = leaves(weights)
    loss = problem.meta_loss(w, problem.meta_batch)
    grads = grads_or_zeros(loss, [*w.values(), *problem.meta_params])
    return list(grads[: len(w)]), list(grads[len(w) :]), loss.detach()


def interpolated(w_0: ParamDict, w_end: ParamDict, t: int, steps: int) -> dict[str, torch.Tensor]:
    """DrMAD's `w^_t = (1 - t / T) w_0 + t / T w_T` (Algorithm 2, line 5)."""
    frac = t / steps
    return {k: (1 - frac) * w_0[k] + frac * w_end[k] for k in w_0}


def reverse_pass(
    train_loss: LossFn,
    meta_params: Sequence[torch.Tensor],
    alpha: Sequence[torch.Tensor],
    batches: Sequence[Any],
    lrs: Sequence[float],
    w_0: ParamDict,
    w_end: ParamDict,
    trajectory: Sequence[ParamDict] | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], list[torch.Tensor]]]:
    """Walks the SGD steps `w_t = w_{t-1} - lr_t d train_loss(w_{t-1}, D_t) / d w` from the last to the first,
    accumulating `g^SO += alpha B_t` and `alpha <- alpha A_t` with `A_t = I - lr_t H_t` and
    `B_t = -lr_t d^2 L / dw dlambda` (HyperDistill, Algorithm 1, lines 4-7).

    The weights `w_{t-1}` at which step `t`'s Jacobians are taken are `trajectory[t - 1]` when the trajectory is given
    (exact reverse mode), else DrMAD's interpolation between `w_0` and `w_end` (Algorithm 2).

    Yields, after each step `t = T, ..., 1`: the weights `w_{t-1}` used and `g^SO` over the last `T - t + 1` steps.
    The pass costs one double backward per step.
    """
    steps = len(batches)
    if len(lrs) != steps or (trajectory is not None and len(trajectory) != steps):
        raise ValueError(f"reverse_pass needs one step size (and weight) per batch, got {steps} batches.")
    names = list(w_0)
    alpha = list(alpha)
    g_so = [torch.zeros_like(m) for m in meta_params]
    for t in range(steps, 0, -1):
        w_prev = dict(trajectory[t - 1]) if trajectory is not None else interpolated(w_0, w_end, t - 1, steps)
        w_leaf = leaves(w_prev)
        grads = grads_or_zeros(train_loss(w_leaf, batches[t - 1]), list(w_leaf.values()), create_graph=True)
        products = gradient_vector_product(grads, [*w_leaf.values(), *meta_params], alpha)
        lr = lrs[t - 1]
        alpha = [a - lr * hv for a, hv in zip(alpha, products[: len(names)])]
        g_so = [g - lr * mv for g, mv in zip(g_so, products[len(names) :])]
        yield w_prev, g_so
