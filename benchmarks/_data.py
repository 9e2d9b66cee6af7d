"""Data the benchmark scripts share (imported inside their worker functions, after torch)."""

from __future__ import annotations

import torch


class RandomImages(torch.utils.data.Dataset):
    """`n` random 3x`size`x`size` images with labels in 0..9, fixed by `seed`: the benchmarks' stand-in for CIFAR
    (size 32) or, larger, for few-shot images."""

    def __init__(self, n: int, seed: int, size: int = 32):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}
