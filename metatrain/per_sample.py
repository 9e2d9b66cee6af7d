"""[`PerSampleLossTrainer`]: a `transformers.Trainer` that computes per-example losses itself."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import _is_peft_model

from .losses import logits_of, per_sample_cross_entropy


class PerSampleLossTrainer(Trainer):
    """A [`~transformers.Trainer`] that computes per-example losses itself, so that plain modules (timm models
    returning logits) and `transformers` models train the same way, and a subclass can reduce the losses.

    Args:
        per_sample_loss (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`, *optional*):
            Maps logits and labels to per-example losses `[B]`; defaults to cross-entropy (token classification
            averaged per example).
        model_input_names (`list[str]`, *optional*):
            For plain modules, the batch keys passed positionally to `forward`; defaults to `["pixel_values"]`.
            `transformers` models get every non-label key as keyword arguments.
        *args, **kwargs: passed to [`~transformers.Trainer`].
    """

    def __init__(
        self,
        *args: Any,
        per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        model_input_names: list[str] | None = None,
        **kwargs: Any,
    ):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.label_names is None:
            training_args.label_names = ["labels"]
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-batch mean: Trainer divides it by the accumulation steps and must not pass
        # `num_items_in_batch` to the model (transformers issue 37766)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.per_sample_loss = per_sample_loss or per_sample_cross_entropy
        self.model_input_names = model_input_names or ["pixel_values"]
        # batch keys the trainer reads itself: kept by `remove_unused_columns`, never passed to the model
        self.trainer_batch_keys: list[str] = []

    def _is_transformers_model(self) -> bool:
        """A `transformers` model, or a `peft` model (LoRA adapters) around one: it takes keyword inputs."""
        model = self.model
        if _is_peft_model(model):
            model = model.get_base_model()
        return isinstance(model, PreTrainedModel)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None and not self._is_transformers_model():
            self._signature_columns = list(self.model_input_names) + list(self.args.label_names)
        super()._set_signature_columns_if_needed()
        self._signature_columns += [k for k in self.trainer_batch_keys if k not in self._signature_columns]

    def _split_inputs(self, inputs: dict[str, Any]) -> tuple[tuple, dict[str, Any], torch.Tensor]:
        labels = inputs[self.args.label_names[0]]
        if self._is_transformers_model():
            dropped = {*self.args.label_names, *self.trainer_batch_keys}
            return (), {k: v for k, v in inputs.items() if k not in dropped}, labels
        missing = [k for k in self.model_input_names if k not in inputs]
        if missing:
            raise ValueError(
                f"Batch has no {missing} for the model (keys: {sorted(inputs)}). Set `model_input_names=` on the "
                "trainer to the keys that `model.forward` takes positionally."
            )
        return tuple(inputs[k] for k in self.model_input_names), {}, labels

    def reduce_loss(self, losses: torch.Tensor, training: bool) -> torch.Tensor:
        """Reduces per-example losses to the scalar that is back-propagated; the mean here."""
        return losses.mean()

    def transform_inputs(self, inputs: dict[str, Any], training: bool) -> dict[str, Any]:
        """The batch the model sees; unchanged here."""
        return inputs

    def batch_context(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """The context entered around every forward of the model on `batch`; a null context here."""
        return contextlib.nullcontext()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Per-example losses of the batch, reduced by [`~PerSampleLossTrainer.reduce_loss`]."""
        inputs = self.transform_inputs(inputs, model.training)
        args, kwargs, labels = self._split_inputs(inputs)
        with self.batch_context(inputs):  # the reduction too (e.g. a weighting by each example's source)
            logits = logits_of(model(*args, **kwargs))
            loss = self.reduce_loss(self.per_sample_loss(logits, labels), model.training)
        return (loss, {"logits": logits}) if return_outputs else loss
