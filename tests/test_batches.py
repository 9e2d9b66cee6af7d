"""Joining an accumulation window's micro-batches for the meta step (`metatrain.batches`): concatenation, dynamic
padding with the tokenizer's pad values, and the errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_args, tiny_bert, tiny_tokenizer, tokenized_text_dataset

from metatrain import MetaTrainer
from metatrain.modules import MetaWeightNet


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_accumulation_joins_dynamically_padded_micro_batches(tmp_path, padding_side):
    """`DataCollatorWithPadding` pads each micro-batch to its own longest: the default `meta_train_batch="window"`
    pads them to one length with the tokenizer's pad token (masks 0) and the model sees the same examples."""
    from transformers import DataCollatorWithPadding

    tokenizer = tiny_tokenizer(tmp_path, padding_side)
    trainer = MetaTrainer(
        model=tiny_bert(tokenizer.vocab_size),
        args=make_args(tmp_path, hypergradient="evograd", gradient_accumulation_steps=2, max_steps=3,
                       per_device_train_batch_size=4),  # fmt: skip
        train_dataset=tokenized_text_dataset(tokenizer, 48, 0), meta_dataset=tokenized_text_dataset(tokenizer, 16, 1),
        meta_module=MetaWeightNet(), data_collator=DataCollatorWithPadding(tokenizer),
    )  # fmt: skip
    windows, joined = [], []
    get_batch_samples, meta_step = trainer.get_batch_samples, trainer.meta_step
    trainer.get_batch_samples = lambda *a: windows.append(get_batch_samples(*a)[0]) or (windows[-1], None)
    trainer.meta_step = lambda batch, *a: joined.append(batch) or meta_step(batch, *a)
    trainer.train()
    assert trainer.meta_steps_skipped == 0 and len(joined) == 3
    lengths = [tuple(b["input_ids"].shape[1] for b in window) for window in windows]
    assert any(a != b for a, b in lengths), lengths  # the test needs windows of unequal lengths
    model = trainer.model.eval()
    for window, batch in zip(windows, joined):
        assert batch["input_ids"].shape == (8, max(b["input_ids"].shape[1] for b in window))
        pad_column = 0 if padding_side == "left" else -1
        short = batch["attention_mask"][:, pad_column] == 0
        assert (batch["input_ids"][:, pad_column][short] == tokenizer.pad_token_id).all()
        assert torch.equal(batch["attention_mask"].sum(1), torch.cat([b["attention_mask"].sum(1) for b in window]))
        if padding_side == "right":  # (BERT's absolute positions move with left padding, in the collator's too)
            with torch.no_grad():
                separate = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in window])
                together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            torch.testing.assert_close(together, separate, rtol=1e-4, atol=1e-5)
        assert torch.equal(batch["labels"], torch.cat([b["labels"] for b in window]))


def test_join_pads_token_labels_with_the_label_pad():
    from metatrain.trainer import join_batches

    a = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[1, 2, 0]])}
    b = {"input_ids": torch.tensor([[8]]), "labels": torch.tensor([[2]])}
    joined = join_batches([a, b], {"input_ids": 0, "labels": -100}, padding_side="left")
    assert joined["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert joined["labels"].tolist() == [[1, 2, 0], [-100, -100, 2]]


def test_unjoinable_micro_batches_name_the_fix():
    from metatrain.trainer import join_batches

    joined = join_batches(
        [{"x": torch.zeros(2, 3), "ids": [1, 2], "tag": "a"}, {"x": torch.ones(1, 3), "ids": [3], "tag": "a"}]
    )
    assert joined["x"].shape == (3, 3) and joined["ids"] == [1, 2, 3] and joined["tag"] == "a"
    with pytest.raises(ValueError, match="meta_train_batch='micro_batch'"):
        join_batches([{"input_ids": torch.zeros(2, 5)}, {"input_ids": torch.zeros(2, 7)}])
    with pytest.raises(ValueError, match="meta_train_batch"):
        make_args(Path("unused"), meta_train_batch="all")
