"""Base classes that tell [`MetaTrainer`] how a meta-module outside the model enters the training loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..losses import weighted_mean


class LossWeighter(nn.Module):
    """A meta-module outside the model that maps detached per-sample training losses `[B]` to weights `[B]`.

    [`MetaTrainer`] reduces training losses with `sum(w * l) / sum(w)`; meta (validation) and evaluation losses
    stay plain means. Subclasses implement `forward(losses) -> weights`.
    """

    def weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        return weighted_mean(losses, self(losses))


class InputTransform(nn.Module):
    """A meta-module outside the model that transforms the training inputs before the model sees them.

    [`MetaTrainer`] applies it to the batch entry `input_name` of training batches only: in the base step and in the
    training loss of the meta step. Meta (validation) and evaluation batches reach the model untransformed, so the
    meta-parameters learn the transformation that makes training data look like validation data. Subclasses
    implement `forward(inputs) -> inputs` and must keep the shape.

    Args:
        input_name (`str`, *optional*, defaults to `"pixel_values"`):
            The batch key of the inputs to transform.
    """

    def __init__(self, input_name: str = "pixel_values"):
        super().__init__()
        self.input_name = input_name


class AttachedTransform(nn.Module):
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

    batch_keys: tuple[str, ...] = ()

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

    def batch_context(self, batch: Mapping[str, Any]) -> contextlib.AbstractContextManager:
        """The context [`MetaTrainer`] enters around each forward of the model on `batch` (the full batch, with the
        keys in `batch_keys`); a null context here."""
        return contextlib.nullcontext()
