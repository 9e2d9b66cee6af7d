"""Metrics computed locally (`evaluate.load` needs the network): entity-level F1 of BIO tags, as seqeval computes it
in its default mode (the conlleval rules), and the matching `compute_metrics` for token classification."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O" or "-" not in tag:
        return "O", ""
    prefix, kind = tag.split("-", 1)
    return prefix, kind


def extract_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one BIO-tagged sequence as `(type, start, end)` with `end` exclusive, by the conlleval rules
    (seqeval's default mode): an entity starts at a `B-` tag, or at an `I-` tag after `O` or after another type; it
    ends before `O`, a `B-` tag or a tag of another type."""
    entities, start, kind = set(), None, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, tag_kind = _split_tag(tag)
        ends = start is not None and (prefix in ("O", "B") or tag_kind != kind)
        if ends:
            entities.add((kind, start, i))
            start = None
        if prefix in ("B", "I") and start is None:
            start, kind = i, tag_kind
    return entities


def entity_scores(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity-level precision, recall and F1 over sequences of BIO tags (an entity counts as found
    when its type, start and end all match); 0 where undefined."""
    if len(true_tags) != len(pred_tags):
        raise ValueError(
            f"{len(true_tags)} true and {len(pred_tags)} predicted sequences: pass one of each per example."
        )
    found = correct = expected = 0
    for true, pred in zip(true_tags, pred_tags):
        if len(true) != len(pred):
            raise ValueError(f"A true sequence of {len(true)} tags has {len(pred)} predicted tags: align them first.")
        true_entities, pred_entities = extract_entities(true), extract_entities(pred)
        expected += len(true_entities)
        found += len(pred_entities)
        correct += len(true_entities & pred_entities)
    precision = correct / found if found else 0.0
    recall = correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


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
