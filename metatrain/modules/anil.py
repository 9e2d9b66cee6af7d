"""ANIL's meta-layers: layers of an unmodified model made meta-parameters, the rest left to the inner optimisation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ._base import MetaModule
from ._names import named_submodules, short_list

# the attribute that marks a meta-layer in the model: the `requires_grad` of its parameters before it was attached
REQUIRES_GRAD_BEFORE = "_meta_layer_requires_grad"


class MetaLayers(MetaModule):
    """Existing layers of a model made meta-parameters, as returned by [`attach_meta_layers`]: ANIL (Raghu et al.,
    "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of MAML", ICLR 2020) as HyperDistill
    meta-learns it (Lee et al., ICLR 2022, Sec. 5): the bottom layers of the backbone are the hyperparameters, the
    top layers and the head the weights of the inner optimisation.

    It holds the model's own modules, not copies: pass it as `meta_module` to [`MetaTrainer`], which finds their
    parameters in the model by identity and keeps them out of the base optimizer. The layers act in the training and
    the meta loss alike, so the meta loss has a direct term. [`detach_meta_layers`] undoes the attachment.

    Args:
        layers (`dict[str, nn.Module]`): the layers, by their names in the model.
    """

    added_to_model = False  # the model's own layers: they stay in its saved file

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        self.names = tuple(layers)
        self.layers = nn.ModuleDict({name.replace(".", "__"): layer for name, layer in layers.items()})

    def extra_repr(self) -> str:
        return f"names={list(self.names)}"


def _attached(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of every meta-layer marked in the model."""
    return [(name, module) for name, module in model.named_modules() if REQUIRES_GRAD_BEFORE in module.__dict__]


def attach_meta_layers(model: nn.Module, names: str | Sequence[str]) -> MetaLayers:
    """Makes the submodules `names` of `model` meta-parameters (ANIL's bottom layers), without changing the model:
    nothing is added to it, its state-dict keys and outputs stay as they are. Each layer is marked with the
    `requires_grad` flags its parameters have now (which [`MetaTrainer`] turns off), and [`detach_meta_layers`]
    puts them back.

    For the few-shot [`~metatrain.models.ConvNet`] of HyperDistill's ANIL (`conv4`), the bottom three blocks:
    `attach_meta_layers(model, ["features.0", "features.1", "features.2"])`.

    Args:
        model (`nn.Module`): the model.
        names (`str` or `Sequence[str]`): names of submodules, as in `model.named_modules()`.

    Returns:
        [`MetaLayers`]: the layers, for the meta-optimizer.

    Raises:
        `ValueError`: for an unknown name, a name given twice or inside another, a layer without parameters, layers
            that hold every trainable parameter of the model, or a model with meta-layers attached already.
    """
    attached = _attached(model)
    if attached:
        raise ValueError(
            f"{type(model).__name__} already has meta-layers attached ({short_list([n for n, _ in attached])}): "
            "detach them first with `detach_meta_layers(model)`, or attach all layers in one call."
        )
    layers = named_submodules(model, names, "names")
    for name in layers:
        outer = next((other for other in layers if name.startswith(f"{other}.")), None)
        if outer is not None:
            raise ValueError(f"`names` gives {name!r}, which lies inside {outer!r}: give each layer once.")
        if next(layers[name].parameters(), None) is None:
            raise ValueError(
                f"{name!r} ({type(layers[name]).__name__}) has no parameters, so it cannot be a meta-layer: name "
                "layers with weights, or the block that holds them."
            )
    chosen = {id(p) for layer in layers.values() for p in layer.parameters()}
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in chosen]
    if not left:
        raise ValueError(
            f"The layers {list(layers)} hold every trainable parameter of {type(model).__name__}: nothing is left "
            "for the inner optimisation. Leave out the top layers (ANIL keeps the last block and the head)."
        )
    for layer in layers.values():
        setattr(layer, REQUIRES_GRAD_BEFORE, {n: p.requires_grad for n, p in layer.named_parameters()})
    return MetaLayers(layers)


def detach_meta_layers(model: nn.Module, meta_layers: MetaLayers | None = None) -> None:
    """Undoes [`attach_meta_layers`]: the parameters of the meta-layers get back the `requires_grad` flags they had
    before it, and the layers are no longer marked.

    Args:
        model (`nn.Module`): the model the layers were attached to.
        meta_layers ([`MetaLayers`], *optional*): the attachment to undo; defaults to every meta-layer marked in the
            model (a deep copy of the model carries its marks).

    Raises:
        `ValueError`: if the model has no meta-layers attached (none of those in `meta_layers`, when given).
    """
    found = _attached(model)
    if meta_layers is not None:
        wanted = {id(layer) for layer in meta_layers.layers.values()}
        found = [(name, layer) for name, layer in found if id(layer) in wanted]
    if not found:
        given = " of the given meta-layers" if meta_layers is not None and _attached(model) else ""
        raise ValueError(
            f"{type(model).__name__} has no meta-layers{given} attached: nothing to detach. Pass the model that "
            "`attach_meta_layers` was called on."
        )
    for _, layer in found:
        before = layer.__dict__.pop(REQUIRES_GRAD_BEFORE)
        for name, p in layer.named_parameters():
            if name in before:
                p.requires_grad_(before[name])
