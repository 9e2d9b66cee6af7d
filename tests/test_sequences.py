"""The generated sequence task of the LM data-weighting recipe and the causal-LM per-example loss."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from metatrain.data.sequences import VOCAB, make_sequence_lm_splits
from metatrain.losses import per_sample_causal_lm_loss


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids if VOCAB[i] != "<eos>")


@pytest.mark.parametrize("task", ["reverse", "add"])
def test_splits_are_disjoint_masked_and_corrupted_as_asked(task):
    splits = make_sequence_lm_splits(task, 3, num_train=200, num_meta=20, num_test=50, corruption=0.3, seed=1)
    prompts = {}
    for name, split in splits.items():
        for row in split:
            text = decode(row["input_ids"].tolist())
            prompt, answer = text.split("=")
            prompts.setdefault(prompt, []).append(name)
            n = int((row["labels"] == -100).sum())
            assert n == len(prompt) + 1 and torch.equal(row["labels"][n:], row["input_ids"][n:])
            if task == "reverse":
                right = prompt[::-1]
            else:
                a, b = prompt.split("+")
                right = f"{int(a) + int(b):04d}"
            assert (answer != right) == bool(row["corrupted"])
    assert all(len(names) == 1 for names in prompts.values())
    assert int(splits["train"][:]["corrupted"].sum()) == 60
    assert not splits["meta"][:]["corrupted"].any() and not splits["test"][:]["corrupted"].any()
    with pytest.raises(ValueError, match="not a sequence task"):
        make_sequence_lm_splits("sort")


def test_causal_lm_loss_per_example_is_the_models_own_loss():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    batch = make_sequence_lm_splits(num_train=4, num_meta=1, num_test=1, length=4)["train"][:4]
    logits = model(input_ids=batch["input_ids"]).logits
    losses = per_sample_causal_lm_loss(logits, batch["labels"])
    for i in range(4):
        own = model(input_ids=batch["input_ids"][i : i + 1], labels=batch["labels"][i : i + 1]).loss
        torch.testing.assert_close(losses[i], own, rtol=1e-5, atol=1e-6)
