"""`MetaTrainer`: a `transformers.Trainer` that learns meta-parameters between ordinary optimizer steps."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten
from transformers import PreTrainedModel

from .batches import join_batches, padding_values
from .callbacks import MetaTrainerCallback
from .checkpointing import META_MODULE_NAME, META_PROCESS_STATE_NAME, META_STATE_NAME, MetaCheckpoints
from .construction_checks import ConstructionChecks, check_arguments
from .estimators import HypergradientEstimator, HypergradientProblem, HypergradientResult, create_estimator
from .inner_optimisations import OnlineMetaLearning
from .meta_data import EpochSeededSampler, MetaBatches
from .modules import MetaModule
from .objective import MetaObjective
from .per_sample import PerSampleLossTrainer
from .profiling import MemoryMeter
from .sharded import check_sharded_estimator, estimate_sharded, is_sharded
from .statistics import MetaStatistics
from .step_guards import MetaStepGuards
from .training_args import MIXED_PRECISION_EVOGRAD, SUPPORTED_SETUPS, MetaTrainingArguments
from .utils import cosine, evaluation_mode, flatten, random_state_kept, ratio, step_seed, torch_rng_kept

# the random stream of the estimator's own draws (EvoGrad's population) in a meta step; 0 and 1 are the losses'
ESTIMATOR_STREAM = 2**61 + 1

__all__ = [
    "ESTIMATOR_STREAM",
    "META_MODULE_NAME",
    "META_PROCESS_STATE_NAME",
    "META_STATE_NAME",
    "MIXED_PRECISION_EVOGRAD",
    "MetaTrainer",
    "MetaTrainerCallback",
    "PerSampleLossTrainer",
    "evaluation_mode",
    "join_batches",
]


def __getattr__(name: str) -> Any:
    if name == "MetaStepProblem":
        raise AttributeError(
            "metatrain.trainer.MetaStepProblem was replaced by metatrain.estimators.HypergradientProblem "
            "(`estimator.estimate(problem)` compares another estimator on the event's problem)."
        )
    raise AttributeError(f"module 'metatrain.trainer' has no attribute {name!r}")


class MetaTrainer(ConstructionChecks, MetaCheckpoints, OnlineMetaLearning, PerSampleLossTrainer):
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
        # where the meta-parameters are in the model (an attached module), or None (one outside it)
        self.meta_param_names = check_arguments(model, args, meta_dataset, meta_module, estimator)
        self.meta_params = list(meta_module.parameters())
        for p in self.meta_params:
            p.requires_grad_(False)

        super().__init__(
            model, args, *trainer_args, per_sample_loss=per_sample_loss, model_input_names=model_input_names, **kwargs
        )
        if self.is_deepspeed_enabled:
            raise ValueError(f"MetaTrainer does not support DeepSpeed. Supported: {SUPPORTED_SETUPS}.")
        self.meta_dataset = meta_dataset
        self.meta_module = meta_module
        # the meta-module's part in the losses (a plain attached module has none)
        self._role = meta_module if isinstance(meta_module, MetaModule) else MetaModule()
        if self.args.meta_disjoint_key is not None:
            self.trainer_batch_keys.append(self.args.meta_disjoint_key)
        if self.args.meta_inner_steps is not None:  # the task of each example: its meta batch is drawn from it
            self.trainer_batch_keys.append("task")
        self.trainer_batch_keys += [k for k in self._role.batch_keys if k not in self.trainer_batch_keys]
        if self.meta_param_names is None:  # outside the model: Accelerate does not place it
            meta_module.to(self.args.device)
        self.estimator = estimator or create_estimator(self.args.hypergradient, **self.args.estimator_options())
        if self.is_fsdp_enabled:
            self._check_fsdp()
        # unset: `after` where the base step's per-example losses spare the meta step a forward (a loss weighter's
        # held input; not on a joined accumulation window), `before` (the papers' order) otherwise
        saves = self._role.reads_losses and self.estimator.uses_held_train_loss
        joined = self.args.meta_train_batch == "window" and self.args.gradient_accumulation_steps > 1
        self.meta_step_position = self.args.meta_step_position or ("after" if saves and not joined else "before")
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
        # the run's meta statistics (checkpointed), and those since the last training log
        self.meta_statistics, self._logged = MetaStatistics(), MetaStatistics()
        self._at_window_start = True
        # the detached per-example losses of the last training forward in the current accumulation window
        self._base_losses: torch.Tensor | None = None
        self._guards = MetaStepGuards(
            self.args.meta_zero_hypergradient_patience, self.args.meta_nonfinite_weights_patience
        )
        self._check_meta_dataset()
        self._set_find_unused_parameters()
        # the meta batches, endlessly and resumably (their position is part of the checkpoint)
        self.meta_batches = MetaBatches(
            self.get_meta_dataloader, EpochSeededSampler(len(meta_dataset), self.args.seed), self._prepare_inputs
        )
        # fresh training batches for estimators that roll out a trajectory of their own (HyperDistill's fit), in an
        # order of their own; drawn only when asked, and resumable like the meta batches
        self.rollout_batches = None
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):
            sampler = EpochSeededSampler(len(self.train_dataset), self.args.seed + 1)
            self.rollout_batches = MetaBatches(self._get_rollout_dataloader, sampler, self._prepare_inputs)
        self.inner_optimisations = None  # the restarts of an online run over a task distribution
        if self.args.meta_inner_steps is not None:
            self._start_online_run()

    def _check_fsdp(self) -> None:
        """Refuses what the meta step cannot do on FSDP2's shards, naming the fix."""
        version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(
                f"MetaTrainer supports FSDP version 2 only, got version {version}: set `fsdp_version: 2` in the "
                "accelerate config or `fsdp_config={'version': 2}`."
            )
        check_sharded_estimator(self.estimator)
        if self.meta_param_names is not None:
            raise ValueError(
                "A meta-module attached inside the model is not supported under FSDP through MetaTrainer yet: "
                "Accelerate would shard its parameters with the model's. Use a meta-module outside the model (a loss "
                "weighter such as MetaWeightNet, or an input transform), or train with DDP."
            )

    @property
    def meta_steps_skipped(self) -> int:
        """Meta steps skipped so far (a non-finite hypergradient or meta loss)."""
        return self.meta_statistics.skipped

    # ------------------------------------------------------------------------------------ the meta-module's part
    def reduce_loss(self, losses: torch.Tensor, training: bool) -> torch.Tensor:
        """The meta-module's training loss in training (a loss weighter's `sum(w * l) / sum(w)`), else the mean."""
        if not training:
            return losses.mean()
        if self._role.reads_losses:
            self._base_losses = losses.detach()  # for the meta step `after` (cleared at each window's ends)
        # a module outside the model is not prepared: Accelerate does not autocast it
        with self.accelerator.autocast():
            return self._role.training_loss(losses)

    def transform_inputs(self, inputs: dict[str, Any], training: bool) -> dict[str, Any]:
        """The meta-module's training inputs in training (an input transform applied), `inputs` otherwise."""
        if not training:
            return inputs
        with self.accelerator.autocast():
            return self._role.training_inputs(inputs)

    def batch_context(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """The meta-module's [`~metatrain.modules.MetaModule.batch_context`] (e.g. which examples of the batch are
        source-language), entered around every forward of the model, in the meta step too."""
        return self._role.batch_context(batch)

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

    def _get_rollout_dataloader(self, sampler: EpochSeededSampler):
        """A loader over the training set with `sampler`, batched as training is."""
        return self._get_dataloader(
            self.train_dataset,
            description="rollout",
            batch_size=self.args.per_device_train_batch_size,
            sampler_fn=lambda _: sampler,
            is_training=True,
        )

    def _draw_train_batches(self, train_batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
        """`n` fresh training batches (of `train_batch`'s task in an online run)."""
        if self.rollout_batches is None:
            raise ValueError(
                f"The {self.estimator.name!r} estimator draws fresh training batches, which needs a train_dataset "
                "with a length (not an iterable dataset)."
            )
        return [self.rollout_batches.next_for(train_batch) for _ in range(n)]

    # ------------------------------------------------------------------------------------------------- meta step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's prefetch of one accumulation window, remembered for the meta step's training batch."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window_batches = batch_samples
        return batch_samples, num_items_in_batch

    def _joins_window(self, inputs: dict[str, Any]) -> bool:
        window = getattr(self, "_window_batches", None) or []
        return self.args.meta_train_batch == "window" and len(window) >= 2 and any(b is inputs for b in window)

    def _meta_train_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The meta step's training batch: with `meta_train_batch="window"`, the micro-batches of the accumulation
        window joined into the equivalent larger batch; otherwise (or outside Trainer's loop) `inputs`. Also the base
        step's per-example losses of that batch where the base step has computed them already (`after`; never on a
        joined window: a batch norm there normalizes each micro-batch by its own statistics)."""
        if not self._joins_window(inputs):
            return self._prepare_inputs(inputs), self._base_losses
        window = self._window_batches
        padding = padding_values(self.data_collator, self.processing_class, self.args.label_names)
        return join_batches([self._prepare_inputs(b) for b in window], *padding), None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step plus one meta step per optimizer step (every `meta_interval` steps)."""
        due = self.state.global_step % self.args.meta_interval == 0
        if self._at_window_start:
            self._base_losses = None
            if self.meta_step_position == "before" and due:
                self.meta_step(self._meta_train_batch(inputs)[0])
        self._at_window_start = False
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            if self.meta_step_position == "after" and due:
                self.meta_step(*self._meta_train_batch(inputs))
            self._at_window_start = True
            self._base_losses = None
        return loss

    @contextlib.contextmanager
    def _step_seeded(self, stream: int) -> Iterator[None]:
        """The torch RNG inside the block seeded by [`~metatrain.utils.step_seed`] of the run's seed, the step and
        `stream`, and as it was after it (the global stream is untouched, so runs, resumes and runs on another
        evaluation schedule draw the same)."""
        with torch_rng_kept(self.args.device):
            torch.manual_seed(step_seed(self.args.seed, self.state.global_step, stream))
            yield

    def meta_objective(self, meta_params: list[torch.Tensor] | None = None) -> MetaObjective:
        """The losses of a meta step at this step: the model (in the mode it is in) and the meta-module on
        `meta_params` (stand-ins for the meta-parameters; their own by default), with the trainer's per-example loss,
        autocast, and the step's common random draws for random layers."""
        return MetaObjective(
            self.model, self.meta_module, meta_params=meta_params, per_sample_loss=self.per_sample_loss,
            split_inputs=self._split_inputs, autocast=self.accelerator.autocast, noise=self._step_seeded,
            meta_loss_mode=self.args.meta_loss_mode,
        )  # fmt: skip

    def meta_step(self, train_batch: dict[str, Any], base_losses: torch.Tensor | None = None) -> bool:
        """Estimates the hypergradient on `train_batch` and a meta batch and steps the meta-optimizer.

        Args:
            train_batch (`dict[str, Any]`): the training batch (moved to the device here where it is not).
            base_losses (`torch.Tensor`, *optional*): the detached per-example losses of `train_batch` at the current
                weights, as the base step computed them: a loss weighter's held input for estimators that perturb
                the weights (EvoGrad, `t1t2_fd`), instead of one more forward of the training batch.
                [`~MetaTrainer.training_step`] passes them when the meta step runs `after` the base step's forward.

        Returns `False` (and changes no weight) when the hypergradient is not finite; the skip is counted in
        `meta_steps_skipped` and logged.
        """
        start = time.perf_counter()
        train_batch = self._prepare_inputs(train_batch)
        if not self.args.meta_profile_memory:
            return self._meta_step(train_batch, base_losses, start)
        # the weights, meta-parameters and training batch exist anyway: a graph that saves them adds no memory
        weights = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]
        existing = [*weights, *self.model.buffers(), *self.meta_params, *tree_flatten(train_batch)[0]]
        with MemoryMeter(self.args.device, exclude=existing) as meter:
            done = self._meta_step(train_batch, base_losses, start)
        if done:
            for statistics in (self.meta_statistics, self._logged):
                statistics.add_memory(meter.peak_bytes / 2**20)
        return done

    def _estimate(self, estimator: HypergradientEstimator, problem: HypergradientProblem) -> HypergradientResult:
        """`estimator` on `problem`, its draws seeded by the step, averaged over processes; attention on the math
        backend for an estimator that needs a second-order graph (the fused kernels have no double backward)."""
        attention = sdpa_kernel(SDPBackend.MATH) if estimator.second_order else contextlib.nullcontext()
        with self._step_seeded(ESTIMATOR_STREAM), attention:
            if is_sharded(self.model):  # FSDP2: on the local shards, in place
                result = estimate_sharded(estimator, problem, self.model)
            else:
                result = estimator.estimate(problem)
        grads, loss = result.grads, result.meta_loss
        if self.accelerator.num_processes > 1:  # functional calls bypass DDP's own averaging
            grads = tuple(self.accelerator.reduce(g, reduction="mean") for g in grads)
            loss = self.accelerator.reduce(loss, reduction="mean")
        return HypergradientResult(grads, loss)

    def _meta_step(self, train_batch: dict[str, Any], base_losses: torch.Tensor | None, start: float) -> bool:
        self.model.train()
        meta_batch = self.meta_batches.next_for(
            train_batch, self.args.meta_disjoint_key, self.args.meta_disjoint_max_draws
        )
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        objective = self.meta_objective([p.detach().requires_grad_(True) for p in self.meta_params])
        # the base step's losses of another batch (a joined window) are not this batch's held input
        if base_losses is not None and len(base_losses) != len(self._split_inputs(train_batch)[2]):
            base_losses = None
        estimators = (self.estimator, self.reference_estimator)
        held = self._role.reads_losses and any(e is not None and e.uses_held_train_loss for e in estimators)
        if base_losses is None and held and is_sharded(self.model):
            base_losses = objective.held_losses(train_batch)  # before the sharded estimator moves the weights
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else self.args.learning_rate
        problem = objective.problem(
            train_batch, meta_batch, lr, params=params, held_losses=base_losses,
            train_batches=functools.partial(self._draw_train_batches, train_batch),
        )  # fmt: skip
        saved = self.estimator.state_dict() if self.estimator.stateful else None  # put back if the step is skipped
        result = self._estimate(self.estimator, problem)
        grads, loss = result.grads, result.meta_loss
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        finite = bool(torch.isfinite(norm) and torch.isfinite(loss))
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "on_meta_step"):
                callback.on_meta_step(
                    self.args, self.state, self.control, trainer=self, objective=objective, problem=problem,
                    result=result, statistics=self.meta_statistics, hypergradient_norm=float(norm),
                    skipped=not finite,
                )  # fmt: skip
        if self.reference_estimator is not None and self.state.global_step % self.args.meta_diagnostics_steps == 0:
            self._compare(grads, self._estimate(self.reference_estimator, problem).grads, defined=finite)
        if not finite:
            if saved is not None:  # e.g. HyperDistill's running average and refit window must not take this step in
                self.estimator.load_state_dict(saved)
            self.meta_statistics.skipped += 1
            self._guards.skipped(params, loss, norm, self.state.global_step, self.meta_statistics.skipped)
            return False
        self._guards.done(norm, self.state.global_step, self.estimator.name)
        if self.args.meta_max_grad_norm is not None and norm > self.args.meta_max_grad_norm:
            grads = tuple(g * (self.args.meta_max_grad_norm / (norm + 1e-6)) for g in grads)
        optimizer = self.create_meta_optimizer()
        for p, g in zip(self.meta_params, grads):
            p.grad = g.to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for statistics in (self.meta_statistics, self._logged):
            statistics.add_step(float(loss), float(norm), time.perf_counter() - start)
        return True

    def _compare(self, grads: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], defined: bool) -> None:
        """Counts the cosine and norm ratio of the hypergradient to the reference estimator's. A step where either is
        zero (e.g. EvoGrad's softmax saturated) or not finite (a skipped meta step, `defined=False`) has no cosine."""
        flat, ref = flatten(grads), flatten(reference)
        value = cosine(flat, ref) if defined else math.nan
        norm_ratio = ratio(float(flat.norm()), float(ref.norm())) if defined else math.nan
        for statistics in (self.meta_statistics, self._logged):
            statistics.add_agreement(value, norm_ratio)

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
            logs.update(self._logged.logs(self.args.meta_diagnostics_reference))
            logs["meta_steps_skipped"] = self.meta_statistics.skipped
            self._logged = MetaStatistics()
        super().log(logs, start_time)
