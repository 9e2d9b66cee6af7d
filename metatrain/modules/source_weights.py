"""Mixture weights over data sources, learned by hypergradient."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._base import LossWeighter


class SourceWeights(LossWeighter):
    """Per-source mixture weights: each training example is weighted by its source's share `softmax(logits)[s]`
    (times the number of sources, so equal shares weigh 1), and the training loss is the weighted mean. The shares
    play the part of DoReMi's domain weights (Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up Language Model
    Pretraining", NeurIPS 2023), learned here from the meta loss's hypergradient instead of by a minimax over a
    reference model's excess loss.

    The source of each example comes from the batch's `key` column (integer ids in `[0, num_sources)`), read in
    [`~SourceWeights.batch_context`], which [`MetaTrainer`] enters around every training loss.

    Args:
        num_sources (`int`): the number of sources.
        key (`str`, *optional*, defaults to `"source"`): the batch column that holds each example's source.
        scale (`float`, *optional*, defaults to 1.0): the shares are `softmax(scale * logits)`. An Adam meta-optimizer
            moves each logit by about `meta_learning_rate` per step whatever the hypergradient's size, so `scale`
            sets how fast the shares can move (DoReMi moves its log-weights by up to about 1 per step).
    """

    def __init__(self, num_sources: int, key: str = "source", scale: float = 1.0):
        super().__init__()
        if isinstance(num_sources, bool) or not isinstance(num_sources, int) or num_sources < 1:
            raise ValueError(f"SourceWeights needs `num_sources` >= 1, got num_sources={num_sources!r}.")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"SourceWeights needs `scale` > 0, got scale={scale!r}.")
        self.logits = nn.Parameter(torch.zeros(num_sources))
        self.scale = float(scale)
        self.key = key
        self.batch_keys = (key,)
        self._sources: torch.Tensor | None = None

    def shares(self) -> torch.Tensor:
        """The mixture weights `softmax(scale * logits)`, one per source, summing to 1."""
        return torch.softmax(self.scale * self.logits, dim=0)

    @contextlib.contextmanager
    def batch_context(self, batch: Mapping[str, Any]) -> Iterator[None]:
        """Makes the batch's sources known to [`~SourceWeights.forward`] inside the block."""
        previous = self._sources
        sources = batch.get(self.key) if isinstance(batch, Mapping) else None
        self._sources = None if sources is None else torch.as_tensor(sources).reshape(-1).long()
        try:
            yield
        finally:
            self._sources = previous

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """The weight `[B]` of each example of the current batch: `num_sources` times its source's share (the losses
        only give the batch size)."""
        if self._sources is None:
            raise ValueError(
                f"SourceWeights needs each example's source, but the batch has no {self.key!r} column (or the loss "
                f"was reduced outside `batch_context(batch)`): add an integer {self.key!r} column to the training "
                "dataset and train through MetaTrainer."
            )
        if self._sources.numel() != losses.numel():
            raise ValueError(f"{self._sources.numel()} sources for {losses.numel()} losses: one per example needed.")
        if self._sources.numel() and not 0 <= int(self._sources.min()) <= int(self._sources.max()) < len(self.logits):
            raise ValueError(
                f"Sources must be ids in [0, {len(self.logits)}), got {self._sources.unique().tolist()}: set "
                "`num_sources` to the number of sources."
            )
        weights = self.shares() * len(self.logits)
        return weights[self._sources.to(weights.device)]
