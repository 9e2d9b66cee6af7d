"""Learned feature-wise transformation (LFT) layers attached to unmodified timm ResNets."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttachedTransform

logger = logging.getLogger(__name__)

FT_AFTER_BN2 = "ft_bn2"
FT_AFTER_BN3 = "ft_bn3"  # Bottleneck blocks: their residual branch ends with bn3
FT_AFTER_SHORTCUT = "ft_shortcut"


class FeatureWiseTransform(nn.Module):
    """Feature-wise transformation of Tseng et al. ("Cross-Domain Few-Shot Classification via Learned Feature-Wise
    Transformation", ICLR 2020), the meta-parameters of EvoGrad's LFT experiment (Sec. 4.3).

    In training mode (and while enabled) it scales and shifts each channel with noise drawn once per forward:
    `gamma = 1 + N(0, 1) * softplus(theta_gamma)`, `beta = N(0, 1) * softplus(theta_beta)`, noise of shape
    `[1, C, 1, 1]`, softplus with `beta=100`. In evaluation mode, or when disabled, it is the identity.

    Args:
        num_channels (`int`): channels `C` of the feature map.
        init_gamma (`float`, *optional*, defaults to 0.3): initial `theta_gamma`.
        init_beta (`float`, *optional*, defaults to 0.5): initial `theta_beta`.
    """

    def __init__(self, num_channels: int, init_gamma: float = 0.3, init_beta: float = 0.5):
        super().__init__()
        self.theta_gamma = nn.Parameter(torch.full((1, num_channels, 1, 1), float(init_gamma)))
        self.theta_beta = nn.Parameter(torch.full((1, num_channels, 1, 1), float(init_beta)))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.enabled):
            return x
        shape = (1, x.shape[1], 1, 1)
        gamma = 1 + torch.randn(shape, device=x.device, dtype=x.dtype) * F.softplus(self.theta_gamma, beta=100)
        beta = torch.randn(shape, device=x.device, dtype=x.dtype) * F.softplus(self.theta_beta, beta=100)
        return gamma * x + beta

    def after(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        """The forward hook on the batch norm this layer follows: its output, transformed. A bound method, not a
        closure, so that a deep copy of the model (an EMA copy, a snapshot) hooks its own copy of the layer."""
        return self(output)

    def extra_repr(self) -> str:
        return f"num_channels={self.theta_gamma.shape[1]}, enabled={self.enabled}"


class FeatureWiseTransforms(AttachedTransform):
    """The FT layers attached to one model, as returned by [`attach_feature_wise_transforms`]: pass it as
    `meta_module` to [`MetaTrainer`] (its parameters are the model's, found by identity; the meta loss runs with the
    layers disabled) and to [`detach_feature_wise_transforms`] to undo the attachment."""

    def __init__(self, layers: dict[str, FeatureWiseTransform], handles: list):
        super().__init__()
        self.layers = nn.ModuleDict({name.replace(".", "__"): layer for name, layer in layers.items()})
        self._handles = handles

    @property
    def enabled(self) -> bool:
        """Whether any FT layer is on (training forwards); [`~AttachedTransform.disabled`] turns all off."""
        return any(layer.enabled for layer in self.layers.values())

    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers.values():
            layer.enabled = enabled


def attach_feature_wise_transforms(
    model: nn.Module, init_gamma: float = 0.3, init_beta: float = 0.5
) -> FeatureWiseTransforms:
    """Attaches a [`FeatureWiseTransform`] after the last batch norm of the residual branch of every block (`bn2` of
    a BasicBlock, as LFT does; `bn3` of a Bottleneck) and after the batch norm of every shortcut (`downsample`) of a
    timm ResNet, without changing timm's code.

    Each FT layer is registered on its block as `ft_bn2` (`ft_bn3`) / `ft_shortcut` (so the model's own state-dict
    keys stay as they were and the FT parameters are model parameters) and applied by a forward hook on the batch
    norm it follows. On a ResNet-10 (`resnet10t`) that is 3,712 meta-parameters, the count of the LFT paper.

    timm's default `zero_init_last=True` zeroes that last batch norm's weight, so an FT layer after it gets exactly
    zero hypergradient at initialisation: build models trained from scratch with `zero_init_last=False` (a warning
    says so when it sees such a block).

    Args:
        model (`nn.Module`): a timm ResNet (any model whose blocks have `bn2`, or `bn3` after it, and an optional
            `downsample` ending in a batch norm).
        init_gamma (`float`, *optional*, defaults to 0.3), init_beta (`float`, *optional*, defaults to 0.5):
            initial `theta_gamma` and `theta_beta`.

    Returns:
        [`FeatureWiseTransforms`]: the attached layers, for the meta-optimizer and for detaching.

    Raises:
        `ValueError`: if the model has no such block, or already has FT layers attached.
    """
    layers, handles = {}, []
    for block_name, block in model.named_modules():
        if not isinstance(getattr(block, "bn2", None), nn.BatchNorm2d):
            continue
        if hasattr(block, FT_AFTER_BN2) or hasattr(block, FT_AFTER_BN3):
            raise ValueError(f"{block_name!r} already has feature-wise transforms: detach them first.")
        bottleneck = isinstance(getattr(block, "bn3", None), nn.BatchNorm2d)
        last, attribute = (block.bn3, FT_AFTER_BN3) if bottleneck else (block.bn2, FT_AFTER_BN2)
        targets = [(attribute, last)]
        downsample = getattr(block, "downsample", None)
        if downsample is not None:
            norms = [m for m in downsample.modules() if isinstance(m, nn.BatchNorm2d)]
            if norms:
                targets.append((FT_AFTER_SHORTCUT, norms[-1]))
        if not bool(last.weight.detach().ne(0).any()):
            logger.warning(
                f"{block_name}.{'bn3' if bottleneck else 'bn2'} has an all-zero weight (timm's zero_init_last): the "
                "FT layer after it gets zero hypergradient until that weight moves. Build with zero_init_last=False "
                "to train from scratch."
            )
        for attribute, norm in targets:
            layer = FeatureWiseTransform(norm.num_features, init_gamma, init_beta).to(
                device=norm.weight.device, dtype=norm.weight.dtype
            )
            block.add_module(attribute, layer)
            handles.append(norm.register_forward_hook(layer.after))
            layers[f"{block_name}.{attribute}" if block_name else attribute] = layer
    if not layers:
        raise ValueError(
            f"No residual block with a `bn2` batch norm found in {type(model).__name__}: feature-wise transforms "
            "attach to timm ResNets (e.g. resnet10t, resnet18, resnet34)."
        )
    return FeatureWiseTransforms(layers, handles)


def detach_feature_wise_transforms(model: nn.Module, transforms: FeatureWiseTransforms) -> None:
    """Removes the FT layers and hooks that [`attach_feature_wise_transforms`] added: the model's modules, state
    dict and outputs are as before the attachment."""
    attached = {id(layer) for layer in transforms.layers.values()}
    for handle in transforms._handles:
        handle.remove()
    transforms._handles.clear()
    for block in list(model.modules()):
        for attribute in (FT_AFTER_BN2, FT_AFTER_BN3, FT_AFTER_SHORTCUT):
            if id(getattr(block, attribute, None)) in attached:
                delattr(block, attribute)
