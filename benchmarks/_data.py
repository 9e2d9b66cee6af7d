"""Data the benchmark scripts share (imported inside their worker functions, after torch)."""

from __future__ import annotations

import torch


class RandomImages(torch.utils.data.Dataset):
    """`n` random 3x32x32 images with labels in 0..9, fixed by `seed`: the benchmarks' stand-in for CIFAR."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}
