"""CIFAR-10, CIFAR-100 or a local image folder as `image`/`labels` datasets with CIFAR-style torchvision transforms."""

from __future__ import annotations

import os
from typing import Any

import datasets

from ..utils import require

# (Hub repository, image column, label column)
HUB_IMAGE_DATASETS = {
    "cifar10": ("uoft-cs/cifar10", "img", "label"),
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label"),
}
# per-channel statistics of CIFAR-10 training images, as in Meta-Weight-Net's code
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


class ImageClassificationTransform:
    """Batch transform for `Dataset.set_transform`: turns the PIL images of column `image` into `pixel_values`
    (`[3, H, W]` float tensors, normalised with CIFAR mean and std) and passes every other column through.

    Args:
        image_size (`int`, *optional*, defaults to 32):
            Side length of the output images; images of another size are resized first.
        train (`bool`, *optional*, defaults to `False`):
            Whether to augment with `RandomCrop(image_size, padding=4)` and `RandomHorizontalFlip`.
        resize (`bool`, *optional*, defaults to `True`):
            Whether to resize every image to `image_size` x `image_size`; off for datasets known to be that size.
    """

    def __init__(self, image_size: int = 32, train: bool = False, resize: bool = True):
        transforms = require("torchvision.transforms", "vision", "Image datasets")
        self.image_size, self.train, self.resize = image_size, train, resize
        steps = [transforms.Resize((image_size, image_size))] if resize else []
        if train:
            steps += [transforms.RandomCrop(image_size, padding=4), transforms.RandomHorizontalFlip()]
        steps += [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
        self.transform = transforms.Compose(steps)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out = {k: v for k, v in batch.items() if k != "image"}
        out["pixel_values"] = [self.transform(image.convert("RGB")) for image in batch["image"]]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, train={self.train}, resize={self.resize})"


def load_image_classification_dataset(
    name_or_path: str, image_size: int | None = None, train_augment: bool = True, **load_dataset_kwargs: Any
) -> datasets.DatasetDict:
    """Loads CIFAR-10, CIFAR-100 or an image folder with splits `train` and `test`, columns `image` (PIL images) and
    `labels` (a `ClassLabel`), and an [`ImageClassificationTransform`] attached with `set_transform`, so indexing
    yields `pixel_values` (`[3, H, W]` float tensors) and `labels`.

    The transform reads the `image` column, so train with `TrainingArguments(remove_unused_columns=False)`:
    otherwise [`~transformers.Trainer`] drops `image` (the model does not take it) before the transform runs. The
    number of classes is `dataset["train"].features["labels"].num_classes`.

    Args:
        name_or_path (`str`):
            `"cifar10"` (Hub `uoft-cs/cifar10`), `"cifar100"` (Hub `uoft-cs/cifar100`, fine labels) or a local
            directory with subfolders `train/` and `test/`, each holding one folder of images per class (loaded with
            the `imagefolder` builder; the class folder names become the label names).
        image_size (`int`, *optional*):
            Side length of the output images. `None` keeps CIFAR's 32 and resizes image-folder images to 32.
        train_augment (`bool`, *optional*, defaults to `True`):
            Whether the `train` split gets `RandomCrop(padding=4)` and `RandomHorizontalFlip`.
        load_dataset_kwargs (*optional*):
            Passed to `datasets.load_dataset` (e.g. `cache_dir`).

    Returns:
        `datasets.DatasetDict`: splits `train` and `test`.
    """
    if os.path.isdir(name_or_path):
        dataset = datasets.load_dataset("imagefolder", data_dir=name_or_path, **load_dataset_kwargs)
        missing = sorted({"train", "test"} - set(dataset))
        if missing:
            raise ValueError(
                f"Image folder {name_or_path!r} has no {missing} split(s) (found {sorted(dataset)}): it needs "
                "subfolders `train/` and `test/`, each with one folder per class."
            )
        image_column, label_column, resize = "image", "label", True
    elif name_or_path.lower() in HUB_IMAGE_DATASETS:
        repo, image_column, label_column = HUB_IMAGE_DATASETS[name_or_path.lower()]
        dataset = datasets.load_dataset(repo, **load_dataset_kwargs)
        resize = image_size is not None and image_size != 32
    else:
        raise ValueError(
            f"Unknown dataset {name_or_path!r}: choose from {list(HUB_IMAGE_DATASETS)} or pass an existing directory."
        )
    image_size = image_size or 32
    result = {}
    for split in ("train", "test"):
        ds = dataset[split].select_columns([image_column, label_column])
        ds = ds.rename_columns({image_column: "image", label_column: "labels"})
        train = split == "train" and train_augment
        ds.set_transform(ImageClassificationTransform(image_size, train=train, resize=resize))
        result[split] = ds
    return datasets.DatasetDict(result)
