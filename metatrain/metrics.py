"""`compute_metrics` for token classification: entity-level scores of BIO tags by `seqeval`, computed locally."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .utils import require


def extract_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one BIO-tagged sequence as `(type, start, end)` with `end` exclusive, by `seqeval`'s
    conlleval rules: an entity starts at a `B-` tag, or at an `I-` tag after `O` or after another type."""
    get_entities = require("seqeval.metrics.sequence_labeling", "recipes", "Entity extraction").get_entities
    return {(kind, start, end + 1) for kind, start, end in get_entities(list(tags))}


def entity_scores(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity-level precision, recall and F1 over sequences of BIO tags, by `seqeval` in its default
    mode (the conlleval rules: an entity counts as found when its type, start and end all match); 0 where
    undefined."""
    if len(true_tags) != len(pred_tags):
        raise ValueError(
            f"{len(true_tags)} true and {len(pred_tags)} predicted sequences: pass one of each per example."
        )
    for true, pred in zip(true_tags, pred_tags):
        if len(true) != len(pred):
            raise ValueError(f"A true sequence of {len(true)} tags has {len(pred)} predicted tags: align them first.")
    metrics = require("seqeval.metrics", "recipes", "Entity-level F1")
    true, pred = [list(t) for t in true_tags], [list(p) for p in pred_tags]
    return {
        name: float(getattr(metrics, f"{name}_score")(true, pred, zero_division=0))
        for name in ("precision", "recall", "f1")
    }


def token_classification_metrics(
    label_names: Sequence[str], ignore_index: int = -100
) -> Callable[[tuple], dict[str, float]]:
    """`compute_metrics` for token classification: entity-level precision, recall and F1 ([`entity_scores`]) and the
    accuracy over labelled tokens; positions whose label is `ignore_index` (sub-word continuations, special tokens,
    padding) are left out.

    Args:
        label_names (`Sequence[str]`): the BIO tag of each label id, e.g. WikiANN's
            `["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]`.
        ignore_index (`int`, *optional*, defaults to -100): the label of positions that are not scored.
    """
    names = list(label_names)

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        predictions = np.argmax(logits, axis=-1)
        keep = labels != ignore_index
        true_tags = [[names[t] for t in row[mask]] for row, mask in zip(labels, keep)]
        pred_tags = [[names[p] for p in row[mask]] for row, mask in zip(predictions, keep)]
        scores = entity_scores(true_tags, pred_tags)
        scores["accuracy"] = float((predictions[keep] == labels[keep]).mean()) if keep.any() else 0.0
        return scores

    return compute
