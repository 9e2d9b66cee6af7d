"""The meta-step event of [`MetaTrainer`]."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState

from .estimators import HypergradientProblem, HypergradientResult
from .objective import MetaObjective
from .statistics import MetaStatistics
from .training_args import MetaTrainingArguments

if TYPE_CHECKING:
    from .trainer import MetaTrainer


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
        objective: MetaObjective,
        problem: HypergradientProblem,
        result: HypergradientResult,
        statistics: MetaStatistics,
        hypergradient_norm: float,
        skipped: bool,
        **kwargs: Any,
    ) -> None:
        """Args:
        trainer ([`MetaTrainer`]): the trainer.
        objective ([`~metatrain.objective.MetaObjective`]): the step's losses; `objective.problem(...)` builds
            another problem on them (other batches, other weights).
        problem ([`~metatrain.estimators.HypergradientProblem`]): the step's weights, meta-parameters, losses,
            batches and learning rate; `other_estimator.estimate(problem)` compares another estimator on the same
            step (its random draws then come from the global RNG: restore it if the run must not change).
        result (`HypergradientResult`): the hypergradient (averaged over processes) and the meta loss.
        statistics ([`~metatrain.statistics.MetaStatistics`]): the run's meta statistics before this step.
        hypergradient_norm (`float`): its norm before clipping.
        skipped (`bool`): whether the step is skipped (not finite) and nothing will be applied.
        """
