"""Noisy-label benchmark splits: a noisy `train`, a clean class-balanced `meta` drawn first, an untouched `test`."""

from __future__ import annotations

import datasets
import numpy as np

from .noise import corrupt_labels
from .splits import class_balanced_meta_split


def _restore_format(dataset: datasets.Dataset, source: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with the format (or `set_transform` transform) of `source`; a format over all of `source`'s
    columns becomes one over all of `dataset`'s columns, a format over some columns keeps those."""
    fmt = source.format
    columns = None if fmt["columns"] == source.column_names else list(fmt["columns"])
    return dataset.with_format(fmt["type"], columns, fmt["output_all_columns"], **fmt["format_kwargs"])


def make_noisy_label_splits(
    dataset: datasets.DatasetDict,
    num_classes: int,
    noise_type: str,
    noise_rate: float,
    num_meta_per_class: int,
    seed: int,
) -> datasets.DatasetDict:
    """Builds the noisy-label setting of Meta-Weight-Net from a clean dataset.

    First `num_meta_per_class` examples per class are drawn from the clean `train` split into `meta` (see
    [`class_balanced_meta_split`]); then the labels of the remaining training examples are corrupted (see
    [`corrupt_labels`]). `train` and `meta` get the extra columns `clean_labels` (the original label), `is_noisy`
    (whether `labels` differs from it; always `False` in `meta`) and `index` (the row in the source `train` split,
    so the two splits can be checked for overlap). Both keep the source's format or `set_transform` transform;
    other splits (`test`, ...) are returned unchanged.

    A transform that outputs only the columns it knows hides the extra columns: read them from
    `split.with_format(None)`. With `TrainingArguments(remove_unused_columns=True)` [`~transformers.Trainer`] drops
    them before batching; with `False` they are batched too, which only matters for models that take `**kwargs`.

    Args:
        dataset (`datasets.DatasetDict`):
            Splits `train` (with an integer `labels` column) and usually `test`, e.g. from [`load_digits_dataset`] or
            [`load_image_classification_dataset`].
        num_classes (`int`):
            Number of classes.
        noise_type (`str`):
            `"uniform"`, `"flip"` or `"flip2"` (see [`noise_transition_matrix`]).
        noise_rate (`float`):
            Corruption probability in `[0, 1]`.
        num_meta_per_class (`int`):
            Clean meta examples per class.
        seed (`int`):
            Seed of both the meta draw and the noise (two independent streams derived from it).

    Returns:
        `datasets.DatasetDict`: `train` (noisy `labels`), `meta` (clean `labels`, disjoint from `train`) and the
        remaining splits of `dataset`.
    """
    if "train" not in dataset:
        raise ValueError(f"dataset needs a 'train' split, got {sorted(dataset)}.")
    if "meta" in dataset:
        raise ValueError("dataset already has a 'meta' split.")
    source = dataset["train"]
    taken = sorted({"clean_labels", "is_noisy", "index"} & set(source.column_names))
    if "labels" not in source.column_names or taken:
        raise ValueError(
            f"The train split needs a 'labels' column and none of 'clean_labels', 'is_noisy', 'index'; it has "
            f"{source.column_names}."
        )
    # work on the unformatted rows: `add_column` after `select` flattens the indices with `map`, which would run a
    # `set_transform` transform and store its outputs (e.g. augmented `pixel_values`) as columns
    plain = source.with_format(None)
    clean = np.asarray(plain.with_format("numpy")["labels"], dtype=np.int64)
    split_seed, noise_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    train_indices, meta_indices = class_balanced_meta_split(clean, num_meta_per_class, split_seed)
    noisy_part, is_noisy_part = corrupt_labels(clean[train_indices], num_classes, noise_type, noise_rate, noise_seed)
    noisy, is_noisy = clean.copy(), np.zeros(clean.shape[0], dtype=bool)
    noisy[train_indices], is_noisy[train_indices] = noisy_part, is_noisy_part

    # add the columns to the whole split, then select: no rows (or images) are copied
    label_feature = source.features["labels"]
    full = plain.rename_column("labels", "clean_labels")
    full = full.add_column("labels", noisy, feature=label_feature)
    full = full.add_column("is_noisy", is_noisy, feature=datasets.Value("bool"))
    full = full.add_column("index", np.arange(clean.shape[0]), feature=datasets.Value("int64"))
    splits = {
        "train": _restore_format(full.select(train_indices), source),
        "meta": _restore_format(full.select(meta_indices), source),
    }
    splits.update({name: split for name, split in dataset.items() if name != "train"})
    return datasets.DatasetDict(splits)
