"""Small problems with known answers, shared by the estimator tests."""

from __future__ import annotations

from torch import nn


def closed_form_hypergradient(lam: float) -> float:
    """d/d lambda of (x*(lambda) - 0.5)^2 with x*(lambda) = argmin (x - 1)^2 + lambda x^2 = 1 / (1 + lambda)."""
    return (lam - 1) / (lam + 1) ** 3


def one_dim_problem(lam):
    train_loss = lambda p, batch: (p["x"] - 1) ** 2 + lam * p["x"] ** 2  # noqa: E731
    meta_loss = lambda p, batch: (p["x"] - 0.5) ** 2  # noqa: E731
    return train_loss, meta_loss


class WeightedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)
