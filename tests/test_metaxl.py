"""MetaXL: the representation transformation network on transformers encoders (attach, detach, source-only action,
errors), its meta step under T1-T2 against a hand-unrolled reference, every estimator, entity-level F1, the
cross-lingual data and the recipe (generated pair, a local WikiANN-schema folder, sequence classification)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import datasets
import pytest
import torch
from helpers import forward_hooks, make_args
from torch import nn
from torch.func import functional_call
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaForTokenClassification,
)

from metatrain import MetaTrainer
from metatrain.data.crosslingual import (
    WIKIANN_LABELS,
    build_word_level_tokenizer,
    generate_crosslingual_task,
    load_wikiann,
    mix_source_and_target,
    tokenize_crosslingual,
)
from metatrain.estimators import ESTIMATORS
from metatrain.losses import per_sample_cross_entropy
from metatrain.metrics import entity_scores, extract_entities, token_classification_metrics
from metatrain.modules import (
    RepresentationTransformNetwork,
    attach_representation_transform,
    detach_representation_transform,
)
from metatrain.trainer import MetaTrainerCallback

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=40,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
DISTIL = dict(dim=8, n_layers=2, n_heads=2, hidden_dim=16, vocab_size=40, max_position_embeddings=40, dropout=0.0,
              attention_dropout=0.0, seq_classif_dropout=0.0)  # fmt: skip
MODELS = {
    "bert-token": (BertForTokenClassification, BertConfig, SIZES),
    "bert-sequence": (BertForSequenceClassification, BertConfig, SIZES),
    "roberta-sequence": (RobertaForSequenceClassification, RobertaConfig, SIZES),
    "xlmr-token": (XLMRobertaForTokenClassification, XLMRobertaConfig, SIZES),
    "xlmr-sequence": (XLMRobertaForSequenceClassification, XLMRobertaConfig, SIZES),
    "distilbert-token": (DistilBertForTokenClassification, DistilBertConfig, DISTIL),
    "distilbert-sequence": (DistilBertForSequenceClassification, DistilBertConfig, DISTIL),
}


def tiny(kind: str = "xlmr-token", seed: int = 0, num_labels: int = 3):
    cls, config_cls, sizes = MODELS[kind]
    torch.manual_seed(seed)
    # eager attention: the second-order estimators differentiate through attention twice, which SDPA's CPU kernel
    # does not support
    return cls(config_cls(**sizes, num_labels=num_labels, attn_implementation="eager"))


def inputs(batch: int = 4, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 40, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}  # fmt: skip


def layer_input(model: nn.Module, index: int, batch: dict, source: torch.Tensor | None = None, transform=None):
    """The hidden states entering encoder layer `index` (0-based), seen by a pre-hook."""
    from metatrain.modules.representation import encoder_layers

    seen = {}
    handle = encoder_layers(model)[1][index].register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0]))
    try:
        if transform is None:
            model(**batch)
        else:
            with transform.batch_context({**batch, "is_source": source}):
                model(**batch)
    finally:
        handle.remove()
    return seen["h"]


# ------------------------------------------------------------------------------------------------------ module
def test_network_is_residual_on_detached_hidden_states():
    torch.manual_seed(0)
    rtn = RepresentationTransformNetwork(6, bottleneck=3)
    assert [type(m) for m in rtn.net] == [nn.Linear, nn.ReLU, nn.Linear] and rtn.net[0].out_features == 3
    h = torch.randn(2, 5, 6, requires_grad=True)
    out = rtn(h)
    torch.testing.assert_close(out, h + rtn.net[1](h @ rtn.net[0].weight.T + rtn.net[0].bias) @ rtn.net[2].weight.T
                               + rtn.net[2].bias)  # fmt: skip
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert torch.equal(grad, torch.ones_like(h))  # the residual branch does not reach the encoder below
    with pytest.raises(ValueError, match="bottleneck=192"):
        RepresentationTransformNetwork(6, bottleneck=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_attach_transforms_source_examples_only_and_detach_restores_the_model(kind):
    model = tiny(kind)
    batch = inputs()
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    reference = model(**batch).logits.detach()
    before_layer = layer_input(model, 1, batch)

    transform = attach_representation_transform(model, layer=1, bottleneck=4)
    assert set(model.state_dict()) - set(keys_before) == {
        f"representation_transform.{k}" for k in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
    }
    names = {n for n, _ in model.named_parameters()}
    assert all(f"representation_transform.{n}" in names for n, _ in transform.network.named_parameters())
    source = torch.tensor([True, False, True, False])
    after_layer = layer_input(model, 1, batch, source, transform)
    expected = torch.where(source[:, None, None], transform.network(before_layer), before_layer)
    torch.testing.assert_close(after_layer, expected)
    assert not torch.allclose(after_layer[0], before_layer[0])
    with transform.batch_context({"is_source": source}):
        logits = model(**batch).logits
    torch.testing.assert_close(logits[1::2], reference[1::2])  # target examples pass through untouched
    assert not torch.allclose(logits[0::2], reference[0::2])
    with transform.batch_context({"is_source": torch.zeros(4, dtype=torch.bool)}):
        torch.testing.assert_close(model(**batch).logits, reference)
    with transform.disabled(), transform.batch_context({"is_source": source}):
        torch.testing.assert_close(model(**batch).logits, reference)
    model.eval()
    with transform.batch_context({"is_source": source}):
        eval_logits = model(**batch).logits
    torch.testing.assert_close(eval_logits, model(**batch).logits)  # identity in evaluation mode

    detach_representation_transform(model, transform)
    assert set(model.state_dict()) == set(keys_before)
    assert all(torch.equal(v, keys_before[k]) for k, v in model.state_dict().items())
    model.train()
    torch.testing.assert_close(model(**batch).logits, reference)
    assert not hasattr(model, "representation_transform")


@pytest.mark.parametrize("kind", ["xlmr-token", "distilbert-sequence"])
def test_detach_without_the_handle_restores_the_model(kind):
    """`detach_representation_transform(model)` finds the RTN on the model (a deep copy's on the copy) and removes it
    and its hook; the handle form checks that it is the model's own; nothing attached is a clear error."""
    import copy

    model = tiny(kind)
    batch = inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = forward_hooks(model)
    model.train()
    reference = model(**batch).logits.detach()
    transform = attach_representation_transform(model, layer=1, bottleneck=4)
    assert forward_hooks(model) == hooks + 1
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match="not the one attached to this"):
        detach_representation_transform(twin, transform)
    detach_representation_transform(twin)
    assert set(twin.state_dict()) == set(before) and forward_hooks(twin) == hooks
    assert forward_hooks(model) == hooks + 1  # the original keeps its hook
    with transform.batch_context({"is_source": torch.ones(4, dtype=torch.bool)}):
        assert not torch.allclose(model(**batch).logits, reference)

    detach_representation_transform(model)
    assert list(model.state_dict()) == list(before) and forward_hooks(model) == hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "representation_transform") and "detached" in repr(transform)
    torch.testing.assert_close(model(**batch).logits, reference)
    for args in ((model,), (model, transform)):
        with pytest.raises(ValueError, match="has no representation transform attached: nothing to detach"):
            detach_representation_transform(*args)
    again = attach_representation_transform(model, layer=0)  # attaching again after a detach works
    detach_representation_transform(model, again)
    assert list(model.state_dict()) == list(before) and forward_hooks(model) == hooks


def test_repr_shows_the_network_and_where_it_acts():
    model = tiny()
    transform = attach_representation_transform(model, layer=1, bottleneck=4, source_key="from_source")
    text = repr(transform)
    assert text.startswith("RepresentationTransform(\n  layer=1, after='roberta.encoder.layer.0', ")
    assert "source_key='from_source', enabled=True" in text and "hidden_size=8, bottleneck=4" in text
    assert "(0): Linear(in_features=8, out_features=4, bias=True)" in text
    assert (
        "(representation_transform): RepresentationTransformNetwork(\n    hidden_size=8, bottleneck=4, "
        "after='roberta.encoder.layer.0'\n    (net): Sequential("
    ) in str(model)
    with transform.disabled():
        assert "enabled=False" in repr(transform)
    assert "after='distilbert.embeddings'" in repr(attach_representation_transform(tiny("distilbert-token"), 0))
    assert repr(RepresentationTransformNetwork(6, 3)).startswith("RepresentationTransformNetwork(\n  hidden_size=6, "
                                                                 "bottleneck=3\n")  # fmt: skip


def test_layer_zero_is_the_embeddings_and_negative_layers_count_from_the_end():
    model = tiny()
    batch = inputs()
    model.train()
    first = layer_input(model, 0, batch)
    transform = attach_representation_transform(model, layer=0, bottleneck=4)
    source = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(layer_input(model, 0, batch, source, transform), transform.network(first))
    detach_representation_transform(model, transform)
    assert attach_representation_transform(model, layer=-1).layer == 2
    with pytest.raises(ValueError, match="already has a representation transform"):
        attach_representation_transform(model, layer=1)


def test_bad_input_errors_name_the_fix():
    model = tiny()
    for layer in (3, -4):
        with pytest.raises(ValueError, match=rf"layer={layer} is out of range .* 2 encoder layers: pass 0"):
            attach_representation_transform(model, layer=layer)
    with pytest.raises(ValueError, match="no encoder layer list"):
        attach_representation_transform(nn.Sequential(nn.Linear(2, 2)))
    transform = attach_representation_transform(model, layer=1, source_key="from_source")
    model.train()
    with pytest.raises(ValueError, match="the batch has no 'from_source' entry: add a boolean 'from_source' column"):
        with transform.batch_context(inputs()):
            model(**inputs())
    with pytest.raises(ValueError, match="outside `batch_context`"):
        model(**inputs())
    with pytest.raises(ValueError, match="mask has 2 entries for a batch of 4"):
        with transform.batch_context({"from_source": torch.tensor([True, False])}):
            model(**inputs())
    model.eval()
    model(**inputs())  # evaluation needs no mask: the transform is off


# ------------------------------------------------------------------------------------------------ meta step
def text_dataset(n: int, seed: int, source: list[bool] | None = None, token_labels: bool = True) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    data = {"input_ids": torch.randint(3, 40, (n, 6), generator=g).numpy(),
            "attention_mask": torch.ones(n, 6, dtype=torch.long).numpy()}  # fmt: skip
    labels = torch.randint(0, 3, (n, 6) if token_labels else (n,), generator=g)
    if token_labels:
        labels[:, 0] = -100
    data["labels"] = labels.numpy()
    if source is not None:
        data["is_source"] = source
    return datasets.Dataset.from_dict(data).with_format("torch")


def metaxl_trainer(tmp_path, kind: str = "xlmr-token", **overrides):
    model = tiny(kind)
    transform = attach_representation_transform(model, layer=1, bottleneck=4)
    token = kind.endswith("token")
    trainer = MetaTrainer(
        model=model, args=make_args(tmp_path, **{"max_steps": 3, "logging_steps": 1, **overrides}),
        train_dataset=text_dataset(32, 1, [i % 2 == 0 for i in range(32)], token_labels=token),
        meta_dataset=text_dataset(16, 2, token_labels=token), meta_module=transform,
    )  # fmt: skip
    return trainer, model, transform


def test_meta_step_under_t1t2_matches_a_hand_unrolled_sgd_step(tmp_path):
    """MetaXL's bilevel step: the training loss is the mean over a batch of transformed source and untouched target
    examples; the meta loss is the target meta batch's after one plain SGD step at the learning rate."""
    trainer, model, transform = metaxl_trainer(
        tmp_path, hypergradient="t1t2", meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0},
    )  # fmt: skip
    trainer.create_optimizer()
    train_batch = next(iter(trainer.get_train_dataloader()))
    meta_batch = next(iter(trainer.get_meta_dataloader()))
    assert "is_source" in train_batch and 0 < int(train_batch["is_source"].sum()) < len(train_batch["is_source"])
    rtn_names = [f"representation_transform.{n}" for n, _ in transform.network.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(weights, batch, source):
        model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with transform.batch_context({"is_source": source}):
            logits = functional_call(model, weights, (), model_inputs).logits
        return per_sample_cross_entropy(logits, batch["labels"]).mean()

    theta = {n: p.clone().requires_grad_() for n, p in before.items() if n not in rtn_names}
    phi = {n: before[n].clone().requires_grad_() for n in rtn_names}
    inner = loss({**theta, **phi}, train_batch, train_batch["is_source"])
    g = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    stepped = {n: p - 0.1 * gi for (n, p), gi in zip(theta.items(), g)}
    outer = loss({**stepped, **phi}, meta_batch, torch.zeros(len(meta_batch["labels"]), dtype=torch.bool))
    expected = torch.autograd.grad(outer, list(phi.values()))
    assert all(e.abs().sum() > 0 for e in expected)

    norms = Norms()
    trainer.add_callback(norms)
    assert trainer.meta_step(train_batch)
    after = dict(model.named_parameters())
    for name, e in zip(rtn_names, expected):
        torch.testing.assert_close(before[name] - after[name].detach(), e, rtol=1e-4, atol=1e-8)
    assert all(torch.equal(before[n], p) for n, p in after.items() if n not in rtn_names)
    assert all(p.grad is None for p in model.parameters())

    norm = norms.values[-1]
    assert norm == pytest.approx(float(torch.linalg.vector_norm(torch.cat([e.flatten() for e in expected]))), rel=1e-4)

    # a training batch without source examples never uses the transform: its hypergradient is exactly zero
    stepped_rtn = {n: p.detach().clone() for n, p in model.named_parameters() if n in rtn_names}
    assert trainer.meta_step({**train_batch, "is_source": torch.zeros_like(train_batch["is_source"])})
    assert norms.values[-1] == 0
    assert all(torch.equal(stepped_rtn[n], p) for n, p in model.named_parameters() if n in rtn_names)


class Norms(MetaTrainerCallback):
    def __init__(self):
        self.values = []

    def on_meta_step(self, args, state, control, *, hypergradient_norm, **kwargs):
        self.values.append(hypergradient_norm)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_trains_the_transform(tmp_path, estimator):
    options = {"evograd": {"rescale": True}, "hyperdistill": {"estimation_period": 2, "horizon": 2}}.get(estimator, {})
    trainer, model, transform = metaxl_trainer(tmp_path, hypergradient=estimator, hypergradient_kwargs=options)
    before = [p.detach().clone() for p in transform.parameters()]
    trainer.train()
    assert trainer.meta_steps_skipped == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, transform.parameters()))
    base = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not base & {id(p) for p in transform.parameters()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(0.5 < h["loss"] < 3.0 for h in logs)  # a per-batch mean: no loss-kwargs scaling of XLM-R


def test_sequence_classification_and_missing_source_key(tmp_path):
    trainer, _, transform = metaxl_trainer(tmp_path, "distilbert-sequence", hypergradient="evograd")
    assert trainer.trainer_batch_keys == ["is_source"]
    trainer.train()
    assert trainer.evaluate(text_dataset(8, 3, token_labels=False))["eval_loss"] > 0  # no mask needed to evaluate
    trainer, _, _ = metaxl_trainer(tmp_path / "missing", "distilbert-sequence")
    trainer.train_dataset = trainer.train_dataset.remove_columns("is_source")
    with pytest.raises(ValueError, match="the batch has no 'is_source' entry"):
        trainer.train()


# ---------------------------------------------------------------------------------------------------- metrics
def test_entity_level_f1_follows_the_conlleval_rules():
    assert extract_entities(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 6), ("ORG", 6, 7)
    }  # fmt: skip
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-PER"]]
    # true: 3 entities; predicted: 4, of which 2 right -> precision 1/2, recall 2/3, F1 4/7
    scores = entity_scores(true, pred)
    assert scores == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})
    assert entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    names = ["O", "B-PER", "I-PER"]
    labels = torch.tensor([[-100, 1, 2, 0, -100], [-100, 1, 0, -100, -100]]).numpy()
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 0, 0], [0, 1, 0, 2, 2]]), 3).float().numpy()
    metrics = token_classification_metrics(names)((logits, labels))
    assert metrics["f1"] == 1.0 and metrics["accuracy"] == 1.0  # predictions at ignored positions do not count
    logits[1, 2] = [0, 1, 0]  # a spurious B-PER on a labelled token
    metrics = token_classification_metrics(names)((logits, labels))
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["accuracy"] == pytest.approx(4 / 5)


# ------------------------------------------------------------------------------------------------------- data
def test_generated_target_is_the_translated_source_language():
    splits, translation = generate_crosslingual_task(num_source=30, num_target_train=10, num_target_test=10, seed=3)
    assert splits["source"].features["ner_tags"].feature.names == WIKIANN_LABELS
    again, _ = generate_crosslingual_task(num_source=30, num_target_train=10, num_target_test=10, seed=3)
    assert splits["source"]["tokens"] == again["source"]["tokens"]
    inverse = {v: k for k, v in translation.items()}
    assert len(inverse) == len(translation)  # one-to-one
    for row in splits["target_test"]:
        assert all(t in inverse for t in row["tokens"]) and row["langs"][0] == "tgt"
        entities = extract_entities([WIKIANN_LABELS[t] for t in row["ner_tags"]])
        assert len(entities) == len(row["spans"]) >= 1
        assert row["label"] == ["PER", "ORG", "LOC"].index(min(entities, key=lambda e: e[1])[0])
    assert all(t in translation for row in splits["source"]["tokens"] for t in row)


def test_generated_entities_are_whole():
    """Every `I-` tag continues an entity of its own type, and each entity's tokens are names of that type, with
    only a trigger of that type (untagged) before it: an entity is never inserted inside another."""
    splits, _ = generate_crosslingual_task(num_source=2000, num_target_train=1, num_target_test=1, seed=0)
    lengths = set()
    for tokens, tags in zip(splits["source"]["tokens"], splits["source"]["ner_tags"]):
        labels = [WIKIANN_LABELS[t] for t in tags]
        lengths.add(len(tokens))
        for previous, label in zip(["O", *labels], labels):
            if label.startswith("I-"):
                assert previous[2:] == label[2:], labels
        for i, label in enumerate(labels):
            if label.startswith("B-") and i > 0 and labels[i - 1] == "O" and tokens[i - 1].startswith("t"):
                assert ["PER", "ORG", "LOC"][int(tokens[i - 1][1])] == label[2:], (tokens, labels)
    assert min(lengths) >= 7 and max(lengths) <= 18


def test_tokenization_aligns_labels_and_the_mix_balances_languages():
    splits, translation = generate_crosslingual_task(num_source=40, num_target_train=5, num_target_test=5, seed=0)
    tokenizer = build_word_level_tokenizer(sorted({*translation, *translation.values()}))
    encoded = tokenize_crosslingual(splits["target_train"], tokenizer, is_source=False)
    row, raw = encoded[0], splits["target_train"][0]
    assert row["input_ids"][0] == 0 and row["input_ids"][-1] == 2 and tokenizer.unk_token_id not in row["input_ids"]
    assert row["labels"] == [-100, *raw["ner_tags"], -100] and row["is_source"] is False
    sequence = tokenize_crosslingual(splits["target_train"], tokenizer, task="sequence")
    assert sequence["labels"] == splits["target_train"]["label"]
    source = tokenize_crosslingual(splits["source"], tokenizer, is_source=True)
    mixed = mix_source_and_target(source, encoded, target_fraction=0.5)
    assert len(mixed) == 40 + 5 * 8 and sum(mixed["is_source"]) == 40
    with pytest.raises(ValueError, match="target_fraction must be in"):
        mix_source_and_target(source, encoded, target_fraction=1.0)
    with pytest.raises(ValueError, match="Unknown task='pos'"):
        tokenize_crosslingual(splits["source"], tokenizer, task="pos")


def write_wikiann(root: Path, language: str, seed: int, sizes: dict[str, int]) -> None:
    splits, _ = generate_crosslingual_task(num_source=max(sizes.values()), num_target_train=1, num_target_test=1,
                                           num_names=30, seed=seed)  # fmt: skip
    folder = root / language
    folder.mkdir(parents=True)
    for split, size in sizes.items():
        rows = splits["source"].select(range(size)).remove_columns("label")
        with open(folder / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps({**row, "tokens": [f"{language}_{t}" for t in row["tokens"]],
                                    "langs": [language] * len(row["tokens"])}) + "\n")  # fmt: skip


def test_wikiann_schema_folder_loads_like_the_hub_dataset(tmp_path):
    write_wikiann(tmp_path, "en", 0, {"train": 6, "validation": 2, "test": 3})
    data = load_wikiann("en", str(tmp_path))
    assert set(data) == {"train", "validation", "test"} and len(data["train"]) == 6
    assert data["train"].features["ner_tags"].feature.names == WIKIANN_LABELS
    with pytest.raises(ValueError, match="has no train.jsonl and test.jsonl"):
        load_wikiann("qu", str(tmp_path))


# ----------------------------------------------------------------------------------------------------- recipe
@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("recipe_metaxl", ROOT / "recipes" / "metaxl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY_RUN = ["--seeds", "0", "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--disable_tqdm", "true",
            "--per_device_train_batch_size", "8", "--meta_batch_size", "4", "--tiny_hidden_size", "8",
            "--bottleneck", "4"]  # fmt: skip


@pytest.mark.slow
def test_recipe_on_the_generated_pair(recipe, tmp_path, no_network):
    results = tmp_path / "results"
    report = recipe.main(["--source_train_size", "40", "--target_train_size", "8", "--target_test_size", "8",
                          "--num_names", "30", "--results_dir", str(results), "--output_dir", str(tmp_path / "runs"),
                          *TINY_RUN])  # fmt: skip
    saved = json.loads((results / "results.json").read_text())
    assert saved["summary"] == report["summary"] and list(saved["summary"]) == list(recipe.METHODS)
    assert (results / "test_f1.png").stat().st_size > 0
    runs = {r["method"]: r for r in saved["runs"]}
    for method, run in runs.items():
        assert 0.0 <= run["test_metric"] <= 1.0 and run["metric"] == "f1" and len(run["test_metric_per_eval"]) == 2
        assert (run["meta_step_seconds"] is None) == (recipe.METHODS[method] is None)
    assert runs["metaxl_evograd"]["meta_step_memory_mb"] < runs["metaxl_t1t2"]["meta_step_memory_mb"]


@pytest.mark.slow
def test_recipe_on_a_wikiann_folder_and_sequence_classification(recipe, tmp_path, no_network):
    for language, seed in (("en", 0), ("qu", 1)):
        write_wikiann(tmp_path / "wikiann", language, seed, {"train": 12, "validation": 2, "test": 4})
    report = recipe.main(["--dataset", str(tmp_path / "wikiann"), "--source_language", "en", "--target_language",
                          "qu", "--target_train_size", "4", "--methods", "joint", "metaxl_t1t2", "--results_dir",
                          str(tmp_path / "r1"), "--output_dir", str(tmp_path / "runs"), *TINY_RUN])  # fmt: skip
    assert [r["method"] for r in report["runs"]] == ["joint", "metaxl_t1t2"]
    assert all(0.0 <= r["test_metric"] <= 1.0 for r in report["runs"])
    report = recipe.main(["--task", "sequence", "--source_train_size", "40", "--target_train_size", "8",
                          "--target_test_size", "8", "--num_names", "30", "--methods", "metaxl_evograd",
                          "--results_dir", str(tmp_path / "r2"), "--output_dir", str(tmp_path / "runs2"),
                          *TINY_RUN])  # fmt: skip
    assert report["runs"][0]["metric"] == "accuracy" and (tmp_path / "r2" / "test_accuracy.png").is_file()
    with pytest.raises(ValueError, match="Unknown task='pos'"):
        recipe.main(["--task", "pos"])
