"""Plots that recipes save next to their JSON results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_weighting_functions(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str) -> None:
    """Learned loss-to-weight mappings, one line per method: `{name: (losses, weights)}`."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, (losses, weights) in curves.items():
        ax.plot(losses, weights, label=name)
    ax.set_xlabel("per-sample training loss")
    ax.set_ylabel("weight")
    ax.set_title("Learned weighting function")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[float]]], path: str, xlabel: str, ylabel: str, title: str
) -> None:
    """Mean and min-max band over seeds of one metric per method: `{name: [[value per x] per seed]}`."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, runs in curves.items():
        values = np.asarray(runs, dtype=float)
        x = np.arange(1, values.shape[1] + 1)
        ax.plot(x, values.mean(0), label=name)
        ax.fill_between(x, values.min(0), values.max(0), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
