"""Small datasets that ship with installed packages, for tests and quick runs without downloads."""

from __future__ import annotations

import datasets
import numpy as np

from ..utils import require


def load_digits_dataset(test_size: float = 0.3, seed: int = 0) -> datasets.DatasetDict:
    """The 8x8 handwritten digits of scikit-learn (1,797 images, 10 classes) as an image-classification dataset.

    The data ships with scikit-learn, so nothing is downloaded. Pixels are scaled to `[0, 1]` (divided by 16), then
    standardised with the mean and standard deviation of the training pixels. Both splits are formatted as torch
    tensors, so [`~transformers.Trainer`]'s default collator batches them.

    Args:
        test_size (`float`, *optional*, defaults to 0.3):
            Fraction of the images held out as `test`, drawn stratified by class.
        seed (`int`, *optional*, defaults to 0):
            Seed of the train/test split.

    Returns:
        `datasets.DatasetDict`: splits `train` and `test` with columns `pixel_values` (float32, `[1, 8, 8]`) and
        `labels` (int64, a `ClassLabel` with 10 classes, so `dataset["train"].features["labels"].num_classes` is 10).
    """
    load_digits = require("sklearn.datasets", "recipes", "The embedded digits").load_digits
    train_test_split = require("sklearn.model_selection", "recipes", "The embedded digits").train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    mean, std = x_train.mean(), x_train.std()
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(1, 8, 8), dtype="float32"),
            "labels": datasets.ClassLabel(names=[str(d) for d in range(10)]),
        }
    )

    def split(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
        x = ((x - mean) / std).astype(np.float32)
        return datasets.Dataset.from_dict({"pixel_values": x, "labels": y}, features=features).with_format("torch")

    return datasets.DatasetDict({"train": split(x_train, y_train), "test": split(x_test, y_test)})
