"""A clean, class-balanced meta split carved out of a training set, disjoint from what is left for training."""

from __future__ import annotations

import numbers

import numpy as np


def class_balanced_meta_split(labels, num_meta_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into a training part and a class-balanced meta part.

    `num_meta_per_class` indices of every class present in `labels` are drawn without replacement (with a private
    `np.random.default_rng(seed)`) into the meta part; every other index goes to the training part. Both parts come
    from one draw, so they cannot overlap (Meta-Weight-Net's code drew its meta set with a different seed than its
    training split and the two overlapped).

    Args:
        labels (`array-like` of `int`):
            The *clean* labels of the whole training set, one per example.
        num_meta_per_class (`int`):
            Meta examples per class; every class must keep at least one example for training.
        seed (`int`):
            Seed of the random generator.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: `(train_indices, meta_indices)`, sorted int64 arrays of positions in
        `labels` that are disjoint and together cover every position.
    """
    if (
        isinstance(num_meta_per_class, bool)
        or not isinstance(num_meta_per_class, numbers.Integral)
        or num_meta_per_class < 1
    ):
        raise ValueError(f"num_meta_per_class must be a positive integer, got {num_meta_per_class!r}.")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}.")
    classes, counts = np.unique(labels, return_counts=True)
    too_few = [(c, n) for c, n in zip(classes.tolist(), counts.tolist()) if n <= num_meta_per_class]
    if too_few:
        details = ", ".join(f"class {c!r} has {n}" for c, n in too_few)
        raise ValueError(
            f"num_meta_per_class={num_meta_per_class} leaves no training example: {details} example(s), and every "
            f"class needs more than {num_meta_per_class}."
        )
    rng = np.random.default_rng(seed)
    meta = [rng.permutation(np.flatnonzero(labels == c))[:num_meta_per_class] for c in classes]
    meta_indices = np.sort(np.concatenate(meta)).astype(np.int64) if meta else np.zeros(0, dtype=np.int64)
    is_meta = np.zeros(labels.shape[0], dtype=bool)
    is_meta[meta_indices] = True
    train_indices = np.flatnonzero(~is_meta).astype(np.int64)
    assert not np.intersect1d(train_indices, meta_indices).size, "meta and train indices overlap"
    assert train_indices.size + meta_indices.size == labels.shape[0], "meta and train indices do not cover labels"
    return train_indices, meta_indices
