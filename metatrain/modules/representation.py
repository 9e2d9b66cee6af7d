"""MetaXL's representation transformation network, attached to unmodified transformers encoders."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._base import AttachedTransform

RTN_ATTRIBUTE = "representation_transform"


class RepresentationTransformNetwork(nn.Module):
    """The representation transformation network (RTN) of MetaXL (Xia et al., "MetaXL: Meta Representation
    Transformation for Low-resource Cross-lingual Learning", NAACL 2021), the meta-parameters of EvoGrad's
    cross-lingual experiment.

    `Linear(hidden_size, bottleneck) - ReLU - Linear(bottleneck, hidden_size)`, applied residually to detached
    hidden states: `h + net(h.detach())`. The residual branch does not back-propagate into the encoder below, so the
    source loss reaches the lower layers through the identity path only, and the network's parameters get their
    gradient from the layers above.

    Args:
        hidden_size (`int`): width `h` of the hidden states.
        bottleneck (`int`, *optional*, defaults to 192): width of the middle layer (MetaXL uses 192-384 on XLM-R base).
    """

    def __init__(self, hidden_size: int, bottleneck: int = 192):
        super().__init__()
        if hidden_size < 1 or bottleneck < 1:
            raise ValueError(
                f"hidden_size and bottleneck must be positive, got {hidden_size} and {bottleneck}: pass the "
                "encoder's hidden size and e.g. bottleneck=192."
            )
        self.net = nn.Sequential(nn.Linear(hidden_size, bottleneck), nn.ReLU(), nn.Linear(bottleneck, hidden_size))
        # set while attached: the name of the module it follows and the hook that applies it (kept here, so detaching
        # needs only the model; a deep copy of the model copies the handle along with the hook it removes)
        self.attached_after: str | None = None
        self._hook: RemovableHandle | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.net(hidden_states.detach())

    def extra_repr(self) -> str:
        sizes = f"hidden_size={self.net[0].in_features}, bottleneck={self.net[0].out_features}"
        return sizes if self.attached_after is None else f"{sizes}, after={self.attached_after!r}"


class RepresentationTransform(AttachedTransform):
    """The RTN attached to one model, as returned by [`attach_representation_transform`]: pass it as `meta_module`
    to [`MetaTrainer`]; [`detach_representation_transform`] undoes the attachment.

    In training forwards it transforms the hidden states of the examples whose `source_key` entry in the batch is
    true (the batch is read in [`~RepresentationTransform.batch_context`], which [`MetaTrainer`] enters around every
    forward); the other (target-language) examples pass through untouched. In evaluation mode, or when disabled (the
    meta loss), it is the identity.

    Args:
        network (`RepresentationTransformNetwork`): the RTN, registered in the model.
        layer (`int`): after which encoder layer it acts (0: the embeddings).
        source_key (`str`): the batch key that marks source-language examples.
    """

    def __init__(self, network: RepresentationTransformNetwork, layer: int, source_key: str):
        super().__init__()
        self.network = network
        self.layer = layer
        self.source_key = source_key
        self.batch_keys = (source_key,)
        self._enabled = True
        self._source: torch.Tensor | None = None
        self._in_batch = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)

    @contextlib.contextmanager
    def batch_context(self, batch: Mapping[str, Any]) -> Iterator[None]:
        """Makes the batch's `source_key` mask (`[B]`, true for source-language examples) known to the hook for the
        forwards inside the block. A batch without the key is only an error if a training forward needs it."""
        previous = self._source, self._in_batch
        mask = batch.get(self.source_key)
        self._source = None if mask is None else torch.as_tensor(mask).reshape(-1).bool()
        self._in_batch = True
        try:
            yield
        finally:
            self._source, self._in_batch = previous

    def transform(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states `[B, T, H]` with the source examples' rows transformed by the RTN."""
        if self._source is None:
            where = "the batch has no" if self._in_batch else "no batch was given (outside `batch_context`), so no"
            raise ValueError(
                f"The representation transform needs to know which examples are source-language, but {where} "
                f"{self.source_key!r} entry: add a boolean {self.source_key!r} column to the training dataset (true "
                "for source examples), and run the model through MetaTrainer or inside `batch_context(batch)`."
            )
        source = self._source.to(hidden_states.device)
        if source.numel() != hidden_states.shape[0]:
            raise ValueError(
                f"The {self.source_key!r} mask has {source.numel()} entries for a batch of {hidden_states.shape[0]} "
                "examples: give one boolean per example."
            )
        mask = source.view(-1, *([1] * (hidden_states.dim() - 1)))
        return torch.where(mask, self.network(hidden_states), hidden_states)

    def hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        """The forward hook on the layer the RTN follows (a bound method, not a closure, so that a deep copy of the
        model hooks its own copy): in training forwards, the output's hidden states transformed."""
        if not (module.training and self.enabled):
            return None
        if isinstance(output, torch.Tensor):
            return self.transform(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.transform(output[0]), *output[1:])
        raise ValueError(
            f"The layer the representation transform hooks returned {type(output).__name__}; expected a tensor or a "
            "tuple starting with the hidden states."
        )

    def extra_repr(self) -> str:
        after = self.network.attached_after
        where = "detached" if after is None else f"after={after!r}"
        return f"layer={self.layer}, {where}, source_key={self.source_key!r}, enabled={self.enabled}"


def encoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The embeddings module and the list of encoder layers of a BERT, RoBERTa, XLM-R or DistilBERT model (with any
    head), found on its `base_model`.

    Raises:
        `ValueError`: if the model has no `embeddings` and `encoder.layer` / `transformer.layer` list.
    """
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    for name in ("encoder", "transformer"):
        layers = getattr(getattr(base, name, None), "layer", None)
        if isinstance(layers, nn.ModuleList) and embeddings is not None:
            return embeddings, layers
    raise ValueError(
        f"{type(model).__name__} has no encoder layer list (`embeddings` with `encoder.layer` or `transformer.layer` "
        "on its base model): the representation transform attaches to BERT, RoBERTa, XLM-R and DistilBERT models."
    )


def attach_representation_transform(
    model: nn.Module, layer: int = -1, bottleneck: int = 192, source_key: str = "is_source"
) -> RepresentationTransform:
    """Attaches MetaXL's representation transformation network after one layer of a transformers encoder, without
    changing transformers' code: the RTN is registered on the model as `representation_transform` (so the model's
    own state-dict keys stay as they were and the RTN parameters are model parameters) and applied by a forward hook
    on the chosen layer.

    Works for BERT, RoBERTa, XLM-R and DistilBERT models with token- or sequence-classification heads.

    Args:
        model (`nn.Module`): the transformers model.
        layer (`int`, *optional*, defaults to -1): the RTN transforms the output of this layer, counting as MetaXL
            does: 0 is the embeddings, `k` the `k`-th encoder layer (1 to the number of layers; MetaXL's default is
            12 on XLM-R base, the last). Negative values count from the last layer (-1 is the last).
        bottleneck (`int`, *optional*, defaults to 192): the RTN's middle width.
        source_key (`str`, *optional*, defaults to `"is_source"`): the batch key that marks source examples.

    Returns:
        [`RepresentationTransform`]: the attached RTN, for `MetaTrainer(meta_module=...)`.

    Raises:
        `ValueError`: if the model has no encoder layer list, `layer` is out of range, or an RTN is attached already.
    """
    embeddings, layers = encoder_layers(model)
    count = len(layers)
    index = layer + count + 1 if layer < 0 else layer
    if not 0 <= index <= count:
        raise ValueError(
            f"layer={layer} is out of range for {type(model).__name__} with {count} encoder layers: pass 0 (the "
            f"embeddings) to {count} (the last layer), or -1 to -{count + 1} to count from the end."
        )
    if hasattr(model, RTN_ATTRIBUTE):
        raise ValueError(
            f"{type(model).__name__} already has a representation transform: detach it first with "
            "`detach_representation_transform(model)`."
        )
    hidden_size = model.config.hidden_size if hasattr(model, "config") else None
    if hidden_size is None:
        raise ValueError(f"{type(model).__name__} has no `config.hidden_size`: pass a transformers model.")
    reference = next(model.parameters())
    network = RepresentationTransformNetwork(hidden_size, bottleneck).to(reference.device, reference.dtype)
    target = embeddings if index == 0 else layers[index - 1]
    network.attached_after = next(name for name, module in model.named_modules() if module is target)
    model.add_module(RTN_ATTRIBUTE, network)
    transform = RepresentationTransform(network, index, source_key)
    network._hook = target.register_forward_hook(transform.hook)
    return transform


def detach_representation_transform(model: nn.Module, transform: RepresentationTransform | None = None) -> None:
    """Removes the RTN and the hook that [`attach_representation_transform`] added: the model's modules, state dict
    and outputs are as before the attachment.

    Args:
        model (`nn.Module`): the model the RTN is attached to.
        transform ([`RepresentationTransform`], *optional*): the attachment to undo, checked against the RTN found in
            the model; defaults to that RTN.

    Raises:
        `ValueError`: if the model has no RTN attached, or `transform` is not the one attached to it.
    """
    network = getattr(model, RTN_ATTRIBUTE, None)
    if not isinstance(network, RepresentationTransformNetwork):
        raise ValueError(
            f"{type(model).__name__} has no representation transform attached: nothing to detach. Pass the model "
            "that `attach_representation_transform` was called on."
        )
    if transform is not None and transform.network is not network:
        raise ValueError(
            f"The given representation transform is not the one attached to this {type(model).__name__} (a deep copy "
            "of the model has its own): call `detach_representation_transform(model)` to detach the model's own."
        )
    if network._hook is not None:
        network._hook.remove()
        network._hook = None
    network.attached_after = None
    delattr(model, RTN_ATTRIBUTE)
