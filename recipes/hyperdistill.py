"""HyperDistill's online meta-learning benchmark: FO, 1-step, DrMAD, Neumann IFT and HyperDistill meta-learning ANIL,
WarpGrad and Meta-Weight-Net over a task distribution, with a Reptile initialisation (Lee et al., ICLR 2022, Sec. 5,
Table 2, Fig. 2 and Fig. 3a).

Each method is `<meta-model>_<estimator>`. A run meta-trains on `num_tasks` tasks of the meta-training classes, one
inner optimisation of `meta_inner_steps` SGD steps each, then solves `test_tasks` fresh tasks of the held-out classes
from the learned initialisation with the learned meta-parameters (the same inner setup) and reports their test
accuracy. Results go to `<results_dir>/results.json` with plots beside it.

    python recipes/hyperdistill.py                                   # embedded digits, 16 px, 5 runs (~20 min)
    python recipes/hyperdistill.py --methods anil_t1t2 anil_hyperdistill --seeds 0
    python recipes/hyperdistill.py recipes/configs/hyperdistill_cifar100.yaml   # needs CIFAR-100 locally
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import default_data_collator, set_seed

from metatrain import MetaTrainingArguments
from metatrain.callbacks import MetaTrainerCallback
from metatrain.cli import parse_config
from metatrain.data import (
    LabelledExamples,
    TaskDistribution,
    TaskStream,
    load_digit_domains,
    load_image_classification_dataset,
)
from metatrain.estimators import create_estimator
from metatrain.estimators.functional import sgd_unroll
from metatrain.experiments import (
    METHOD_OPTIONS_HELP,
    GridArguments,
    method_trainer,
    methods_field,
    run_and_report,
    write_results,
)
from metatrain.models import build_model
from metatrain.modules import MetaWeightNet, attach_meta_layers, attach_warp_layers
from metatrain.plotting import plot_curves, plot_grouped_bars

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "hyperdistill_digits.yaml")
ESTIMATORS = {"fo": "first_order", "1step": "t1t2", "drmad": "drmad", "neumann": "neumann",
              "hyperdistill": "hyperdistill"}  # fmt: skip
META_MODELS = ("anil", "warpgrad", "mwn")
# Meta-Weight-Net has no direct gradient, so first-order gives a zero hypergradient: not run (N/A in the paper)
METHODS = {f"{m}_{e}": est for m in META_MODELS for e, est in ESTIMATORS.items() if (m, e) != ("mwn", "fo")}
SUMMARY_KEYS = ("test_accuracy", "jvps_per_inner_optimisation", "seconds_per_step", "meta_step_seconds")
BOTTOM = ["features.0", "features.1", "features.2"]


@dataclass
class HyperDistillArguments(GridArguments):
    """Arguments of the HyperDistill recipe: the task distribution and its split, the meta-models, the meta-test, then
    the grid of methods and seeds."""

    METHODS: ClassVar[dict[str, str]] = METHODS
    methods: list[str] | None = methods_field(METHODS)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "One meta-training run each."})

    dataset: str = field(
        default="digits",
        metadata={"help": "`digits` (embedded, styles as the split), `cifar100` or an image folder path."},
    )
    meta_train_styles: list[str] = field(
        default_factory=lambda: ["gray", "inverted", "red_on_blue", "noisy"],
        metadata={"help": "digits: styles of the meta-training classes (a class is a digit in a style)."},
    )
    meta_test_styles: list[str] = field(
        default_factory=lambda: ["low_contrast"], metadata={"help": "digits: held-out styles of the meta-test tasks."}
    )
    class_split: list[int] = field(
        default_factory=lambda: [50, 20, 30],
        metadata={
            "help": "Other datasets: meta-train / meta-validation (unused) / meta-test classes, in label order."
        },
    )
    image_size: int = field(default=16, metadata={"help": "Side of the images."})
    width: int = field(default=1, metadata={"help": "Width multiplier of the conv nets (32 channels each)."})
    ways: int = field(default=5, metadata={"help": "Classes per task."})
    examples_per_class: int = field(
        default=30, metadata={"help": "Examples of each class in a task, half for training."}
    )
    num_tasks: int = field(default=20, metadata={"help": "Inner optimisations (tasks) of meta-training."})
    test_tasks: int = field(default=50, metadata={"help": "Fresh meta-test tasks solved after meta-training."})
    noise_rate: float = field(default=0.4, metadata={"help": "Meta-Weight-Net: uniform noise on training labels."})
    neumann_interval: int = field(
        default=5, metadata={"help": "Neumann IFT runs a meta step every this many inner steps (`meta_interval`)."}
    )
    cosine_meta_model: str | None = field(
        default="anil",
        metadata={"help": "Fig. 3a: the meta-model whose HyperDistill runs also measure cosines to exact RMD."},
    )
    method_options: dict[str, dict[str, Any]] | str | None = field(
        default_factory=lambda: {
            "anil_hyperdistill": {"estimation_period": 10}, "warpgrad_hyperdistill": {"estimation_period": 10},
            "mwn_hyperdistill": {"pi": 1.0}, "anil_neumann": {"terms": 4}, "warpgrad_neumann": {"terms": 4},
            "mwn_neumann": {"terms": 4},
        },
        metadata={
            "help": f"{METHOD_OPTIONS_HELP} `horizon` of DrMAD and HyperDistill defaults to `meta_inner_steps`. "
            "Default: theta refitted every 10 inner optimisations (the paper: 50 of 1000), the paper's pi = 1 for "
            "Meta-Weight-Net's HyperDistill, 4 Neumann terms every `neumann_interval` steps."
        },
    )  # fmt: skip
    results_dir: str = field(default="outputs/hyperdistill", metadata={"help": "Where results.json and plots go."})


def load_data(args: HyperDistillArguments, seed: int) -> dict[str, Any]:
    """The meta-training and meta-test datasets with their classes, and the channels of the images."""
    if args.dataset == "digits":
        domains = load_digit_domains(args.meta_train_styles, args.meta_test_styles, args.image_size, seed=seed)

        def pooled(named: dict[str, datasets.Dataset]) -> LabelledExamples:
            # a class is a digit in a style: style i's digit d is class 10 i + d
            parts = [d[:] for d in named.values()]
            y = torch.cat([p["labels"] + 10 * i for i, p in enumerate(parts)])
            return LabelledExamples(torch.cat([p["pixel_values"] for p in parts]), y)

        train, test = pooled(domains["seen"]), pooled(domains["unseen"])
        return {"train": train, "test": test, "train_classes": None, "test_classes": None}
    base = load_image_classification_dataset(args.dataset, image_size=args.image_size)["train"]
    first, middle, last = args.class_split
    num_classes = base.features["labels"].num_classes
    if first + middle + last != num_classes:
        raise ValueError(f"class_split={args.class_split} must add up to the {num_classes} classes of {args.dataset}.")
    images = LabelledExamples(base, torch.as_tensor(base.with_format("numpy")["labels"]))
    classes = list(range(num_classes))
    split = {"train_classes": classes[:first], "test_classes": classes[first + middle :]}
    return {"train": images, "test": images, **split}


def distribution(args: HyperDistillArguments, meta_model: str, dataset, classes, seed: int) -> TaskDistribution:
    """Tasks of `classes`; noisy training labels for Meta-Weight-Net."""
    noise = args.noise_rate if meta_model == "mwn" else 0.0
    return TaskDistribution(dataset, args.ways, classes, args.examples_per_class, label_noise=noise, seed=seed)


def meta_model(name: str, args: HyperDistillArguments, in_chans: int):
    """The model and a builder of its meta-module: ANIL (conv4, bottom three blocks), WarpGrad (conv3, two warp layers
    after each block) or Meta-Weight-Net (conv4)."""
    model = build_model("conv3" if name == "warpgrad" else "conv4", args.ways, in_chans=in_chans, width=args.width)
    if name == "anil":
        return model, lambda: attach_meta_layers(model, BOTTOM)
    if name == "warpgrad":
        return model, lambda: attach_warp_layers(model, after=BOTTOM, layers_per_site=2)
    return model, MetaWeightNet


def jvps_per_inner_optimisation(estimator: str, options: dict[str, Any], steps: int, interval: int) -> float:
    """JVPs of one inner optimisation of `steps` steps with a meta step every `interval`, from each estimator's
    definition: FO 0, 1-step 1 per call, DrMAD 2t - 1 at call t, Neumann terms + 1 per call, HyperDistill 1 per call
    plus, with `pi` fitted, the fit's 2 x horizon every `estimation_period` inner optimisations."""
    calls = steps // interval
    if estimator == "first_order":
        return 0.0
    if estimator == "t1t2":
        return float(calls)
    if estimator == "drmad":
        horizon = options.get("horizon", 100)
        return float(sum(2 * ((t - 1) % horizon + 1) - 1 for t in range(1, calls + 1)))
    if estimator == "neumann":
        return float((options.get("terms", 10) + 1) * calls)
    if options.get("pi") is not None:  # no fit
        return float(calls)
    return calls + 2 * options.get("horizon", 100) / options.get("estimation_period", 50)


class EndOfTaskMetaLoss(MetaTrainerCallback):
    """Fig. 2: the meta loss `L_val(w_T, lambda)` at the end of each inner optimisation, on the last meta batch of
    its task (recorded before the weights restart)."""

    def __init__(self, steps: int):
        self.steps, self.losses, self.last = steps, [], None

    def on_meta_step(self, args, state, control, *, trainer, problem, **kwargs):
        self.last = (trainer, problem.meta_batch)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0 and self.last is not None:
            trainer, meta_batch = self.last
            params = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
            with torch.no_grad():
                self.losses.append(float(trainer.meta_objective().meta_loss(params, meta_batch)))


def task_batches(trainer, stream: TaskStream, k: int, split: str = "train") -> list[dict[str, torch.Tensor]]:
    """Task `k`'s training batches in the stream's order (one per inner step), or its test examples as one batch."""
    items = stream.batches_of(k) if split == "train" else [stream.tests().examples_of(k)]
    keep = ("pixel_values", "labels")
    return [trainer._prepare_inputs(default_data_collator([{c: x[c] for c in keep} for x in b])) for b in items]


def hypergradient_cosines(trainer, stream: TaskStream, k: int, options: dict[str, dict], lr: float):
    """Fig. 3a: along one inner optimisation (task `k` of `stream`, from the learned initialisation), the cosine of
    each estimator's hypergradient at every step t to exact reverse mode through the t steps of that trajectory
    (`sgd_unroll` + autograd)."""
    trainer.model.train()
    leaves = [p.detach().requires_grad_(True) for p in trainer.meta_params]
    objective = trainer.meta_objective(leaves)
    batches, (meta,) = task_batches(trainer, stream, k), task_batches(trainer, stream, k, "test")
    rollout = iter(task_batches(trainer, stream, k + 1) * 100)  # HyperDistill's fit rolls out on another task

    def fresh(n: int) -> list[dict[str, torch.Tensor]]:
        return [next(rollout) for _ in range(n)]

    estimators = {name: create_estimator(est, **options.get(est, {})) for name, est in ESTIMATORS.items()}
    start = {n: v.detach().clone() for n, v in trainer.inner_optimisations.initialisation.items()}
    weights, cosines = start, {name: [] for name in estimators}
    for t in tqdm(range(1, stream.steps + 1), desc="cosines to exact RMD", leave=False):
        problem = objective.problem(batches[t - 1], meta, lr, params=weights, train_batches=fresh)
        grads = {
            name: torch.cat([g.flatten() for g in est.estimate(problem).grads]) for name, est in estimators.items()
        }
        end = sgd_unroll(start, objective.train_loss, batches[:t], [lr] * t, create_graph=True)
        exact = torch.autograd.grad(objective.meta_loss(end, meta), leaves, allow_unused=True)
        exact = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(leaves, exact)])
        for name, g in grads.items():
            cosines[name].append(float(torch.nn.functional.cosine_similarity(g, exact, 0)))
        weights = sgd_unroll(weights, objective.train_loss, [batches[t - 1]], [lr], create_graph=False)
        weights = {n: w.detach() for n, w in weights.items()}
    return cosines


def run(args: HyperDistillArguments, training_args: MetaTrainingArguments, method: str, seed: int, data):
    set_seed(seed)
    model_name, short = method.split("_", 1)
    steps = training_args.meta_inner_steps
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    train = distribution(args, model_name, data["train"], data["train_classes"], seed)
    test = distribution(args, model_name, data["test"], data["test_classes"], seed + 1000)
    processes = training_args.world_size  # tasks in parallel, one per process
    if args.num_tasks % processes:
        raise ValueError(f"num_tasks={args.num_tasks} must be a multiple of the {processes} processes.")
    stream = TaskStream(train, steps, batch, args.num_tasks, processes, training_args.per_device_train_batch_size)
    estimator = METHODS[method]
    options = {m: dict(o) for m, o in args.method_options.items()}
    if estimator in ("drmad", "hyperdistill"):
        options.setdefault(method, {}).setdefault("horizon", steps)
    interval = args.neumann_interval if estimator == "neumann" else 1
    max_steps = steps * args.num_tasks // processes
    run_args = dataclasses.replace(training_args, meta_interval=interval, max_steps=max_steps)
    in_chans = data["train"][0]["pixel_values"].shape[0]
    model, meta_module = meta_model(model_name, args, in_chans)
    recorder = EndOfTaskMetaLoss(steps)
    trainer = method_trainer(
        method, METHODS, options, run_args, seed, model=model, train_dataset=stream, meta_dataset=stream.tests(),
        meta_module=meta_module, callbacks=[recorder],
    )  # fmt: skip
    output = trainer.train()
    lr = training_args.learning_rate
    result = {
        "method": method, "meta_model": model_name, "estimator": estimator, "seed": seed,
        "test_accuracy": trainer.meta_test(TaskStream(test, steps, batch, args.test_tasks), lr)["accuracy"],
        "jvps_per_inner_optimisation": jvps_per_inner_optimisation(
            estimator, trainer.args.hypergradient_kwargs, steps, interval
        ),
        "seconds_per_step": output.metrics["train_runtime"] / max(trainer.state.global_step, 1),
        "meta_step_seconds": trainer.meta_statistics.means().get("meta_step_seconds"),
        "meta_steps_skipped": trainer.meta_statistics.skipped,
        "meta_loss_per_inner_optimisation": recorder.losses,
        "hypergradient_kwargs": trainer.args.hypergradient_kwargs,
    }  # fmt: skip
    if model_name == args.cosine_meta_model and short == "hyperdistill":
        cosine_options = {"hyperdistill": {**options[method], "seed": seed}, "drmad": {"horizon": steps},
                          "neumann": options.get(f"{model_name}_neumann", {})}  # fmt: skip
        fresh = TaskStream(train, steps, batch, args.num_tasks + 2)  # task num_tasks: not trained on
        result["hypergradient_cosines"] = hypergradient_cosines(trainer, fresh, args.num_tasks, cosine_options, lr)
    return result, trainer


def interval95(values: list[float]) -> float | None:
    """Half-width of the t 95% confidence interval of the mean (`None` for fewer than two values)."""
    from scipy import stats

    return (
        float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
        if len(values) > 1
        else None
    )


def table(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """`{meta_model: {estimator short name: {accuracy, accuracy_ci95, jvps, seconds_per_step, runs}}}`."""
    rows: dict[str, dict[str, dict[str, float | None]]] = {}
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        accuracy = [r["test_accuracy"] for r in runs]
        model_name, short = method.split("_", 1)
        rows.setdefault(model_name, {})[short] = {
            "accuracy": float(np.mean(accuracy)), "accuracy_ci95": interval95(accuracy),
            "jvps_per_inner_optimisation": runs[0]["jvps_per_inner_optimisation"],
            "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in runs])), "runs": len(runs),
        }  # fmt: skip
    return rows


def markdown(rows: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """Table 2's layout: one row per estimator; meta-test accuracy (%) +- 95% interval per meta-model; JVPs per inner
    optimisation and seconds per step per meta-model."""
    models = list(rows)
    head = ["method", *[f"{m} accuracy (%)" for m in models], *[f"{m} JVPs / s per step" for m in models]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for short in ESTIMATORS:
        cells, costs = [], []
        for m in models:
            row = rows[m].get(short)
            if row is None:
                cells.append("N/A")
                costs.append("N/A")
                continue
            ci = "" if row["accuracy_ci95"] is None else f" ± {100 * row['accuracy_ci95']:.2f}"
            cells.append(f"{100 * row['accuracy']:.2f}{ci}")
            costs.append(f"{row['jvps_per_inner_optimisation']:g} / {row['seconds_per_step']:.3f}")
        lines.append("| " + " | ".join([short, *cells, *costs]) + " |")
    return "\n".join(lines) + "\n"


def plot(args: HyperDistillArguments, results: list[dict[str, Any]], rows) -> None:
    colors = {short: f"C{i}" for i, short in enumerate(ESTIMATORS)}
    bars = {m: {s: (r["accuracy"], r["accuracy_ci95"] or 0.0) for s, r in group.items()} for m, group in rows.items()}
    plot_grouped_bars(bars, os.path.join(args.results_dir, "meta_test_accuracy.png"), "meta-test accuracy",
                      f"{args.dataset}: meta-test accuracy (mean, 95% interval)", colors)  # fmt: skip
    for model_name in rows:
        curves = {}
        for r in results:
            if r["meta_model"] == model_name and r["meta_loss_per_inner_optimisation"]:
                curves.setdefault(r["method"].split("_", 1)[1], []).append(r["meta_loss_per_inner_optimisation"])
        plot_curves(curves, os.path.join(args.results_dir, f"convergence_{model_name}.png"), "inner optimisation",
                    "meta loss L_val(w_T)", f"{model_name}: meta-training convergence (Fig. 2)", colors)  # fmt: skip
    cosines = [r["hypergradient_cosines"] for r in results if "hypergradient_cosines" in r]
    if cosines:
        curves = {short: [c[short] for c in cosines] for short in ESTIMATORS}
        plot_curves(curves, os.path.join(args.results_dir, "cosine_to_exact_rmd.png"), "inner step t",
                    "cosine to exact RMD", f"{args.cosine_meta_model}: hypergradient vs exact RMD (Fig. 3a)", colors,
                    reference=(1.0, "exact"))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args, training_args = parse_config((HyperDistillArguments, MetaTrainingArguments), argv, DEFAULT_CONFIG)
    report, is_main = run_and_report(
        args, training_args, functools.partial(load_data, args),
        lambda method, seed, data: run(args, training_args, method, seed, data), SUMMARY_KEYS,
    )  # fmt: skip
    if is_main:
        rows = table(report["runs"])
        report["table"] = rows
        cosines = [r["hypergradient_cosines"] for r in report["runs"] if "hypergradient_cosines" in r]
        if cosines:
            report["cosine_to_exact_rmd"] = {
                short: np.mean([c[short] for c in cosines], axis=0).tolist() for short in ESTIMATORS
            }
        write_results(args.results_dir, report)
        with open(os.path.join(args.results_dir, "table.md"), "w") as f:
            f.write(markdown(rows))
        plot(args, report["runs"], rows)
        print(markdown(rows))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
