"""Online meta-learning over a task distribution: the base weights restart every `meta_inner_steps` optimizer steps,
from a fixed or a Reptile-learned initialisation, while the meta-parameters carry on (HyperDistill, Algorithm 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from .meta_data import TaskBatches


class InnerOptimisations:
    """The initialisation the base weights restart from at the end of each inner optimisation of `steps` optimizer
    steps, and its Reptile step (Nichol et al., 2018): `phi <- phi - reptile_lr (phi - w_T)` with `w_T` the weights
    the inner optimisation ended at; `reptile_lr=None` keeps `phi` fixed.

    Args:
        steps (`int`): optimizer steps per inner optimisation.
        reptile_lr (`float`, *optional*): Reptile's step size; `None` for a fixed initialisation.
        params (`Mapping[str, torch.Tensor]`): the trainable base weights; their current values are `phi`.
    """

    def __init__(self, steps: int, reptile_lr: float | None, params: Mapping[str, torch.Tensor]):
        self.steps, self.reptile_lr = steps, reptile_lr
        self.initialisation = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def restart(self, params: Mapping[str, torch.Tensor]) -> None:
        """Takes the Reptile step towards `params` (the weights `w_T`) and copies the initialisation into them."""
        if list(params) != list(self.initialisation):
            raise ValueError("The model's trainable weights changed since the initialisation was taken.")
        for name, p in params.items():
            phi = self.initialisation[name]
            if self.reptile_lr is not None:
                phi.add_(p.detach().to(phi.dtype) - phi, alpha=self.reptile_lr)
            p.copy_(phi)

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
    ([`InnerOptimisations`]), the base optimizer's state is cleared and the estimator resets."""

    def _start_online_run(self) -> None:
        """Checks the run's data and estimator, and sets up the restarts and the per-task batches."""
        args, steps = self.args, self.args.meta_inner_steps
        if not self.estimator.restartable:
            raise ValueError(
                f"meta_inner_steps={steps} restarts the inner optimisation, but the estimator "
                f"{type(self.estimator).__name__} keeps state across calls and cannot reset it: implement its "
                "`reset()` or use an estimator that can restart (any registered one)."
            )
        if args.world_size > 1:
            raise ValueError(
                f"meta_inner_steps={steps} runs in one process for now (each process would need a task of its own); "
                f"this run has {args.world_size}."
            )
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        for name, dataset in (("train_dataset", self.train_dataset), ("meta_dataset", self.meta_dataset)):
            if not hasattr(dataset, "examples_per_task"):
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

    def end_inner_optimisation(self) -> None:
        """Restarts the base weights from the initialisation (after its Reptile step), clears the base optimizer's
        state (momentum, Adam's moments) and resets the estimator."""
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.inner_optimisations.restart(params)
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self.estimator.reset()
