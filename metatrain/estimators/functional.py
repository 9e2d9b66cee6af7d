"""The pieces estimators are built from, public for writing your own: the types of weights and losses, gradients
that are zero where unused, the differentiable SGD step and unroll, and gradient-vector products (Hessian-vector and
mixed second-derivative products). Subclass [`~metatrain.estimators.HypergradientEstimator`], implement `estimate`,
and [`~metatrain.estimators.register_estimator`] it, or pass an instance to `MetaTrainer(estimator=...)`."""

from __future__ import annotations

from ._base import HypergradientProblem, LossFn, ParamDict, detached_copy, grads_or_zeros, leaves
from ._hvp import gradient_vector_product
from ._lookahead import sgd_lookahead, sgd_unroll

__all__ = [
    "HypergradientProblem",
    "LossFn",
    "ParamDict",
    "detached_copy",
    "grads_or_zeros",
    "gradient_vector_product",
    "leaves",
    "sgd_lookahead",
    "sgd_unroll",
]
