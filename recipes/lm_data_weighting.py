"""Language-model data weighting: fine-tune a causal LM on a mixture whose training examples are partly corrupted,
with a small clean meta set; compare plain fine-tuning, fine-tuning on the clean part alone, a per-example loss
weighter (Meta-Weight-Net) and per-source mixture weights (DoReMi-like, `SourceWeights`), each learned by EvoGrad and
by `t1t2_fd`. The training examples come from `num_sources` sources of graded quality (source k holds a share
k / (num_sources - 1) of corrupted examples).

The embedded default is a generated task (`reverse`: `01234=43210`) where half the training answers are random
digits, on a tiny GPT-2 built from a config. The real path takes any causal LM and text dataset by name, optionally
with LoRA adapters; its corrupted examples have their tokens shuffled. Reports held-out clean loss, perplexity and
exact-match accuracy (generated tasks) or next-token accuracy (text), seconds per step and memory; writes
`<results_dir>/results.json` with plots beside it.

    python recipes/lm_data_weighting.py                                      # embedded, 3 seeds (a few minutes)
    python recipes/lm_data_weighting.py --model gpt2 --dataset wikitext --dataset_config wikitext-2-raw-v1 --lora true
    accelerate launch --config_file recipes/accelerate_configs/bf16.yaml recipes/lm_data_weighting.py ...
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, set_seed

from metatrain import MetaTrainingArguments
from metatrain.cli import parse_config
from metatrain.data import graded_sources
from metatrain.data.sequences import SEQUENCE_TASKS, VOCAB, make_sequence_lm_splits
from metatrain.experiments import (
    METHOD_OPTIONS_HELP,
    GridArguments,
    method_trainer,
    methods_field,
    per_method,
    run_and_report,
    train_and_measure,
)
from metatrain.losses import per_sample_causal_lm_loss
from metatrain.modules import MetaWeightNet, SourceWeights
from metatrain.plotting import plot_curves, plot_grouped_bars, plot_weighting_functions

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "lm_data_weighting_reverse.yaml")
METHODS = {"plain": None, "clean_only": None, "mwn_evograd": "evograd", "mwn_t1t2_fd": "t1t2_fd",
           "mixture_evograd": "evograd", "mixture_t1t2_fd": "t1t2_fd"}  # fmt: skip
SUMMARY_KEYS = ("test_loss", "test_perplexity", "test_accuracy", "gap_recovered", "seconds_per_step",
                "meta_step_seconds", "meta_step_memory_mb", "peak_cuda_memory_mb")  # fmt: skip


@dataclass
class LMDataWeightingArguments(GridArguments):
    """Arguments of the LM data-weighting recipe: the data and its corruption, the model, then the methods and
    seeds."""

    METHODS: ClassVar[dict[str, str | None]] = METHODS
    methods: list[str] | None = methods_field(METHODS)

    dataset: str = field(
        default="reverse",
        metadata={"help": f"A generated task {SEQUENCE_TASKS}, or a text dataset's name or path (`load_dataset`)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The text dataset's configuration."})
    text_column: str = field(default="text", metadata={"help": "The text dataset's text column."})
    block_size: int = field(default=64, metadata={"help": "Text datasets: tokens per example."})
    length: int = field(default=5, metadata={"help": "Generated tasks: digits of the prompt."})
    num_train: int = field(default=2000, metadata={"help": "Training examples (clean and corrupted)."})
    num_meta: int = field(default=64, metadata={"help": "Clean meta examples."})
    num_test: int = field(default=500, metadata={"help": "Clean held-out test examples."})
    corruption: float = field(default=0.5, metadata={"help": "Share of the training examples corrupted."})
    num_sources: int = field(
        default=4,
        metadata={"help": "Training sources of graded quality (`metatrain.data.graded_sources`), for the mixture "
                  "methods: source k holds a share k / (num_sources - 1) of the corrupted examples."},
    )  # fmt: skip
    source_scale: float = field(
        default=10.0, metadata={"help": "`SourceWeights(scale=...)`: how fast the meta-optimizer moves the shares."}
    )
    model: str = field(
        default="tiny_gpt2", metadata={"help": "`tiny_gpt2` (built from a config) or a causal LM's name or path."}
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of every weight."})
    method_options: dict[str, dict[str, Any]] | str | None = field(
        # EvoGrad's lookahead step matched to the learning rate, the step t1t2_fd takes
        default_factory=lambda: {
            method: {"population": 2, "sigma": "auto", "temperature": 0.05}
            for method in ("mwn_evograd", "mixture_evograd")
        },
        metadata={"help": METHOD_OPTIONS_HELP},
    )
    results_dir: str = field(default="outputs/lm_data_weighting", metadata={"help": "Where results.json goes."})


def text_splits(args: LMDataWeightingArguments, tokenizer, seed: int):
    """Blocks of `block_size` tokens of a text dataset's train split: `num_train` training blocks (a share of them
    with their tokens shuffled), then `num_meta` and `num_test` clean ones."""
    import datasets
    from datasets import load_dataset

    text = load_dataset(args.dataset, args.dataset_config, split="train")[args.text_column]
    ids = np.asarray(tokenizer("".join(t for t in text if t.strip()))["input_ids"])
    total = args.num_train + args.num_meta + args.num_test
    if len(ids) < total * args.block_size:
        raise ValueError(
            f"{args.dataset} has {len(ids)} tokens, fewer than {total} blocks of {args.block_size}: lower the sizes."
        )
    blocks = ids[: total * args.block_size].reshape(total, args.block_size)
    rng = np.random.default_rng(seed)
    blocks = blocks[rng.permutation(total)]
    corrupted = np.zeros(total, dtype=bool)
    corrupted[rng.choice(args.num_train, round(args.corruption * args.num_train), replace=False)] = True
    for i in np.flatnonzero(corrupted):
        blocks[i] = rng.permutation(blocks[i])

    def split(rows: slice) -> datasets.Dataset:
        b = blocks[rows]
        columns = {"input_ids": b, "attention_mask": np.ones_like(b), "labels": b, "corrupted": corrupted[rows]}
        return datasets.Dataset.from_dict(columns).with_format("torch")

    n, m = args.num_train, args.num_train + args.num_meta
    return datasets.DatasetDict(train=split(slice(0, n)), meta=split(slice(n, m)), test=split(slice(m, total)))


def load_data(args: LMDataWeightingArguments, seed: int):
    """The splits and the tokenizer (`None` for a generated task); each training example has a `source`."""
    if args.dataset in SEQUENCE_TASKS:
        sizes = dict(num_train=args.num_train, num_meta=args.num_meta, num_test=args.num_test)
        splits = make_sequence_lm_splits(args.dataset, args.length, corruption=args.corruption, seed=seed, **sizes)
        tokenizer = None
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        splits = text_splits(args, tokenizer, seed)
    sources = graded_sources(np.asarray(splits["train"]["corrupted"]), args.num_sources, seed)
    splits["train"] = splits["train"].add_column("source", sources).with_format("torch")
    return splits, tokenizer


def build_model(args: LMDataWeightingArguments, tokenizer) -> torch.nn.Module:
    if args.model == "tiny_gpt2":
        if tokenizer is not None:
            raise ValueError("model=tiny_gpt2 has the generated tasks' vocabulary: name a model for a text dataset.")
        eos = VOCAB.index("<eos>")
        config = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)  # fmt: skip
        model = GPT2LMHeadModel(config)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    return model


def exact_match(eval_pred) -> dict[str, float]:
    """Next-token accuracy over the labelled tokens, and the share of examples with every labelled token right
    (greedy decoding's exact match of the answer, for the generated tasks)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = target != -100
    right = (predicted == target) | ~mask
    return {"token_accuracy": float(right[mask].mean() if mask.any() else 0.0),
            "accuracy": float(right.all(axis=1).mean())}  # fmt: skip


def run(args: LMDataWeightingArguments, training_args: MetaTrainingArguments, method: str, seed: int, data):
    splits, tokenizer = data
    set_seed(seed)
    model = build_model(args, tokenizer)
    train = splits["train"]
    if method == "clean_only":
        train = train.filter(lambda corrupted: not corrupted, input_columns="corrupted")
    if not method.startswith("mixture"):  # only the mixture weights read it
        train = train.remove_columns("source")
    if method.startswith("mixture"):
        meta_module = functools.partial(SourceWeights, args.num_sources, scale=args.source_scale)
    else:
        meta_module = MetaWeightNet
    trainer = method_trainer(
        method, METHODS, args.method_options, training_args, seed, model=model, train_dataset=train,
        eval_dataset=splits["test"], compute_metrics=exact_match, meta_dataset=splits["meta"],
        meta_module=meta_module, per_sample_loss=per_sample_causal_lm_loss,
    )  # fmt: skip
    costs = train_and_measure(trainer)
    final = trainer.evaluate()
    history = trainer.state.log_history
    result = {
        "method": method, "seed": seed, "test_loss": final["eval_loss"],
        "test_perplexity": float(np.exp(final["eval_loss"])),
        "test_accuracy": final["eval_accuracy" if tokenizer is None else "eval_token_accuracy"],
        "test_loss_per_epoch": [h["eval_loss"] for h in history if "eval_loss" in h][:-1] or [final["eval_loss"]],
        **costs,
    }  # fmt: skip
    if method.startswith("mixture"):
        result.update(learned_shares(trainer.meta_module, splits["train"]))
    elif METHODS[method] is not None:  # the learned weights of the clean and the corrupted training examples
        result.update(learned_weights(trainer, splits["train"]))
    return result, trainer


@torch.no_grad()
def learned_weights(trainer, train) -> dict[str, Any]:
    """Meta-Weight-Net's weight of each training example at its final loss, averaged over the clean and the
    corrupted ones, and its weighting function."""
    model, device = trainer.model, trainer.args.device
    model.eval()
    losses = []
    for start in range(0, len(train), 256):
        batch = train[start : start + 256]
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        losses.append(per_sample_causal_lm_loss(model(**inputs).logits, batch["labels"].to(device)))
    losses = torch.cat(losses)
    weights = trainer.meta_module(losses).cpu().numpy()
    corrupted = np.asarray(train["corrupted"], dtype=bool)
    grid = torch.linspace(0, float(losses.max()), 81, device=device)
    return {
        "mean_weight_clean": float(weights[~corrupted].mean()),
        "mean_weight_corrupted": float(weights[corrupted].mean()) if corrupted.any() else None,
        "weighting_function": {"loss": grid.tolist(), "weight": trainer.meta_module(grid).tolist()},
    }


@torch.no_grad()
def learned_shares(weights: SourceWeights, train) -> dict[str, Any]:
    """The learned share of each source, and the resulting weight of the clean and the corrupted examples."""
    shares = weights.shares().cpu().numpy()
    sources = np.asarray(train["source"])
    corrupted = np.asarray(train["corrupted"], dtype=bool)
    per_example = len(shares) * shares[sources]
    return {
        "source_shares": shares.tolist(),
        "source_corrupted_share": [float(corrupted[sources == k].mean()) for k in range(len(shares))],
        "mean_weight_clean": float(per_example[~corrupted].mean()),
        "mean_weight_corrupted": float(per_example[corrupted].mean()) if corrupted.any() else None,
    }


def gap_recovered(results: list[dict[str, Any]], key: str = "test_loss") -> None:
    """For each seed's weighted runs: `(plain - method) / (plain - clean_only)` of the test loss, the share of the
    gap between plain fine-tuning and fine-tuning on the clean part that the learned weighting recovers."""
    by_seed = {(r["seed"], r["method"]): r[key] for r in results}
    for r in results:
        plain, clean = by_seed.get((r["seed"], "plain")), by_seed.get((r["seed"], "clean_only"))
        gap = None if plain is None or clean is None else plain - clean
        r["gap_recovered"] = None if not gap or METHODS[r["method"]] is None else (plain - r[key]) / gap


def plot(results: list[dict[str, Any]], args: LMDataWeightingArguments) -> None:
    """The recipe's plots, beside `results.json` in `args.results_dir`."""
    colors = {method: f"C{i}" for i, method in enumerate(METHODS)}
    title = f"{args.dataset}, {args.corruption:.0%} corrupted"
    plot_curves(per_method(results, "test_loss_per_epoch"), os.path.join(args.results_dir, "test_loss.png"),
                "epoch", "held-out clean loss", title, colors)  # fmt: skip
    bars = {"test accuracy": {m: (float(np.mean(v)), float(np.std(v)))
                              for m, v in per_method(results, "test_accuracy").items()}}  # fmt: skip
    plot_grouped_bars(bars, os.path.join(args.results_dir, "test_accuracy.png"), "accuracy",
                      f"{args.dataset}: held-out accuracy (mean, std over seeds)", colors)  # fmt: skip
    shares = per_method(results, "source_shares")
    if shares:  # the learned mixture, per source (mean and std over seeds)
        corrupted = next(r["source_corrupted_share"] for r in results if "source_corrupted_share" in r)
        bars = {f"{k}: {c:.0%}": {m: (float(np.mean([s[k] for s in v])), float(np.std([s[k] for s in v])))
                                  for m, v in shares.items()} for k, c in enumerate(corrupted)}  # fmt: skip
        plot_grouped_bars(bars, os.path.join(args.results_dir, "source_shares.png"), "learned share",
                          "Learned share per source (source: its corrupted share)", colors)  # fmt: skip
    last = {r["method"]: r["weighting_function"] for r in results if "weighting_function" in r}
    if last:
        plot_weighting_functions({m: (w["loss"], w["weight"]) for m, w in last.items()},
                                 os.path.join(args.results_dir, "weighting.png"),
                                 f"Learned weighting function (seed {args.seeds[-1]})", colors)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args, training_args = parse_config((LMDataWeightingArguments, MetaTrainingArguments), argv, DEFAULT_CONFIG)

    report, is_main = run_and_report(
        args, training_args, lambda seed: load_data(args, seed),
        lambda method, seed, data: run(args, training_args, method, seed, data), SUMMARY_KEYS, gap_recovered,
    )  # fmt: skip
    if is_main:
        plot(report["runs"], args)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
