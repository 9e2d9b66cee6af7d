"""Base classes of meta-modules: each kind says how it enters [`MetaTrainer`]'s losses through the methods of
[`MetaModule`], so the trainer and [`~metatrain.objective.MetaObjective`] treat every kind alike."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..losses import weighted_mean


class MetaModule(nn.Module):
    """Base of meta-modules. Its methods are the module's part in the losses; the defaults here are no part at all,
    as for a module attached inside the model, which acts through the model's forward.

    In each method, `call` runs the module: the module itself in the base step, and its functional call on the
    meta step's stand-ins for the meta-parameters in the meta step.
    """

    # whether the module acts from outside the model (its parameters are not the model's)
    outside_model: bool = False
    # whether `training_loss` reads the per-example losses (a loss weighter): estimators that perturb the weights
    # then get them held at the current weights (`HypergradientProblem.held_train_loss`)
    reads_losses: bool = False
    # batch keys the module reads in `batch_context`: kept by `remove_unused_columns`, never passed to the model
    batch_keys: tuple[str, ...] = ()
    # whether an attached module's weights were added to the model (left out of its saved file); False for a module
    # made of the model's own layers (ANIL's), which the model needs to load
    added_to_model: bool = True

    def training_loss(
        self, losses: torch.Tensor, call: Callable[..., torch.Tensor] | None = None, held: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The training loss of per-example `losses` `[B]`: their mean here. `held`, where given, stands for
        `losses` as the module's input (their values at the current weights)."""
        return losses.mean()

    def training_inputs(self, batch: Mapping[str, Any], call: Callable[..., Any] | None = None) -> Mapping[str, Any]:
        """The training batch the model sees: `batch` unchanged here."""
        return batch

    def meta_loss_context(self) -> contextlib.AbstractContextManager:
        """The context the meta (validation) loss runs in: a null context here."""
        return contextlib.nullcontext()

    def batch_context(self, batch: Mapping[str, Any]) -> contextlib.AbstractContextManager:
        """The context entered around every forward of the model on `batch` (the full batch, with the keys in
        `batch_keys`); a null context here."""
        return contextlib.nullcontext()


class LossWeighter(MetaModule):
    """A meta-module outside the model that maps detached per-sample training losses `[B]` to weights `[B]`.

    [`MetaTrainer`] reduces training losses with `sum(w * l) / sum(w)`; meta (validation) and evaluation losses
    stay plain means. Subclasses implement `forward(losses) -> weights`.
    """

    outside_model = True
    reads_losses = True

    def weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """`sum(w * l) / sum(w)` with `w = self(losses)`."""
        return weighted_mean(losses, self(losses))

    def training_loss(
        self, losses: torch.Tensor, call: Callable[..., torch.Tensor] | None = None, held: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`sum(w * l) / sum(w)` with `w = call(held)` (or of `losses` where nothing is held)."""
        return weighted_mean(losses, (call or self)(losses if held is None else held))


class InputTransform(MetaModule):
    """A meta-module outside the model that transforms the training inputs before the model sees them.

    [`MetaTrainer`] applies it to the batch entry `input_name` of training batches only: in the base step and in the
    training loss of the meta step. Meta (validation) and evaluation batches reach the model untransformed, so the
    meta-parameters learn the transformation that makes training data look like validation data. Subclasses
    implement `forward(inputs) -> inputs` and must keep the shape.

    Args:
        input_name (`str`, *optional*, defaults to `"pixel_values"`):
            The batch key of the inputs to transform.
    """

    outside_model = True

    def __init__(self, input_name: str = "pixel_values"):
        super().__init__()
        self.input_name = input_name

    def training_inputs(self, batch: Mapping[str, Any], call: Callable[..., Any] | None = None) -> Mapping[str, Any]:
        """`batch` with its `input_name` entry transformed by `call` (the module itself by default)."""
        if self.input_name not in batch:
            raise ValueError(
                f"The input transform {type(self).__name__} reads batch key {self.input_name!r}, which the batch "
                f"lacks (keys: {sorted(batch)}): set its `input_name`."
            )
        return {**batch, self.input_name: (call or self)(batch[self.input_name])}


class AttachedTransform(MetaModule):
    """The meta-parameter layers that an `attach_*` function inserted into a model, acting on training forwards only.

    Its parameters are parameters of the model (found by identity by [`MetaTrainer`]). [`MetaTrainer`] runs the meta
    (validation) loss inside [`~AttachedTransform.disabled`], so the layers shape the training loss and the
    meta-parameters learn from how the trained weights do without them (LFT's pseudo-unseen episodes). Subclasses
    implement `set_enabled(enabled)` and report the current state with `enabled`.

    Layers that need to know more about the batch than the model's inputs (e.g. which examples are from the source
    language) name those keys in `batch_keys` (kept in the batch by `remove_unused_columns`, never passed to the model)
    and read them in [`~AttachedTransform.batch_context`], which [`MetaTrainer`] enters around every forward of the
    model with the batch it is run on.
    """

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    def set_enabled(self, enabled: bool) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Turns the attached layers into the identity inside the block, restoring the previous state after it."""
        previous = self.enabled
        self.set_enabled(False)
        try:
            yield
        finally:
            self.set_enabled(previous)

    def meta_loss_context(self) -> contextlib.AbstractContextManager:
        """The meta loss runs with the layers off ([`~AttachedTransform.disabled`])."""
        return self.disabled()
