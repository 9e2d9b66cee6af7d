"""The checkpoint part of [`MetaTrainer`]: the meta step's state (meta-module, meta-optimizer, estimator, meta data
position, statistics) saved beside Trainer's and loaded on resume, and the meta-module kept out of the model file."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

META_STATE_NAME = "meta_trainer_state.pt"
# under several processes, each one's own estimator state and meta data position (its shard of the batches)
META_PROCESS_STATE_NAME = "meta_trainer_state_{}.pt"
# the meta-module's weights, beside the model's (which leave out an attached meta-module's)
META_MODULE_NAME = "meta_module.safetensors"


class MetaCheckpoints:
    """Trainer's checkpoint hooks extended with the meta step's state, so that a resumed run is the same run. Mixed
    into [`MetaTrainer`], whose `meta_module`, `estimator`, `meta_batches`, `rollout_batches`, `meta_statistics`,
    `inner_optimisations` and `meta_param_names` it saves and restores."""

    def meta_state_dict(self) -> dict[str, Any]:
        """Everything of the meta step a checkpoint needs to continue the same run. Under several processes it holds
        the main process's estimator state and meta data position, and every process also writes its own
        (`meta_trainer_state_{process}.pt`), which it loads on resume."""
        return {
            "meta_module": self.meta_module.state_dict(),
            "meta_optimizer": self.create_meta_optimizer().state_dict(),
            **self._process_state_dict(task_state=False),  # the model and optimizer files hold the main process's
            "statistics": self.meta_statistics.state_dict(),
            "meta_step_position": self.meta_step_position,
            "inner_optimisations": None if self.inner_optimisations is None else self.inner_optimisations.state_dict(),
        }

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        self.meta_module.load_state_dict(state["meta_module"])
        self.create_meta_optimizer().load_state_dict(state["meta_optimizer"])
        self.estimator.load_state_dict(state["estimator"])
        self.meta_batches.load_state_dict(state["meta_data"])
        if self.rollout_batches is not None and state.get("rollout_data") is not None:
            self.rollout_batches.load_state_dict(state["rollout_data"])
        self.meta_statistics.load_state_dict(state["statistics"])
        if self.inner_optimisations is not None:
            if state.get("inner_optimisations") is None:
                raise ValueError(
                    "The checkpoint was written by a run without `meta_inner_steps`: it has no initialisation to "
                    "restart the base weights from. Resume it without `meta_inner_steps`."
                )
            self.inner_optimisations.load_state_dict(state["inner_optimisations"])
            if state.get("task_weights") is not None:  # this process's own (the model file holds the main one's)
                with torch.no_grad():
                    for name, p in self.model.named_parameters():
                        if p.requires_grad:
                            p.copy_(state["task_weights"][name])
                self.optimizer.load_state_dict(state["task_optimizer"])
        saved = state.get("meta_step_position", self.meta_step_position)
        if saved != self.meta_step_position:
            logger.warning(
                f"The checkpoint's run placed the meta step {saved!r} the base step's forward, this trainer places it "
                f"{self.meta_step_position!r}: the resumed run is not the run that wrote the checkpoint. Set "
                f"`meta_step_position={saved!r}` to continue it."
            )

    def _process_state_dict(self, task_state: bool = True) -> dict[str, Any]:
        """What differs between processes: the estimator's state (e.g. the remembered batches of reverse mode and
        HyperDistill, drawn from this process's shard), this process's position in the meta data, and in an online
        run of several processes (with `task_state`) its own task's base weights and base optimizer state."""
        state = {
            "estimator": self.estimator.state_dict(),
            "meta_data": self.meta_batches.state_dict(),
            "rollout_data": None if self.rollout_batches is None else self.rollout_batches.state_dict(),
        }
        if task_state and self.inner_optimisations is not None and self.args.world_size > 1:
            weights = {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}
            state["task_weights"], state["task_optimizer"] = weights, self.optimizer.state_dict()
        return state

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

    def _added_to_model(self) -> set[str]:
        """The model's state-dict keys of what attaching the meta-module added (its parameters and buffers): left out
        of the model file. None for a module outside the model or one made of the model's own layers (ANIL's)."""
        if self.meta_param_names is None or not getattr(self.meta_module, "added_to_model", True):
            return set()
        owned = {id(t) for t in (*self.meta_module.parameters(), *self.meta_module.buffers())}
        model = self.model
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        return {name for name, t in named if id(t) in owned}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save of the model without what attaching the meta-module added (so `from_pretrained` loads the
        model as it was built, with no unexpected keys), and the meta-module on its own in
        `meta_module.safetensors`."""
        left_out = self._added_to_model()
        if left_out:
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
        left_out = self._added_to_model()
        if left_out and hasattr(load_result, "_replace"):
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in left_out])
        super()._issue_warnings_after_load(load_result)
