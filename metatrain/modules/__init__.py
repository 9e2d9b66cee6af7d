"""Meta-parameter modules that attach to unmodified models."""

from __future__ import annotations

from ._base import InputTransform, LossWeighter
from .meta_weight_net import MetaWeightNet
from .rotation import LearnableRotation, rotate_images

__all__ = ["InputTransform", "LearnableRotation", "LossWeighter", "MetaWeightNet", "rotate_images"]
