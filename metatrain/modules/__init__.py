"""Meta-parameter modules that attach to unmodified models."""

from __future__ import annotations

from ._base import LossWeighter
from .meta_weight_net import MetaWeightNet

__all__ = ["LossWeighter", "MetaWeightNet"]
