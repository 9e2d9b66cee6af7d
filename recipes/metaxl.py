"""MetaXL: low-resource cross-lingual transfer with a meta-learned representation transformation network (RTN).

EvoGrad paper (NeurIPS version), third application, and MetaXL (Xia et al., NAACL 2021). Four methods on the same
data and seed: fine-tuning on the source language only, joint training on source and target (no transformation),
and MetaXL, whose RTN transforms the source examples' hidden states after one encoder layer and is learned from the
target language's few labelled sentences, with the T1-T2 lookahead (MetaXL's own) or EvoGrad. Results go to
`<results_dir>/results.json` with plots beside it.

    python recipes/metaxl.py                                  # generated language pair, tiny encoder, 3 seeds
    python recipes/metaxl.py recipes/configs/metaxl_generated.yaml --seeds 0 --max_steps 100
    accelerate launch recipes/metaxl.py recipes/configs/metaxl_wikiann.yaml  # WikiANN en -> qu, xlm-roberta-base

The default is an offline stand-in, not WikiANN: a generated language pair in WikiANN's schema whose target language
is the source with every word replaced by its translation, a tiny XLM-R built from a config whose translated words'
embeddings start as their source words' plus one fixed offset, see `metatrain.data.crosslingual`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    XLMRobertaConfig,
    set_seed,
)

from metatrain import MetaTrainingArguments
from metatrain.cli import parse_config
from metatrain.data.crosslingual import (
    ENTITY_TYPES,
    WIKIANN_LABELS,
    build_word_level_tokenizer,
    generate_crosslingual_task,
    load_wikiann,
    mix_source_and_target,
    tie_translated_embeddings,
    tokenize_crosslingual,
)
from metatrain.experiments import (
    METHOD_OPTIONS_HELP,
    GridArguments,
    accuracy,
    method_trainer,
    methods_field,
    per_method,
    run_and_report,
    train_and_measure,
)
from metatrain.metrics import token_classification_metrics
from metatrain.modules import attach_representation_transform
from metatrain.plotting import plot_curves

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "metaxl_generated.yaml")
METHODS = {"source_only": None, "joint": None, "metaxl_t1t2": "t1t2", "metaxl_evograd": "evograd"}
SUMMARY_KEYS = ("test_metric", "seconds_per_step", "meta_step_seconds", "meta_step_memory_mb", "peak_cuda_memory_mb")


@dataclass
class MetaXLArguments(GridArguments):
    """Arguments of the MetaXL recipe: the language pair, the encoder and the RTN, then the grid of methods and
    seeds."""

    METHODS: ClassVar[dict[str, str | None]] = METHODS
    methods: list[str] | None = methods_field(METHODS)

    dataset: str = field(
        default="generated",
        metadata={
            "help": "`generated` (the offline language pair of `metatrain.data.crosslingual`), a WikiANN Hub dataset "
            "(`unimelb-nlp/wikiann`) or a local folder of `<language>/<split>.jsonl` files in WikiANN's schema."
        },
    )
    task: str = field(
        default="ner", metadata={"help": "`ner` (token classification, entity F1) or `sequence` (accuracy)."}
    )
    source_language: str = field(default="en", metadata={"help": "WikiANN source language."})
    target_language: str = field(default="qu", metadata={"help": "WikiANN target language."})
    source_train_size: int = field(default=5000, metadata={"help": "Source sentences used (the first ones)."})
    target_train_size: int = field(
        default=100, metadata={"help": "Labelled target sentences: target-train loss and meta loss (as in MetaXL)."}
    )
    target_test_size: int = field(default=300, metadata={"help": "Target test sentences (generated task only)."})
    num_names: int = field(default=150, metadata={"help": "Generated task: names (entity words) per language."})
    trigger_probability: float = field(
        default=0.5, metadata={"help": "Generated task: probability that a trigger word precedes an entity."}
    )
    offset_scale: float = field(
        default=1.0,
        metadata={"help": "Generated task: norm of the target language's embedding offset relative to theirs."},
    )
    freeze_word_embeddings: bool = field(
        default=False, metadata={"help": "Generated task: keep the tied word embeddings fixed (as pretrained)."}
    )
    model: str = field(
        default="tiny",
        metadata={"help": "`tiny` (an XLM-R built from the `tiny_*` sizes) or a Hub model, e.g. `xlm-roberta-base`."},
    )
    tiny_hidden_size: int = field(default=32, metadata={"help": "Hidden size of the tiny XLM-R."})
    tiny_layers: int = field(default=2, metadata={"help": "Encoder layers of the tiny XLM-R."})
    tiny_heads: int = field(default=2, metadata={"help": "Attention heads of the tiny XLM-R."})
    tiny_dropout: float = field(default=0.1, metadata={"help": "Hidden and attention dropout of the tiny XLM-R."})
    max_length: int = field(default=128, metadata={"help": "Tokens per sentence after tokenization (truncated)."})
    rtn_layer: int = field(
        default=-1,
        metadata={"help": "The RTN transforms this layer's output: 0 the embeddings, k the k-th layer, -1 the last."},
    )
    bottleneck: int = field(default=192, metadata={"help": "Middle width of the RTN (MetaXL: 192-384)."})
    target_fraction: float = field(
        default=0.5,
        metadata={"help": "Share of target examples in the joint and MetaXL training set (repeated to reach it)."},
    )
    method_options: dict[str, dict[str, Any]] | str | None = field(
        default_factory=lambda: {
            "metaxl_evograd": {"population": 2, "sigma": 0.001, "temperature": 0.05, "rescale": True}
        },
        metadata={
            "help": f"{METHOD_OPTIONS_HELP} Default: the paper's EvoGrad values for `metaxl_evograd`, with `rescale`."
        },
    )
    results_dir: str = field(default="outputs/metaxl", metadata={"help": "Where results.json and plots go."})

    def __post_init__(self):
        super().__post_init__()
        if self.task not in ("ner", "sequence"):
            raise ValueError(f"Unknown task={self.task!r}: choose 'ner' or 'sequence'.")
        if self.task == "sequence" and self.dataset != "generated":
            raise ValueError(
                "task='sequence' runs on the generated language pair only (WikiANN is NER): set --dataset generated."
            )


def load_data(args: MetaXLArguments, seed: int) -> dict:
    """Tokenized splits (`source`, `mix`, `target_train`, `target_test`), the tokenizer and the generated task's
    translation table (None on WikiANN)."""
    translation = None
    if args.dataset == "generated":
        raw, translation = generate_crosslingual_task(
            num_source=args.source_train_size, num_target_train=args.target_train_size,
            num_target_test=args.target_test_size, num_names=args.num_names,
            trigger_probability=args.trigger_probability, seed=seed,
        )  # fmt: skip
        source, target_train, target_test = raw["source"], raw["target_train"], raw["target_test"]
    else:
        source_data = load_wikiann(args.source_language, args.dataset)
        target_data = load_wikiann(args.target_language, args.dataset)
        source = source_data["train"].select(range(min(args.source_train_size, len(source_data["train"]))))
        target_train = target_data["train"].select(range(min(args.target_train_size, len(target_data["train"]))))
        target_test = target_data["test"]
    if args.model == "tiny":
        words = translation if translation is not None else {w: w for row in source["tokens"] for w in row}
        vocabulary = sorted(set(words) | set(words.values()))
        if translation is None:
            vocabulary = sorted({*vocabulary, *(w for split in (target_train, target_test) for r in split["tokens"]
                                                for w in r)})  # fmt: skip
        tokenizer = build_word_level_tokenizer(vocabulary, model_max_length=args.max_length)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    encode = lambda data, is_source: tokenize_crosslingual(  # noqa: E731
        data, tokenizer, args.task, args.max_length, is_source=is_source
    )
    source, target_train, target_test = encode(source, True), encode(target_train, False), encode(target_test, False)
    return {
        "source": source,
        "mix": mix_source_and_target(source, target_train, args.target_fraction, seed=seed),
        "target_train": target_train,
        "target_test": target_test,
        "tokenizer": tokenizer,
        "translation": translation,
    }


def build_model(args: MetaXLArguments, data: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    num_labels = len(WIKIANN_LABELS) if args.task == "ner" else len(ENTITY_TYPES)
    auto = AutoModelForTokenClassification if args.task == "ner" else AutoModelForSequenceClassification
    # eager attention: T1-T2 and the other second-order estimators differentiate through attention twice, which
    # PyTorch's fused SDPA kernels do not support
    if args.model != "tiny":
        return auto.from_pretrained(args.model, num_labels=num_labels, attn_implementation="eager")
    tokenizer = data["tokenizer"]
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=args.tiny_hidden_size, num_hidden_layers=args.tiny_layers,
        num_attention_heads=args.tiny_heads, intermediate_size=4 * args.tiny_hidden_size,
        max_position_embeddings=args.max_length + 2, hidden_dropout_prob=args.tiny_dropout,
        attention_probs_dropout_prob=args.tiny_dropout, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = auto.from_config(config, attn_implementation="eager")
    if data["translation"] is not None:
        embeddings = model.get_input_embeddings()
        tie_translated_embeddings(embeddings, tokenizer, data["translation"], args.offset_scale, seed=seed)
        embeddings.weight.requires_grad_(not args.freeze_word_embeddings)
    return model


def run(args: MetaXLArguments, training_args: MetaTrainingArguments, method: str, seed: int, data: dict):
    set_seed(seed)
    model = build_model(args, data, seed)
    tokenizer = data["tokenizer"]
    if args.task == "ner":
        collator, metrics, metric_name = (DataCollatorForTokenClassification(tokenizer),
                                          token_classification_metrics(WIKIANN_LABELS), "f1")  # fmt: skip
    else:
        collator, metrics, metric_name = DataCollatorWithPadding(tokenizer), accuracy, "accuracy"
    trainer = method_trainer(
        method, METHODS, args.method_options, training_args, seed, model=model,
        train_dataset=data["source"] if method == "source_only" else data["mix"], eval_dataset=data["target_test"],
        data_collator=collator, compute_metrics=metrics, meta_dataset=data["target_train"],
        meta_module=lambda: attach_representation_transform(model, layer=args.rtn_layer, bottleneck=args.bottleneck),
    )  # fmt: skip
    costs = train_and_measure(trainer)
    final = trainer.evaluate()
    history = trainer.state.log_history
    curve = [h[f"eval_{metric_name}"] for h in history if f"eval_{metric_name}" in h][:-1]
    result = {
        "method": method,
        "seed": seed,
        "metric": metric_name,
        "test_metric": final[f"eval_{metric_name}"],
        "test_metrics": {k[5:]: v for k, v in final.items() if k in ("eval_f1", "eval_precision", "eval_recall",
                                                                       "eval_accuracy", "eval_loss")},
        "test_metric_per_eval": curve or [final[f"eval_{metric_name}"]],
        **costs,
    }  # fmt: skip
    return result, trainer


def main(argv: list[str] | None = None) -> dict:
    args, training_args = parse_config((MetaXLArguments, MetaTrainingArguments), argv, DEFAULT_CONFIG)
    report, is_main = run_and_report(
        args, training_args, lambda seed: load_data(args, seed),
        lambda method, seed, data: run(args, training_args, method, seed, data), SUMMARY_KEYS,
    )  # fmt: skip
    if is_main:
        curves = per_method(report["runs"], "test_metric_per_eval")
        colors = {method: f"C{i}" for i, method in enumerate(METHODS)}
        metric = report["runs"][0]["metric"]
        title = (
            "generated language pair"
            if args.dataset == "generated"
            else (f"{args.dataset}: {args.source_language} -> {args.target_language}")
        )
        plot_curves(curves, os.path.join(args.results_dir, f"test_{metric}.png"), "evaluation",
                    f"target test {metric}", title, colors)  # fmt: skip
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
