"""Small helpers the trainer, the objective and the diagnostics share: model modes, random states, vector
comparisons."""

from __future__ import annotations

import contextlib
import importlib
import math
import random
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch
from torch import nn

DISTRIBUTION = "metatrain-hf"


def require(module: str, extra: str, what: str) -> ModuleType:
    """`module` imported, or an `ImportError` naming the extra of this package that installs it, e.g.
    `pip install 'metatrain-hf[recipes]'`; `what` says what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs `{module.split('.')[0]}`, which metatrain installs with its `{extra}` extra: "
            f"pip install '{DISTRIBUTION}[{extra}]'."
        ) from err


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """The model in evaluation mode (batch norm on running statistics, dropout off) inside the block, and back in the
    mode it was in after, also when the block raises: the meta loss with `meta_loss_mode="eval"`, few-shot tests."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def torch_rng_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """torch's CPU random state, and `device`'s, restored after the block."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


@contextlib.contextmanager
def random_state_kept(device: torch.device) -> Iterator[None]:
    """Python's, numpy's and torch's (CPU and `device`) random states as they were before the block, after it."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch_rng_kept(device):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def step_seed(seed: int, step: int, stream: int) -> int:
    """The seed of random stream `stream` at optimizer step `step` of a run seeded `seed`: what
    [`~metatrain.MetaTrainer`] seeds the meta step's draws with (streams 0 and 1: the training and the meta loss's
    random layers; `ESTIMATOR_STREAM`: the estimator's own draws)."""
    return (seed * 1_000_003 + step) * 2 + stream


def flatten(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float64 CPU vector of a hypergradient given as one tensor per meta-parameter."""
    return torch.cat([g.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for g in grads])


def ratio(num: float, den: float) -> float:
    """`num / den`, NaN when `den` is not positive or either is not finite."""
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else math.nan


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity in [-1, 1], NaN when either vector is zero (undefined, not orthogonal) or not finite."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0 or not math.isfinite(na * nb):
        return math.nan
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))
