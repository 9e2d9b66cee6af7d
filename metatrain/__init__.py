"""metatrain: gradient-based meta-learning and hyperparameter optimization inside HuggingFace training."""

from __future__ import annotations

from .estimators import ESTIMATORS, HypergradientEstimator, create_estimator

__version__ = "0.1.0"

__all__ = ["ESTIMATORS", "HypergradientEstimator", "__version__", "create_estimator"]
