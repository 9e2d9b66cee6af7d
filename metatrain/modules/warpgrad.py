"""WarpGrad's warp layers, interleaved with the task layers of an unmodified model by forward hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init
from torch.utils.hooks import RemovableHandle

from ._base import MetaModule
from ._names import named_submodules

WARP_PREFIX = "warp"
# modules whose forward runs their children (or that have none): a warp site registered on one would run in it
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class WarpLayer(nn.Module):
    """One warp layer: the pre-activation residual unit `x + conv(relu(norm(x)))` (He et al., 2016) with a 3x3
    convolution that keeps the channels, zero-initialised, so the layer starts as the identity and the warped model
    as the unwarped one. Its convolution gets a non-zero hypergradient from the start, its norm once the convolution
    has moved.

    Args:
        channels (`int`): channels `C` of the feature map `[B, C, H, W]`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        # skip_init: no draw from the global random stream for weights that are zeroed anyway
        self.conv = skip_init(nn.Conv2d, channels, channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.relu(self.norm(x)))


class WarpSite(nn.Sequential):
    """The warp layers after one module of the model, applied to its output by a forward hook.

    Args:
        channels (`int`): channels of the module's output.
        layers (`int`): number of [`WarpLayer`]s.
        after (`str`): the module's name in the model.
    """

    def __init__(self, channels: int, layers: int, after: str):
        super().__init__(*(WarpLayer(channels) for _ in range(layers)))
        self.channels = channels
        self.attached_after = after
        # the hook that applies the site once attached: kept here, so detaching needs only the model
        self._hook: RemovableHandle | None = None

    def after(self, module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
        """The forward hook on the module the site follows: its output, warped. A bound method, not a closure, so
        that a deep copy of the model hooks its own copy of the site."""
        if not (isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[1] == self.channels):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"The warp layers after {self.attached_after!r} take feature maps [B, {self.channels}, H, W], but it "
                f"returned {shape}: attach them after a module with 2D feature maps, or pass the right `channels`."
            )
        return self(output)

    def extra_repr(self) -> str:
        return f"after={self.attached_after!r}, channels={self.channels}"


class WarpLayers(MetaModule):
    """The warp layers attached to one model, as returned by [`attach_warp_layers`]: WarpGrad (Flennerhag et al.,
    "Meta-Learning with Warped Gradient Descent", ICLR 2020) as HyperDistill meta-learns it (Lee et al., ICLR 2022,
    Sec. 5), the warp layers the hyperparameters and the task layers the weights of the inner optimisation.

    Pass it as `meta_module` to [`MetaTrainer`]: its parameters are the model's (found by identity, kept out of the
    base optimizer). Unlike an [`~metatrain.modules.AttachedTransform`], the layers act in the training and the meta
    loss alike, so the meta loss has a direct term. [`detach_warp_layers`] undoes the attachment.

    Args:
        sites (`dict[str, WarpSite]`): the warp layers, by the name of the module they follow.
    """

    def __init__(self, sites: dict[str, WarpSite]):
        super().__init__()
        self.sites = nn.ModuleDict({name.replace(".", "__"): site for name, site in sites.items()})


def _attached_sites(model: nn.Module) -> list[tuple[nn.Module, str, WarpSite]]:
    """`(holder, attribute, site)` for every warp site registered in the model."""
    return [
        (holder, attribute, site)
        for holder in model.modules()
        for attribute, site in holder.named_children()
        if isinstance(site, WarpSite)
    ]


def _holder(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Where the warp site after `name` is registered, and under which attribute: on the nearest module from its
    parent upwards that does not run its children (`warp_<path from there>`), else on the module itself (`warp`)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        holder = model.get_submodule(".".join(parts[:depth]))
        if not isinstance(holder, _CONTAINERS):
            return holder, "_".join([WARP_PREFIX, *parts[depth:]])
    followed = model.get_submodule(name)
    if not isinstance(followed, _CONTAINERS):
        return followed, WARP_PREFIX
    raise ValueError(
        f"{name!r} and every module above it run their children in order (nn.Sequential), so warp layers "
        "registered there would run as extra stages: wrap the model in a module of your own."
    )


def _out_channels(name: str, module: nn.Module) -> int:
    """The channels of `module`'s output: those of the last `Conv2d` or `BatchNorm2d` registered in it."""
    channels = None
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
        elif isinstance(layer, nn.BatchNorm2d):
            channels = layer.num_features
    if channels is None:
        raise ValueError(
            f"Cannot tell the channels of {name!r} ({type(module).__name__}): it holds no Conv2d or BatchNorm2d. "
            "Pass `channels=` (one count, or one per module in `after`)."
        )
    return channels


def attach_warp_layers(
    model: nn.Module, after: str | Sequence[str], layers_per_site: int = 2, channels: int | Sequence[int] | None = None
) -> WarpLayers:
    """Interleaves warp layers with the task layers of `model` without changing its code: after the output of each
    module in `after`, `layers_per_site` [`WarpLayer`]s (residual, zero-initialised: the warped model starts as the
    unwarped one, exactly).

    HyperDistill's WarpGrad is a `conv3` [`~metatrain.models.ConvNet`] with two warp layers after every block:
    `attach_warp_layers(model, after=["features.0", "features.1", "features.2"])`.

    The layers of each site are registered as a [`WarpSite`] on the nearest module, from the followed module's parent
    upwards, that does not run its children in order (not an `nn.Sequential`), as `warp_<path from there>`: for
    `features.0` of a ConvNet, `warp_features_0` on the model; for `layer1.0.bn2` of a ResNet, `warp_bn2` on the
    block. A model that is an `nn.Sequential` all the way up gets the site on the followed module itself, as `warp`.
    So the model's own state-dict keys stay as they were and the warp parameters are model parameters; a forward hook
    on the followed module applies the site.

    Args:
        model (`nn.Module`): the model.
        after (`str` or `Sequence[str]`): names of the modules to follow, as in `model.named_modules()`; each returns
            feature maps `[B, C, H, W]`.
        layers_per_site (`int`, *optional*, defaults to 2): warp layers after each module.
        channels (`int` or `Sequence[int]`, *optional*): `C` of the modules' outputs, one for all or one each;
            defaults to that of the last `Conv2d` or `BatchNorm2d` in each module.

    Returns:
        [`WarpLayers`]: the attached layers, for the meta-optimizer.

    Raises:
        `ValueError`: for an unknown or repeated name, channels that cannot be told, `layers_per_site < 1`, or a model
            with warp layers attached already.
    """
    if _attached_sites(model):
        raise ValueError(
            f"{type(model).__name__} already has warp layers attached: detach them first with "
            "`detach_warp_layers(model)`."
        )
    if not isinstance(layers_per_site, int) or layers_per_site < 1:
        raise ValueError(f"layers_per_site must be a positive integer, got {layers_per_site!r}.")
    followed = named_submodules(model, after, "after")
    if channels is None:
        counts = [_out_channels(name, module) for name, module in followed.items()]
    elif isinstance(channels, int):
        counts = [channels] * len(followed)
    else:
        counts = list(channels)
        if len(counts) != len(followed):
            raise ValueError(
                f"channels has {len(counts)} counts for {len(followed)} modules in `after`: give one count each, or "
                "one for all."
            )
    places = {}
    for name in followed:
        holder, attribute = _holder(model, name)
        if hasattr(holder, attribute) or (id(holder), attribute) in places.values():
            raise ValueError(
                f"Cannot register the warp layers after {name!r} as {attribute!r} on {type(holder).__name__}: the "
                "name is taken. Rename that attribute of your model."
            )
        places[name] = (id(holder), attribute)
    sites = {}
    for (name, module), count in zip(followed.items(), counts):
        holder, attribute = _holder(model, name)
        reference = next(module.parameters(), None)
        if reference is None:
            reference = next(model.parameters(), None)
        site = WarpSite(count, layers_per_site, name).train(module.training)
        if reference is not None:
            site.to(device=reference.device, dtype=reference.dtype)
        holder.add_module(attribute, site)
        site._hook = module.register_forward_hook(site.after)
        sites[name] = site
    return WarpLayers(sites)


def detach_warp_layers(model: nn.Module, warps: WarpLayers | None = None) -> None:
    """Removes the warp layers and hooks that [`attach_warp_layers`] added: the model's modules, state dict and
    outputs are as before the attachment.

    Args:
        model (`nn.Module`): the model the layers are attached to.
        warps ([`WarpLayers`], *optional*): the attachment to undo; defaults to every warp site found in the model.

    Raises:
        `ValueError`: if the model has no warp layers attached (none of those in `warps`, when given).
    """
    found = _attached_sites(model)
    if warps is not None:
        wanted = {id(site) for site in warps.sites.values()}
        found = [entry for entry in found if id(entry[2]) in wanted]
    if not found:
        given = " of the given warps" if warps is not None and _attached_sites(model) else ""
        raise ValueError(
            f"{type(model).__name__} has no warp layers{given} attached: nothing to detach. Pass the model that "
            "`attach_warp_layers` was called on."
        )
    for holder, attribute, site in found:
        if site._hook is not None:
            site._hook.remove()
            site._hook = None
        delattr(holder, attribute)
