"""Task distributions for online meta-learning: classification tasks of a few classes drawn from a labelled dataset,
each split into training and test examples, read one task after another (HyperDistill's setting)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .noise import corrupt_labels


class Task(NamedTuple):
    """One task: its classes (in the order they are relabelled `0 .. ways - 1`) and the rows and new labels of its
    training and test examples."""

    classes: np.ndarray
    train_rows: np.ndarray
    train_labels: np.ndarray
    test_rows: np.ndarray
    test_labels: np.ndarray


class LabelledExamples(torch.utils.data.Dataset):
    """Examples in memory for a [`TaskDistribution`]: `inputs[i]` (a tensor `[N, ...]`, or a dataset whose items hold
    `input_column`, e.g. with an image transform) and `labels[i]`; `dataset["labels"]` gives the label column
    without reading (or transforming) any input.

    Args:
        inputs (`torch.Tensor` or a map-style dataset): the inputs.
        labels (`torch.Tensor`): one integer label per input.
        input_column (`str`, *optional*, defaults to `"pixel_values"`): the key of an input in an example.
    """

    def __init__(self, inputs: Any, labels: torch.Tensor, input_column: str = "pixel_values"):
        if len(inputs) != len(labels):
            raise ValueError(f"LabelledExamples has {len(inputs)} inputs but {len(labels)} labels.")
        self.inputs, self.labels, self.input_column = inputs, torch.as_tensor(labels), input_column

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | str) -> Any:
        if key == "labels":
            return self.labels
        x = self.inputs[key]
        return {self.input_column: x if torch.is_tensor(x) else x[self.input_column], "labels": self.labels[key]}


class TaskDistribution:
    """Classification tasks drawn from a labelled dataset: task `k` is a deterministic function of `(seed, k)`,
    `ways` classes drawn from `classes`, relabelled `0 .. ways - 1` in the order drawn, with `examples_per_class`
    examples of each, split into training and test examples (HyperDistill, Sec. 5: 10 classes, 500 examples each,
    half for training).

    Args:
        dataset (`datasets.Dataset` or a map-style dataset of dicts):
            The examples; `dataset[label_column]` gives every label, `dataset[i]` one example as a dict.
        ways (`int`): classes per task.
        classes (`Sequence[int]`, *optional*):
            The classes tasks are drawn from (a meta-training, meta-validation or meta-test split of the classes);
            defaults to every label in the dataset.
        examples_per_class (`int`, *optional*):
            Examples of each class in a task; defaults to the smallest class's count.
        train_fraction (`float`, *optional*, defaults to 0.5): share of a class's examples used for training.
        label_column (`str`, *optional*, defaults to `"labels"`): the label column.
        label_noise (`float`, *optional*, defaults to 0): share of each task's training labels redrawn uniformly
            (Meta-Weight-Net's setting within a task); test labels stay clean.
        seed (`int`, *optional*, defaults to 0): seed of the tasks.

    Tasks read one example at a time, which a `datasets.Dataset` in torch format does slowly (milliseconds per row):
    for images in memory use [`LabelledExamples`].
    """

    def __init__(
        self,
        dataset: Any,
        ways: int,
        classes: Sequence[int] | None = None,
        examples_per_class: int | None = None,
        train_fraction: float = 0.5,
        label_column: str = "labels",
        label_noise: float = 0.0,
        seed: int = 0,
    ):
        labels = np.asarray(dataset[label_column]).reshape(-1)
        available = sorted({int(c) for c in labels}) if classes is None else [int(c) for c in classes]
        if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
            raise ValueError(f"`ways` must be an integer >= 1, got ways={ways!r}.")
        if len(available) < ways:
            raise ValueError(
                f"A task needs ways={ways} classes, but the task distribution has {len(available)} "
                f"({available[:10]}{'...' if len(available) > 10 else ''}): lower `ways` or give more `classes`."
            )
        if len(set(available)) != len(available):
            raise ValueError(f"`classes` lists a class twice: {available}.")
        self.rows_of = {c: np.flatnonzero(labels == c) for c in available}
        empty = [c for c, rows in self.rows_of.items() if len(rows) < 2]
        if empty:
            raise ValueError(
                f"Classes {empty[:10]} have fewer than 2 examples in the dataset's {label_column!r} column: a task "
                "needs a training and a test example of each class; leave them out of `classes`."
            )
        smallest = min(len(rows) for rows in self.rows_of.values())
        examples_per_class = smallest if examples_per_class is None else examples_per_class
        if not 2 <= examples_per_class <= smallest:
            raise ValueError(
                f"examples_per_class={examples_per_class} must be in [2, {smallest}]: the smallest class has "
                f"{smallest} examples."
            )
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
        if not 0 <= label_noise <= 1:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}.")
        self.label_noise = label_noise
        self.dataset, self.ways, self.classes = dataset, ways, available
        self.examples_per_class, self.label_column, self.seed = examples_per_class, label_column, seed
        self.train_per_class = min(max(1, round(examples_per_class * train_fraction)), examples_per_class - 1)

    @property
    def test_per_class(self) -> int:
        return self.examples_per_class - self.train_per_class

    @functools.lru_cache(maxsize=16)  # noqa: B019 (a few tasks are read at a time; the distribution lives as long)
    def task(self, k: int) -> Task:
        """Task `k`."""
        rng = np.random.default_rng([self.seed, k])
        chosen = np.asarray(self.classes)[rng.choice(len(self.classes), self.ways, replace=False)]
        train_rows, test_rows = [], []
        for c in chosen:
            rows = rng.permutation(self.rows_of[int(c)])[: self.examples_per_class]
            train_rows.append(rows[: self.train_per_class])
            test_rows.append(rows[self.train_per_class :])
        labels = np.arange(self.ways)
        train_labels = np.repeat(labels, self.train_per_class)
        if self.label_noise > 0:
            noise_seed = self.seed * 100003 + k
            train_labels, _ = corrupt_labels(train_labels, self.ways, "uniform", self.label_noise, seed=noise_seed)
        return Task(
            chosen,
            np.concatenate(train_rows),
            train_labels,
            np.concatenate(test_rows),
            np.repeat(labels, self.test_per_class),
        )

    def example(self, row: int, label: int, task: int) -> dict[str, Any]:
        """The dataset's example `row` with its label replaced by the task's `label` and the task's index."""
        item = dict(self.dataset[int(row)])
        item[self.label_column] = int(label)
        item["task"] = int(task)
        return item


class TaskStream(torch.utils.data.Dataset):
    """The training examples of tasks `0 .. num_tasks - 1`, `steps * batch_size` examples per task: what
    [`MetaTrainer`] reads in order with `meta_inner_steps=steps`, so that each inner optimisation trains on one task.
    With `processes > 1` the tasks run in parallel (a meta-batch of one task per process): the stream interleaves
    them so that Accelerate's sharding of its batches gives process `r` tasks `r, r + processes, ...`. A task's
    training examples are read in passes, each in an order of its own seeded by `(seed, k, pass)`.

    Args:
        distribution ([`TaskDistribution`]): the tasks.
        steps (`int`): optimizer steps per inner optimisation (`meta_inner_steps`).
        batch_size (`int`): examples per optimizer step and process (per-device batch size times gradient
            accumulation steps).
        num_tasks (`int`): tasks in the stream, a multiple of `processes`.
        processes (`int`, *optional*, defaults to 1): processes of the run (its world size).
        micro_batch_size (`int`, *optional*): the per-device batch size, where it is smaller than `batch_size`
            (gradient accumulation) in a run of several processes.
    """

    def __init__(
        self,
        distribution: TaskDistribution,
        steps: int,
        batch_size: int,
        num_tasks: int,
        processes: int = 1,
        micro_batch_size: int | None = None,
    ):
        micro_batch_size = batch_size if micro_batch_size is None else micro_batch_size
        for name, value in (("steps", steps), ("batch_size", batch_size), ("num_tasks", num_tasks),
                            ("processes", processes), ("micro_batch_size", micro_batch_size)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TaskStream `{name}` must be an integer >= 1, got {name}={value!r}.")
        if batch_size % micro_batch_size:
            raise ValueError(
                f"TaskStream batch_size={batch_size} must be a multiple of micro_batch_size={micro_batch_size} "
                "(the per-device batch size times the gradient accumulation steps)."
            )
        if num_tasks % processes:
            raise ValueError(
                f"TaskStream num_tasks={num_tasks} must be a multiple of processes={processes}: every process runs "
                "one task per inner optimisation."
            )
        self.distribution, self.steps, self.batch_size, self.num_tasks = distribution, steps, batch_size, num_tasks
        self.processes, self.micro_batch_size = processes, micro_batch_size
        self.examples_per_task = steps * batch_size

    def __len__(self) -> int:
        return self.num_tasks * self.examples_per_task

    def __getitem__(self, index: int) -> dict[str, Any]:
        # batch `c` of the stream is the `i`-th of process `r` (Accelerate deals batches out in turn)
        c, j = divmod(int(index), self.micro_batch_size)
        i, r = divmod(c, self.processes)
        e, s = divmod(i, self.examples_per_task // self.micro_batch_size)
        return self.example_of(e * self.processes + r, s * self.micro_batch_size + j)

    def batches_of(self, k: int) -> list[list[dict[str, Any]]]:
        """Task `k`'s examples as its inner optimisation reads them: one list of `batch_size` per optimizer step."""
        size = self.batch_size
        return [[self.example_of(k, s * size + i) for i in range(size)] for s in range(self.steps)]

    def example_of(self, k: int, position: int) -> dict[str, Any]:
        """The example read at `position` of task `k`'s inner optimisation."""
        task = self.distribution.task(k)
        n = len(task.train_rows)
        order = np.random.default_rng([self.distribution.seed, k, 1, position // n]).permutation(n)
        j = order[position % n]
        return self.distribution.example(task.train_rows[j], task.train_labels[j], k)

    def tests(self) -> TaskTests:
        """The test examples of the same tasks: the meta dataset of the run."""
        return TaskTests(self.distribution, self.num_tasks)


class TaskTests(torch.utils.data.Dataset):
    """The test examples of tasks `0 .. num_tasks - 1`, task by task (`examples_per_task` each): the meta dataset of an
    online run over a [`TaskStream`]; [`MetaTrainer`] draws each meta batch from the current task's block.

    Args:
        distribution ([`TaskDistribution`]): the tasks.
        num_tasks (`int`): tasks in the set.
    """

    def __init__(self, distribution: TaskDistribution, num_tasks: int):
        self.distribution, self.num_tasks = distribution, num_tasks
        self.examples_per_task = distribution.ways * distribution.test_per_class

    def __len__(self) -> int:
        return self.num_tasks * self.examples_per_task

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example_of(*divmod(int(index), self.examples_per_task))

    def examples_of(self, k: int) -> list[dict[str, Any]]:
        """Every test example of task `k`."""
        return [self.example_of(k, j) for j in range(self.examples_per_task)]

    def example_of(self, k: int, j: int) -> dict[str, Any]:
        """Test example `j` of task `k`."""
        task = self.distribution.task(k)
        return self.distribution.example(task.test_rows[j], task.test_labels[j], k)
