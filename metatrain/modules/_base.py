"""Base classes that tell [`MetaTrainer`] how a meta-module enters the training loss."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import weighted_mean


class LossWeighter(nn.Module):
    """A meta-module outside the model that maps detached per-sample training losses `[B]` to weights `[B]`.

    [`MetaTrainer`] reduces training losses with `sum(w * l) / sum(w)`; meta (validation) and evaluation losses
    stay plain means. Subclasses implement `forward(losses) -> weights`.
    """

    def weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        return weighted_mean(losses, self(losses))
