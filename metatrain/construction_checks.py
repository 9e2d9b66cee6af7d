"""The checks [`MetaTrainer`] runs at construction: the meta dataset against the model and the training batches, and
whether DDP needs to search for unused weights."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from torch import nn
from torch.func import functional_call

from .estimators import HypergradientEstimator
from .losses import logits_of
from .training_args import MetaTrainingArguments
from .utils import random_state_kept

logger = logging.getLogger(__name__)


def _flat(values: Any) -> Iterator[Any]:
    """The scalars of nested lists (a token-classification label column)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def check_arguments(
    model: nn.Module | None, args: Any, meta_dataset: Any, meta_module: nn.Module | None, estimator: Any
) -> list[str] | None:
    """Refuses [`MetaTrainer`]'s arguments where they cannot work, naming the argument and the fix. Returns the names
    of the meta-parameters in the model for a meta-module attached to it, `None` for one outside it."""
    if estimator is not None and not isinstance(estimator, HypergradientEstimator):
        raise ValueError(
            f"`estimator` must be a `metatrain.estimators.HypergradientEstimator` instance, got {estimator!r}: "
            "subclass it and implement `estimate`, or choose a registered one by name with `hypergradient=`."
        )
    if estimator is not None and isinstance(args, MetaTrainingArguments) and args.hypergradient_kwargs:
        raise ValueError(
            f"hypergradient_kwargs={args.hypergradient_kwargs} configure the estimator `hypergradient` names, but "
            f"an estimator instance ({type(estimator).__name__}) was passed: set its options on the instance and "
            "leave `hypergradient_kwargs` empty."
        )
    if not isinstance(args, MetaTrainingArguments):
        raise ValueError(
            f"MetaTrainer needs `args` to be a MetaTrainingArguments, got {type(args).__name__}: build it with "
            "`metatrain.MetaTrainingArguments(output_dir=..., hypergradient=...)`."
        )
    if meta_dataset is None:
        raise ValueError(
            "MetaTrainer needs `meta_dataset`: the clean held-out set the hypergradient is computed on. Pass e.g. "
            "`meta_dataset=splits['meta']` (see `metatrain.data.make_noisy_label_splits`)."
        )
    if meta_module is None or not isinstance(meta_module, nn.Module):
        raise ValueError(
            f"MetaTrainer needs `meta_module`, an nn.Module holding the meta-parameters, got {meta_module!r}."
        )
    if model is None:
        raise ValueError("MetaTrainer needs `model`; `model_init` is not supported.")
    meta_params = list(meta_module.parameters())
    if not meta_params:
        raise ValueError(
            f"No meta-parameters found: `meta_module` ({type(meta_module).__name__}) has no parameters. "
            "Attach the meta-module before building the trainer and pass the module that owns the parameters."
        )
    if len(meta_module.state_dict()) > len(dict(meta_module.named_parameters())):
        logger.info("meta_module buffers are saved with the meta state but not learned.")
    names_in_model = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    found = [names_in_model.get(id(p)) for p in meta_params]
    if args.precision == "fp16" and args.device.type == "cpu":
        raise ValueError(
            "fp16=True on CPU trains in full precision without a word (Accelerate applies no fp16 autocast "
            "there): use bf16=True for mixed precision on CPU, or neither."
        )
    if all(found):
        return found
    if any(found):
        raise ValueError(
            "Some but not all parameters of `meta_module` are parameters of the model: "
            f"{[n for n in found if n]}. Attach the whole meta-module to the model or keep it outside."
        )
    if not getattr(meta_module, "outside_model", False):
        raise ValueError(
            f"Meta-parameters not found in the model: `meta_module` ({type(meta_module).__name__}) is neither "
            "attached to the model nor a `metatrain.modules.LossWeighter` or `InputTransform`. Attach it to "
            "the model first (e.g. with the module's `attach_*` function), or subclass LossWeighter for a "
            "loss-weighting net or InputTransform for a transformation of the training inputs."
        )
    return None


class ConstructionChecks:
    """Mixed into [`MetaTrainer`]: the checks it runs once it is built (a sample of each data set collated as its
    loader would, one functional forward of the model)."""

    def _forward_sample(self, batch: dict[str, Any], training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits and the labels of `batch`, through a functional call with cloned buffers (batch norm
        statistics untouched), in training or evaluation mode, in the meta loss's context (an attached transform off),
        random states kept."""
        inputs = self._prepare_inputs(batch)
        args, kwargs, labels = self._split_inputs(inputs)
        weights = {**{n: b.clone() for n, b in self.model.named_buffers()}, **dict(self.model.named_parameters())}
        with random_state_kept(self.args.device), self._role.meta_loss_context():
            was_training = self.model.training
            self.model.train(training)
            try:
                logits = logits_of(functional_call(self.model, weights, args, kwargs))
            finally:
                self.model.train(was_training)
        return logits, labels

    def unused_parameters(self) -> list[str]:
        """The trainable weights that one training-mode forward and backward of two training examples leaves without
        gradient (buffers and random states untouched)."""
        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        logits, labels = self._forward_sample(self._collated_sample(self.train_dataset, "training", size=2), True)
        grads = torch.autograd.grad(
            self.per_sample_loss(logits, labels).mean(), list(trainable.values()), allow_unused=True
        )
        return [name for name, g in zip(trainable, grads) if g is None]

    def _set_find_unused_parameters(self) -> None:
        """Turns off DDP's search for unused weights where Trainer turned it on by default (every plain module) and
        one training forward shows every weight used: DDP would warn on every rank and search the graph at every step.
        Never turns it on; `ddp_find_unused_parameters` overrides it, and models whose use of weights varies between
        steps (LayerDrop, activation checkpointing) keep Trainer's choice."""
        handler = getattr(self.accelerator, "ddp_handler", None)
        if self.args.ddp_find_unused_parameters is not None or handler is None or self.args.world_size < 2:
            return
        config = getattr(self.model, "config", None)
        varies = (
            getattr(self.model, "is_gradient_checkpointing", False)
            or self.args.gradient_checkpointing
            or any(
                (getattr(config, key, 0) or 0) > 0 for key in ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")
            )
        )
        if not handler.find_unused_parameters or varies or not self._has_training_examples():
            return
        unused = self.unused_parameters()
        if unused:
            logger.info(f"DDP searches for unused weights: {len(unused)} get no gradient, e.g. {unused[:3]}.")
        else:
            handler.find_unused_parameters = False

    def _collated_sample(self, dataset: Any, description: str, size: int = 4) -> dict[str, Any]:
        """The first `size` items of `dataset` prepared and collated as its loader would (unused columns removed)."""
        collator = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(collator, description=description)
        with random_state_kept(torch.device("cpu")):  # a collator may draw (masking): the run's stream is untouched
            return collator([dataset[i] for i in range(min(size, len(dataset)))])

    def _has_training_examples(self) -> bool:
        """Whether a training set is given, sized and not empty (so a sample of it can be collated)."""
        return (
            self.train_dataset is not None and hasattr(self.train_dataset, "__len__") and len(self.train_dataset) > 0
        )

    def _training_batch_keys(self) -> set[str]:
        """The keys of a training batch, or none where the training set is not given or not sized."""
        if not self._has_training_examples():
            return set()
        try:
            return set(self._collated_sample(self.train_dataset, "training"))
        except Exception:  # a training set that fails here fails in Trainer's loader with Trainer's own error
            return set()

    def _check_meta_dataset(self) -> None:
        """Refuses a meta dataset the meta step could not use, naming `meta_dataset` and the fix: one that cannot be
        collated, lacks the labels or a key of the training batches, or has labels outside the model's classes."""
        meta = self.meta_dataset
        if isinstance(meta, torch.utils.data.IterableDataset) or not hasattr(meta, "__len__"):
            raise ValueError(
                "meta_dataset must be a map-style dataset (`datasets.Dataset` or a torch Dataset with `__len__`), "
                f"got {type(meta).__name__}: the meta loader shuffles it with a seeded sampler."
            )
        if len(meta) == 0:
            raise ValueError("meta_dataset is empty: pass the clean held-out examples for the meta loss.")
        try:
            batch = self._collated_sample(meta, "meta")
        except Exception as error:
            raise ValueError(
                f"meta_dataset cannot be batched by the trainer's data collator ({type(error).__name__}: {error}). "
                "Prepare it as the training set (the same tokenization or transform and the same columns), e.g. "
                "`meta_dataset = meta_dataset.map(tokenize, batched=True)`."
            ) from error
        label = self.args.label_names[0]
        if label not in batch:
            raise ValueError(
                f"meta_dataset has no {label!r} (its batches hold {sorted(batch)}): name its label column {label!r}, "
                f"e.g. `meta_dataset = meta_dataset.rename_column('target', {label!r})`, or set `label_names`."
            )
        missing = sorted(self._model_keys() - set(batch))
        if missing:
            raise ValueError(
                f"meta_dataset's batches lack {missing}, which the model reads from the training batches (meta: "
                f"{sorted(batch)}): prepare the meta set as the training set (the same tokenization or transform)."
            )
        labels = self._meta_labels(batch)
        if labels is None or labels.is_floating_point() or labels.is_complex():
            return
        try:
            logits, _ = self._forward_sample(batch, training=False)
            classes = int(logits.shape[-1])
        except Exception:  # a model that fails here fails in the meta step with its own error
            return
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= classes))]
        if bad.numel():
            raise ValueError(
                f"meta_dataset has labels outside the model's {classes} outputs (0 to {classes - 1}; -100 is "
                f"ignored): {sorted(set(bad.tolist()))[:10]}. Map its labels with the training set's label mapping, "
                "or build the model with that many classes (`num_labels`)."
            )

    def _model_keys(self) -> set[str]:
        """The batch keys the model reads: `model_input_names` for a plain module; for a `transformers` model, the
        non-label keys of a training batch, less the keys the trainer reads itself (an attached transform's)."""
        if not self._is_transformers_model():
            return set(self.model_input_names)
        return self._training_batch_keys() - set(self.args.label_names) - set(self.trainer_batch_keys)

    def _meta_labels(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Every label of the meta set where its label column holds plain integers (no custom transform), else those
        of the collated sample."""
        meta, label = self.meta_dataset, self.args.label_names[0]
        column = next((c for c in (label, "label") if c in getattr(meta, "column_names", ())), None)
        if column is not None and meta.format.get("type") != "custom":
            values = list(_flat(meta.with_format(None)[column]))
            if all(isinstance(v, int) for v in values):
                return torch.as_tensor(values)
        try:
            return torch.as_tensor(batch[label])
        except (TypeError, ValueError):
            return None
