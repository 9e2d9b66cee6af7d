"""Synthetic label noise as in Meta-Weight-Net: each clean label is redrawn from a row of a transition matrix; data
sources of graded quality from which examples are corrupted."""

from __future__ import annotations

import numbers

import numpy as np

NOISE_TYPES = ("uniform", "flip", "flip2")


def _check_noise(num_classes: int, noise_type: str, noise_rate: float) -> None:
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"Unknown noise_type {noise_type!r}: choose from {list(NOISE_TYPES)}.")
    if isinstance(noise_rate, bool) or not isinstance(noise_rate, numbers.Real) or not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be a number in [0, 1], got {noise_rate!r}.")
    min_classes = {"uniform": 1, "flip": 2, "flip2": 3}[noise_type]
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < min_classes:
        raise ValueError(f"noise_type {noise_type!r} needs num_classes >= {min_classes}, got {num_classes!r}.")


def noise_transition_matrix(num_classes: int, noise_type: str, noise_rate: float) -> np.ndarray:
    """The `[K, K]` matrix `C` with `C[i, j] = P(noisy label j | clean label i)`; every row sums to one.

    - `"uniform"`: `(1 - p) I + p / K`: with probability `p` the label is redrawn uniformly over *all* classes, so
      it may stay the same; the expected fraction of changed labels is `p (K - 1) / K`.
    - `"flip"`: `(1 - p) I`, plus `p` on class `(c + 1) % K` in row `c`.
    - `"flip2"`: `(1 - p) I`, plus `p / 2` on each of the classes `(c + 1) % K` and `(c + 2) % K` in row `c`.

    Meta-Weight-Net draws the flip targets of each class at random; here they are the next one or two classes, so
    the matrix depends on nothing but its arguments.

    Args:
        num_classes (`int`):
            Number of classes `K` (at least 2 for `"flip"`, at least 3 for `"flip2"`).
        noise_type (`str`):
            One of [`NOISE_TYPES`]: `"uniform"`, `"flip"` or `"flip2"`.
        noise_rate (`float`):
            Corruption probability `p` in `[0, 1]`.

    Returns:
        `np.ndarray`: float64 array of shape `[num_classes, num_classes]`.
    """
    _check_noise(num_classes, noise_type, noise_rate)
    p, k = float(noise_rate), int(num_classes)
    if noise_type == "uniform":
        return (1.0 - p) * np.eye(k) + p / k
    matrix = (1.0 - p) * np.eye(k)
    rows = np.arange(k)
    if noise_type == "flip":
        matrix[rows, (rows + 1) % k] += p
    else:
        matrix[rows, (rows + 1) % k] += p / 2
        matrix[rows, (rows + 2) % k] += p / 2
    return matrix


def corrupt_labels(
    labels, num_classes: int, noise_type: str, noise_rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupts integer class labels with synthetic noise (see [`noise_transition_matrix`] for the noise types).

    Each label is redrawn independently from its row of the transition matrix with a private
    `np.random.default_rng(seed)`; the global NumPy RNG is neither used nor advanced.

    Args:
        labels (`array-like` of `int`):
            Clean labels, a 1-D sequence with values in `[0, num_classes)`.
        num_classes (`int`):
            Number of classes.
        noise_type (`str`):
            `"uniform"`, `"flip"` or `"flip2"`.
        noise_rate (`float`):
            Corruption probability in `[0, 1]`.
        seed (`int`):
            Seed of the random generator; the same seed gives the same noisy labels.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: `(noisy_labels, is_noisy)`: int64 noisy labels and a boolean mask that is
        `True` where the label changed.
    """
    matrix = noise_transition_matrix(num_classes, noise_type, noise_rate)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, got values in "
            f"[{labels.min()}, {labels.max()}]."
        )
    rng = np.random.default_rng(seed)
    # inverse-CDF sampling from each example's row (the last entry pinned to 1 against rounding)
    cdf = np.cumsum(matrix, axis=1)
    cdf[:, -1] = 1.0
    noisy = (rng.random(labels.shape[0])[:, None] >= cdf[labels]).sum(axis=1).astype(np.int64)
    return noisy, noisy != labels


def graded_sources(corrupted: np.ndarray, num_sources: int, seed: int = 0) -> np.ndarray:
    """Source ids `[N]` for examples of which `corrupted` are bad, so that sources differ in quality: a clean example
    goes to source `k` of `S` with probability proportional to `S - 1 - k`, a corrupted one proportional to `k`.
    With half the examples corrupted, the sources have the same expected size and source `k` a corrupted share of
    `k / (S - 1)` (source 0 clean, the last all corrupted). One source (`S = 1`) holds every example.

    Args:
        corrupted (`np.ndarray`): `[N]` booleans.
        num_sources (`int`): the number of sources `S`.
        seed (`int`, *optional*, defaults to 0): seed of the assignment.
    """
    if isinstance(num_sources, bool) or not isinstance(num_sources, int) or num_sources < 1:
        raise ValueError(f"num_sources must be an integer >= 1, got {num_sources!r}.")
    corrupted = np.asarray(corrupted, dtype=bool)
    if num_sources == 1:
        return np.zeros(len(corrupted), dtype=np.int64)
    rank = np.arange(num_sources)
    clean_p, bad_p = (num_sources - 1 - rank) / rank.sum(), rank / rank.sum()
    rng = np.random.default_rng(seed)
    sources = np.empty(len(corrupted), dtype=np.int64)
    sources[~corrupted] = rng.choice(num_sources, int((~corrupted).sum()), p=clean_p)
    sources[corrupted] = rng.choice(num_sources, int(corrupted.sum()), p=bad_p)
    return sources
