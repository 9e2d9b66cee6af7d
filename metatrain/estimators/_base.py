"""The interface every hypergradient estimator implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ParamDict = Mapping[str, torch.Tensor]
LossFn = Callable[[ParamDict, Any], torch.Tensor]


@dataclass
class HypergradientResult:
    """What one hypergradient estimate returns.

    Args:
        grads (`tuple[torch.Tensor, ...]`): one tensor per meta-parameter, shaped like it.
        meta_loss (`torch.Tensor`): the detached meta (validation) loss the estimate differentiated.
    """

    grads: tuple[torch.Tensor, ...]
    meta_loss: torch.Tensor


class HypergradientEstimator:
    """Base class of hypergradient estimators.

    An estimator sees the base weights `theta` as a dict of tensors (constants: it never changes them), the
    meta-parameters `lambda` as a list of leaf tensors with `requires_grad=True`, and two losses written as
    functions of a weight dict and a batch. It returns `d meta_loss / d lambda` without touching any `.grad`.

    Subclasses implement [`~HypergradientEstimator.estimate`] and validate their options in `__init__`,
    raising `ValueError` that names the option.
    """

    name: str = ""
    # True for estimators that evaluate the training loss at perturbed copies of the weights (EvoGrad, finite
    # differences): inputs that autograd estimators treat as detached constants (a loss weighter's per-sample losses)
    # must then be held at their value at the unperturbed weights, which the caller provides
    perturbs_weights: bool = False
    # True for estimators that differentiate through a gradient (a second-order graph): fused attention kernels have
    # no double backward, so `MetaTrainer` runs their meta step on the math backend of scaled_dot_product_attention
    second_order: bool = False

    def __init__(self) -> None:
        """Estimators without options take none; subclasses declare theirs as keyword arguments."""

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
        """Estimates `d meta_loss / d meta_params`.

        Args:
            params (`Mapping[str, torch.Tensor]`):
                Base weights `theta`, treated as constants.
            meta_params (`Sequence[torch.Tensor]`):
                Meta-parameters `lambda`, leaf tensors with `requires_grad=True`.
            train_loss (`Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]`):
                Scalar training loss of a weight dict and `train_batch`; depends on `meta_params`.
            meta_loss (`Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]`):
                Scalar meta (validation) loss of a weight dict and `meta_batch`.
            train_batch (`Any`, *optional*): passed to `train_loss`.
            meta_batch (`Any`, *optional*): passed to `meta_loss`.
            lr (`float`, *optional*): inner step size, required by lookahead estimators.

        Returns:
            [`HypergradientResult`]: one gradient per meta-parameter (shaped like it) and the detached meta loss.
        """
        raise NotImplementedError

    def hypergradient(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """Removed: one spelling of the call is kept, `estimate(...)`, whose result holds the gradients (`.grads`)."""
        raise AttributeError(
            f"{type(self).__name__}.hypergradient(...) was removed: call `estimate(...)` with the same arguments and "
            "take `.grads` of its result."
        )

    @property
    def stateful(self) -> bool:
        """Whether the estimator keeps state across calls (it overrides [`~HypergradientEstimator.state_dict`])."""
        return type(self).state_dict is not HypergradientEstimator.state_dict

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint; stateless estimators return an empty dict. `MetaTrainer` also takes it before each
        estimate and loads it back when the meta step is skipped (a non-finite hypergradient), so that the skipped
        call leaves no trace: it must be a snapshot, which later calls replace rather than change in place."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}.")

    def _check_lr(self, lr: float | None) -> float:
        """The inner step size; 0 is valid (a learning-rate warmup starts there: the lookahead is then theta)."""
        if lr is None or not lr >= 0:
            raise ValueError(f"The `{self.name}` estimator needs the inner step size `lr` >= 0, got lr={lr!r}.")
        return float(lr)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def grads_or_zeros(output: torch.Tensor, inputs: Sequence[torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """`torch.autograd.grad` that returns zeros for inputs the output does not depend on."""
    if not output.requires_grad:
        return tuple(torch.zeros_like(x) for x in inputs)
    grads = torch.autograd.grad(output, list(inputs), allow_unused=True, **kwargs)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


def detached_copy(value: Any) -> Any:
    """`value` with every tensor detached and copied (nested mappings, lists, tuples and named tuples kept; mappings
    come back as dicts), so that a batch or weights the caller later changes in place do not change a remembered
    copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: detached_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [detached_copy(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def leaves(params: ParamDict) -> dict[str, torch.Tensor]:
    """Detached copies of `params` that require grad, to differentiate the training loss w.r.t. `theta`."""
    return {name: p.detach().requires_grad_(True) for name, p in params.items()}
