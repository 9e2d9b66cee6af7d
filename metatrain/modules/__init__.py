"""Meta-parameter modules that attach to unmodified models."""

from __future__ import annotations

from ._base import AttachedTransform, InputTransform, LossWeighter, MetaModule
from .feature_wise import (
    FeatureWiseTransform,
    FeatureWiseTransforms,
    attach_feature_wise_transforms,
    detach_feature_wise_transforms,
)
from .meta_weight_net import MetaWeightNet
from .representation import (
    RepresentationTransform,
    RepresentationTransformNetwork,
    attach_representation_transform,
    detach_representation_transform,
)
from .rotation import LearnableRotation, rotate_images

__all__ = [
    "AttachedTransform",
    "FeatureWiseTransform",
    "FeatureWiseTransforms",
    "InputTransform",
    "LearnableRotation",
    "LossWeighter",
    "MetaModule",
    "MetaWeightNet",
    "RepresentationTransform",
    "RepresentationTransformNetwork",
    "attach_feature_wise_transforms",
    "attach_representation_transform",
    "detach_feature_wise_transforms",
    "detach_representation_transform",
    "rotate_images",
]
