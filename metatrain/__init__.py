"""metatrain: gradient-based meta-learning and hyperparameter optimization inside HuggingFace training."""

from __future__ import annotations

from .estimators import ESTIMATORS, HypergradientEstimator, create_estimator, register_estimator
from .trainer import MetaTrainer, PerSampleLossTrainer
from .training_args import MetaTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "register_estimator",
    "HypergradientEstimator",
    "MetaTrainer",
    "MetaTrainingArguments",
    "PerSampleLossTrainer",
    "__version__",
    "create_estimator",
]
