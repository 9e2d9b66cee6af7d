"""The meta objective: the training and meta losses of a model and a meta-module as functions of weights and a batch,
written once for [`MetaTrainer`]'s meta step and for the offline [`~metatrain.diagnostics.compare_estimators`]."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .estimators import HypergradientProblem
from .estimators.functional import ParamDict
from .losses import logits_of, per_sample_cross_entropy
from .modules import MetaModule
from .utils import evaluation_mode

META_LOSS_MODES = ("train", "eval")


def split_pair(batch: Any) -> tuple[tuple, dict[str, Any], torch.Tensor]:
    """`(args, kwargs, labels)` of a batch `(inputs, labels)`, `inputs` a tensor or a tuple of positional inputs."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"Batches must be `(inputs, labels)` pairs, got {type(batch).__name__}.")
    inputs, labels = batch
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}, labels


class MetaObjective:
    """The two losses of a meta step, as functions `loss(weights, batch)` of a weight dict and a batch.

    The model runs through `torch.func.functional_call` on the weights given, with freshly cloned buffers at every
    call (batch norm statistics are never changed), in the mode it is in. The meta-module takes its part through
    the methods of [`~metatrain.modules.MetaModule`]: a loss weighter weights the per-example training losses, an
    input transform transforms the training inputs, an attached transform is off in the meta loss. Build one per
    meta step: [`~MetaObjective.problem`] holds a loss weighter's input for that step.

    Args:
        model (`nn.Module`): the model.
        meta_module (`nn.Module`, *optional*): holds the meta-parameters, inside the model or outside it.
        meta_params (`Sequence[torch.Tensor]`, *optional*): tensors that stand for the meta-module's parameters in
            the losses (the meta step's leaves); defaults to its own parameters, used as they are.
        per_sample_loss (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`, *optional*): logits and labels to
            per-example losses `[B]`; defaults to [`~metatrain.losses.per_sample_cross_entropy`].
        split_inputs (`Callable[[Any], tuple[tuple, dict, torch.Tensor]]`, *optional*): a batch to the model's
            positional and keyword inputs and the labels; defaults to [`split_pair`] (`(inputs, labels)` batches).
        autocast (`Callable[[], ContextManager]`, *optional*): mixed precision around every forward.
        noise (`Callable[[int], ContextManager]`, *optional*): the random state of every loss call, by stream (0 for
            the training loss, 1 for the meta loss): the same draws at every call of one meta step, so that estimators
            comparing a loss at several weights see the weights' effect only.
        meta_loss_mode (`str`, *optional*, defaults to `"train"`): `"eval"` runs the meta loss in evaluation mode.
    """

    def __init__(
        self,
        model: nn.Module,
        meta_module: nn.Module | None = None,
        *,
        meta_params: Sequence[torch.Tensor] | None = None,
        per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        split_inputs: Callable[[Any], tuple[tuple, dict[str, Any], torch.Tensor]] | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        noise: Callable[[int], contextlib.AbstractContextManager] | None = None,
        meta_loss_mode: str = "train",
    ):
        if meta_loss_mode not in META_LOSS_MODES:
            raise ValueError(f"meta_loss_mode must be one of {META_LOSS_MODES}, got {meta_loss_mode!r}.")
        self.model = model
        self.meta_module = meta_module
        # a module that is not a MetaModule (an attached plain module) has no part of its own
        self.role = meta_module if isinstance(meta_module, MetaModule) else MetaModule()
        own = list(meta_module.parameters()) if meta_module is not None else []
        self.meta_params = list(meta_params) if meta_params is not None else own
        if len(self.meta_params) != len(own):
            raise ValueError(
                f"meta_params has {len(self.meta_params)} tensors for the meta-module's {len(own)} parameters."
            )
        substitutes = meta_params is not None
        in_model = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        # the stand-ins, by name in the model (an attached module) or in the module (one outside the model)
        self._in_model = {
            in_model[id(p)]: s for p, s in zip(own, self.meta_params) if substitutes and id(p) in in_model
        }
        names = [name for name, _ in meta_module.named_parameters()] if meta_module is not None else []
        self._in_module = dict(zip(names, self.meta_params)) if substitutes and not self._in_model else {}
        self.per_sample_loss = per_sample_loss or per_sample_cross_entropy
        self.split_inputs = split_inputs or split_pair
        self.autocast = autocast
        self.noise = noise or (lambda stream: contextlib.nullcontext())
        self.meta_loss_mode = meta_loss_mode

    def call_module(self, *args: Any) -> Any:
        """The meta-module on `args`, on the stand-ins for its parameters, under `autocast`."""
        with self.autocast():
            if self._in_module:
                return functional_call(self.meta_module, self._in_module, args)
            return self.meta_module(*args)

    def per_sample(self, weights: ParamDict, batch: Any, training: bool = True) -> torch.Tensor:
        """Per-example losses `[B]` of `batch` as the model computes them at `weights` (weights not given keep the
        model's values): in the training loss's setting, or with `training=False` the meta loss's."""
        args, kwargs, labels = self.split_inputs(batch)
        substituted = {**{n: b.clone() for n, b in self.model.named_buffers()}, **self._in_model, **weights}
        off = contextlib.nullcontext() if training else self.role.meta_loss_context()
        eval_mode = not training and self.meta_loss_mode == "eval"
        mode = evaluation_mode(self.model) if eval_mode else contextlib.nullcontext()
        with self.noise(int(training)), off, mode, self.role.batch_context(batch):
            with self.autocast():
                outputs = functional_call(self.model, substituted, args, kwargs)
        return self.per_sample_loss(logits_of(outputs), labels)

    def training_inputs(self, batch: Any) -> Any:
        """`batch` as the model sees it in training (an input transform applied)."""
        with self.autocast():
            return self.role.training_inputs(batch, self.call_module)

    def train_loss(self, weights: ParamDict, batch: Any) -> torch.Tensor:
        """The training loss: the meta-module's reduction of the per-example losses (the mean for most)."""
        inputs = self.training_inputs(batch)
        return self._reduce(self.per_sample(weights, inputs), batch=inputs)

    def meta_loss(self, weights: ParamDict, batch: Any) -> torch.Tensor:
        """The meta (validation) loss: the mean per-example loss, an attached transform off."""
        return self.per_sample(weights, batch, training=False).mean()

    @torch.no_grad()
    def held_losses(self, batch: Any, weights: ParamDict | None = None) -> torch.Tensor:
        """The per-example training losses of `batch` at `weights` (the model's own by default), without a graph: a
        loss weighter's held input."""
        return self.per_sample(weights or {}, self.training_inputs(batch))

    def _reduce(self, losses: torch.Tensor, held: torch.Tensor | None = None, batch: Any = None) -> torch.Tensor:
        """The meta-module's training loss of `losses`, inside its `batch_context` of `batch` where one is given."""
        with self.role.batch_context(batch) if batch is not None else contextlib.nullcontext():
            return self.role.training_loss(losses, self.call_module, held)

    def problem(
        self,
        train_batch: Any,
        meta_batch: Any,
        lr: float | None,
        params: Mapping[str, torch.Tensor] | None = None,
        held_losses: torch.Tensor | None = None,
        train_batches: Callable[[int], Sequence[Any]] | None = None,
    ) -> HypergradientProblem:
        """The hypergradient problem of one step on these batches.

        Args:
            train_batch, meta_batch: the batches.
            lr (`float`): the inner step size.
            params (`Mapping[str, torch.Tensor]`, *optional*): the current weights; defaults to the model's
                trainable weights, detached.
            held_losses (`torch.Tensor`, *optional*): the per-example losses of `train_batch` at `params`, where
                they are known already (the base step's): a loss weighter's held input. Otherwise they are computed
                with one forward, under `torch.no_grad`, the first time an estimator needs them.
            train_batches (`Callable[[int], Sequence]`, *optional*): draws fresh training batches, for estimators that
                roll out a trajectory of their own (HyperDistill's fit of `theta`).

        Returns:
            [`~metatrain.estimators.HypergradientProblem`]: its `held_train_loss` feeds a loss weighter the losses at
            `params` whatever weights it is evaluated at.
        """
        if params is None:
            params = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        held_train_loss = None
        if self.role.reads_losses:
            held = {} if held_losses is None else {"losses": held_losses}

            def held_train_loss(weights: ParamDict) -> torch.Tensor:
                inputs = self.training_inputs(train_batch)
                losses = self.per_sample(weights, inputs)
                if "losses" not in held:
                    held["losses"] = self.held_losses(train_batch, params)
                return self._reduce(losses, held["losses"], batch=inputs)

        return HypergradientProblem(
            params,
            self.meta_params,
            self.train_loss,
            self.meta_loss,
            train_batch,
            meta_batch,
            lr,
            held_train_loss,
            train_batches,
        )
