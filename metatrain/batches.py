"""The micro-batches of an accumulation window joined into one batch for the meta step."""

from __future__ import annotations

from typing import Any

import torch


def join_batches(
    batches: list[dict[str, Any]], pad_values: dict[str, float] | None = None, padding_side: str = "right"
) -> dict[str, Any]:
    """The micro-batches of an accumulation window as one batch: tensors concatenated along their first dimension,
    lists chained, other values taken from the first batch when all are equal.

    Args:
        batches (`list[dict[str, Any]]`): the micro-batches.
        pad_values (`dict[str, float]`, *optional*):
            For keys whose tensors differ in length along their second dimension (dynamic padding), the value to pad
            them to the longest with, e.g. `{"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}`.
            Other keys must have equal shapes.
        padding_side (`str`, *optional*, defaults to `"right"`): where the padding goes, as the tokenizer pads.
    """
    pad_values = pad_values or {}
    joined = {}
    for key, first in batches[0].items():
        values = [b[key] for b in batches]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            if any(v.shape[1:] != first.shape[1:] for v in values):
                paddable = key in pad_values and all(v.dim() == first.dim() >= 2 for v in values)
                if not paddable or any(v.shape[2:] != first.shape[2:] for v in values):
                    raise ValueError(
                        f"The micro-batches of an accumulation window cannot be joined for the meta step: {key!r} has "
                        f"shapes {[tuple(v.shape) for v in values]}, which padding the second dimension (keys padded: "
                        f"{sorted(pad_values)}) cannot join. Pad every batch to one length (e.g. "
                        "`padding='max_length'`), or set `meta_train_batch='micro_batch'` to run the meta step on one "
                        "micro-batch."
                    )
                length = max(v.shape[1] for v in values)
                widths = [(0, 0)] * (first.dim() - 2)
                values = [
                    torch.nn.functional.pad(
                        v,
                        [w for pair in widths for w in pair]
                        + ([length - v.shape[1], 0] if padding_side == "left" else [0, length - v.shape[1]]),
                        value=pad_values[key],
                    )
                    for v in values
                ]
            joined[key] = torch.cat(values)
        elif isinstance(first, list):
            joined[key] = [item for v in values for item in v]
        elif all(v is first or v == first for v in values):
            joined[key] = first
        else:
            raise ValueError(
                f"The micro-batches of an accumulation window cannot be joined for the meta step: {key!r} differs "
                "between them and is neither a tensor nor a list. Set `meta_train_batch='micro_batch'`."
            )
    return joined


def padding_values(data_collator: Any, processing_class: Any, label_names: list[str]) -> tuple[dict[str, float], str]:
    """How dynamically padded micro-batches are joined by [`join_batches`]: the tokenizer's pad token and side (from
    the data collator, else `processing_class`), masks padded with 0 and labels with the collator's label pad
    (-100 by default)."""
    tokenizer = getattr(data_collator, "tokenizer", None) or processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    values = {name: getattr(data_collator, "label_pad_token_id", -100) for name in label_names}
    values["attention_mask"] = 0
    if getattr(tokenizer, "pad_token_id", None) is not None:
        values.update(
            input_ids=tokenizer.pad_token_id,
            token_type_ids=getattr(tokenizer, "pad_token_type_id", 0),
            special_tokens_mask=1,
        )
    return values, getattr(tokenizer, "padding_side", "right")
