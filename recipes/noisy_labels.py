"""Meta-Weight-Net on noisy labels: plain training vs MWN with the T1-T2 lookahead vs MWN with EvoGrad.

EvoGrad paper Sec. 4.4 / Table 5 and Meta-Weight-Net (Shu et al., 2019). Every method sees the same noisy train
split, clean meta split, test split and seed. Results go to `<results_dir>/results.json` with plots beside it.

    python recipes/noisy_labels.py                                  # embedded digits, 40% uniform noise, 3 seeds
    python recipes/noisy_labels.py recipes/configs/noisy_labels_digits.yaml --seeds 0 --num_train_epochs 5
    accelerate launch recipes/noisy_labels.py recipes/configs/noisy_labels_cifar10.yaml   # needs CIFAR-10 locally
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import set_seed

from metatrain import MetaTrainingArguments
from metatrain.cli import parse_config
from metatrain.data import load_digits_dataset, load_image_classification_dataset, make_noisy_label_splits
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
from metatrain.models import build_model
from metatrain.modules import MetaWeightNet
from metatrain.plotting import plot_curves, plot_weighting_functions

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "noisy_labels_digits.yaml")
METHODS = {"baseline": None, "mwn_t1t2": "t1t2", "mwn_evograd": "evograd"}
SUMMARY_KEYS = ("test_accuracy", "seconds_per_step", "meta_step_seconds", "meta_step_memory_mb", "peak_cuda_memory_mb")


@dataclass
class NoisyLabelsArguments(GridArguments):
    """Arguments of the noisy-label recipe: the data, its noise and the model, then the grid of methods and seeds."""

    METHODS: ClassVar[dict[str, str | None]] = METHODS
    methods: list[str] | None = methods_field(METHODS)

    dataset: str = field(
        default="digits", metadata={"help": "`digits` (embedded), `cifar10`, `cifar100` or an image folder path."}
    )
    model: str = field(default="small_cnn", metadata={"help": "`small_cnn`, `cifar_resnet32` or a timm model name."})
    width: int = field(default=1, metadata={"help": "Width multiplier of the built-in models."})
    noise_type: str = field(default="uniform", metadata={"help": "Label noise: `uniform`, `flip` or `flip2`."})
    noise_rate: float = field(
        default=0.4,
        metadata={
            "help": "Probability that a training label is corrupted: under `uniform` redrawn over all classes (so it "
            "changes with probability noise_rate (K - 1) / K), under `flip` / `flip2` moved to another class."
        },
    )
    num_meta_per_class: int = field(default=10, metadata={"help": "Clean meta examples per class."})
    method_options: dict[str, dict[str, Any]] | str | None = field(
        default_factory=lambda: {
            "mwn_evograd": {"population": 2, "sigma": 0.001, "temperature": 0.05, "rescale": True}
        },
        metadata={
            "help": f"{METHOD_OPTIONS_HELP} Default: the paper's EvoGrad values for `mwn_evograd`, with the estimate "
            "rescaled to the learning rate (`rescale`; see README)."
        },
    )
    results_dir: str = field(default="outputs/noisy_labels", metadata={"help": "Where results.json and plots go."})


def load_data(args: NoisyLabelsArguments, seed: int):
    if args.dataset == "digits":
        base = load_digits_dataset(seed=seed)
    else:
        base = load_image_classification_dataset(args.dataset)
    num_classes = base["train"].features["labels"].num_classes
    splits = make_noisy_label_splits(
        base, num_classes, args.noise_type, args.noise_rate, args.num_meta_per_class, seed=seed
    )
    return splits, num_classes


def run(args: NoisyLabelsArguments, training_args: MetaTrainingArguments, method: str, seed: int, splits, classes):
    set_seed(seed)
    in_chans = splits["train"][0]["pixel_values"].shape[0]
    model = build_model(args.model, num_classes=classes, in_chans=in_chans, width=args.width)
    trainer = method_trainer(
        method, METHODS, args.method_options, training_args, seed, model=model, train_dataset=splits["train"],
        eval_dataset=splits["test"], compute_metrics=accuracy, meta_dataset=splits["meta"], meta_module=MetaWeightNet,
    )  # fmt: skip
    costs = train_and_measure(trainer)
    final = trainer.evaluate()
    history = trainer.state.log_history
    result = {
        "method": method,
        "seed": seed,
        "test_accuracy": final["eval_accuracy"],
        "test_accuracy_per_epoch": [h["eval_accuracy"] for h in history if "eval_accuracy" in h][:-1]
        or [final["eval_accuracy"]],
        **costs,
    }
    if METHODS[method] is not None:
        device = trainer.meta_module.net[0].weight.device
        losses = torch.linspace(0, 8, 81, device=device)
        with torch.no_grad():
            result["weighting_function"] = {"loss": losses.tolist(), "weight": trainer.meta_module(losses).tolist()}
    return result, trainer


def main(argv: list[str] | None = None) -> dict:
    args, training_args = parse_config((NoisyLabelsArguments, MetaTrainingArguments), argv, DEFAULT_CONFIG)
    report, is_main = run_and_report(
        args, training_args, lambda seed: load_data(args, seed),
        lambda method, seed, data: run(args, training_args, method, seed, *data), SUMMARY_KEYS,
    )  # fmt: skip
    if is_main:
        results = report["runs"]
        curves = per_method(results, "test_accuracy_per_epoch")
        colors = {method: f"C{i}" for i, method in enumerate(METHODS)}
        plot_curves(curves, os.path.join(args.results_dir, "test_accuracy.png"), "epoch", "test accuracy",
                    f"{args.dataset}, {args.noise_rate:.0%} {args.noise_type} noise", colors)  # fmt: skip
        last = {r["method"]: r["weighting_function"] for r in results if "weighting_function" in r}
        plot_weighting_functions(
            {m: (w["loss"], w["weight"]) for m, w in last.items()},
            os.path.join(args.results_dir, "weighting.png"),
            f"Learned weighting function (seed {args.seeds[-1]})",
            colors,
        )
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
