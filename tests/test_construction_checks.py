"""What MetaTrainer refuses or accepts at construction (`metatrain.construction_checks`): its arguments, the meta
dataset against the model and the training batches, and the probe for unused weights that DDP's search depends on."""

from __future__ import annotations

import datasets
import pytest
import torch
from helpers import (
    OneStepLookahead,
    bn_model,
    image_dataset,
    make_args,
    make_trainer,
    snapshot,
    tiny_bert,
    tiny_tokenizer,
    tokenized_text_dataset,
)
from torch import nn

from metatrain import MetaTrainer
from metatrain.modules import MetaWeightNet


def test_bad_input_errors_name_the_fix(tmp_path):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="meta_dataset"):
        MetaTrainer(model=bn_model(), args=args, train_dataset=image_dataset(8, 0), meta_module=MetaWeightNet())
    with pytest.raises(ValueError, match="hypergradient='evgrad'.*evograd"):
        make_args(tmp_path, hypergradient="evgrad")
    with pytest.raises(ValueError, match="population"):
        make_trainer(tmp_path, hypergradient_kwargs={"popsize": 4})
    with pytest.raises(ValueError, match="meta_max_grad_norm.*> 0.*got -1.0"):
        make_args(tmp_path, meta_max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"meta batch size of 8 \(per_device_train_batch_size, no meta_batch_size"):
        MetaTrainer(
            model=bn_model(),
            args=make_args(tmp_path, dataloader_drop_last=True),
            train_dataset=image_dataset(8, 0),
            meta_dataset=image_dataset(5, 0),
            meta_module=MetaWeightNet(),
        ).get_meta_dataloader()
    with pytest.raises(ValueError, match="meta_optimizer='rmsprop'"):
        make_args(tmp_path, meta_optimizer="rmsprop")
    with pytest.raises(ValueError, match="not valid JSON"):
        make_args(tmp_path, hypergradient_kwargs="{sigma: 1}")
    with pytest.raises(ValueError, match="Meta-parameters not found"):
        make_trainer(tmp_path, meta_module=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="No meta-parameters found"):
        make_trainer(tmp_path, meta_module=nn.ReLU())
    with pytest.raises(ValueError, match="MetaTrainingArguments"):
        MetaTrainer(model=bn_model(), args=None, meta_dataset=image_dataset(8, 0), meta_module=MetaWeightNet())


def test_fp16_on_cpu_is_refused_naming_bf16(tmp_path):
    with pytest.raises(ValueError, match="fp16=True on CPU.*bf16=True"):
        make_trainer(tmp_path, fp16=True)


def test_an_estimator_instance_is_checked(tmp_path):
    with pytest.raises(ValueError, match="HypergradientEstimator` instance, got .t1t2..*hypergradient="):
        make_trainer(tmp_path, estimator="t1t2")
    with pytest.raises(ValueError, match=r"hypergradient_kwargs=\{'sigma': 0.1\}.*instance \(OneStepLookahead\)"):
        make_trainer(tmp_path, estimator=OneStepLookahead(), hypergradient_kwargs={"sigma": 0.1})


def test_a_meta_dataset_the_meta_step_cannot_use_is_refused_at_construction(tmp_path):
    from transformers import DataCollatorWithPadding

    tokenizer = tiny_tokenizer(tmp_path)
    train = tokenized_text_dataset(tokenizer, 16, 0)
    meta = tokenized_text_dataset(tokenizer, 8, 1)

    def build(meta_dataset, model=None):
        return MetaTrainer(
            model=model or tiny_bert(tokenizer.vocab_size), args=make_args(tmp_path, hypergradient="evograd"),
            train_dataset=train, meta_dataset=meta_dataset, meta_module=MetaWeightNet(),
            data_collator=DataCollatorWithPadding(tokenizer),
        )  # fmt: skip

    build(meta)  # the well-formed one is accepted
    untokenized = datasets.Dataset.from_dict({"text": ["the cat sat"] * 8, "labels": [0] * 8})
    with pytest.raises(ValueError, match=r"meta_dataset cannot be batched.*tokeniz"):
        build(untokenized)
    with pytest.raises(ValueError, match=r"meta_dataset has no 'labels'.*rename_column"):
        build(meta.rename_column("labels", "target"))
    out_of_range = meta.map(lambda row, i: {"labels": 7 if i == 5 else row["labels"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"meta_dataset has labels outside the model's 3 outputs.*\[7\]"):
        build(out_of_range)
    with pytest.raises(ValueError, match=r"meta_dataset's batches lack \['token_type_ids'\], which the model reads"):
        build(meta.remove_columns(["token_type_ids"]))
    with pytest.raises(ValueError, match="meta_dataset is empty"):
        build(meta.select([]))
    # a plain module with `num_classes` (timm) is checked too
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    bad = image_dataset(8, 0).map(lambda row: {"labels": 3})
    with pytest.raises(ValueError, match="outside the model's 3 outputs"):
        MetaTrainer(model=model, args=make_args(tmp_path), train_dataset=image_dataset(8, 1), meta_dataset=bad,
                    meta_module=MetaWeightNet())  # fmt: skip


def test_meta_datasets_the_meta_step_can_use_are_accepted(tmp_path):
    """What the construction checks must not refuse: a language model's token labels (its outputs are the vocabulary,
    not `num_labels`), labels a transform maps from strings, and training columns the model never reads."""
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = tiny_tokenizer(tmp_path)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    masked = tokenized_text_dataset(tokenizer, 8, 0).map(lambda row: {"labels": row["input_ids"]})
    masked = masked.remove_columns(["token_type_ids"])
    MetaTrainer(
        model=BertForMaskedLM(config), args=make_args(tmp_path), train_dataset=masked, meta_dataset=masked,
        meta_module=MetaWeightNet(), data_collator=lambda rows: _pad_labels(tokenizer, rows),
    )  # fmt: skip
    names = ["cat", "dog", "frog"]
    strings = image_dataset(8, 2).with_format(None).map(lambda row: {"labels": names[row["labels"]]})
    strings.set_transform(lambda b: {"pixel_values": torch.tensor(b["pixel_values"]),
                                     "labels": torch.tensor([names.index(n) for n in b["labels"]])})  # fmt: skip
    extra = image_dataset(64, 1).add_column("clean_labels", list(range(64)))
    MetaTrainer(
        model=bn_model(), args=make_args(tmp_path, remove_unused_columns=False), train_dataset=extra,
        meta_dataset=strings, meta_module=MetaWeightNet(),
    )  # fmt: skip


def _pad_labels(tokenizer, rows):
    """Pads input ids with the pad token and token labels with -100 (a masked-LM collator without the masking)."""
    length = max(len(r["input_ids"]) for r in rows)
    pad = lambda values, value: values + [value] * (length - len(values))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(list(r["input_ids"]), tokenizer.pad_token_id) for r in rows]),
        "attention_mask": torch.tensor([pad(list(r["attention_mask"]), 0) for r in rows]),
        "labels": torch.tensor([pad(list(r["labels"]), -100) for r in rows]),
    }


# ----------------------------------------------------------------------------------- the DDP probe for unused weights
class WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.unused = bn_model(), nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)


class TrainOnlyBranch(nn.Module):
    """A weight used in training forwards only: an evaluation-mode probe would miss it."""

    def __init__(self):
        super().__init__()
        self.body, self.train_only = bn_model(), nn.Linear(3, 3)

    def forward(self, x):
        out = self.body(x)
        return out + self.train_only(out) if self.training else out


def test_unused_parameter_probe_runs_in_training_mode_and_leaves_the_model_as_it_was(tmp_path):
    trainer = make_trainer(tmp_path, model=TrainOnlyBranch())
    state, rng = snapshot(trainer.model), torch.get_rng_state()
    assert trainer.unused_parameters() == []
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in trainer.model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in snapshot(trainer.model).items())  # batch norm statistics too
    assert make_trainer(tmp_path, model=WithUnusedHead()).unused_parameters() == ["unused.weight", "unused.bias"]
