"""Per-sample losses, which loss weighters and the meta step need, and the logits they are computed from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, a mapping with `logits`, an output object with `.logits`, or the
    first item of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    return outputs[0]


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy per example, `[B]`.

    `logits` `[B, C]` with labels `[B]`, or `[B, T, C]` with labels `[B, T]` (token classification: the mean over
    the tokens of each example whose label is not `ignore_index`).
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=ignore_index)
    tokens = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), reduction="none", ignore_index=ignore_index
    ).view(labels.shape)
    counts = (labels != ignore_index).sum(dim=tuple(range(1, labels.dim()))).clamp(min=1)
    return tokens.sum(dim=tuple(range(1, labels.dim()))) / counts


def per_sample_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy per example, `[B]`: logits `[B, T, V]` at position `t` predict `labels[:, t + 1]`
    (labels aligned with `input_ids`, as `transformers` causal LMs take them), averaged over each example's tokens
    whose label is not `ignore_index` (e.g. a masked prompt)."""
    return per_sample_cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`sum(w * l) / sum(w)`; a zero sum of weights is replaced by one (Meta-Weight-Net's guard)."""
    norm = weights.sum()
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    return (weights * losses).sum() / norm
