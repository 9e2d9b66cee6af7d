"""Pieces the recipes share: the seeds x methods grid, the accuracy metric, per-method summaries and the results."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from transformers import Trainer


def accuracy(eval_pred) -> dict[str, float]:
    """`compute_metrics` for classification: the fraction of argmax predictions equal to the labels."""
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def episode_accuracy(eval_pred) -> dict[str, float]:
    """`compute_metrics` for few-shot episodes (logits `[E, Q, N]`, labels `[E, Q]`): the mean accuracy over episodes
    and the half-width of its 95% confidence interval, `1.96 * std / sqrt(E)`, as few-shot papers report it."""
    logits, labels = eval_pred
    per_episode = (np.argmax(logits, axis=-1) == labels).mean(axis=-1)
    return {
        "accuracy": float(per_episode.mean()),
        "accuracy_ci95": float(1.96 * per_episode.std() / np.sqrt(len(per_episode))),
        "episodes": len(per_episode),
    }


def check_methods(methods: Iterable[str], allowed: Iterable[str]) -> None:
    """Raises a `ValueError` naming the methods that are not in `allowed`."""
    unknown = sorted(set(methods) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}: choose from {list(allowed)}.")


def run_grid(
    seeds: Sequence[int],
    methods: Sequence[str],
    load_data: Callable[[int], Any],
    run: Callable[[str, int, Any], tuple[dict[str, Any], Trainer]],
) -> tuple[list[dict[str, Any]], bool]:
    """Runs every method on every seed, the data loaded once per seed and shared by the methods.

    Returns:
        `tuple[list[dict], bool]`: the result of each run, and whether this process is the main one (the one that
        writes files under `accelerate launch`).
    """
    results, is_main = [], True
    for seed in seeds:
        data = load_data(seed)
        for method in methods:
            result, trainer = run(method, seed, data)
            results.append(result)
            is_main = trainer.is_world_process_zero()
    return results, is_main


def summarize(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Per method (in order of appearance), the mean and standard deviation over seeds of each of `keys`, as
    `<key>_mean` and `<key>_std`; runs without a value (or with `None`) are left out; a key no run has is `None`."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        summary[method] = {}
        for key in keys:
            values = [r[key] for r in runs if r.get(key) is not None]
            summary[method][f"{key}_mean"] = float(np.mean(values)) if values else None
            summary[method][f"{key}_std"] = float(np.std(values)) if values else None
    return summary


def write_results(results_dir: str, report: dict[str, Any]) -> str:
    """Writes `report` to `<results_dir>/results.json` (creating the folder) and returns the path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, "results.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path
