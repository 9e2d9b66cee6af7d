"""Meta-Weight-Net: a learned mapping from per-sample loss to sample weight."""

from __future__ import annotations

import torch
from torch import nn

from ._base import LossWeighter


class MetaWeightNet(LossWeighter):
    """Meta-Weight-Net (Shu et al., "Meta-Weight-Net: Learning an Explicit Mapping For Sample Weighting",
    NeurIPS 2019): `Linear(1, hidden) - ReLU - Linear(hidden, 1) - Sigmoid`, fed the detached per-sample losses.

    As a [`LossWeighter`], [`MetaTrainer`] uses it to reduce the per-sample training losses with
    `sum(w * l) / sum(w)`; the meta (validation) loss stays the plain mean.

    Args:
        hidden_size (`int`, *optional*, defaults to 100):
            Width of the hidden layer.
    """

    def __init__(self, hidden_size: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1), nn.Sigmoid())

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """Maps per-sample losses `[B]` to weights `[B]` in (0, 1); the losses are detached."""
        return self.net(losses.detach().reshape(-1, 1).to(self.net[0].weight.dtype)).reshape(losses.shape)
