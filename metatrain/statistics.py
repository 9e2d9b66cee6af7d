"""What [`MetaTrainer`]'s meta steps measured: losses, hypergradient norms, time, memory and agreement with a reference
estimator, summed over steps."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class MetaStatistics:
    """Sums over applied meta steps (a skipped one is counted in `skipped` only) and over the steps compared with the
    reference estimator (`meta_diagnostics_steps`). [`MetaTrainer`] keeps one over the run (`trainer.meta_statistics`,
    checkpointed) and one since the last training log, whose means it logs.

    Args:
        steps (`int`): meta steps applied.
        skipped (`int`): meta steps skipped (a non-finite hypergradient or meta loss).
        meta_loss, hypergradient_norm, seconds (`float`): sums over the applied steps.
        memory_mb (`float`): sum of the meta step memory over the `memory_steps` steps measured
            (`meta_profile_memory`).
        compared (`int`): steps compared with the reference estimator; `cosine_undefined` of them had no cosine
            (either hypergradient zero or not finite); `cosine` sums the others'; `norm_ratio` sums the
            `norm_ratios` defined norm ratios.
    """

    steps: int = 0
    skipped: int = 0
    meta_loss: float = 0.0
    hypergradient_norm: float = 0.0
    seconds: float = 0.0
    memory_mb: float = 0.0
    memory_steps: int = 0
    compared: int = 0
    cosine: float = 0.0
    cosine_undefined: int = 0
    norm_ratio: float = 0.0
    norm_ratios: int = 0

    def add_step(self, meta_loss: float, hypergradient_norm: float, seconds: float) -> None:
        """Counts one applied meta step."""
        self.steps += 1
        self.meta_loss += meta_loss
        self.hypergradient_norm += hypergradient_norm
        self.seconds += seconds

    def add_memory(self, megabytes: float) -> None:
        """Counts the memory one meta step needed."""
        self.memory_mb += megabytes
        self.memory_steps += 1

    def add_agreement(self, cosine: float, norm_ratio: float) -> None:
        """Counts one comparison with the reference estimator (NaN: undefined, counted apart)."""
        self.compared += 1
        if math.isnan(cosine):
            self.cosine_undefined += 1
        else:
            self.cosine += cosine
        if not math.isnan(norm_ratio):
            self.norm_ratio += norm_ratio
            self.norm_ratios += 1

    def means(self) -> dict[str, float | None]:
        """The mean meta loss, hypergradient norm, seconds and memory (MB) per step; `None` where nothing was
        counted."""

        def mean(total: float, count: int) -> float | None:
            return total / count if count else None

        return {
            "meta_loss": mean(self.meta_loss, self.steps),
            "hypergradient_norm": mean(self.hypergradient_norm, self.steps),
            "meta_step_seconds": mean(self.seconds, self.steps),
            "meta_step_memory_mb": mean(self.memory_mb, self.memory_steps),
        }

    def logs(self, reference: str) -> dict[str, float]:
        """The entries of a training log: the means (rounded as logged), and the mean cosine and norm ratio to
        `reference` where steps were compared."""
        logs: dict[str, float] = {}
        if self.steps:
            means = self.means()
            logs["meta_loss"] = round(means["meta_loss"], 6)
            logs["hypergradient_norm"] = means["hypergradient_norm"]
            logs["meta_step_seconds"] = round(means["meta_step_seconds"], 6)
            if self.memory_steps:
                logs["meta_step_memory_mb"] = round(means["meta_step_memory_mb"], 4)
        if self.compared:
            defined = self.compared - self.cosine_undefined
            logs[f"hypergradient_cosine_to_{reference}"] = self.cosine / defined if defined else math.nan
            logs[f"hypergradient_norm_ratio_to_{reference}"] = (
                self.norm_ratio / self.norm_ratios if self.norm_ratios else math.nan
            )
            # steps compared where either hypergradient was zero (no direction) or not finite (a skipped meta step):
            # left out of the mean cosine
            logs["hypergradient_cosine_undefined_steps"] = self.cosine_undefined
        return logs

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
