"""Hypergradient estimators behind one interface, chosen by name with [`create_estimator`]; add your own with
[`register_estimator`] (the pieces an estimator is built from are in [`metatrain.estimators.functional`])."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ._base import HypergradientEstimator, HypergradientProblem, HypergradientResult
from .drmad import DrMAD
from .evograd import EvoGrad
from .first_order import FirstOrder
from .hyperdistill import HyperDistill
from .neumann import Neumann
from .reverse import ReverseMode
from .t1t2 import T1T2
from .t1t2_fd import T1T2FiniteDifference

_REGISTRY: dict[str, type[HypergradientEstimator]] = {
    "evograd": EvoGrad,
    "t1t2": T1T2,
    "t1t2_fd": T1T2FiniteDifference,
    "first_order": FirstOrder,
    "neumann": Neumann,
    "reverse": ReverseMode,
    "hyperdistill": HyperDistill,
    "drmad": DrMAD,
}
# the registered estimators by name, read only: add one with `register_estimator`
ESTIMATORS: Mapping[str, type[HypergradientEstimator]] = MappingProxyType(_REGISTRY)


def register_estimator(name: str, cls: type[HypergradientEstimator], overwrite: bool = False) -> None:
    """Registers an estimator class under `name`, for `create_estimator(name)` and
    `MetaTrainingArguments(hypergradient=name)` (register it before building the arguments).

    Args:
        name (`str`): the name to choose it by.
        cls (`type[HypergradientEstimator]`): a subclass of [`HypergradientEstimator`] implementing `estimate`.
        overwrite (`bool`, *optional*, defaults to `False`): replace an estimator already registered under `name`.

    Raises:
        `ValueError`: for a class that is not a `HypergradientEstimator` subclass, or a name already taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, HypergradientEstimator)):
        raise ValueError(
            f"register_estimator({name!r}, {cls!r}): the class must subclass "
            "`metatrain.estimators.HypergradientEstimator` and implement `estimate`."
        )
    if name in _REGISTRY and _REGISTRY[name] is not cls and not overwrite:
        raise ValueError(
            f"An estimator is already registered as {name!r} ({_REGISTRY[name].__name__}): choose another name, or "
            "pass `overwrite=True` to replace it."
        )
    _REGISTRY[name] = cls


def unregister_estimator(name: str) -> None:
    """Removes the estimator registered under `name` (one added with [`register_estimator`])."""
    if name not in _REGISTRY:
        raise ValueError(f"No estimator is registered as {name!r}: registered are {sorted(_REGISTRY)}.")
    del _REGISTRY[name]


def create_estimator(name: str, **kwargs: Any) -> HypergradientEstimator:
    """Builds the estimator registered under `name` with its options.

    Args:
        name (`str`): one of `ESTIMATORS` (`"evograd"`, `"t1t2"`, `"t1t2_fd"`, `"first_order"`, `"neumann"`,
            `"reverse"`, `"hyperdistill"`, `"drmad"`, and any added with [`register_estimator`]).
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
    "DrMAD",
    "EvoGrad",
    "FirstOrder",
    "HypergradientEstimator",
    "HyperDistill",
    "HypergradientProblem",
    "HypergradientResult",
    "Neumann",
    "ReverseMode",
    "T1T2",
    "T1T2FiniteDifference",
    "create_estimator",
    "register_estimator",
    "unregister_estimator",
]
