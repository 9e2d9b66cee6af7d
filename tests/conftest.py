"""Fixtures shared by the test modules: no network, and a small image folder written on the fly."""

from __future__ import annotations

import socket

import numpy as np
import pytest


@pytest.fixture
def no_network(monkeypatch):
    """Fails any attempt to open an internet connection."""

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x (4 train, 2 test) random 32x32 RGB PNGs in `tmp_path/data/{train,test}/<class>/`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, count in (("train", 4), ("test", 2)):
        for name in ("cat", "dog", "frog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
