"""The memory meters of `metatrain.profiling`."""

from __future__ import annotations

import pytest
import torch

from metatrain.profiling import MemoryMeter


def test_cpu_memory_is_the_peak_over_the_start_of_the_block():
    """200 MB written and freed inside the block: the peak RSS over the block's start sees them; neither what was
    resident before (100 MB, still held) nor an earlier, higher peak (500 MB more, freed) counts."""
    held = torch.ones(25_000_000, dtype=torch.float32)  # 100 MB resident before the block
    spike = torch.ones(125_000_000, dtype=torch.float32)  # an earlier peak, returned to the system before the block
    del spike
    with MemoryMeter(torch.device("cpu"), cpu="rss") as memory:
        block = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB
        del block
    assert memory.kind == "cpu_peak_rss_over_start"
    assert 190 * 2**20 < memory.peak_bytes < 260 * 2**20, memory.peak_bytes / 2**20
    del held


def test_an_unknown_cpu_measure_is_refused():
    with pytest.raises(ValueError, match="cpu='rss'.*cpu='peak'"):
        MemoryMeter("cpu", cpu="peak")
