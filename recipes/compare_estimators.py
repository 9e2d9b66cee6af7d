"""Every hypergradient estimator on one network: agreement with exact reverse mode and with T1-T2, cost per call.

The setting of `recipes/noisy_labels.py`: embedded digits with 40% uniform label noise, `small_cnn`, Meta-Weight-Net
as the loss weighter, SGD at 0.1, batches of 100. The network is first trained with plain SGD for a few epochs (so
the hypergradient is not the one at initialisation), then for `T - 1` more real SGD steps on the MWN-weighted loss
(`T` the longest `reverse` horizon), as MetaTrainer's base steps would take them with the weighter held fixed; the
stateful estimators (`reverse`, `hyperdistill`) are called on each of those steps, as a trainer calls them. At the
state reached, in training mode as in MetaTrainer's meta step, `metatrain.diagnostics.compare_estimators` measures
every estimator on one training batch and one meta batch, on MetaTrainer's objective (the weighting net's input held
at the current weights for the estimators that perturb the weights, EvoGrad and `t1t2_fd`): its cosine with the
exact reverse-mode hypergradient through the last `reference_horizon` real steps and with T1-T2 (the one-step
lookahead that the cheap estimators approximate), its norm ratio, its median time per call and its memory (peak
bytes saved for backward on CPU, the allocator's peak on CUDA), next to a training step (forward and backward of the
training batch) measured in the same run. Writes `results.json`, `table.md` and `estimators.png` to `--results_dir`;
about a minute on 2 idle CPU cores.

    python recipes/compare_estimators.py
    python recipes/compare_estimators.py --stochastic_repeats 500 --reference_horizon 10 --neumann_terms 1 10 50
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import torch

from metatrain.cli import parse_config
from metatrain.data import load_digits_dataset, make_noisy_label_splits
from metatrain.diagnostics import EstimatorReport, compare_estimators, synchronize
from metatrain.estimators import HypergradientEstimator, HypergradientProblem, HypergradientResult, create_estimator
from metatrain.estimators.functional import sgd_lookahead
from metatrain.experiments import write_results
from metatrain.models import build_model
from metatrain.modules import MetaWeightNet
from metatrain.objective import MetaObjective
from metatrain.profiling import MemoryMeter
from metatrain.tables import markdown_table as table
from metatrain.utils import cosine, flatten, ratio

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STOCHASTIC = ("evograd",)  # estimators whose estimate is random: `repeats` draws, cosine per draw and of the mean


@dataclass
class CompareEstimatorsArguments:
    model: str = field(default="small_cnn", metadata={"help": "`small_cnn` or another name `build_model` takes."})
    noise_rate: float = field(default=0.4, metadata={"help": "Probability of a uniformly corrupted training label."})
    num_meta_per_class: int = field(default=10, metadata={"help": "Clean meta examples per class."})
    batch_size: int = field(default=100, metadata={"help": "Training batch size, of the pretraining and the probe."})
    meta_batch_size: int = field(default=100, metadata={"help": "Meta batch size (the digits meta split has 100)."})
    lr: float = field(default=0.1, metadata={"help": "Plain SGD learning rate, also the estimators' inner step."})
    pretrain_epochs: int = field(default=5, metadata={"help": "Epochs of plain SGD before the real trajectory."})
    max_pretrain_steps: int = field(
        default=-1, metadata={"help": "Stop the pretraining after this many steps; -1 for `pretrain_epochs` only."}
    )
    reference_horizon: int = field(
        default=5, metadata={"help": "SGD steps the reference `reverse` differentiates through (horizon T)."}
    )
    reverse_horizons: list[int] = field(
        default_factory=lambda: [1, 2],
        metadata={"help": "Horizons of the other `reverse` rows (the reference is always a row); 1 is T1-T2."},
    )
    neumann_terms: list[int] = field(default_factory=lambda: [1, 10], metadata={"help": "Neumann term counts."})
    evograd_options: str = field(
        default='[{"sigma": 0.001}, {"population": 2, "sigma": 0.001, "temperature": 0.05, "rescale": true}, '
        '{"sigma": "auto"}, {"sigma": "auto", "perturb": "^fc\\\\."}, {"sigma": "auto", "population": 10}, '
        '{"sigma": "auto", "memory_lean": true}]',
        metadata={
            "help": "JSON list of EvoGrad options, one row each (population 2 and temperature 0.05 unless given; "
            "sigma 0.001 is the paper's; the second row is `recipes/noisy_labels.py`'s default)."
        },
    )
    hyperdistill_gammas: list[float] = field(
        default_factory=lambda: [0.0, 0.99], metadata={"help": "HyperDistill decays, one row each (0.99 default)."}
    )
    repeats: int = field(default=20, metadata={"help": "Timed calls per deterministic estimator (median time)."})
    stochastic_repeats: int = field(
        default=100,
        metadata={"help": "Timed calls per stochastic estimator (EvoGrad): the draws its cosines are taken over."},
    )
    device: str = field(default="auto", metadata={"help": "`cpu`, `cuda`, or `auto` (CUDA when available)."})
    seed: int = field(default=0, metadata={"help": "Seeds the data, the model, the batches and every estimator."})
    results_dir: str = field(
        default="outputs/compare_estimators", metadata={"help": "Where results.json, table.md and the plot go."}
    )


class FromState(HypergradientEstimator):
    """Starts every call of `estimator` from the state it has now: each repeat of `compare_estimators` then measures
    the call that follows the trajectory the estimator was fed (it would otherwise see every repeat as one more
    step). Reports carry `options` as their options, so that a row is labelled by what was chosen. The flattened
    hypergradient of every call is kept in `draws`, for the per-draw statistics the reports do not hold.
    """

    def __init__(self, estimator: HypergradientEstimator, options: Mapping[str, Any]):
        self._estimator = estimator
        self._state = copy.deepcopy(estimator.state_dict())
        self._draws: list[torch.Tensor] = []
        vars(self).update(options)

    @property
    def name(self) -> str:
        return self._estimator.name

    @property
    def draws(self) -> list[torch.Tensor]:
        return self._draws

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        self._estimator.load_state_dict(copy.deepcopy(self._state))
        result = self._estimator.estimate(problem)
        self._draws.append(flatten(result.grads))
        return result


class Precomputed(HypergradientEstimator):
    """Returns a result computed once, labelled `name(options)`: a reference `compare_estimators` does not redo."""

    def __init__(self, result: HypergradientResult, name: str, options: Mapping[str, Any]):
        self._result, self._name = result, name
        vars(self).update(options)

    @property
    def name(self) -> str:
        return self._name

    @property
    def result(self) -> HypergradientResult:
        return self._result

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        return self._result


def estimator_specs(args: CompareEstimatorsArguments) -> list[tuple[str, dict[str, Any]]]:
    """The rows: `(name, options)` for every estimator and option set compared."""
    evograd = json.loads(args.evograd_options)
    if not isinstance(evograd, list) or not all(isinstance(o, dict) for o in evograd):
        raise ValueError(f"`evograd_options` must be a JSON list of option dicts, got {args.evograd_options!r}.")
    horizons = sorted({*args.reverse_horizons, args.reference_horizon})
    return [
        ("t1t2", {}),
        ("t1t2_fd", {}),
        ("first_order", {}),
        *[("neumann", {"terms": j}) for j in args.neumann_terms],
        *[("evograd", options) for options in evograd],
        *[("hyperdistill", {"gamma": gamma}) for gamma in args.hyperdistill_gammas],
        *[("reverse", {"horizon": h}) for h in horizons],
    ]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
    """Shuffled full batches `(x, y)`, epoch after epoch."""
    while True:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield x[rows], y[rows]


def sgd_step(theta: dict[str, torch.Tensor], loss_fn: Callable, batch: Any, lr: float) -> dict[str, torch.Tensor]:
    """One plain SGD step on a weight dict (the step `reverse` replays), detached."""
    return {k: p.detach() for k, p in sgd_lookahead(theta, loss_fn, batch, lr, create_graph=False).items()}


def measure_training_step(
    theta: dict[str, torch.Tensor], train_loss: Callable, batch: Any, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds and memory of a forward and backward of the (weighted) training loss: the cost of a training
    step without its optimizer update, timed as `compare_estimators` times an estimator (one warm-up call)."""

    def step() -> None:
        weights = {k: p.detach().requires_grad_(True) for k, p in theta.items()}
        torch.autograd.grad(train_loss(weights, batch), list(weights.values()))

    step()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    with MemoryMeter(device) as meter:
        step()
    return {"seconds": statistics.median(seconds), "memory_bytes": int(meter.peak_bytes), "memory_kind": meter.kind}


def _clean(value: Any) -> Any:
    """NaN as `None`, for `json.dumps(..., allow_nan=False)`."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(rows: list[dict[str, Any]], step: dict[str, float], reference: str) -> str:
    """One line per row, and the training step first; memory in MiB."""
    header = [
        "estimator", f"cos vs {reference}", "cos of mean vs ref", "abs cos vs ref", "draws cos > 0", "cos vs t1t2",
        "cos of mean vs t1t2",
        "norm / ref", "norm of mean / ref", "ms / call", "x t1t2", "x train step", "memory (MiB)", "x t1t2",
        "x train step",
    ]  # fmt: skip
    lines = [["training step (forward + backward, no hypergradient)", *[""] * 8, f"{step['seconds'] * 1e3:.1f}",
              "", "1", f"{step['memory_bytes'] / 2**20:.3g}", "", "1"]]  # fmt: skip
    for r in rows:
        cells = [
            f"`{r['label']}`",
            _fmt(r["cosine_reverse"], ".4f"),
            _fmt(r["cosine_of_mean_reverse"], ".4f"),
            _fmt(r["abs_cosine_reverse"], ".3f") if r["stochastic"] else "",
            f"{round(r['share_positive_reverse'] * r['draws'])} / {r['draws']}" if r["stochastic"] else "",
            _fmt(r["cosine_t1t2"], ".4f"),
            _fmt(r["cosine_of_mean_t1t2"], ".4f"),
            _fmt(r["norm_ratio_reverse"], ".3g"),
            _fmt(r["norm_ratio_of_mean_reverse"], ".3g"),
            f"{r['seconds'] * 1e3:.1f}",
            _fmt(r["seconds_vs_t1t2"], ".2f"),
            _fmt(r["seconds_vs_train_step"], ".2f"),
            f"{r['memory_bytes'] / 2**20:.3g}",
            _fmt(r["memory_vs_t1t2"], ".2f"),
            _fmt(r["memory_vs_train_step"], ".2f"),
        ]
        lines.append(cells)
    return table(header, lines, right_from=1)


def _values(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)


def plot(rows: list[dict[str, Any]], step: dict[str, float], reference: str, path: str, title: str) -> None:
    """Three panels, one bar row per estimator: cosine with each reference (bar: mean over the calls, diamond: cosine
    of the mean), time per call and memory, both on a log axis with the training step and T1-T2 marked."""
    y = np.arange(len(rows))
    t1t2 = next(r for r in rows if r["label"] == "t1t2")
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.38 * len(rows) + 2.2), sharey=True)
    ax = axes[0]
    for offset, key, name, color in ((-0.2, "reverse", reference, "C0"), (0.2, "t1t2", "t1t2", "C1")):
        ax.barh(y + offset, np.nan_to_num(_values(rows, f"cosine_{key}")), height=0.4, color=color,
                label=f"vs {name}: mean over calls")  # fmt: skip
        ax.scatter(_values(rows, f"cosine_of_mean_{key}"), y + offset, marker="D", s=14, color="black", zorder=3,
                   label="cosine of the mean of the calls" if key == "t1t2" else None)  # fmt: skip
    for i, r in enumerate(rows):
        if r["cosine_reverse"] is None:
            ax.text(0.02, i, "zero hypergradient: no direction", va="center", fontsize=7)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlim(min(-0.1, ax.get_xlim()[0]), 1.05)
    ax.set_xlabel("cosine with the reference")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2)
    for ax, key, unit, scale, reference_value in (
        (axes[1], "seconds", "ms per call", 1e3, step["seconds"]),
        (axes[2], "memory_bytes", f"MiB ({step['memory_kind'].replace('_', ' ')})", 2**-20, step["memory_bytes"]),
    ):
        values = np.array([r[key] * scale for r in rows], dtype=float)
        ax.barh(y, np.where(values > 0, values, np.nan), height=0.6, color="C2")
        ax.axvline(reference_value * scale, color="C3", ls="--", lw=1, label="training step (forward + backward)")
        ax.axvline(t1t2[key] * scale, color="C1", ls=":", lw=1.5, label="t1t2")
        ax.set_xscale("log")
        for i, v in enumerate(values):
            if v == 0:
                ax.text(ax.get_xlim()[0], i, " 0", va="center", fontsize=7)
        ax.set_xlabel(unit)
        ax.grid(axis="x", alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2)
    axes[0].set_yticks(y, [r["label"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_config((CompareEstimatorsArguments,), argv)
    started = time.perf_counter()
    for option in ("reference_horizon", "repeats", "stochastic_repeats"):
        if getattr(args, option) < 1:
            raise ValueError(f"`{option}` must be >= 1, got {option}={getattr(args, option)}.")
    specs = estimator_specs(args)
    estimators = [create_estimator(name, **options) for name, options in specs]  # a typo fails before any work
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    # data, model and meta-module, seeded
    torch.manual_seed(args.seed)
    splits = make_noisy_label_splits(
        load_digits_dataset(seed=args.seed), 10, "uniform", args.noise_rate, args.num_meta_per_class, seed=args.seed
    )
    train, meta = splits["train"][:], splits["meta"][:]
    x, y = train["pixel_values"].to(device), train["labels"].to(device)
    generator = torch.Generator().manual_seed(args.seed)
    rows = torch.randperm(len(meta["labels"]), generator=generator)[: args.meta_batch_size]
    meta_batch = (meta["pixel_values"][rows].to(device), meta["labels"][rows].to(device))
    model = build_model(args.model, num_classes=10, in_chans=x.shape[1]).to(device).train()  # as MetaTrainer
    weighter = MetaWeightNet().to(device)
    # the losses of MetaTrainer's meta step: the MWN-weighted training loss and the plain meta loss; the plain
    # training loss without the weighter, for the pretraining
    objective, plain = MetaObjective(model, weighter), MetaObjective(model)
    meta_params, train_loss, meta_loss = objective.meta_params, objective.train_loss, objective.meta_loss
    theta = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    # plain SGD for a few epochs, then the real steps the stateful estimators see, on the MWN-weighted loss
    stream = batches(x, y, args.batch_size, generator)
    steps_per_epoch = len(y) // args.batch_size
    pretrain_steps = args.pretrain_epochs * steps_per_epoch
    if args.max_pretrain_steps >= 0:
        pretrain_steps = min(pretrain_steps, args.max_pretrain_steps)
    for _ in range(pretrain_steps):
        theta = sgd_step(theta, plain.train_loss, next(stream), args.lr)
    # fresh training batches for HyperDistill's fit of theta, in an order of their own
    rollout = batches(x, y, args.batch_size, torch.Generator().manual_seed(args.seed + 1))

    def fresh(n: int) -> list[tuple]:
        return [next(rollout) for _ in range(n)]

    trajectory = max(options["horizon"] for name, options in specs if name == "reverse") - 1
    for _ in range(trajectory):
        batch = next(stream)
        for estimator in estimators:
            if estimator.stateful:
                estimator.estimate(objective.problem(batch, meta_batch, args.lr, params=theta, train_batches=fresh))
        theta = sgd_step(theta, train_loss, batch, args.lr)
    train_batch = next(stream)
    with torch.no_grad():
        state = {
            "pretrain_steps": pretrain_steps,
            "trajectory_steps": trajectory,
            "train_loss": float(plain.train_loss(theta, train_batch)),
            "weighted_train_loss": float(train_loss(theta, train_batch)),
            "meta_loss": float(meta_loss(theta, meta_batch)),
        }

    # the two references, computed once; the problem holds the weighting net's input at `theta` for the estimators
    # that perturb the weights, as MetaTrainer's meta step does
    problem = objective.problem(train_batch, meta_batch, args.lr, params=theta, train_batches=fresh)
    reference_options = {"horizon": args.reference_horizon}
    reference_at = specs.index(("reverse", reference_options))
    measured = [FromState(estimator, options) for estimator, (_, options) in zip(estimators, specs)]
    references = {
        "reverse": Precomputed(measured[reference_at].estimate(problem), "reverse", reference_options),
        "t1t2": Precomputed(create_estimator("t1t2").estimate(problem), "t1t2", {}),
    }

    vectors = {key: flatten(reference.result.grads) for key, reference in references.items()}
    results = []
    for (name, options), estimator in zip(specs, measured):
        # the same seed against both references: a stochastic estimator is compared on the same draws with each
        reports: dict[str, EstimatorReport] = {}
        for key, reference in references.items():
            torch.manual_seed(args.seed)
            estimator.draws.clear()
            repeats = args.stochastic_repeats if name in STOCHASTIC else args.repeats if key == "reverse" else 1
            (reports[key],) = compare_estimators(
                problem, estimators=[estimator], reference=reference, repeats=repeats, warmup=1
            )
            if key == "reverse":
                draws = list(estimator.draws)  # warm-up, timed and memory calls: repeats + 2 draws
        vs_reverse, vs_t1t2 = reports["reverse"], reports["t1t2"]
        per_draw = {key: [cosine(d, vector) for d in draws] for key, vector in vectors.items()}
        results.append(
            {
                "label": vs_reverse.label,
                "name": name,
                "options": options,
                "stochastic": name in STOCHASTIC,
                **{f"{k}_{key}": getattr(reports[key], k) for key in reports for k in ("cosine", "cosine_of_mean")},
                **{f"abs_cosine_{key}": statistics.fmean(abs(c) for c in cos) for key, cos in per_draw.items()},
                **{f"share_positive_{key}": sum(c > 0 for c in cos) / len(cos) for key, cos in per_draw.items()},
                "draws": len(draws),
                **{
                    f"{k}_{key}": getattr(reports[key], k)
                    for key in reports
                    for k in ("norm_ratio", "norm_ratio_of_mean")
                },
                "norm": vs_reverse.norm,
                "seconds": vs_reverse.seconds,
                "memory_bytes": vs_reverse.memory_bytes,
                "memory_kind": vs_reverse.memory_kind,
                "repeats": vs_reverse.repeats,
                "meta_loss": vs_reverse.meta_loss,
            }
        )
    # measured last, once the process is warm like it is for the estimators
    step = measure_training_step(theta, train_loss, train_batch, args.repeats, device)
    t1t2 = next(r for r in results if r["label"] == "t1t2")
    for r in results:
        for key in ("seconds", "memory_bytes"):
            short = "seconds" if key == "seconds" else "memory"
            r[f"{short}_vs_t1t2"] = ratio(r[key], t1t2[key])
            r[f"{short}_vs_train_step"] = ratio(r[key], step[key])
    results = [{k: _clean(v) for k, v in r.items()} for r in results]

    report = {
        "config": dataclasses.asdict(args),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "num_weights": sum(p.numel() for p in theta.values()),
        "num_meta_params": sum(p.numel() for p in meta_params),
        "state": state,
        "references": {
            "reverse": vs_reverse.reference,
            "reverse_norm": vs_reverse.reference_norm,
            "t1t2_norm": vs_t1t2.reference_norm,
        },  # fmt: skip
        "training_step": step,
        "estimators": results,
    }
    os.makedirs(args.results_dir, exist_ok=True)
    reference_label = vs_reverse.reference
    table = markdown_table(results, step, reference_label)
    with open(os.path.join(args.results_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    title = (
        f"Hypergradient estimators, {args.model} on digits ({args.noise_rate:.0%} noise) + Meta-Weight-Net, "
        f"after {pretrain_steps} + {trajectory} SGD steps; batch {args.batch_size}, lr {args.lr}, {device}"
    )
    plot(results, step, reference_label, os.path.join(args.results_dir, "estimators.png"), title)
    report["seconds_total"] = time.perf_counter() - started
    write_results(args.results_dir, report, allow_nan=False)
    print(table)
    print(f"{report['seconds_total']:.0f} s in all")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
