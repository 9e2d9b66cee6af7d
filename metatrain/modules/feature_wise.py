"""Learned feature-wise transformation (LFT) layers attached to unmodified timm ResNets."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..utils import require
from ._base import AttachedTransform

logger = logging.getLogger(__name__)

FT_AFTER_BN2 = "ft_bn2"
FT_AFTER_BN3 = "ft_bn3"  # Bottleneck blocks: their residual branch ends with bn3
FT_AFTER_SHORTCUT = "ft_shortcut"


@functools.cache
def supported_blocks() -> dict[type, tuple[str, str, str]]:
    """The timm blocks whose structure is known: (last conv, last norm) of their residual branch and the FT layer's
    attribute."""
    resnet = require("timm.models.resnet", "vision", "LFT's feature-wise layers (timm ResNets)")
    return {resnet.BasicBlock: ("conv2", "bn2", FT_AFTER_BN2), resnet.Bottleneck: ("conv3", "bn3", FT_AFTER_BN3)}


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
        # the forward hook that applies the layer once attached: kept here, so detaching needs only the model (a deep
        # copy of the model copies the handle along with the hook it removes)
        self._hook: RemovableHandle | None = None

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
    layers disabled). [`detach_feature_wise_transforms`] undoes the attachment."""

    def __init__(self, layers: dict[str, FeatureWiseTransform]):
        super().__init__()
        self.layers = nn.ModuleDict({name.replace(".", "__"): layer for name, layer in layers.items()})

    @property
    def enabled(self) -> bool:
        """Whether any FT layer is on (training forwards); [`~AttachedTransform.disabled`] turns all off."""
        return any(layer.enabled for layer in self.layers.values())

    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers.values():
            layer.enabled = enabled


def _attached_layers(model: nn.Module) -> list[tuple[nn.Module, str, FeatureWiseTransform]]:
    """`(block, attribute, layer)` for every FT layer registered in the model."""
    return [
        (block, attribute, layer)
        for block in model.modules()
        for attribute in (FT_AFTER_BN2, FT_AFTER_BN3, FT_AFTER_SHORTCUT)
        if isinstance(layer := getattr(block, attribute, None), FeatureWiseTransform)
    ]


def _short_list(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def attach_feature_wise_transforms(
    model: nn.Module, init_gamma: float = 0.3, init_beta: float = 0.5
) -> FeatureWiseTransforms:
    """Attaches a [`FeatureWiseTransform`] after the last batch norm of the residual branch of every block (`bn2` of
    a BasicBlock, as LFT does; `bn3` of a Bottleneck) and after every shortcut (`downsample`, which ends in a batch
    norm) of a timm ResNet, without changing timm's code.

    Only timm's `BasicBlock` and `Bottleneck` (`timm.models.resnet`) are recognised: the blocks of timm's `resnet*`,
    `resnet*d`/`t`/`s`, `seresnet*`, `resnext*`, `seresnext*`, `ecaresnet*`, `wide_resnet*`, `resnetrs*`, `resnetaa*`
    and `resnetblur*` models (and of a model that wraps one, such as a few-shot classifier). Other architectures
    (EfficientNet, ResNetV2, SK-ResNet, ResNeSt, Res2Net, RegNet, ...) are refused: their blocks are built
    differently, and a layer placed by name alone can end up where it gets no hypergradient.

    Each FT layer is registered on its block as `ft_bn2` (`ft_bn3`) / `ft_shortcut` (so the model's own state-dict
    keys stay as they were and the FT parameters are model parameters) and applied by a forward hook on the module
    it follows. On a ResNet-10 (`resnet10t`) that is 3,712 meta-parameters, the count of the LFT paper.

    timm's default `zero_init_last=True` zeroes that last batch norm's weight, so an FT layer after it gets exactly
    zero hypergradient at initialisation: build models trained from scratch with `zero_init_last=False` (one warning
    lists the blocks when it sees such weights).

    Args:
        model (`nn.Module`): a timm ResNet, or a model containing one.
        init_gamma (`float`, *optional*, defaults to 0.3), init_beta (`float`, *optional*, defaults to 0.5):
            initial `theta_gamma` and `theta_beta`.

    Returns:
        [`FeatureWiseTransforms`]: the attached layers, for the meta-optimizer.

    Raises:
        `ValueError`: if the model has no timm `BasicBlock` or `Bottleneck`, or already has FT layers attached.
    """
    if _attached_layers(model):
        raise ValueError(
            f"{type(model).__name__} already has feature-wise transforms: detach them first with "
            "`detach_feature_wise_transforms(model)`."
        )
    blocks = [(name, block) for name, block in model.named_modules() if type(block) in supported_blocks()]
    if not blocks:
        supported = ", ".join(f"timm.models.resnet.{cls.__name__}" for cls in supported_blocks())
        ResNet = require("timm.models.resnet", "vision", "LFT").ResNet  # noqa: N806
        stages = [getattr(m, f"layer{i}") for m in model.modules() if isinstance(m, ResNet) for i in range(1, 5)]
        other = sorted({type(block).__name__ for stage in stages for block in stage})
        found = f" (a timm ResNet of {', '.join(other)} blocks)" if other else ""
        raise ValueError(
            f"{type(model).__name__}{found} has no residual block that feature-wise transforms know how to attach "
            f"to (supported: {supported}). Use a timm ResNet built from them, e.g. timm.create_model('resnet10t', "
            "'resnet18', 'resnet50d', 'seresnet50' or 'resnext50_32x4d', zero_init_last=False), or add "
            "`FeatureWiseTransform` layers to your model yourself."
        )
    zeroed, layers = [], {}
    for block_name, block in blocks:
        conv_name, norm_name, attribute = supported_blocks()[type(block)]
        norm, conv = getattr(block, norm_name), getattr(block, conv_name)
        prefix = f"{block_name}." if block_name else ""
        weight = getattr(norm, "weight", None)
        if weight is not None and not bool(weight.detach().ne(0).any()):
            zeroed.append(prefix + norm_name)
        targets = [(attribute, norm)]
        if block.downsample is not None:
            targets.append((FT_AFTER_SHORTCUT, block.downsample))  # its output is that of its last batch norm
        for name, target in targets:
            layer = FeatureWiseTransform(conv.out_channels, init_gamma, init_beta)
            layer.to(device=conv.weight.device, dtype=conv.weight.dtype).train(block.training)
            block.add_module(name, layer)
            layer._hook = target.register_forward_hook(layer.after)
            layers[prefix + name] = layer
    if zeroed:
        logger.warning(
            f"{len(zeroed)} of {len(blocks)} blocks have an all-zero weight in the norm their FT layer follows "
            f"(timm's zero_init_last): {_short_list(zeroed)}. Those FT layers get zero hypergradient until the "
            "weights move: build the model with zero_init_last=False to train it from scratch."
        )
    return FeatureWiseTransforms(layers)


def detach_feature_wise_transforms(model: nn.Module, transforms: FeatureWiseTransforms | None = None) -> None:
    """Removes the FT layers and hooks that [`attach_feature_wise_transforms`] added: the model's modules, state
    dict and outputs are as before the attachment.

    Args:
        model (`nn.Module`): the model the layers are attached to.
        transforms ([`FeatureWiseTransforms`], *optional*): the attachment to undo; defaults to every FT layer found
            in the model.

    Raises:
        `ValueError`: if the model has no FT layers attached (none of those in `transforms`, when given).
    """
    found = _attached_layers(model)
    if transforms is not None:
        wanted = {id(layer) for layer in transforms.layers.values()}
        found = [entry for entry in found if id(entry[2]) in wanted]
    if not found:
        given = " of the given transforms" if transforms is not None and _attached_layers(model) else ""
        raise ValueError(
            f"{type(model).__name__} has no feature-wise transforms{given} attached: nothing to detach. Pass the "
            "model that `attach_feature_wise_transforms` was called on."
        )
    for block, attribute, layer in found:
        if layer._hook is not None:
            layer._hook.remove()
            layer._hook = None
        delattr(block, attribute)
