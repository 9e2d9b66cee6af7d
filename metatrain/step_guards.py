"""What [`MetaTrainer`] does about a meta step's outcome beyond stepping: a warning when the hypergradient stays
exactly zero, a log of each skipped step with its cause, and a stop when the model's own weights stay non-finite."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class MetaStepGuards:
    """Watches the meta steps in a row.

    Args:
        zero_patience (`int`): warn once the hypergradient has been exactly zero for this many meta steps in a row.
        nonfinite_patience (`int`): raise once the model's weights have been non-finite for this many skipped meta
            steps in a row (no meta step can help them).
    """

    def __init__(self, zero_patience: int, nonfinite_patience: int):
        self.zero_patience, self.nonfinite_patience = zero_patience, nonfinite_patience
        self.zero_in_a_row = 0
        self.nonfinite_weights: tuple[int, int] | None = None  # (first step seen, meta steps skipped in a row)

    def done(self, norm: torch.Tensor, step: int, estimator_name: str) -> None:
        """A meta step that stepped the meta-optimizer, with hypergradient norm `norm`."""
        self.nonfinite_weights = None
        self.zero_in_a_row = self.zero_in_a_row + 1 if norm == 0 else 0
        if self.zero_in_a_row == self.zero_patience:
            logger.warning(
                f"The hypergradient has been exactly zero for {self.zero_in_a_row} meta steps in a row (step {step}, "
                f"{estimator_name}): the meta-parameters learn nothing. The losses may not depend on them (a "
                "transform after a zero-initialised batch norm: build the model with `zero_init_last=False`; "
                "`first_order` with a loss weighter is zero by definition), or EvoGrad's softmax is saturated (raise "
                "`temperature`)."
            )

    def skipped(
        self, params: dict[str, torch.Tensor], loss: torch.Tensor, norm: torch.Tensor, step: int, skipped: int
    ) -> None:
        """A meta step skipped for a non-finite hypergradient or meta loss (`skipped` so far): logs it with its cause,
        and raises once the model's weights `params` have been non-finite for `nonfinite_patience` such steps."""
        bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
        if not bad:
            self.nonfinite_weights = None
            logger.warning(
                f"Non-finite hypergradient or meta loss at step {step} (meta loss {loss.item()}, hypergradient norm "
                f"{norm.item()}): meta step skipped, meta-parameters and estimator state unchanged ({skipped} skipped "
                "so far)."
            )
            return
        first, count = self.nonfinite_weights or (step, 0)
        self.nonfinite_weights = (first, count + 1)
        logger.warning(
            f"Meta step skipped at step {step}: the model's weights are not finite (first seen at step {first}; "
            f"{len(bad)} tensors, e.g. {bad[:3]}). The meta-parameters are unchanged; the model is not."
        )
        if count + 1 >= self.nonfinite_patience:
            raise RuntimeError(
                f"The model's weights are not finite (first seen at step {first}; {len(bad)} tensors, e.g. "
                f"{bad[:3]}), and {count + 1} meta steps in a row were skipped for it. Check the training data for "
                "NaN or infinite values, lower `learning_rate`, set `max_grad_norm`, or train in fp32."
            )
