"""Memory of a block of work: the CUDA allocator's peak on GPU, and on CPU the peak of bytes saved for backward or
the process's peak resident memory ([`MemoryMeter`]); the peak of live tensor bytes on any device
([`LiveTensorMeter`])."""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class _Saved:
    """What the autograd graph holds instead of a saved tensor while a [`MemoryMeter`] watches: its lifetime is the
    lifetime of the saved tensor in the graph."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class MemoryMeter:
    """Context manager measuring the memory a block of work adds, in bytes (`peak_bytes` after exit).

    On CUDA it is the allocator's peak during the block minus the memory allocated when it began. On CPU, where
    torch keeps no allocator statistics, it is the peak, over the block, of the total size of the distinct tensor
    storages that autograd graphs hold saved for backward at once: the part of memory that differs between
    hypergradient estimators (the second-order graph of T1-T2, EvoGrad's `K` first-order graphs alive together, or one
    at a time in its memory-lean mode). A storage counts from the first time a graph saves it until no graph holds it.
    Storages that existed before the block and stay alive anyway (the weights, the batch) cost nothing when a graph
    saves them: pass them as `exclude`, or they are counted as if the graph had made them. The two are different
    quantities: compare figures of one kind only, and `kind` says which.

    With `cpu="rss"`, on CPU it is instead the process's peak resident memory over the block minus its resident memory
    when the block began (Linux): everything the block allocates, tensors or not, for whole training steps.

    Args:
        device (`torch.device` or `str`): where the work runs.
        exclude (`Iterable[torch.Tensor]`, *optional*): on CPU, tensors whose storages are not counted when a graph
            saves them (they, or views and detached aliases of them, such as the weights of a functional call).
        cpu (`str`, *optional*, defaults to `"saved_for_backward"`): what is measured on CPU, `"saved_for_backward"`
            or `"rss"`.

    After the block, `start_bytes` is the memory allocated (CUDA) or resident (`"rss"`) when it began, and
    `absolute_peak_bytes` the peak itself (`peak_bytes + start_bytes`); both are 0 for `"saved_for_backward"`.
    """

    def __init__(
        self, device: torch.device | str, exclude: Iterable[torch.Tensor] = (), cpu: str = "saved_for_backward"
    ):
        if cpu not in ("saved_for_backward", "rss"):
            raise ValueError(f"MemoryMeter measures `cpu='saved_for_backward'` or `cpu='rss'`, got cpu={cpu!r}.")
        self.device = torch.device(device)
        self.kind = "cuda_peak_allocated" if self.device.type == "cuda" else f"cpu_peak_{cpu}"
        if self.kind == "cpu_peak_rss":
            self.kind = "cpu_peak_rss_over_start"
        self.peak_bytes = self.start_bytes = self.absolute_peak_bytes = 0
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}

    def __enter__(self) -> MemoryMeter:
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss_over_start":
            self.start_bytes = _process_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
                f.write("5")
        else:
            self._holders: dict[int, int] = {}  # storage pointer -> saved tensors of it alive in a graph
            self._live = 0
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> _Saved:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self._excluded:
            return _Saved(t.detach())
        if not self._holders.get(key):
            self._live += size
            self.peak_bytes = max(self.peak_bytes, self._live)
        self._holders[key] = self._holders.get(key, 0) + 1
        # detached: a tensor saved by the op that made it would otherwise hold its own grad_fn through this wrapper,
        # a cycle through C++ that Python's collector cannot free (every T1-T2 step leaked its graph); autograd
        # restores the graph links of what the unpack hook returns
        saved = _Saved(t.detach())
        weakref.finalize(saved, self._release, key, size)
        return saved

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key: int, size: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self._live -= size

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            self.absolute_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes = self.absolute_peak_bytes - self.start_bytes
        elif self.kind == "cpu_peak_rss_over_start":
            self.absolute_peak_bytes = _process_kib("VmHWM") * 1024
            self.peak_bytes = self.absolute_peak_bytes - self.start_bytes
        else:
            self._hooks.__exit__(*exc)


def _process_kib(field: str) -> int:
    """A memory figure of this process from `/proc/self/status`, in KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _has_storage(value: Any) -> bool:
    """Whether `value` is a tensor with memory of its own: forward-mode AD's efficient zero tangents have none, nor
    does a wrapper such as a DTensor (its local tensor is seen where it is made)."""
    return isinstance(value, torch.Tensor) and not is_traceable_wrapper_subclass(value) and not value._is_zerotensor()


class LiveTensorMeter(TorchDispatchMode):
    """Context manager measuring the peak total size of the tensor storages that the work inside it creates and that
    are alive at once, in bytes (`peak_bytes` after exit): on CPU, the counterpart of the CUDA allocator's peak over
    the memory allocated at the start, without the allocator's caching and fragmentation that make a process's peak
    resident set size vary by tens of MB between runs of the same work.

    Every operator's outputs are seen through `torch`'s dispatcher (the backward pass's too); an output whose storage
    is an input's (a view, an in-place result) is not new, and a storage counts until it is freed (an alias such as
    a detached tensor may keep it after the tensor that made it).
    Tensors that existed before the block (weights, optimizer state) are not counted, nor is memory outside tensors.
    Each operator call costs a little Python, so time work outside the meter.

    Args:
        min_bytes (`int`, *optional*, defaults to 0): storages smaller than this are ignored.
    """

    def __init__(self, min_bytes: int = 0):
        super().__init__()
        self.min_bytes = min_bytes
        self.peak_bytes = 0
        self._live: dict[int, int] = {}
        self._total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # the inputs' storages before the call: an `out=` tensor that the op resizes gets a new one (new memory)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _has_storage(t)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not _has_storage(t):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size < self.min_bytes or size == 0 or key in self._live or key in inputs:
                continue
            self._live[key] = size
            self._total += size
            self.peak_bytes = max(self.peak_bytes, self._total)
            weakref.finalize(storage, self._free, key)  # the storage: an alias may keep it after its tensor
        return out

    def _free(self, key: int) -> None:
        self._total -= self._live.pop(key, 0)
