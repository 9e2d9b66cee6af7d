"""Memory of a block of work: the CUDA allocator's peak on GPU, bytes saved for backward on CPU."""

from __future__ import annotations

import torch


class MemoryMeter:
    """Context manager measuring the memory a block of work adds, in bytes (`peak_bytes` after exit).

    On CUDA it is the allocator's peak during the block minus the memory allocated when it began. On CPU, where
    torch keeps no allocator statistics, it is the total size of the distinct tensor storages the autograd graph
    saves for backward inside the block: the part of memory that differs between hypergradient estimators (the
    second-order graph of T1-T2 against EvoGrad's single first-order graph). The two are different quantities:
    compare figures of one kind only, and `kind` says which.

    Args:
        device (`torch.device` or `str`): where the work runs.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = "cuda_peak_allocated" if self.device.type == "cuda" else "cpu_saved_for_backward"
        self.peak_bytes = 0

    def __enter__(self) -> MemoryMeter:
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._seen: set[int] = set()
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.peak_bytes += storage.nbytes()
        return t

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._hooks.__exit__(*exc)
