"""Cross-lingual transfer data (MetaXL): WikiANN languages, a generated source/target language pair in WikiANN's
schema, a word-level tokenizer built locally, tokenization with label alignment, and the mixed training set.

Every example carries `is_source` (true for source-language examples), the batch key MetaXL's representation
transform reads (see [`~metatrain.modules.attach_representation_transform`]).
"""

from __future__ import annotations

import math
import os
from typing import Any

import datasets
import numpy as np

from ..metrics import extract_entities

WIKIANN_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
ENTITY_TYPES = ["PER", "ORG", "LOC"]
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R's first four ids
SOURCE_KEY = "is_source"


def _features(sequence_labels: int | None = None) -> datasets.Features:
    features = {
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=WIKIANN_LABELS)),
        "langs": datasets.Sequence(datasets.Value("string")),
        "spans": datasets.Sequence(datasets.Value("string")),
    }
    if sequence_labels is not None:
        features["label"] = datasets.ClassLabel(num_classes=sequence_labels)
    return datasets.Features(features)


def load_wikiann(language: str, path: str = "unimelb-nlp/wikiann") -> datasets.DatasetDict:
    """One WikiANN language (`train`, `validation`, `test`; columns `tokens`, `ner_tags`, `langs`, `spans`).

    Args:
        language (`str`): the WikiANN configuration, e.g. `"en"` or `"qu"`.
        path (`str`, *optional*, defaults to `"unimelb-nlp/wikiann"`): a Hub dataset (loaded with
            `datasets.load_dataset(path, language)`), or a local folder holding `<language>/<split>.jsonl` files in
            WikiANN's schema (loaded with the `json` builder; tests write such a folder).

    Raises:
        `ValueError`: if a local folder lacks the language's files.
    """
    if os.path.isdir(path):
        folder = os.path.join(path, language)
        files = {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "validation", "test")}
        files = {split: f for split, f in files.items() if os.path.isfile(f)}
        if "train" not in files or "test" not in files:
            raise ValueError(
                f"{folder} has no train.jsonl and test.jsonl: write WikiANN-schema JSON lines files (tokens, "
                "ner_tags) per split, or pass a Hub dataset such as 'unimelb-nlp/wikiann'."
            )
        data = datasets.load_dataset("json", data_files=files)
        return data.cast_column("ner_tags", datasets.Sequence(datasets.ClassLabel(names=WIKIANN_LABELS)))
    return datasets.load_dataset(path, language)


def generate_crosslingual_task(
    num_source: int = 2000,
    num_target_train: int = 100,
    num_target_test: int = 300,
    num_names: int = 240,
    num_fillers: int = 60,
    triggers_per_type: int = 3,
    trigger_probability: float = 0.5,
    seed: int = 0,
) -> tuple[datasets.DatasetDict, dict[str, str]]:
    """A generated source/target language pair for NER (WikiANN's schema) and sentence classification.

    The source language has `num_names` names, each of a fixed entity type (PER, ORG or LOC, in equal numbers),
    `num_fillers` filler words and `triggers_per_type` trigger words per type. A sentence is 6 to 12 filler words
    with one or two entities inserted between them (7 to 18 words in all), each entity one or two names of the same
    type (`B-`/`I-` tags), preceded by a trigger of its type with probability `trigger_probability`; entities never
    overlap or split a trigger from its entity. The sentence label (`label`, for sequence classification) is the type
    of its first (leftmost) entity. The target language is a systematic transformation of the source: every word is
    replaced by its translation (`"x" + word`, a one-to-one token mapping), with the same grammar and labels. Source
    and target sentences are drawn independently, so many target test names never occur in the few target training
    sentences: recognising them needs what the model learns from the source.

    Returns:
        `tuple[datasets.DatasetDict, dict[str, str]]`: splits `source`, `target_train` and `target_test`, and the
        translation of every source word.
    """
    if min(num_source, num_target_train, num_target_test) < 1 or num_names < 2 * len(ENTITY_TYPES):
        raise ValueError(
            f"Need at least one sentence per split and two names per type, got num_source={num_source}, "
            f"num_target_train={num_target_train}, num_target_test={num_target_test}, num_names={num_names}."
        )
    if not 0.0 <= trigger_probability <= 1.0:
        raise ValueError(f"trigger_probability must be in [0, 1], got {trigger_probability}.")
    rng = np.random.default_rng(seed)
    names = [f"n{i}" for i in range(num_names)]
    name_types = rng.permutation(np.arange(num_names) % len(ENTITY_TYPES))
    by_type = [[n for n, t in zip(names, name_types) if t == k] for k in range(len(ENTITY_TYPES))]
    fillers = [f"w{i}" for i in range(num_fillers)]
    triggers = [[f"t{k}{j}" for j in range(triggers_per_type)] for k in range(len(ENTITY_TYPES))]
    translation = {w: f"x{w}" for w in [*names, *fillers, *(t for group in triggers for t in group)]}

    def sentence() -> tuple[list[str], list[int], int]:
        # units: each filler alone, each entity with its trigger as one block, so that an entity is never inserted
        # inside another one or between a trigger and its entity
        units = [[(str(w), 0)] for w in rng.choice(fillers, size=int(rng.integers(6, 13)))]
        for _ in range(int(rng.integers(1, 3))):
            kind = int(rng.integers(len(ENTITY_TYPES)))
            entity = list(rng.choice(by_type[kind], size=int(rng.integers(1, 3)), replace=False))
            words = ([str(rng.choice(triggers[kind]))] if rng.random() < trigger_probability else []) + entity
            entity_tags = [0] * (len(words) - len(entity)) + [1 + 2 * kind] + [2 + 2 * kind] * (len(entity) - 1)
            units.insert(int(rng.integers(0, len(units) + 1)), [(str(w), t) for w, t in zip(words, entity_tags)])
        tokens, tags = [w for unit in units for w, _ in unit], [t for unit in units for _, t in unit]
        return tokens, tags, (next(t for t in tags if t) - 1) // 2

    def split(count: int, translate: bool, lang: str) -> datasets.Dataset:
        rows = {"tokens": [], "ner_tags": [], "langs": [], "spans": [], "label": []}
        for _ in range(count):
            tokens, tags, label = sentence()
            tokens = [translation[t] for t in tokens] if translate else tokens
            rows["tokens"].append(tokens)
            rows["ner_tags"].append(tags)
            rows["langs"].append([lang] * len(tokens))
            entities = sorted(extract_entities([WIKIANN_LABELS[t] for t in tags]), key=lambda e: e[1])
            rows["spans"].append([f"{kind}: {' '.join(tokens[start:end])}" for kind, start, end in entities])
            rows["label"].append(label)
        return datasets.Dataset.from_dict(rows, features=_features(len(ENTITY_TYPES)))

    splits = datasets.DatasetDict(
        source=split(num_source, False, "src"),
        target_train=split(num_target_train, True, "tgt"),
        target_test=split(num_target_test, True, "tgt"),
    )
    return splits, translation


def build_word_level_tokenizer(words: list[str], model_max_length: int = 512):
    """A word-level fast tokenizer over `words` with XLM-R's special tokens (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3)
    and its `<s> ... </s>` template, built locally (no download): `word_ids()` and `is_split_into_words` work as
    with a Hub tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        pad_token="<pad>", unk_token="<unk>", model_max_length=model_max_length,
    )  # fmt: skip


def tokenize_crosslingual(
    dataset: datasets.Dataset, tokenizer: Any, task: str = "ner", max_length: int = 128, is_source: bool = False
) -> datasets.Dataset:
    """Tokenizes pre-split words and adds `labels` and `is_source`.

    Args:
        dataset (`datasets.Dataset`): examples with `tokens` and `ner_tags` (`task="ner"`) or `label`
            (`task="sequence"`).
        tokenizer: a fast tokenizer (`word_ids()` is used to align word tags with sub-word tokens).
        task (`str`, *optional*, defaults to `"ner"`): `"ner"` labels the first sub-word of each word with its tag
            and every other token with -100; `"sequence"` labels the sentence.
        max_length (`int`, *optional*, defaults to 128): longer inputs are truncated.
        is_source (`bool`, *optional*, defaults to `False`): the value of the `is_source` column.

    Raises:
        `ValueError`: for another task, or a dataset without the columns the task needs.
    """
    if task not in ("ner", "sequence"):
        raise ValueError(f"Unknown task={task!r}: choose 'ner' (token classification) or 'sequence'.")
    needed = ["tokens", "ner_tags" if task == "ner" else "label"]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset lacks {missing} for task={task!r} (columns: {dataset.column_names}).")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        if task == "sequence":
            encoded["labels"] = list(batch["label"])
        else:
            labels = []
            for i, tags in enumerate(batch["ner_tags"]):
                previous, row = None, []
                for word in encoded.word_ids(i):
                    row.append(-100 if word is None or word == previous else int(tags[word]))
                    previous = word
                labels.append(row)
            encoded["labels"] = labels
        encoded[SOURCE_KEY] = [bool(is_source)] * len(batch["tokens"])
        return dict(encoded)

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def mix_source_and_target(
    source: datasets.Dataset, target: datasets.Dataset, target_fraction: float = 0.5, seed: int = 0
) -> datasets.Dataset:
    """Source examples plus the target examples repeated until they make up about `target_fraction` of the mix,
    shuffled, so that a batch's mean loss weighs the two languages as MetaXL's sum of a source and a target loss
    does (with 0.5)."""
    if not 0.0 < target_fraction < 1.0:
        raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction}: 0.5 balances the languages.")
    copies = max(1, math.ceil(len(source) * target_fraction / (1 - target_fraction) / len(target)))
    return datasets.concatenate_datasets([source, *[target] * copies]).shuffle(seed=seed)


def tie_translated_embeddings(
    embeddings: Any, tokenizer: Any, translation: dict[str, str], offset_scale: float = 1.0, seed: int = 0
) -> Any:
    """Sets the embedding of every translated word to its source word's embedding plus one fixed offset (a random
    direction of norm `offset_scale` times the mean source-embedding norm), in place: a stand-in, for the generated
    task, for a pretrained multilingual encoder in which translations have related representations.

    Args:
        embeddings (`torch.nn.Embedding`): the model's word embeddings (`model.get_input_embeddings()`).
        tokenizer: maps words to ids (`convert_tokens_to_ids`).
        translation (`dict[str, str]`): source word to target word, from [`generate_crosslingual_task`].
        offset_scale (`float`, *optional*, defaults to 1.0): size of the language offset relative to the embeddings.
        seed (`int`, *optional*, defaults to 0): seeds the offset's direction.

    Returns:
        `torch.Tensor`: the offset.
    """
    import torch

    source = torch.tensor(tokenizer.convert_tokens_to_ids(list(translation)))
    target = torch.tensor(tokenizer.convert_tokens_to_ids(list(translation.values())))
    weight = embeddings.weight
    with torch.no_grad():
        direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(seed))
        offset = direction / direction.norm() * weight[source].norm(dim=1).mean() * offset_scale
        weight[target] = weight[source] + offset.to(weight.dtype)
    return offset
