"""Online meta-learning over a task distribution: the base weights restart every `meta_inner_steps` optimizer steps,
from a fixed or a Reptile-learned initialisation, while the meta-parameters carry on (HyperDistill, Algorithm 3)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .estimators.functional import sgd_unroll
from .losses import logits_of
from .meta_data import TaskBatches


class InnerOptimisations:
    """The initialisation the base weights restart from at the end of each inner optimisation of `steps` optimizer
    steps, and its Reptile step (Nichol et al., 2018): `phi <- phi - reptile_lr (phi - w_T)` with `w_T` the weights
    the inner optimisation ended at (their mean over the processes' tasks in a run of several processes);
    `reptile_lr=None` keeps `phi` fixed.

    Args:
        steps (`int`): optimizer steps per inner optimisation.
        reptile_lr (`float`, *optional*): Reptile's step size; `None` for a fixed initialisation.
        params (`Mapping[str, torch.Tensor]`): the trainable base weights; their current values are `phi`.
    """

    def __init__(self, steps: int, reptile_lr: float | None, params: Mapping[str, torch.Tensor]):
        self.steps, self.reptile_lr = steps, reptile_lr
        self.initialisation = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def restart(
        self, params: Mapping[str, torch.Tensor], average: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """Takes the Reptile step towards `params` (the weights `w_T`; `average` maps them, flattened, to their mean
        over processes) and copies the initialisation into them."""
        if list(params) != list(self.initialisation):
            raise ValueError("The model's trainable weights changed since the initialisation was taken.")
        if self.reptile_lr is not None:
            ends = [p.detach().to(phi.dtype) for p, phi in zip(params.values(), self.initialisation.values())]
            if average is not None:
                ends = average(torch.cat([t.reshape(-1) for t in ends])).split([t.numel() for t in ends])
            for phi, w_end in zip(self.initialisation.values(), ends):
                phi.add_(w_end.reshape(phi.shape) - phi, alpha=self.reptile_lr)
        for name, p in params.items():
            p.copy_(self.initialisation[name])

    def state_dict(self) -> dict[str, Any]:
        return {"initialisation": dict(self.initialisation)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["initialisation"]
        if list(saved) != list(self.initialisation):
            raise ValueError(
                "The checkpoint's initialisation holds other weights than the model's trainable ones: "
                f"{sorted(set(saved) ^ set(self.initialisation))[:5]}."
            )
        for name, value in saved.items():
            self.initialisation[name].copy_(value)


class RestartAtInnerOptimisationEnd(TrainerCallback):
    """Ends an inner optimisation after every `steps`-th optimizer step: [`MetaTrainer`]'s `end_inner_optimisation`
    runs after the optimizer step and before a checkpoint of that step is written."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.trainer.inner_optimisations.steps == 0:
            self.trainer.end_inner_optimisation()


class OnlineMetaLearning:
    """Mixed into [`MetaTrainer`]: with `meta_inner_steps`, the run is a sequence of inner optimisations, one task
    each, read in order from a [`~metatrain.data.TaskStream`]; the meta batches (and HyperDistill's fresh training
    batches) come from the current task; after each inner optimisation the weights restart
    ([`InnerOptimisations`]), the base optimizer's state is cleared and the estimator resets.

    In a run of several processes (tasks in parallel, the paper's meta-batch) each process trains its own task with
    base weights and batch-norm statistics of its own (DDP neither averages the gradients nor copies the buffers);
    the hypergradient and Reptile's step are averaged over the processes' tasks, and every process checkpoints its
    own weights and optimizer state."""

    def _start_online_run(self) -> None:
        """Checks the run's data and estimator, and sets up the restarts and the per-task batches."""
        args, steps = self.args, self.args.meta_inner_steps
        if not self.estimator.restartable:
            raise ValueError(
                f"meta_inner_steps={steps} restarts the inner optimisation, but the estimator "
                f"{type(self.estimator).__name__} keeps state across calls and cannot reset it: implement its "
                "`reset()` or use an estimator that can restart (any registered one)."
            )
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        for name, dataset in (("train_dataset", self.train_dataset), ("meta_dataset", self.meta_dataset)):
            if not hasattr(dataset, "examples_per_task") or not hasattr(dataset, "example_of"):
                kind = "a metatrain.data.TaskStream" if name == "train_dataset" else "its `tests()`"
                raise ValueError(
                    f"meta_inner_steps={steps} reads one task per inner optimisation, so {name} must be read task by "
                    f"task ({kind}), got a {type(dataset).__name__}."
                )
        if self.train_dataset.examples_per_task != steps * per_step:
            raise ValueError(
                f"The TaskStream holds {self.train_dataset.examples_per_task} examples per task, but an inner "
                f"optimisation of meta_inner_steps={steps} optimizer steps reads {steps * per_step} "
                f"(per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps} per step): build it with steps={steps}, batch_size={per_step}."
            )
        processes = getattr(self.train_dataset, "processes", 1)
        micro = getattr(self.train_dataset, "micro_batch_size", args.per_device_train_batch_size)
        if processes != args.world_size or (processes > 1 and micro != args.per_device_train_batch_size):
            raise ValueError(
                f"The TaskStream deals its tasks to {processes} process(es) in batches of {micro}, but this run has "
                f"{args.world_size} process(es) with per_device_train_batch_size {args.per_device_train_batch_size}: "
                f"build it with processes={args.world_size}, micro_batch_size={args.per_device_train_batch_size}."
            )
        if args.world_size > 1 and args.ddp_broadcast_buffers:
            raise ValueError(
                "ddp_broadcast_buffers=True copies the main process's buffers (batch-norm statistics) into every "
                "process, but in an online run each process trains a task of its own: set ddp_broadcast_buffers=False."
            )
        meta_size = args.meta_batch_size or args.per_device_train_batch_size
        if meta_size > self.meta_dataset.examples_per_task:
            raise ValueError(
                f"A meta batch of {meta_size} is more than a task's {self.meta_dataset.examples_per_task} test "
                "examples: set a smaller `meta_batch_size`."
            )
        self.meta_batches = TaskBatches(
            self.meta_dataset, meta_size, self._task_collator("meta"), self._prepare_inputs, args.seed
        )
        self.rollout_batches = TaskBatches(
            self.train_dataset, args.per_device_train_batch_size, self._task_collator("rollout"), self._prepare_inputs,
            args.seed + 1,
        )  # fmt: skip
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        if args.world_size > 1:  # every process starts from the main process's weights, as DDP's do
            from accelerate.utils import broadcast

            for p in params.values():
                p.data.copy_(broadcast(p.detach().clone(), from_process=0))
        self.inner_optimisations = InnerOptimisations(steps, args.meta_reptile_lr, params)
        self.add_callback(RestartAtInnerOptimisationEnd(self))
        self.estimator.reset()  # the first inner optimisation starts

    def _task_collator(self, description: str):
        return self._get_collator_with_removed_columns(self.data_collator, description=description)

    def _get_train_sampler(self, train_dataset=None):
        """In order for an online run (one task after another), Trainer's otherwise."""
        if self.args.meta_inner_steps is not None:
            return torch.utils.data.SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)
        return super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step; in an online run of several processes without DDP's averaging of the base gradients (each
        process trains its own task)."""
        parallel = self.args.meta_inner_steps is not None and self.accelerator.num_processes > 1
        if parallel and hasattr(model, "forward_sync_buffers"):  # nor copy the main process's batch-norm statistics
            model.forward_sync_buffers = False
        with self.accelerator.no_sync(model) if parallel else contextlib.nullcontext():
            return super().training_step(model, inputs, num_items_in_batch)

    def end_inner_optimisation(self) -> None:
        """Restarts the base weights from the initialisation (after its Reptile step), clears the base optimizer's
        state (momentum, Adam's moments) and resets the estimator."""
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        average = None
        if self.accelerator.num_processes > 1:
            average = lambda t: self.accelerator.reduce(t, reduction="mean")  # noqa: E731
        self.inner_optimisations.restart(params, average)
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self.estimator.reset()

    def meta_test(self, stream: Any, learning_rate: float | None = None) -> dict[str, float]:
        """The meta-test of an online run: each task of `stream` (a [`~metatrain.data.TaskStream`], typically of
        held-out classes) solved by `stream.steps` plain SGD steps on its training batches, from the initialisation
        and with the meta-parameters as learned, then scored on its test examples (batch norm on batch statistics, as
        in training).

        Args:
            stream ([`~metatrain.data.TaskStream`]): the meta-test tasks.
            learning_rate (`float`, *optional*): the SGD step size; defaults to `learning_rate`.

        Returns:
            `dict[str, float]`: the mean over tasks of the test `accuracy` and `loss`.
        """
        if self.inner_optimisations is None:
            raise ValueError("meta_test solves tasks from the learned initialisation: set `meta_inner_steps`.")
        lr = self.args.learning_rate if learning_rate is None else learning_rate
        objective, collate, tests = self.meta_objective(), self._task_collator("meta-test"), stream.tests()
        start = {name: phi.detach().clone() for name, phi in self.inner_optimisations.initialisation.items()}
        accuracies, losses = [], []
        was_training = self.model.training
        self.model.train()
        for k in tqdm(range(stream.num_tasks), desc="meta-test", leave=False, disable=self.args.disable_tqdm):
            batches = [self._prepare_inputs(collate(items)) for items in stream.batches_of(k)]
            weights = sgd_unroll(start, objective.train_loss, batches, [lr] * stream.steps, create_graph=False)
            test = self._prepare_inputs(collate(tests.examples_of(k)))
            args, kwargs, labels = objective.split_inputs(test)
            state = {**{n: b.clone() for n, b in self.model.named_buffers()}, **weights}
            # as the meta loss sees it (an attached transform off)
            with torch.no_grad(), self._role.meta_loss_context(), self._role.batch_context(test):
                with self.accelerator.autocast():
                    logits = logits_of(functional_call(self.model, state, args, kwargs)).float()
            accuracies.append(float((logits.argmax(-1) == labels).float().mean()))
            losses.append(float(torch.nn.functional.cross_entropy(logits, labels)))
        self.model.train(was_training)
        return {"accuracy": float(np.mean(accuracies)), "loss": float(np.mean(losses))}
