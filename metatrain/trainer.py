"""`MetaTrainer`: a `transformers.Trainer` that learns meta-parameters between ordinary optimizer steps."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerControl, TrainerState

from .diagnostics import cosine, flatten, ratio
from .estimators import HypergradientEstimator, HypergradientResult, create_estimator
from .losses import logits_of, per_sample_cross_entropy, weighted_mean
from .meta_data import EpochSeededSampler, MetaBatches
from .modules import AttachedTransform, InputTransform, LossWeighter
from .profiling import MemoryMeter
from .training_args import SUPPORTED_SETUPS, MetaTrainingArguments

logger = logging.getLogger(__name__)

META_STATE_NAME = "meta_trainer_state.pt"
# under several processes, each one's own estimator state and meta data position (its shard of the batches)
META_PROCESS_STATE_NAME = "meta_trainer_state_{}.pt"
# the meta-module's weights, beside the model's (which leave out an attached meta-module's)
META_MODULE_NAME = "meta_module.safetensors"
# EvoGrad's default perturbation and temperature under bf16/fp16: 10x the paper's sigma, 100x its temperature, so the
# expected lookahead step (K - 1) sigma^2 / (K tau) is the paper's
MIXED_PRECISION_EVOGRAD = {"sigma": 0.01, "temperature": 5.0}
# the random stream of the estimator's own draws (EvoGrad's population) in a meta step; 0 and 1 are the losses'
ESTIMATOR_STREAM = 2**61 + 1


def join_batches(
    batches: list[dict[str, Any]], pad_values: dict[str, float] | None = None, padding_side: str = "right"
) -> dict[str, Any]:
    """The micro-batches of an accumulation window as one batch: tensors concatenated along their first dimension,
    lists chained, other values taken from the first batch when all are equal.

    Args:
        batches (`list[dict[str, Any]]`): the micro-batches.
        pad_values (`dict[str, float]`, *optional*):
            For keys whose tensors differ in length along their second dimension (dynamic padding), the value to pad
            them to the longest with, e.g. `{"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}`.
            Other keys must have equal shapes.
        padding_side (`str`, *optional*, defaults to `"right"`): where the padding goes, as the tokenizer pads.
    """
    pad_values = pad_values or {}
    joined = {}
    for key, first in batches[0].items():
        values = [b[key] for b in batches]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            if any(v.shape[1:] != first.shape[1:] for v in values):
                paddable = key in pad_values and all(v.dim() == first.dim() >= 2 for v in values)
                if not paddable or any(v.shape[2:] != first.shape[2:] for v in values):
                    raise ValueError(
                        f"The micro-batches of an accumulation window cannot be joined for the meta step: {key!r} has "
                        f"shapes {[tuple(v.shape) for v in values]}, which padding the second dimension (keys padded: "
                        f"{sorted(pad_values)}) cannot join. Pad every batch to one length (e.g. "
                        "`padding='max_length'`), or set `meta_train_batch='micro_batch'` to run the meta step on one "
                        "micro-batch."
                    )
                length = max(v.shape[1] for v in values)
                widths = [(0, 0)] * (first.dim() - 2)
                values = [
                    torch.nn.functional.pad(
                        v,
                        [w for pair in widths for w in pair]
                        + ([length - v.shape[1], 0] if padding_side == "left" else [0, length - v.shape[1]]),
                        value=pad_values[key],
                    )
                    for v in values
                ]
            joined[key] = torch.cat(values)
        elif isinstance(first, list):
            joined[key] = [item for v in values for item in v]
        elif all(v is first or v == first for v in values):
            joined[key] = first
        else:
            raise ValueError(
                f"The micro-batches of an accumulation window cannot be joined for the meta step: {key!r} differs "
                "between them and is neither a tensor nor a list. Set `meta_train_batch='micro_batch'`."
            )
    return joined


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """The model in evaluation mode (batch norm on running statistics, dropout off) inside the block, and back in the
    mode it was in after, also when the block raises: the meta loss with `meta_loss_mode="eval"`, few-shot tests."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _mixed_precision(args: Any) -> str:
    """`"bf16"`, `"fp16"` or `"no"`, from the flags or Accelerate's setting (`accelerate launch` configs, the
    `ACCELERATE_MIXED_PRECISION` variable), as Trainer resolves it."""
    if args.bf16 or args.fp16:
        return "bf16" if args.bf16 else "fp16"
    return str(getattr(args, "mixed_precision", None) or "no")


def _flat(values: Any) -> Iterator[Any]:
    """The scalars of nested lists (a token-classification label column)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def _torch_rng_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """torch's CPU random state, and `device`'s, restored after the block."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


@contextlib.contextmanager
def random_state_kept(device: torch.device) -> Iterator[None]:
    """Python's, numpy's and torch's (CPU and `device`) random states as they were before the block, after it."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with _torch_rng_kept(device):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _empty_meta_log() -> dict[str, Any]:
    """Running sums of the meta statistics between two training logs."""
    return {"count": 0, "meta_loss": 0.0, "hypergradient_norm": 0.0, "seconds": 0.0}


@dataclass(frozen=True)
class MetaStepProblem:
    """What one meta step estimates the hypergradient of: the arguments of
    [`~metatrain.estimators.HypergradientEstimator.estimate`], as the meta step built them.

    Args:
        params (`dict[str, torch.Tensor]`): the model's trainable weights at this step (constants).
        meta_params (`list[torch.Tensor]`): leaves sharing the meta-parameters' storage, `requires_grad=True`.
        train_loss, meta_loss (`Callable[[dict, Any], torch.Tensor]`): the training loss (weighted, transformed or
            with the attached meta-module on) and the meta loss, as functions of weights and a batch; they draw the
            meta step's common noise at every call.
        train_batch, meta_batch (`dict[str, Any]`): the batches.
        lr (`float`): the base optimizer's current learning rate.
    """

    params: dict[str, torch.Tensor]
    meta_params: list[torch.Tensor]
    train_loss: Callable[[dict[str, torch.Tensor], Any], torch.Tensor]
    meta_loss: Callable[[dict[str, torch.Tensor], Any], torch.Tensor]
    train_batch: dict[str, Any]
    meta_batch: dict[str, Any]
    lr: float

    def estimate(self, estimator: HypergradientEstimator) -> HypergradientResult:
        """`estimator`'s estimate on this problem (the meta step's own is in the event's `result`)."""
        return estimator.estimate(
            self.params, self.meta_params, self.train_loss, self.meta_loss, self.train_batch, self.meta_batch, self.lr
        )


class MetaTrainerCallback(TrainerCallback):
    """A [`~transformers.TrainerCallback`] with one more event, called by [`MetaTrainer`] at every meta step, after
    the hypergradient is estimated (and averaged over processes) and before the meta-optimizer applies it: probes,
    diagnostics and tests observe the meta step here instead of patching the trainer."""

    def on_meta_step(
        self,
        args: MetaTrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        *,
        trainer: MetaTrainer,
        problem: MetaStepProblem,
        result: HypergradientResult,
        hypergradient_norm: float,
        skipped: bool,
        **kwargs: Any,
    ) -> None:
        """Args:
        trainer ([`MetaTrainer`]): the trainer.
        problem ([`MetaStepProblem`]): the step's weights, meta-parameters, losses, batches and learning rate;
            `problem.estimate(other_estimator)` compares another estimator on the same step (its random draws then
            come from the global RNG: restore it if the run must not change).
        result (`HypergradientResult`): the hypergradient (averaged over processes) and the meta loss.
        hypergradient_norm (`float`): its norm before clipping.
        skipped (`bool`): whether the step is skipped (not finite) and nothing will be applied.
        """


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
        return isinstance(self.model, PreTrainedModel)

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
        with self.batch_context(inputs):
            logits = logits_of(model(*args, **kwargs))
        loss = self.reduce_loss(self.per_sample_loss(logits, labels), model.training)
        return (loss, {"logits": logits}) if return_outputs else loss


class MetaTrainer(PerSampleLossTrainer):
    """A [`~transformers.Trainer`] that, once per optimizer step, estimates the hypergradient of a meta (validation)
    loss with respect to the parameters of `meta_module` and steps a separate meta-optimizer.

    The training loop is Trainer's own: the meta step lives in [`~MetaTrainer.training_step`], runs through
    `torch.func.functional_call` on the unwrapped model with cloned buffers (BatchNorm running statistics are not
    touched), and never writes a `.grad` of the model. Meta-parameters are kept `requires_grad=False`, so the base
    optimizer, DDP, clipping and `grad_norm` never see them.

    Args:
        model (`PreTrainedModel` or `nn.Module`):
            A `transformers` model (dict batches with `labels`) or a plain module such as a timm model, called with
            the batch's `model_input_names` as positional arguments and returning logits.
        args (`MetaTrainingArguments`):
            Training and meta-learning options.
        meta_dataset (`datasets.Dataset` or `torch.utils.data.Dataset`):
            Clean held-out examples for the meta loss; batched like the train set, shuffled, sharded across processes.
        meta_module (`nn.Module`):
            Holds the meta-parameters. Either a module outside the model, a [`~metatrain.modules.LossWeighter`] (it
            weights the per-sample training losses) or a [`~metatrain.modules.InputTransform`] (it transforms the
            training inputs), or a module attached inside the model (its parameters must all be parameters of the
            model). An attached [`~metatrain.modules.AttachedTransform`] (e.g. LFT's feature-wise transforms) acts
            on training forwards only: the meta loss runs with it disabled.
        estimator (`HypergradientEstimator`, *optional*):
            An estimator instance to use instead of the one `args.hypergradient` names (e.g. one of your own, see
            [`metatrain.estimators.functional`]); `args.hypergradient_kwargs` must then be empty.
        per_sample_loss, model_input_names: see [`PerSampleLossTrainer`].
        **kwargs: passed to [`~transformers.Trainer`].

    Callbacks with an `on_meta_step` method (see [`MetaTrainerCallback`]) are called at every meta step.
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: MetaTrainingArguments | None = None,
        *trainer_args: Any,
        meta_dataset: Any = None,
        meta_module: nn.Module | None = None,
        estimator: HypergradientEstimator | None = None,
        per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        model_input_names: list[str] | None = None,
        **kwargs: Any,
    ):
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
        self.meta_params = list(meta_module.parameters())
        if not self.meta_params:
            raise ValueError(
                f"No meta-parameters found: `meta_module` ({type(meta_module).__name__}) has no parameters. "
                "Attach the meta-module before building the trainer and pass the module that owns the parameters."
            )
        if len(meta_module.state_dict()) > len(dict(meta_module.named_parameters())):
            logger.info("meta_module buffers are saved with the meta state but not learned.")
        names_in_model = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        found = [names_in_model.get(id(p)) for p in self.meta_params]
        if all(found):
            self.meta_param_names: list[str] | None = found
        elif any(found):
            raise ValueError(
                "Some but not all parameters of `meta_module` are parameters of the model: "
                f"{[n for n in found if n]}. Attach the whole meta-module to the model or keep it outside."
            )
        else:
            if not isinstance(meta_module, (LossWeighter, InputTransform)):
                raise ValueError(
                    f"Meta-parameters not found in the model: `meta_module` ({type(meta_module).__name__}) is neither "
                    "attached to the model nor a `metatrain.modules.LossWeighter` or `InputTransform`. Attach it to "
                    "the model first (e.g. with the module's `attach_*` function), or subclass LossWeighter for a "
                    "loss-weighting net or InputTransform for a transformation of the training inputs."
                )
            self.meta_param_names = None
        for p in self.meta_params:
            p.requires_grad_(False)

        if _mixed_precision(args) == "fp16" and args.device.type == "cpu":
            raise ValueError(
                "fp16=True on CPU trains in full precision without a word (Accelerate applies no fp16 autocast "
                "there): use bf16=True for mixed precision on CPU, or neither."
            )
        super().__init__(
            model, args, *trainer_args, per_sample_loss=per_sample_loss, model_input_names=model_input_names, **kwargs
        )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "MetaTrainer does not support DeepSpeed or FSDP yet: they shard parameters, so the functional "
                f"calls of the meta step are not viable. Supported: {SUPPORTED_SETUPS}."
            )
        self.meta_dataset = meta_dataset
        self.meta_module = meta_module
        if self.args.meta_disjoint_key is not None:
            self.trainer_batch_keys.append(self.args.meta_disjoint_key)
        if isinstance(meta_module, AttachedTransform):
            self.trainer_batch_keys += [k for k in meta_module.batch_keys if k not in self.trainer_batch_keys]
        self.external_meta_module = meta_module if self.meta_param_names is None else None
        self.loss_weighter = meta_module if isinstance(self.external_meta_module, LossWeighter) else None
        self.input_transform = meta_module if isinstance(self.external_meta_module, InputTransform) else None
        if self.external_meta_module is not None:
            self.external_meta_module.to(self.args.device)
        self.estimator = estimator or create_estimator(self.args.hypergradient, **self._estimator_options())
        self.reference_estimator = None
        if self.args.meta_diagnostics_steps:
            self.reference_estimator = create_estimator(self.args.meta_diagnostics_reference)
            if self.reference_estimator.stateful:
                raise ValueError(
                    f"meta_diagnostics_reference={self.args.meta_diagnostics_reference!r} keeps state across steps, "
                    "but the reference only runs every `meta_diagnostics_steps` steps: use a stateless estimator such "
                    "as 't1t2', or compare offline with `metatrain.diagnostics`."
                )
        self.meta_optimizer: torch.optim.Optimizer | None = None
        self.meta_steps_skipped = 0
        self._at_window_start = True
        # the detached per-example losses of the last training forward in the current accumulation window
        self._base_losses: torch.Tensor | None = None
        self._meta_log = _empty_meta_log()
        self._nonfinite_weights: tuple[int, int] | None = None  # (first step seen, meta steps skipped in a row)
        self._zero_hypergradients = 0  # meta steps in a row with an exactly zero hypergradient
        self._check_meta_dataset()
        self._set_find_unused_parameters()
        # the meta batches, endlessly and resumably (their position is part of the checkpoint)
        self.meta_batches = MetaBatches(
            self.get_meta_dataloader, EpochSeededSampler(len(meta_dataset), self.args.seed), self._prepare_inputs
        )

    def _estimator_options(self) -> dict[str, Any]:
        """`hypergradient_kwargs`, with EvoGrad's perturbations sized for mixed precision: bf16 and fp16 do not resolve
        `sigma=0.001` on weights of order 0.1-1, so its perturbed losses differ by rounding. Unless `sigma` or
        `temperature` is given, it then takes `MIXED_PRECISION_EVOGRAD` (the same expected lookahead step,
        `(K - 1) sigma^2 / (K tau)`); a given `sigma` below it is warned about."""
        options = dict(self.args.hypergradient_kwargs)
        precision = _mixed_precision(self.args)
        if self.args.hypergradient != "evograd" or precision not in ("bf16", "fp16"):
            return options
        if "sigma" not in options and "temperature" not in options:
            logger.warning(
                f"EvoGrad under {precision}: sigma={MIXED_PRECISION_EVOGRAD['sigma']}, temperature="
                f"{MIXED_PRECISION_EVOGRAD['temperature']} instead of the paper's 0.001 and 0.05 ({precision} does "
                "not resolve perturbations of 0.001; the expected step is the same). Set `sigma` or `temperature` in "
                "`hypergradient_kwargs` to choose them."
            )
            return {**options, **MIXED_PRECISION_EVOGRAD}
        sigma = options.get("sigma", 0.001)
        if isinstance(sigma, (int, float)) and sigma < MIXED_PRECISION_EVOGRAD["sigma"]:
            logger.warning(
                f"EvoGrad with sigma={sigma} under {precision}: perturbations that small are below {precision}'s "
                "resolution for most weights, so the hypergradient is mostly rounding noise. Leave `sigma` and "
                f"`temperature` unset (then {MIXED_PRECISION_EVOGRAD}, the same expected step), or set sigma >= "
                f"{MIXED_PRECISION_EVOGRAD['sigma']} with `rescale=True`."
            )
        return options

    def _forward_sample(self, batch: dict[str, Any], training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits and the labels of `batch`, through a functional call with cloned buffers (batch norm
        statistics untouched), in training or evaluation mode, an attached transform off, random states kept."""
        inputs = self._prepare_inputs(batch)
        args, kwargs, labels = self._split_inputs(inputs)
        weights = {**{n: b.clone() for n, b in self.model.named_buffers()}, **dict(self.model.named_parameters())}
        attached = isinstance(self.meta_module, AttachedTransform)
        attached_off = self.meta_module.disabled() if attached else contextlib.nullcontext()
        with random_state_kept(self.args.device), attached_off:
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

    # ------------------------------------------------------------------------------------------ meta data checks
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

    def reduce_loss(self, losses: torch.Tensor, training: bool) -> torch.Tensor:
        """The loss weighter's `sum(w * l) / sum(w)` in training, the plain mean otherwise."""
        if self.loss_weighter is not None and training:
            self._base_losses = losses.detach()  # for the meta step `after` (cleared at each window's ends)
            with self.accelerator.autocast():  # an external module is not prepared: Accelerate does not autocast it
                return self.loss_weighter.weighted_loss(losses)
        return losses.mean()

    def batch_context(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """An attached transform's [`~metatrain.modules.AttachedTransform.batch_context`] (e.g. which examples of
        the batch are source-language), entered around every forward of the model, in the meta step too."""
        if isinstance(self.meta_module, AttachedTransform):
            return self.meta_module.batch_context(batch)
        return contextlib.nullcontext()

    def transform_inputs(self, inputs: dict[str, Any], training: bool, transform: Callable | None = None):
        """Applies the input transform (or `transform`, its functional form in the meta step) to training batches."""
        if self.input_transform is None or not training:
            return inputs
        key = self.input_transform.input_name
        if key not in inputs:
            raise ValueError(
                f"The input transform {type(self.input_transform).__name__} reads batch key {key!r}, which the batch "
                f"lacks (keys: {sorted(inputs)}): set its `input_name`."
            )
        with self.accelerator.autocast():
            return {**inputs, key: (transform or self.input_transform)(inputs[key])}

    # ------------------------------------------------------------------------------------------------ optimizers
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        meta_ids = {id(p) for p in self.meta_params}
        if any(id(p) in meta_ids for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("The base optimizer holds meta-parameters; only the meta-optimizer may step them.")
        self.create_meta_optimizer()
        return optimizer

    def create_meta_optimizer(self) -> torch.optim.Optimizer:
        """Builds the plain torch meta-optimizer from `meta_optimizer`, `meta_learning_rate` and
        `meta_optimizer_kwargs` (once)."""
        if self.meta_optimizer is None:
            cls, kwargs = self.args.meta_optimizer_cls_and_kwargs()
            self.meta_optimizer = cls(self.meta_params, **kwargs)
        return self.meta_optimizer

    # ------------------------------------------------------------------------------------------------- meta data
    def get_meta_dataloader(self, sampler: EpochSeededSampler | None = None):
        """Shuffled, sharded loader over `meta_dataset`: Trainer's `_get_dataloader` with `sampler` (by default a new
        [`EpochSeededSampler`] of the run's seed, epoch 0)."""
        sampler = sampler or EpochSeededSampler(len(self.meta_dataset), self.args.seed)
        loader = self._get_dataloader(
            self.meta_dataset,
            description="meta",
            batch_size=self.args.meta_batch_size or self.args.per_device_train_batch_size,
            sampler_fn=lambda _: sampler,
            is_training=True,
        )
        if len(loader) == 0:
            size = self.args.meta_batch_size or self.args.per_device_train_batch_size
            source = "meta_batch_size"
            if not self.args.meta_batch_size:
                source = "per_device_train_batch_size, no meta_batch_size"
            raise ValueError(
                f"The meta dataloader is empty: meta_dataset has {len(self.meta_dataset)} examples for a meta batch "
                f"size of {size} ({source}) per process with dataloader_drop_last="
                f"{self.args.dataloader_drop_last}: set a smaller meta_batch_size or add meta examples."
            )
        return loader

    # ------------------------------------------------------------------------------------------------- meta step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's prefetch of one accumulation window, remembered for the meta step's training batch."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window_batches = batch_samples
        return batch_samples, num_items_in_batch

    def _meta_train_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The meta step's training batch: with `meta_train_batch="window"`, the micro-batches of the accumulation
        window joined into the equivalent larger batch; otherwise (or outside Trainer's loop) `inputs`. Also the base
        step's per-example losses of that batch where the base step has computed them already (`after`, not on a
        joined window: a batch norm there normalizes each micro-batch by its own statistics)."""
        window = getattr(self, "_window_batches", None) or []
        if self.args.meta_train_batch != "window" or len(window) < 2 or not any(b is inputs for b in window):
            return self._prepare_inputs(inputs), self._base_losses
        return join_batches([self._prepare_inputs(b) for b in window], *self._padding()), None

    def _padding(self) -> tuple[dict[str, float], str]:
        """How dynamically padded micro-batches are joined: the tokenizer's pad token and side (from the data
        collator, else `processing_class`), masks padded with 0 and labels with the collator's label pad (-100)."""
        tokenizer = getattr(self.data_collator, "tokenizer", None) or self.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        values = {name: getattr(self.data_collator, "label_pad_token_id", -100) for name in self.args.label_names}
        values["attention_mask"] = 0
        if getattr(tokenizer, "pad_token_id", None) is not None:
            values.update(
                input_ids=tokenizer.pad_token_id,
                token_type_ids=getattr(tokenizer, "pad_token_type_id", 0),
                special_tokens_mask=1,
            )
        return values, getattr(tokenizer, "padding_side", "right")

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step plus one meta step per optimizer step (every `meta_interval` steps)."""
        due = self.state.global_step % self.args.meta_interval == 0
        if self._at_window_start:
            self._base_losses = None
            if self.args.meta_step_position == "before" and due:
                self.meta_step(self._meta_train_batch(inputs)[0])
        self._at_window_start = False
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            if self.args.meta_step_position == "after" and due:
                self.meta_step(*self._meta_train_batch(inputs))
            self._at_window_start = True
            self._base_losses = None
        return loss

    def meta_step(self, train_batch: dict[str, Any], base_losses: torch.Tensor | None = None) -> bool:
        """Estimates the hypergradient on `train_batch` and a meta batch and steps the meta-optimizer.

        Args:
            train_batch (`dict[str, Any]`): the training batch, prepared (on the device).
            base_losses (`torch.Tensor`, *optional*): the detached per-example losses of `train_batch` at the current
                weights, as the base step computed them. Estimators that perturb the weights (EvoGrad, `t1t2_fd`)
                hold a loss weighter's input at these losses; without them the meta step computes them with one more
                forward pass of the training batch. [`~MetaTrainer.training_step`] passes them when the meta step
                runs `after` the base step's forward. With random layers (dropout) they carry the base step's draws,
                not the meta step's common ones: still losses at the current weights, as the weighting net's input.

        Returns `False` (and changes no weight) when the hypergradient is not finite; the skip is counted in
        `meta_steps_skipped` and logged.
        """
        if not self.args.meta_profile_memory:
            return self._meta_step(train_batch, base_losses)
        # the weights, meta-parameters and training batch exist anyway: a graph that saves them adds no memory
        existing = [*self.model.parameters(), *self.model.buffers(), *self.meta_params, *tree_flatten(train_batch)[0]]
        with MemoryMeter(self.args.device, exclude=existing) as meter:
            done = self._meta_step(train_batch, base_losses)
        if done:
            self._meta_log["memory_mb"] = self._meta_log.get("memory_mb", 0.0) + meter.peak_bytes / 2**20
        return done

    @staticmethod
    def _attention_for(estimator: Any) -> contextlib.AbstractContextManager:
        """`scaled_dot_product_attention` on its math backend for an estimator that needs a second-order graph (the
        fused kernels have no double backward); any backend otherwise."""
        return sdpa_kernel(SDPBackend.MATH) if estimator.second_order else contextlib.nullcontext()

    @contextlib.contextmanager
    def _step_seeded(self, stream: int) -> Iterator[None]:
        """The torch RNG inside the block seeded by the run's seed, the step and `stream`, and as it was after it (the
        global stream is untouched, so runs, resumes and runs on another evaluation schedule draw the same)."""
        with _torch_rng_kept(self.args.device):
            torch.manual_seed((self.args.seed * 1_000_003 + self.state.global_step) * 2 + stream)
            yield

    @contextlib.contextmanager
    def _same_noise(self, stream: int) -> Iterator[None]:
        """Runs a loss with random layers (dropout, LFT's noise) on the same draws at every call of one meta step, so
        that estimators comparing the loss at several weights (EvoGrad, finite differences) see the weights' effect
        only (streams 0 and 1: the training and the meta loss)."""
        with self._step_seeded(stream):
            yield

    def _meta_step(self, train_batch: dict[str, Any], base_losses: torch.Tensor | None = None) -> bool:
        start = time.perf_counter()
        model = self.model
        model.train()
        meta_batch = self.meta_batches.next_for(
            train_batch, self.args.meta_disjoint_key, self.args.meta_disjoint_max_draws
        )
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        buffers = dict(model.named_buffers())
        leaves = [p.detach().requires_grad_(True) for p in self.meta_params]
        embedded = dict(zip(self.meta_param_names, leaves)) if self.meta_param_names is not None else {}
        external = self.external_meta_module
        external_params = dict(zip([n for n, _ in external.named_parameters()], leaves)) if external else {}

        def external_call(*call_args: Any) -> torch.Tensor:
            with self.accelerator.autocast():
                return functional_call(external, external_params, call_args)

        def per_sample(weights: dict[str, torch.Tensor], batch: dict[str, Any], training: bool = True) -> torch.Tensor:
            args, kwargs, labels = self._split_inputs(batch)
            substituted = {**{n: b.clone() for n, b in buffers.items()}, **embedded, **weights}
            attached_off = (
                self.meta_module.disabled()
                if not training and isinstance(self.meta_module, AttachedTransform)
                else contextlib.nullcontext()
            )
            meta_eval = not training and self.args.meta_loss_mode == "eval"
            mode = evaluation_mode(model) if meta_eval else contextlib.nullcontext()
            with self._same_noise(int(training)), attached_off, mode, self.batch_context(batch):
                with self.accelerator.autocast():
                    outputs = functional_call(model, substituted, args, kwargs)
            return self.per_sample_loss(logits_of(outputs), labels)

        anchored: dict[str, torch.Tensor] = {}
        estimators = [self.estimator, self.reference_estimator]
        hold_inputs = any(est is not None and est.perturbs_weights for est in estimators)
        if base_losses is not None and base_losses.shape == self._split_inputs(train_batch)[2].shape:
            anchored["losses"] = base_losses  # the base step's forward at these weights: no forward of our own

        def weighter_inputs(losses: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
            # The weighting net sees detached per-sample losses. Estimators that perturb the weights would feed it
            # the perturbed copies' losses and so differentiate through its input: for the current batch it gets
            # the losses at the current weights instead, and every estimator targets the same objective (for one
            # that evaluates the current batch at the current weights, these are the same values). `after`, the base
            # step has computed them (`base_losses`); otherwise one no-grad forward here.
            if not (hold_inputs and batch is train_batch):
                return losses
            if "losses" not in anchored:
                with torch.no_grad():
                    anchored["losses"] = per_sample(params, self.transform_inputs(batch, True, external_call))
            return anchored["losses"]

        def train_loss(weights, batch):
            losses = per_sample(weights, self.transform_inputs(batch, True, external_call))
            if self.loss_weighter is None:
                return losses.mean()
            return weighted_mean(losses, external_call(weighter_inputs(losses, batch)))

        def meta_loss(weights, batch):
            return per_sample(weights, batch, training=False).mean()

        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else self.args.learning_rate
        saved = self.estimator.state_dict() if self.estimator.stateful else None  # put back if the step is skipped
        with self._step_seeded(ESTIMATOR_STREAM), self._attention_for(self.estimator):
            result = self.estimator.estimate(params, leaves, train_loss, meta_loss, train_batch, meta_batch, lr)
        grads, loss = self._reduce(result.grads), result.meta_loss
        if self.accelerator.num_processes > 1:
            loss = self.accelerator.reduce(loss, reduction="mean")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        finite = bool(torch.isfinite(norm) and torch.isfinite(loss))
        problem = MetaStepProblem(params, leaves, train_loss, meta_loss, train_batch, meta_batch, lr)
        self._call_meta_step_event(problem, HypergradientResult(grads, loss), norm, skipped=not finite)
        if self.reference_estimator is not None and self.state.global_step % self.args.meta_diagnostics_steps == 0:
            with self._step_seeded(ESTIMATOR_STREAM), self._attention_for(self.reference_estimator):
                reference = self.reference_estimator.estimate(
                    params, leaves, train_loss, meta_loss, train_batch, meta_batch, lr
                ).grads
            self._log_agreement(grads, self._reduce(reference), defined=finite)
        if not finite:
            if saved is not None:  # e.g. HyperDistill's running average and refit window must not take this step in
                self.estimator.load_state_dict(saved)
            self.meta_steps_skipped += 1
            self._check_base_weights(params, loss, norm)
            return False
        self._nonfinite_weights = None
        self._zero_hypergradients = self._zero_hypergradients + 1 if norm == 0 else 0
        if self._zero_hypergradients == self.args.meta_zero_hypergradient_patience:
            logger.warning(
                f"The hypergradient has been exactly zero for {self._zero_hypergradients} meta steps in a row (step "
                f"{self.state.global_step}, {self.estimator.name}): the meta-parameters learn nothing. The losses may "
                "not depend on them (a transform after a zero-initialised batch norm: build the model with "
                "`zero_init_last=False`; `first_order` with a loss weighter is zero by definition), or EvoGrad's "
                "softmax is saturated (raise `temperature`)."
            )
        if self.args.meta_max_grad_norm is not None and norm > self.args.meta_max_grad_norm:
            grads = tuple(g * (self.args.meta_max_grad_norm / (norm + 1e-6)) for g in grads)
        optimizer = self.create_meta_optimizer()
        for p, g in zip(self.meta_params, grads):
            p.grad = g.to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._meta_log["count"] += 1
        self._meta_log["meta_loss"] += loss.float()
        self._meta_log["hypergradient_norm"] += norm
        self._meta_log["seconds"] += time.perf_counter() - start
        return True

    def _call_meta_step_event(
        self, problem: MetaStepProblem, result: HypergradientResult, norm: torch.Tensor, skipped: bool
    ) -> None:
        for callback in self.callback_handler.callbacks:
            on_meta_step = getattr(callback, "on_meta_step", None)
            if on_meta_step is not None:
                on_meta_step(
                    self.args, self.state, self.control, trainer=self, problem=problem, result=result,
                    hypergradient_norm=float(norm), skipped=skipped,
                )  # fmt: skip

    def _check_base_weights(self, params: dict[str, torch.Tensor], loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Logs a skipped meta step with its cause, and stops the run once the model's own weights have been non-finite
        for `meta_nonfinite_weights_patience` meta steps in a row (no meta step can help them)."""
        step, skipped = self.state.global_step, self.meta_steps_skipped
        bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
        if not bad:
            self._nonfinite_weights = None
            logger.warning(
                f"Non-finite hypergradient or meta loss at step {step} (meta loss {loss.item()}, hypergradient norm "
                f"{norm.item()}): meta step skipped, meta-parameters and estimator state unchanged ({skipped} skipped "
                "so far)."
            )
            return
        first, count = self._nonfinite_weights or (step, 0)
        self._nonfinite_weights = (first, count + 1)
        logger.warning(
            f"Meta step skipped at step {step}: the model's weights are not finite (first seen at step {first}; "
            f"{len(bad)} tensors, e.g. {bad[:3]}). The meta-parameters are unchanged; the model is not."
        )
        if count + 1 >= self.args.meta_nonfinite_weights_patience:
            raise RuntimeError(
                f"The model's weights are not finite (first seen at step {first}; {len(bad)} tensors, e.g. "
                f"{bad[:3]}), "
                f"and {count + 1} meta steps in a row were skipped for it. Check the training data for NaN or "
                "infinite values, lower `learning_rate`, set `max_grad_norm`, or train in fp32."
            )

    def _reduce(self, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Hypergradients averaged over processes (functional calls bypass DDP's own averaging)."""
        if self.accelerator.num_processes == 1:
            return grads
        return tuple(self.accelerator.reduce(g, reduction="mean") for g in grads)

    def _log_agreement(
        self, grads: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], defined: bool = True
    ) -> None:
        """Accumulates the cosine and norm ratio of the hypergradient to the reference estimator's. A step where either
        is zero (e.g. EvoGrad's softmax saturated) or not finite (a skipped meta step, `defined=False`) has no cosine:
        it is counted apart, not averaged in.
        """
        flat, ref = flatten(grads), flatten(reference)
        stats = self._meta_log
        stats["agreement_count"] = stats.get("agreement_count", 0) + 1
        value = cosine(flat, ref) if defined else math.nan
        if math.isnan(value):
            stats["cosine_undefined"] = stats.get("cosine_undefined", 0) + 1
        else:
            stats["cosine"] = stats.get("cosine", 0.0) + value
        norm_ratio = ratio(float(flat.norm()), float(ref.norm())) if defined else math.nan
        if not math.isnan(norm_ratio):
            stats["norm_ratio"] = stats.get("norm_ratio", 0.0) + norm_ratio
            stats["norm_ratio_count"] = stats.get("norm_ratio_count", 0) + 1

    # ---------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Trainer's evaluation, leaving every random state as it found it: a loader's iterator draws its seed from the
        global RNG, and an evaluation between a checkpoint and the next step would otherwise make a resumed run (and a
        run evaluated on another schedule) draw other dropout and shuffling than the run that wrote the checkpoint."""
        with random_state_kept(self.args.device):
            return super().evaluate(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean meta loss, hypergradient norm and meta step time since the last log to training logs."""
        if "loss" in logs:
            stats = self._meta_log
            if stats["count"]:
                n = stats["count"]
                logs["meta_loss"] = round(float(stats["meta_loss"]) / n, 6)
                logs["hypergradient_norm"] = float(stats["hypergradient_norm"]) / n
                logs["meta_step_seconds"] = round(stats["seconds"] / n, 6)
                if "memory_mb" in stats:
                    logs["meta_step_memory_mb"] = round(stats["memory_mb"] / n, 4)
            if stats.get("agreement_count"):
                reference, undefined = self.args.meta_diagnostics_reference, stats.get("cosine_undefined", 0)
                defined, ratios = stats["agreement_count"] - undefined, stats.get("norm_ratio_count", 0)
                logs[f"hypergradient_cosine_to_{reference}"] = stats["cosine"] / defined if defined else math.nan
                logs[f"hypergradient_norm_ratio_to_{reference}"] = stats["norm_ratio"] / ratios if ratios else math.nan
                # steps compared where either hypergradient was zero (no direction) or not finite (a skipped
                # meta step): left out of the mean cosine
                logs["hypergradient_cosine_undefined_steps"] = undefined
            logs["meta_steps_skipped"] = self.meta_steps_skipped
            self._meta_log = _empty_meta_log()
        super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------------- checkpoints
    def meta_state_dict(self) -> dict[str, Any]:
        """Everything of the meta step a checkpoint needs to continue the same run. Under several processes it holds
        the main process's estimator state and meta data position, and every process also writes its own
        (`meta_trainer_state_{process}.pt`), which it loads on resume."""
        return {
            "meta_module": self.meta_module.state_dict(),
            "meta_optimizer": self.create_meta_optimizer().state_dict(),
            **self._process_state_dict(),
            "meta_steps_skipped": self.meta_steps_skipped,
        }

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        self.meta_module.load_state_dict(state["meta_module"])
        self.create_meta_optimizer().load_state_dict(state["meta_optimizer"])
        self.estimator.load_state_dict(state["estimator"])
        self.meta_batches.load_state_dict(state["meta_data"])
        self.meta_steps_skipped = state["meta_steps_skipped"]

    def _process_state_dict(self) -> dict[str, Any]:
        """What differs between processes: the estimator's state (e.g. the remembered batches of reverse mode and
        HyperDistill, drawn from this process's shard) and this process's position in the meta data."""
        return {"estimator": self.estimator.state_dict(), "meta_data": self.meta_batches.state_dict()}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.meta_state_dict(), os.path.join(output_dir, META_STATE_NAME))
        if self.args.world_size > 1:  # every process its own, as Trainer's `rng_state_{process}.pth`
            os.makedirs(output_dir, exist_ok=True)
            name = META_PROCESS_STATE_NAME.format(self.args.process_index)
            torch.save(self._process_state_dict(), os.path.join(output_dir, name))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, META_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"Checkpoint {checkpoint} has no {META_STATE_NAME}: it was not written by MetaTrainer (or with "
                "`save_only_model=True`), so the meta-module and meta-optimizer cannot be restored."
            )
        # where the estimator's state is used; an indexed CPU device ("cpu:0" under several processes) is not a
        # location torch.load can restore to (Trainer avoids it the same way)
        location = "cpu" if self.args.device.type == "cpu" else self.args.device
        state = torch.load(path, map_location=location, weights_only=False)
        if self.args.world_size > 1:
            own = os.path.join(checkpoint, META_PROCESS_STATE_NAME.format(self.args.process_index))
            if os.path.isfile(own):
                state.update(torch.load(own, map_location=location, weights_only=False))
            else:
                logger.warning(
                    f"Checkpoint {checkpoint} has no {os.path.basename(own)} (it was written by another number of "
                    "processes): every process resumes with the main process's estimator state and meta data "
                    "position, so the run does not continue exactly as it would have."
                )
        self.load_meta_state_dict(state)

    def _load_best_model(self) -> None:
        """Trainer's, plus the meta-module of the best checkpoint (`load_best_model_at_end`): the model and meta-module
        saved after training are then the pair that checkpoint held."""
        super()._load_best_model()
        path = os.path.join(self.state.best_model_checkpoint, META_MODULE_NAME)
        if not os.path.isfile(path):
            logger.warning(
                f"The best checkpoint {self.state.best_model_checkpoint} has no {META_MODULE_NAME}: the meta-module "
                "keeps its last state, which does not belong with the best model's weights."
            )
            return
        from safetensors.torch import load_file

        self.meta_module.load_state_dict(load_file(path))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save of the model without an attached meta-module's weights (so `from_pretrained` loads the
        model as it was built, with no unexpected keys), and the meta-module on its own in
        `meta_module.safetensors`."""
        if self.meta_param_names is not None:
            left_out = set(self.meta_param_names)
            state_dict = state_dict if state_dict is not None else self.model.state_dict()
            state_dict = {k: v for k, v in state_dict.items() if k not in left_out}
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            from safetensors.torch import save_file

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.meta_module.state_dict().items()}
            save_file(tensors, os.path.join(output_dir, META_MODULE_NAME))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Trainer's warnings on loading a checkpoint's model, less the attached meta-parameters, which the model file
        leaves out on purpose (they come back from the meta state)."""
        if self.meta_param_names is not None and hasattr(load_result, "_replace"):
            left_out = set(self.meta_param_names)
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in left_out])
        super()._issue_warnings_after_load(load_result)
