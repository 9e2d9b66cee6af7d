"""Meta-parameter modules that attach to unmodified models."""

from __future__ import annotations

from ._base import AttachedTransform, InputTransform, LossWeighter, MetaModule
from .anil import MetaLayers, attach_meta_layers, detach_meta_layers
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
from .source_weights import SourceWeights
from .warpgrad import WarpLayer, WarpLayers, WarpSite, attach_warp_layers, detach_warp_layers

__all__ = [
    "AttachedTransform",
    "FeatureWiseTransform",
    "FeatureWiseTransforms",
    "InputTransform",
    "LearnableRotation",
    "LossWeighter",
    "MetaLayers",
    "MetaModule",
    "MetaWeightNet",
    "RepresentationTransform",
    "RepresentationTransformNetwork",
    "SourceWeights",
    "WarpLayer",
    "WarpLayers",
    "WarpSite",
    "attach_feature_wise_transforms",
    "attach_meta_layers",
    "attach_representation_transform",
    "attach_warp_layers",
    "detach_feature_wise_transforms",
    "detach_meta_layers",
    "detach_representation_transform",
    "detach_warp_layers",
    "rotate_images",
]
