"""The meta batches: an epoch-seeded shuffle of the meta dataset, drawn endlessly and resumably; or, in an online run
over a task distribution, draws from the current task's examples."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """Shuffles `range(size)` with a permutation seeded by `seed + epoch`, so any epoch can be replayed on resume
    without touching the global RNG."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class MetaBatches:
    """Draws meta batches from a loader over the meta dataset pass after pass, each pass in the order of its epoch's
    seed; its position (pass and batches drawn in it) is its state, so a resumed run draws the same batches next.
    Drawing never moves the global RNG (a loader draws its base seed from it when a pass starts).

    Args:
        build_loader (`Callable[[EpochSeededSampler], Iterable]`): builds the loader over the meta dataset with the
            given sampler (once, at the first draw).
        sampler ([`EpochSeededSampler`]): the sampler, set to each pass's epoch.
        prepare (`Callable[[dict], dict]`, *optional*): applied to each batch drawn (e.g. moving it to the device).
    """

    def __init__(
        self,
        build_loader: Callable[[EpochSeededSampler], Iterable],
        sampler: EpochSeededSampler,
        prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        self._build_loader, self.sampler, self._prepare = build_loader, sampler, prepare or (lambda batch: batch)
        self._loader: Iterable | None = None
        self._iterator: Iterator | None = None
        self.epoch, self.consumed = 0, 0

    def state_dict(self) -> dict[str, int]:
        """The position: the pass (`epoch`) and the batches drawn in it (`consumed`)."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed, self._iterator = int(state["epoch"]), int(state["consumed"]), None

    def rewind(self) -> None:
        """Back to the first batch of the first pass."""
        self.load_state_dict({"epoch": 0, "consumed": 0})

    def next(self) -> dict[str, Any]:
        """The next meta batch."""
        if self._loader is None:
            self._loader = self._build_loader(self.sampler)
        with torch.random.fork_rng(devices=[]):
            while True:
                if self._iterator is None:
                    # Accelerate's loader sets its sampler to its own count of passes when iterated, which starts at
                    # 0 in a loader built after resume: set that count too, or a run resumed in pass >= 1 would draw
                    # another pass's order
                    if hasattr(self._loader, "set_epoch"):
                        self._loader.set_epoch(self.epoch)
                    self.sampler.set_epoch(self.epoch)
                    self._iterator = iter(self._loader)
                    for _ in range(self.consumed):
                        next(self._iterator)
                try:
                    batch = next(self._iterator)
                except StopIteration:
                    self.epoch, self.consumed, self._iterator = self.epoch + 1, 0, None
                    continue
                self.consumed += 1
                return self._prepare(batch)

    def next_for(self, train_batch: dict[str, Any], disjoint_key: str | None = None, max_draws: int = 100):
        """The next meta batch; with `disjoint_key`, the next one whose values of that key share none with
        `train_batch`'s (e.g. a pseudo-unseen domain for a pseudo-seen one), within `max_draws` draws."""
        if disjoint_key is None:
            return self.next()
        if disjoint_key not in train_batch:
            raise ValueError(
                f"meta_disjoint_key={disjoint_key!r} is not a key of the training batch (keys: "
                f"{sorted(train_batch)}): add it to the dataset's items or unset `meta_disjoint_key`."
            )
        train_values = set(torch.as_tensor(train_batch[disjoint_key]).reshape(-1).tolist())
        for _ in range(max_draws):
            batch = self.next()
            if not train_values & set(torch.as_tensor(batch[disjoint_key]).reshape(-1).tolist()):
                return batch
        raise ValueError(
            f"No meta batch in {max_draws} draws has a {disjoint_key!r} other than the training batch's "
            f"{sorted(train_values)}: the meta dataset needs items with other values of {disjoint_key!r} (e.g. "
            "episodes from at least two domains)."
        )


class TaskBatches:
    """Batches drawn from the current task of a dataset read task by task (`dataset.examples_per_task` items per
    task, item `j` of task `k` at `dataset.example_of(k, j)`, as in [`~metatrain.data.TaskStream`] and
    [`~metatrain.data.TaskTests`]): the meta batches, and the fresh training batches of HyperDistill's fit, of an
    online run over a task distribution. The task is read from the training batch's `task` entry. Draw `d` takes
    `batch_size` distinct items of the block chosen by `(seed, task, d)`; the count of draws is the state.

    Args:
        dataset: a dataset with `examples_per_task`.
        batch_size (`int`): items per batch.
        collate (`Callable[[list], dict]`): builds a batch from items (the trainer's collator).
        prepare (`Callable[[dict], dict]`, *optional*): applied to each batch (e.g. moving it to the device).
        seed (`int`, *optional*, defaults to 0): seed of the draws.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        collate: Callable[[list[Any]], dict[str, Any]],
        prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int = 0,
    ):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._collate, self._prepare = collate, prepare or (lambda batch: batch)
        self.drawn = 0

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn = int(state["drawn"])

    def rewind(self) -> None:
        self.drawn = 0

    def next_for(self, train_batch: dict[str, Any], disjoint_key: str | None = None, max_draws: int = 100):
        """A batch of the task of `train_batch` (`disjoint_key` does not apply: the batch is the task's)."""
        if "task" not in train_batch:
            raise ValueError(
                f"The training batch has no 'task' entry (keys: {sorted(train_batch)}): an online run over a task "
                "distribution reads a dataset whose items name their task (`metatrain.data.TaskStream`)."
            )
        tasks = torch.as_tensor(train_batch["task"]).reshape(-1).unique()
        if len(tasks) != 1:
            raise ValueError(
                f"The training batch mixes tasks {tasks.tolist()}: each optimizer step must read one task (build the "
                "TaskStream with the run's `meta_inner_steps` and batch size)."
            )
        task, size = int(tasks[0]), self.dataset.examples_per_task
        rows = np.random.default_rng([self.seed, task, self.drawn]).choice(size, self.batch_size, replace=False)
        self.drawn += 1
        return self._prepare(self._collate([self.dataset.example_of(task, int(j)) for j in rows]))
