"""Episodic few-shot data: N-way K-shot episodes with Q queries per class, drawn from one or several domains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def stack_images(images: Any) -> torch.Tensor:
    """The image column of a batch of dataset rows as one tensor: torch-formatted datasets give a tensor already,
    datasets with a `set_transform` give a list of tensors."""
    return images if isinstance(images, torch.Tensor) else torch.stack([torch.as_tensor(x) for x in images])


class EpisodeDataset(torch.utils.data.Dataset):
    """A map-style dataset of few-shot episodes over one or several domains (LFT's episodic training and testing).

    Item `i` is a deterministic function of `(seed, i)`: a domain drawn uniformly, `n_way` classes of it with at least
    `k_shot + n_query` examples, and `k_shot + n_query` distinct examples of each class. The classes are relabelled
    `0 .. n_way - 1` in the order drawn, so a model cannot memorise the label space. An epoch replays the same
    episodes in a new order, and a resumed run rebuilds them exactly.

    Each item is a dict: `support` (`[n_way * k_shot, C, H, W]`, class by class), `support_labels`
    (`[n_way * k_shot]`), `query` (`[n_way * n_query, C, H, W]`), `labels` (`[n_way * n_query]`, the query labels
    the loss and metrics read) and `domain` (an integer id, for `MetaTrainingArguments.meta_disjoint_key`).
    Trainer's default collator stacks `E` episodes into a leading dimension; [`~metatrain.models.FewShotClassifier`]
    returns logits `[E, n_way * n_query, n_way]`, whose per-example loss is the mean over an episode's queries.

    Args:
        domains (`Mapping[str, Any]`):
            Domain name to dataset: a `datasets.Dataset` (or any dataset indexable by a list of indices that returns
            a dict of columns) with an image column and an integer label column.
        n_way (`int`, *optional*, defaults to 5): classes per episode.
        k_shot (`int`, *optional*, defaults to 5): support examples per class.
        n_query (`int`, *optional*, defaults to 16): query examples per class.
        num_episodes (`int`, *optional*, defaults to 100): length of the dataset.
        seed (`int`, *optional*, defaults to 0): seed of the episodes.
        domain_ids (`Mapping[str, int]`, *optional*):
            Integer id of each domain name; defaults to the position in `domains`. Give the training and meta episode
            sets the same ids so that `meta_disjoint_key="domain"` compares like with like.
        image_key (`str`, *optional*, defaults to `"pixel_values"`), label_key (`str`, *optional*, defaults to
            `"labels"`): the columns read.
    """

    def __init__(
        self,
        domains: Mapping[str, Any],
        n_way: int = 5,
        k_shot: int = 5,
        n_query: int = 16,
        num_episodes: int = 100,
        seed: int = 0,
        domain_ids: Mapping[str, int] | None = None,
        image_key: str = "pixel_values",
        label_key: str = "labels",
    ):
        for option, value, least in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1),
                                     ("num_episodes", num_episodes, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"EpisodeDataset needs an integer `{option}` >= {least}, got {option}={value!r}.")
        if not domains:
            raise ValueError("EpisodeDataset needs at least one domain: pass `domains={'name': dataset, ...}`.")
        self.domains = dict(domains)
        self.names = list(self.domains)
        self.domain_ids = dict(domain_ids) if domain_ids is not None else {n: i for i, n in enumerate(self.names)}
        missing = [n for n in self.names if n not in self.domain_ids]
        if missing:
            raise ValueError(f"`domain_ids` has no id for domains {missing}: give every domain an integer id.")
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.num_episodes, self.seed = num_episodes, seed
        self.image_key, self.label_key = image_key, label_key
        self.class_indices = {name: self._index_classes(name, ds) for name, ds in self.domains.items()}

    def _index_classes(self, name: str, dataset: Any) -> list[np.ndarray]:
        """Example indices of each class with enough examples for an episode."""
        # read the label column without the image transform a dataset may carry (`set_transform`)
        plain = dataset.with_format(None) if hasattr(dataset, "with_format") else dataset
        labels = np.asarray(plain[self.label_key])
        needed = self.k_shot + self.n_query
        classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        classes = [indices for indices in classes if len(indices) >= needed]
        if len(classes) < self.n_way:
            raise ValueError(
                f"Domain {name!r} has {len(classes)} classes with at least k_shot + n_query = {needed} examples, "
                f"fewer than n_way={self.n_way}: lower n_way, k_shot or n_query, or add examples."
            )
        return classes

    def __len__(self) -> int:
        return self.num_episodes

    def draw(self, index: int) -> tuple[str, np.ndarray]:
        """The domain of episode `index` and the dataset rows of its examples, `[n_way, k_shot + n_query]` (row `c`
        is class `c`: its first `k_shot` entries are the support, the rest the queries)."""
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range for {self.num_episodes} episodes")
        rng = np.random.default_rng([self.seed, index])
        name = self.names[rng.integers(len(self.names))]
        classes = self.class_indices[name]
        chosen = rng.choice(len(classes), self.n_way, replace=False)
        return name, np.stack([rng.choice(classes[c], self.k_shot + self.n_query, replace=False) for c in chosen])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        name, picks = self.draw(index)
        images = stack_images(self.domains[name][picks.reshape(-1).tolist()][self.image_key])
        images = images.view(self.n_way, self.k_shot + self.n_query, *images.shape[1:])
        labels = torch.arange(self.n_way)
        return {
            "support": images[:, : self.k_shot].flatten(0, 1),
            "support_labels": labels.repeat_interleave(self.k_shot),
            "query": images[:, self.k_shot :].flatten(0, 1),
            "labels": labels.repeat_interleave(self.n_query),
            "domain": torch.tensor(self.domain_ids[name]),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(domains={self.names}, n_way={self.n_way}, k_shot={self.k_shot}, "
            f"n_query={self.n_query}, num_episodes={self.num_episodes}, seed={self.seed})"
        )
