"""Hypergradient estimators behind one interface, chosen by name with [`create_estimator`]."""

from __future__ import annotations

import inspect
from typing import Any

from ._base import HypergradientEstimator, HypergradientResult
from .evograd import EvoGrad
from .first_order import FirstOrder
from .hyperdistill import HyperDistill
from .neumann import Neumann
from .reverse import ReverseMode
from .t1t2 import T1T2
from .t1t2_fd import T1T2FiniteDifference

ESTIMATORS: dict[str, type[HypergradientEstimator]] = {
    "evograd": EvoGrad,
    "t1t2": T1T2,
    "t1t2_fd": T1T2FiniteDifference,
    "first_order": FirstOrder,
    "neumann": Neumann,
    "reverse": ReverseMode,
    "hyperdistill": HyperDistill,
}


def create_estimator(name: str, **kwargs: Any) -> HypergradientEstimator:
    """Builds the estimator registered under `name` with its options.

    Args:
        name (`str`): one of `ESTIMATORS` (`"evograd"`, `"t1t2"`, `"t1t2_fd"`, `"first_order"`, `"neumann"`,
            `"reverse"`, `"hyperdistill"`).
        **kwargs: the estimator's options (for example `population`, `sigma` for EvoGrad).

    Raises:
        `ValueError`: for an unknown name or an option the estimator does not take or accept.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown hypergradient estimator {name!r}: choose one of {sorted(ESTIMATORS)}.")
    cls = ESTIMATORS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for hypergradient estimator {name!r}: it accepts {accepted or 'no options'}."
        )
    return cls(**kwargs)


__all__ = [
    "ESTIMATORS",
    "EvoGrad",
    "FirstOrder",
    "HypergradientEstimator",
    "HyperDistill",
    "HypergradientResult",
    "Neumann",
    "ReverseMode",
    "T1T2",
    "T1T2FiniteDifference",
    "create_estimator",
]
