"""The interface every hypergradient estimator implements."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ParamDict = Mapping[str, torch.Tensor]
LossFn = Callable[[ParamDict, Any], torch.Tensor]


@dataclass(frozen=True)
class HypergradientProblem:
    """What an estimator differentiates: the one argument of [`~HypergradientEstimator.estimate`].

    Args:
        params (`Mapping[str, torch.Tensor]`): the base weights `theta`, treated as constants.
        meta_params (`Sequence[torch.Tensor]`): the meta-parameters `lambda`, leaves with `requires_grad=True`.
        train_loss (`Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]`):
            The scalar training loss of a weight dict and a batch; depends on `meta_params`.
        meta_loss (`Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]`):
            The scalar meta (validation) loss of a weight dict and a batch.
        train_batch (`Any`, *optional*): the current training batch.
        meta_batch (`Any`, *optional*): the meta batch.
        lr (`float`, *optional*): the inner step size, required by lookahead estimators.
        held_train_loss (`Callable[[Mapping[str, torch.Tensor]], torch.Tensor]`, *optional*):
            The training loss of `train_batch` at weights near `params`, with the inputs that stand for the current
            weights (a loss weighter's per-example losses) held at their values at `params`. Estimators that evaluate
            `train_batch` at perturbed weights (EvoGrad, `t1t2_fd`) call it instead of `train_loss`, so that they
            target the objective the autograd estimators differentiate. [`~metatrain.objective.MetaObjective.problem`]
            builds it; defaults to `train_loss(weights, train_batch)`.
        train_batches (`Callable[[int], Sequence[Any]]`, *optional*):
            Draws that many fresh training batches of the current task, for estimators that roll out a trajectory
            of their own (HyperDistill's linear estimation, Algorithm 4). `MetaTrainer` draws them from the
            training set in an order of their own, which is part of its checkpoint.
    """

    params: ParamDict
    meta_params: Sequence[torch.Tensor]
    train_loss: LossFn
    meta_loss: LossFn
    train_batch: Any = None
    meta_batch: Any = None
    lr: float | None = None
    held_train_loss: Callable[[ParamDict], torch.Tensor] | None = None
    train_batches: Callable[[int], Sequence[Any]] | None = None

    def __post_init__(self) -> None:
        held = self.held_train_loss
        # the default, built again for the fields of a copy (`dataclasses.replace`)
        if held is None or (isinstance(held, functools.partial) and held.func is _on_batch):
            held = functools.partial(_on_batch, self.train_loss, self.train_batch)
            object.__setattr__(self, "held_train_loss", held)


def _on_batch(loss: LossFn, batch: Any, weights: ParamDict) -> torch.Tensor:
    return loss(weights, batch)


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

    An estimator gets one [`HypergradientProblem`]: the base weights `theta` as a dict of tensors (constants: it
    never changes them), the meta-parameters `lambda` as leaf tensors with `requires_grad=True`, two losses written
    as functions of a weight dict and a batch, the batches and the step size. It returns `d meta_loss / d lambda`.

    Subclasses implement `estimate(self, problem)` and validate their options in `__init__`, raising `ValueError`
    that names the option; a call with anything but one problem raises a `TypeError` that shows the call.
    """

    name: str = ""
    # True for estimators that differentiate through a gradient (a second-order graph): fused attention kernels have
    # no double backward, so `MetaTrainer` runs their meta step on the math backend of scaled_dot_product_attention
    second_order: bool = False
    # True for estimators that call `problem.held_train_loss` (a loss weighter's input held at the current weights):
    # `MetaTrainer` then runs the meta step `after` the base step's forward by default, reusing its per-example losses
    uses_held_train_loss: bool = False

    def __init__(self) -> None:
        """Estimators without options take none; subclasses declare theirs as keyword arguments."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        estimate = cls.__dict__.get("estimate")
        if estimate is None:
            return
        if len(inspect.signature(estimate).parameters) != 2:
            raise TypeError(
                f"{cls.__name__}.estimate must take one argument besides `self`, the problem: "
                "`def estimate(self, problem: HypergradientProblem) -> HypergradientResult`, reading "
                "`problem.params`, `problem.meta_params`, `problem.train_loss`, `problem.meta_loss`, the batches and "
                "`problem.lr`."
            )

        @functools.wraps(estimate)
        def checked(self: HypergradientEstimator, *args: Any, **kwargs: Any) -> HypergradientResult:
            given = [*args, *kwargs.values()]
            if len(given) != 1 or not isinstance(given[0], HypergradientProblem):
                raise TypeError(
                    f"{type(self).__name__}.estimate takes one `HypergradientProblem`: call "
                    "`estimate(HypergradientProblem(params, meta_params, train_loss, meta_loss, train_batch, "
                    "meta_batch, lr))` (from `metatrain.estimators`)."
                )
            return estimate(self, *args, **kwargs)

        cls.estimate = checked

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        """Estimates the hypergradient `d meta_loss / d meta_params` of `problem`, without touching any `.grad`.

        Args:
            problem ([`HypergradientProblem`]): the weights, meta-parameters, losses, batches and step size.

        Returns:
            [`HypergradientResult`]: one gradient per meta-parameter (shaped like it) and the detached meta loss.
        """
        raise NotImplementedError

    def hypergradient(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """Removed: one spelling of the call is kept, `estimate(problem)`, whose result holds the gradients
        (`.grads`)."""
        raise AttributeError(
            f"{type(self).__name__}.hypergradient(...) was removed: call `estimate(HypergradientProblem(...))` and "
            "take `.grads` of its result."
        )

    def reset(self) -> None:
        """Starts a new inner optimisation: forgets what the estimator keeps of the trajectory. `MetaTrainer` calls it
        when the base weights restart (`meta_inner_steps`). Nothing to forget for a stateless estimator; a stateful one
        that cannot restart leaves this as it is."""

    @property
    def restartable(self) -> bool:
        """Whether the estimator can start a new inner optimisation: it is stateless or implements `reset`."""
        return not self.stateful or type(self).reset is not HypergradientEstimator.reset

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
