"""Vector-Jacobian products of a differentiable gradient: Hessian-vector and mixed second-derivative products."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gradient_vector_product(
    grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """`d (sum_i <grads_i, vectors_i>) / d inputs`, keeping the graph so it can be called again.

    With `grads = d L / d theta` built with `create_graph=True`, `inputs = theta` gives the Hessian-vector product
    `H v`, and `inputs = lambda` the mixed product `d^2 L / d lambda d theta . v`. Inputs the gradients do not depend
    on get zeros.
    """
    connected = [(g, v) for g, v in zip(grads, vectors) if g.requires_grad]
    if not connected:
        return tuple(torch.zeros_like(x) for x in inputs)
    outputs, grad_outputs = zip(*connected)
    products = torch.autograd.grad(outputs, list(inputs), grad_outputs, retain_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(x) if p is None else p for x, p in zip(inputs, products))
