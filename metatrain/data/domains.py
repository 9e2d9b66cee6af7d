"""Image domains for cross-domain few-shot learning: visually distinct renderings of the embedded digits, and image
folders (miniImageNet, CUB, Cars, Places, Plantae laid out one folder per class)."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from ..utils import require
from .images import ImageClassificationTransform


def _two_tone(
    foreground: tuple[float, float, float], background: tuple[float, float, float], noise: float = 0.0
) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """A rendering with the domain's foreground and background colours (each jittered by up to 0.1 per image and
    channel) and optional Gaussian pixel noise."""

    def render(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(x)
        fg = np.clip(np.asarray(foreground).reshape(1, 3, 1, 1) + rng.uniform(-0.1, 0.1, (n, 3, 1, 1)), 0.0, 1.0)
        bg = np.clip(np.asarray(background).reshape(1, 3, 1, 1) + rng.uniform(-0.1, 0.1, (n, 3, 1, 1)), 0.0, 1.0)
        out = x * fg + (1.0 - x) * bg
        if noise:
            out = out + rng.normal(0.0, noise, out.shape)
        return np.clip(out, 0.0, 1.0)

    return render


DIGIT_DOMAINS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gray": _two_tone((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    "inverted": _two_tone((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "red_on_blue": _two_tone((0.9, 0.25, 0.2), (0.15, 0.2, 0.55)),
    "noisy": _two_tone((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), noise=0.3),
    "green_on_purple_noisy": _two_tone((0.3, 0.85, 0.3), (0.5, 0.15, 0.5), noise=0.15),
    "low_contrast": _two_tone((0.65, 0.6, 0.55), (0.35, 0.4, 0.45)),
}
DIGIT_SEEN_DOMAINS = ("gray", "inverted", "red_on_blue", "noisy")
DIGIT_UNSEEN_DOMAINS = ("low_contrast",)


def load_digit_domains(
    seen: Sequence[str] = DIGIT_SEEN_DOMAINS,
    unseen: Sequence[str] = DIGIT_UNSEEN_DOMAINS,
    image_size: int = 32,
    test_size: float = 0.3,
    seed: int = 0,
) -> dict[str, dict[str, datasets.Dataset]]:
    """Visually distinct domains rendered from scikit-learn's 8x8 digits (shipped with scikit-learn: nothing is
    downloaded), for cross-domain few-shot learning with a held-out domain.

    The digits are split once, stratified by class: seen domains render the training part, unseen domains the held-out
    part, so a test episode shows neither a rendering nor an image seen in training. Each image is upsampled
    (bilinear) to `image_size` and rendered as RGB in `[0, 1]` with its domain's foreground and background colours
    (jittered by up to 0.1 per image and channel): `gray` (white on black), `inverted` (black on white), `red_on_blue`,
    `noisy` (gray with Gaussian pixel noise of standard deviation 0.3), `green_on_purple_noisy` (noise 0.15) and
    `low_contrast` (a warm gray digit on a cool gray background: a fifth of gray's contrast on average, 0.3 / 0.2 /
    0.1 in R / G / B). Every domain is then mapped by `(x - 0.5) / 0.25` alike, so the shift between domains reaches
    the network. All domains share the ten digit classes: what changes between them is the style, not the label
    space (unlike miniImageNet to CUB, where the classes are new too).

    Args:
        seen (`Sequence[str]`, *optional*): names of the training domains, from `DIGIT_DOMAINS`; defaults to
            `gray`, `inverted`, `red_on_blue`, `noisy`.
        unseen (`Sequence[str]`, *optional*): names of the held-out test domains; defaults to `low_contrast`.
        image_size (`int`, *optional*, defaults to 32): side length of the images.
        test_size (`float`, *optional*, defaults to 0.3): fraction of the digits rendered for unseen domains.
        seed (`int`, *optional*, defaults to 0): seed of the split and of the renderings.

    Returns:
        `dict`: `{"seen": {name: Dataset}, "unseen": {name: Dataset}}`, each dataset with `pixel_values` (float32
        `[3, image_size, image_size]`) and `labels` (a `ClassLabel` of the ten digits), formatted as torch tensors.
    """
    load_digits = require("sklearn.datasets", "recipes", "The embedded digits").load_digits
    train_test_split = require("sklearn.model_selection", "recipes", "The embedded digits").train_test_split

    unknown = sorted(set(seen) - set(DIGIT_DOMAINS)) + sorted(set(unseen) - set(DIGIT_DOMAINS))
    if unknown:
        raise ValueError(f"Unknown digit domains {unknown}: choose from {list(DIGIT_DOMAINS)}.")
    overlap = sorted(set(seen) & set(unseen))
    if overlap:
        raise ValueError(f"Domains {overlap} are both seen and unseen: a held-out domain must not be trained on.")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False).numpy()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels
    )
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(3, image_size, image_size), dtype="float32"),
            "labels": datasets.ClassLabel(names=[str(d) for d in range(10)]),
        }
    )

    def render(name: str, indices: np.ndarray) -> datasets.Dataset:
        rng = np.random.default_rng([seed, list(DIGIT_DOMAINS).index(name)])
        pixels = (DIGIT_DOMAINS[name](images[indices], rng).astype(np.float32) - 0.5) / 0.25
        data = {"pixel_values": pixels, "labels": labels[indices]}
        return datasets.Dataset.from_dict(data, features=features).with_format("torch")

    return {
        "seen": {name: render(name, train_idx) for name in seen},
        "unseen": {name: render(name, test_idx) for name in unseen},
    }


def load_image_folder_domain(path: str, image_size: int = 84, **load_dataset_kwargs) -> datasets.Dataset:
    """One few-shot domain from an image folder with one subfolder of images per class (`path/<class>/*.jpg`, the
    layout of miniImageNet, CUB, Cars, Places and Plantae once extracted), loaded with the `imagefolder` builder.

    Indexing yields `pixel_values` (`[3, image_size, image_size]`, resized and normalised by
    [`ImageClassificationTransform`], no augmentation) and `labels`.

    Args:
        path (`str`): the domain's folder.
        image_size (`int`, *optional*, defaults to 84): side length of the images (84 for miniImageNet-style work).
        load_dataset_kwargs (*optional*): passed to `datasets.load_dataset` (e.g. `cache_dir`).
    """
    if not os.path.isdir(path):
        raise ValueError(f"Domain folder {path!r} does not exist: pass a folder with one subfolder per class.")
    dataset = datasets.load_dataset("imagefolder", data_dir=path, split="train", **load_dataset_kwargs)
    dataset = dataset.rename_column("label", "labels")
    dataset.set_transform(ImageClassificationTransform(image_size, train=False, resize=True))
    return dataset


class PooledDomains(torch.utils.data.Dataset):
    """The examples of several domains as one classification dataset, for pre-training a backbone on the seen
    domains before meta-training (LFT starts from an encoder pre-trained by classification on its seen classes).

    Classes are matched by name across domains: a class that several domains share (the digits of every digit
    rendering) is one label, and classes of different names (miniImageNet's and CUB's) are different labels. Item `i`
    is a dict of `pixel_values` and `labels` (an `int` in `0 .. len(classes) - 1`).

    Args:
        domains (`Mapping[str, Any]`):
            Domain name to dataset: each indexable by an integer, returning a dict with the image and label columns,
            and with a `ClassLabel` feature for the label column (`datasets.Dataset`s from [`load_digit_domains`] or
            [`load_image_folder_domain`]).
        image_key (`str`, *optional*, defaults to `"pixel_values"`), label_key (`str`, *optional*, defaults to
            `"labels"`): the columns read.

    Attributes:
        classes (`list[str]`): the class names in label order (first appearance over the domains).
    """

    def __init__(self, domains: Mapping[str, Any], image_key: str = "pixel_values", label_key: str = "labels"):
        if not domains:
            raise ValueError("PooledDomains needs at least one domain.")
        self.image_key, self.label_key = image_key, label_key
        self.datasets = list(domains.values())
        names = []
        for name, dataset in domains.items():
            feature = getattr(dataset, "features", {}).get(label_key)
            if not hasattr(feature, "names"):
                raise ValueError(
                    f"Domain {name!r} has no ClassLabel column {label_key!r} (got {feature!r}): classes are pooled "
                    "by name, so each domain needs named classes (`datasets.ClassLabel`)."
                )
            names.append(feature.names)
        self.classes = list(dict.fromkeys(n for domain_names in names for n in domain_names))
        index = {n: i for i, n in enumerate(self.classes)}
        self._labels = [[index[n] for n in domain_names] for domain_names in names]
        self._ends = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        i %= len(self)
        domain = bisect.bisect_right(self._ends, i)
        row = self.datasets[domain][i - (self._ends[domain - 1] if domain else 0)]
        return {"pixel_values": row[self.image_key], "labels": self._labels[domain][int(row[self.label_key])]}
