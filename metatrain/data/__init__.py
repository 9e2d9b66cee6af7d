"""Data for meta-learning experiments: synthetic label noise, clean meta splits, episodes and task distributions, and
small or standard datasets."""

from __future__ import annotations

from .domains import (
    DIGIT_DOMAINS,
    DIGIT_SEEN_DOMAINS,
    DIGIT_UNSEEN_DOMAINS,
    PooledDomains,
    load_digit_domains,
    load_image_folder_domain,
)
from .embedded import load_digits_dataset
from .episodes import EpisodeDataset
from .images import CIFAR_MEAN, CIFAR_STD, ImageClassificationTransform, load_image_classification_dataset
from .noise import NOISE_TYPES, corrupt_labels, graded_sources, noise_transition_matrix
from .noisy import make_noisy_label_splits
from .splits import class_balanced_meta_split
from .tasks import LabelledExamples, Task, TaskDistribution, TaskStream, TaskTests

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DIGIT_DOMAINS",
    "DIGIT_SEEN_DOMAINS",
    "DIGIT_UNSEEN_DOMAINS",
    "EpisodeDataset",
    "LabelledExamples",
    "NOISE_TYPES",
    "PooledDomains",
    "Task",
    "TaskDistribution",
    "TaskStream",
    "TaskTests",
    "ImageClassificationTransform",
    "class_balanced_meta_split",
    "corrupt_labels",
    "load_digit_domains",
    "load_digits_dataset",
    "load_image_folder_domain",
    "load_image_classification_dataset",
    "make_noisy_label_splits",
    "graded_sources",
    "noise_transition_matrix",
]
