"""Plots that recipes save next to their JSON results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .utils import require

require("matplotlib", "recipes", "Plots").use("Agg")
plt = require("matplotlib.pyplot", "recipes", "Plots")


def plot_weighting_functions(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str,
    title: str = "Learned weighting function",
    colors: Mapping[str, str] | None = None,
) -> None:
    """Learned loss-to-weight mappings, one line per method: `{name: (losses, weights)}`; `colors` maps a name to a
    matplotlib color, so one method keeps its color across a recipe's plots."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, (losses, weights) in curves.items():
        ax.plot(losses, weights, label=name, color=(colors or {}).get(name))
    ax.set_xlabel("per-sample training loss")
    ax.set_ylabel("weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: str,
    xlabel: str,
    ylabel: str,
    title: str,
    colors: Mapping[str, str] | None = None,
    reference: tuple[float, str] | None = None,
) -> None:
    """Mean and min-max band over seeds of one metric per method: `{name: [[value per x] per seed]}`; `colors` as
    in [`plot_weighting_functions`]; `reference=(value, label)` draws a dashed horizontal line (e.g. a true value)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, runs in curves.items():
        values = np.asarray(runs, dtype=float)
        x = np.arange(1, values.shape[1] + 1)
        (line,) = ax.plot(x, values.mean(0), label=name, color=(colors or {}).get(name))
        ax.fill_between(x, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
    if reference is not None:
        ax.axhline(reference[0], color="0.3", linestyle="--", linewidth=1, label=reference[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grouped_bars(
    values: Mapping[str, Mapping[str, tuple[float, float | None]]],
    path: str,
    ylabel: str,
    title: str,
    colors: Mapping[str, str] | None = None,
) -> None:
    """Bars of one metric per method, grouped (e.g. by number of shots or by backbone):
    `{group: {method: (value, error or None)}}`; errors are drawn as error bars; `colors` as in
    [`plot_weighting_functions`]."""
    groups = list(values)
    methods = list(dict.fromkeys(m for group in values.values() for m in group))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(groups) * max(len(methods), 1) * 0.45, 3.5))
    for i, method in enumerate(methods):
        x = [g for g, group in enumerate(groups) if method in values[group]]
        heights = [values[groups[g]][method][0] for g in x]
        errors = [values[groups[g]][method][1] for g in x]
        ax.bar(
            np.asarray(x) + (i - (len(methods) - 1) / 2) * width, heights, width, label=method,
            yerr=None if any(e is None for e in errors) else errors, capsize=3, color=(colors or {}).get(method),
        )  # fmt: skip
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
