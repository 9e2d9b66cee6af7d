"""EvoGrad on a 1-D problem: its hypergradient against the closed form, and (x, lambda) trajectories.

EvoGrad paper Sec. 4.1, Figures 2 and 3: train loss `f_T(x, lambda) = (x - 1)^2 + lambda x^2`, validation loss
`f_V(x) = (x - 0.5)^2`, EvoGrad with sigma 1, temperature 0.5 and Gaussian noise. Writes `results.json`,
`figure2_hypergradient.png` and `figure3_trajectories.png` to `--results_dir`; runs in seconds on a CPU.

    python recipes/toy_1d.py                          # the paper's settings, Figure 2 at x = x*(lambda)
    python recipes/toy_1d.py --evaluate_at random     # Figure 2 as the paper ran it, at x ~ N(0, 1)

Where Figure 2 evaluates EvoGrad. The closed form `g(lambda) = (lambda - 1) / (lambda + 1)^3` is the hypergradient of
the validation loss at the inner optimum `x*(lambda) = 1 / (1 + lambda)` (the minimiser of `f_T`):
`d f_V(x*) / d lambda = 2 (x* - 0.5) dx*/dlambda = 2 (x* - 0.5) (-x*^2) = g(lambda)`, whatever the current `x`. The
paper instead evaluates EvoGrad "with random choice of x" (`x ~ N(0, 1)` in the official notebook), where its
evolutionary step from `x` estimates another quantity: for `K -> infinity` the population's softmax-weighted mean is
that of `N(x, sigma^2) exp(-f_T / tau)`, and averaged over `x ~ N(0, 1)` its hypergradient is (sigma 1, tau 0.5)
`8 (8 lambda - 7) / (5 + 4 lambda)^3`, which crosses zero at `lambda = 7/8`, not 1. At `x = x*(lambda)` that mean
stays at `x*` and the limit is `c g(lambda)` with `c = 2 sigma^2 (1 + lambda) / (tau + 2 sigma^2 (1 + lambda))`
(0.81 to 0.92 here): the same quantity up to a mild shrinkage. So `--evaluate_at optimum` (default) compares like
with like; `--evaluate_at random` is the paper's setting.

Figure 3 follows the paper's online setting, where EvoGrad sees the current `x`, not `x*`; see [`sgd_step`].
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import matplotlib
import numpy as np
import torch

from metatrain.cli import parse_config
from metatrain.estimators import HypergradientEstimator, HypergradientProblem, create_estimator
from metatrain.experiments import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EVALUATE_AT = ("optimum", "random")


@dataclass
class Toy1DArguments:
    populations: list[int] = field(
        default_factory=lambda: [2, 10, 100], metadata={"help": "EvoGrad population sizes K, one panel each."}
    )
    sigma: float = field(default=1.0, metadata={"help": "EvoGrad perturbation scale."})
    temperature: float = field(default=0.5, metadata={"help": "EvoGrad softmax temperature tau."})
    noise: str = field(default="gaussian", metadata={"help": "EvoGrad noise: `gaussian` (the paper's) or `sign`."})
    repetitions: int = field(default=100, metadata={"help": "EvoGrad estimates per lambda in Figure 2."})
    lambda_min: float = field(default=0.1, metadata={"help": "Smallest lambda of the Figure 2 grid."})
    lambda_max: float = field(default=2.0, metadata={"help": "Largest lambda of the Figure 2 grid."})
    grid_size: int = field(default=25, metadata={"help": "Number of lambda values in the Figure 2 grid."})
    evaluate_at: str = field(
        default="optimum",
        metadata={
            "help": "Where Figure 2 evaluates EvoGrad: `optimum` (x = 1 / (1 + lambda), where the closed form is "
            "defined) or `random` (x ~ N(0, 1), the paper's setting); see the module docstring."
        },
    )
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate of both x and lambda in Figure 3."})
    num_steps: int = field(default=5, metadata={"help": "SGD steps per trajectory in Figure 3."})
    start_x: list[float] = field(
        default_factory=lambda: [-1.8, -0.9, 0.9, 1.3, 1.5], metadata={"help": "Starting x of each trajectory."}
    )
    start_lambda: list[float] = field(
        default_factory=lambda: [0.2, 1.2, 0.8, 0.2, 1.7], metadata={"help": "Starting lambda of each trajectory."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds torch before each figure."})
    results_dir: str = field(default="outputs/toy_1d", metadata={"help": "Where results.json and the plots go."})


def train_loss(x, lam):
    return (x - 1) ** 2 + lam * x**2


def val_loss(x):
    return (x - 0.5) ** 2


def inner_optimum(lam):
    """`x*(lambda) = argmin_x f_T(x, lambda)`."""
    return 1 / (1 + lam)


def closed_form_hypergradient(lam):
    """`d f_V(x*(lambda)) / d lambda`, the paper's ground truth."""
    return (lam - 1) / (lam + 1) ** 3


def evograd_hypergradient(estimator: HypergradientEstimator, x: float, lam: float) -> float:
    """EvoGrad's estimate of `d f_V / d lambda` from the point `x`."""
    lam = torch.tensor(float(lam), dtype=torch.float64, requires_grad=True)
    problem = HypergradientProblem(
        params={"x": torch.tensor(float(x), dtype=torch.float64)},
        meta_params=[lam],
        train_loss=lambda params, _: train_loss(params["x"], lam),
        meta_loss=lambda params, _: val_loss(params["x"]),
    )
    (grad,) = estimator.estimate(problem).grads
    return grad.item()


def estimate_on_grid(estimator: HypergradientEstimator, lambdas: np.ndarray, args: Toy1DArguments) -> np.ndarray:
    """`args.repetitions` EvoGrad estimates per lambda, shaped `(len(lambdas), repetitions)`, each from
    `x = x*(lambda)` or a fresh `x ~ N(0, 1)` as `args.evaluate_at` says."""

    def start(lam: float) -> float:
        return inner_optimum(lam) if args.evaluate_at == "optimum" else torch.randn(()).item()

    return np.array([[evograd_hypergradient(estimator, start(lam), lam) for _ in range(args.repetitions)]
                     for lam in lambdas])  # fmt: skip


def sgd_step(x: float, lam: float, hypergradient: Callable[[float, float], float], lr: float) -> tuple[float, float]:
    """One online step of Figure 3, as in the paper's notebook: `x <- x - lr df_T/dx (x, lambda)`, then
    `lambda <- lambda - lr hypergradient(x, lambda)` at the updated `x`."""
    x = x - lr * (2 * (x - 1) + 2 * lam * x)
    return x, lam - lr * hypergradient(x, lam)


def trajectory(
    x: float, lam: float, hypergradient: Callable[[float, float], float], args: Toy1DArguments
) -> dict[str, list[float]]:
    xs, lams = [x], [lam]
    for _ in range(args.num_steps):
        x, lam = sgd_step(x, lam, hypergradient, args.lr)
        xs.append(x)
        lams.append(lam)
    return {"x": xs, "lambda": lams}


def plot_hypergradients(
    lambdas: np.ndarray, closed_form: np.ndarray, estimates: dict[int, np.ndarray], path: str, evaluate_at: str
) -> None:
    fig, axes = plt.subplots(1, len(estimates), figsize=(4 * len(estimates), 3.3), squeeze=False)
    where = "x = 1/(1+λ)" if evaluate_at == "optimum" else "x ~ N(0, 1)"
    for ax, (k, values) in zip(axes[0], estimates.items()):
        mean, std = values.mean(1), values.std(1)
        ax.plot(lambdas, mean, color="C0", label="EvoGrad (mean ± std)")
        ax.fill_between(lambdas, mean - std, mean + std, color="C0", alpha=0.25)
        ax.plot(lambdas, closed_form, color="C3", ls="--", label="closed form")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"Population K = {k}")
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("∂f_V / ∂λ")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"EvoGrad vs closed-form hypergradient, evaluated at {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_trajectories(ground_truth: list[dict], evograd: dict[int, list[dict]], path: str, num_steps: int) -> None:
    every = ground_truth + [t for runs in evograd.values() for t in runs]
    xs = [x for t in every for x in t["x"]] + [-2.0, 2.0]
    lams = [lam for t in every for lam in t["lambda"]] + [0.0, 2.0]
    extent = [min(xs) - 0.1, max(xs) + 0.1, min(lams) - 0.1, max(lams) + 0.1]
    background = val_loss(np.linspace(extent[0], extent[1], 200))[None, :].repeat(2, 0)
    fig, axes = plt.subplots(1, len(evograd), figsize=(4 * len(evograd), 3.6), squeeze=False, sharey=True)
    for ax, (k, runs) in zip(axes[0], evograd.items()):
        ax.imshow(background, cmap="Greens", extent=extent, origin="lower", aspect="auto")
        for name, color, style, paths in (("ground truth", "C3", "-", ground_truth), ("EvoGrad", "C0", "--", runs)):
            for i, t in enumerate(paths):
                ax.plot(t["x"], t["lambda"], color=color, ls=style, label=name if i == 0 else None)
                ax.scatter(t["x"][0], t["lambda"][0], color=color, marker="o", s=30, alpha=0.7)
                ax.scatter(t["x"][-1], t["lambda"][-1], color=color, marker="x", s=40)
        ax.set_title(f"Population K = {k}")
        ax.set_xlabel("x")
    axes[0, 0].set_ylabel("λ")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"(x, λ) for {num_steps} SGD steps from ○ to ×; shading: validation loss (x - 0.5)², light = low", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_config((Toy1DArguments,), argv)
    if args.evaluate_at not in EVALUATE_AT:
        raise ValueError(f"`evaluate_at` must be one of {EVALUATE_AT}, got {args.evaluate_at!r}.")
    if len(args.start_x) != len(args.start_lambda):
        raise ValueError(f"`start_x` and `start_lambda` differ in length: {args.start_x} vs {args.start_lambda}.")
    estimators = {
        k: create_estimator("evograd", population=k, sigma=args.sigma, temperature=args.temperature, noise=args.noise)
        for k in args.populations
    }

    # Figure 2: repeated EvoGrad estimates on a grid of lambda.
    lambdas = np.linspace(args.lambda_min, args.lambda_max, args.grid_size)
    closed_form = closed_form_hypergradient(lambdas)
    torch.manual_seed(args.seed)
    estimates = {k: estimate_on_grid(estimator, lambdas, args) for k, estimator in estimators.items()}
    summary = {
        str(k): {
            "pearson": float(np.corrcoef(values.mean(1), closed_form)[0, 1]),
            "mean_abs_error": float(np.abs(values.mean(1) - closed_form).mean()),
        }
        for k, values in estimates.items()
    }

    # Figure 3: both methods take the same x step; only the lambda step differs. The ground truth follows the true
    # hypergradient at its own lambda: the official notebook evaluated it at EvoGrad's lambda (`gt_grad(ll)`), which
    # tied its "ground truth" trajectory to EvoGrad's noise.
    torch.manual_seed(args.seed)
    starts = list(zip(args.start_x, args.start_lambda))
    ground_truth = [trajectory(x, lam, lambda x, lam: closed_form_hypergradient(lam), args) for x, lam in starts]
    evograd = {
        k: [trajectory(x, lam, partial(evograd_hypergradient, estimator), args) for x, lam in starts]
        for k, estimator in estimators.items()
    }

    report = {
        "config": dataclasses.asdict(args),
        "summary": summary,
        "hypergradient": {
            "lambda": lambdas.tolist(),
            "closed_form": closed_form.tolist(),
            "evograd_mean": {str(k): v.mean(1).tolist() for k, v in estimates.items()},
            "evograd_std": {str(k): v.std(1).tolist() for k, v in estimates.items()},
        },
        "trajectories": {"ground_truth": ground_truth, "evograd": {str(k): v for k, v in evograd.items()}},
    }
    write_results(args.results_dir, report)
    plot_hypergradients(
        lambdas, closed_form, estimates, os.path.join(args.results_dir, "figure2_hypergradient.png"), args.evaluate_at
    )
    plot_trajectories(
        ground_truth, evograd, os.path.join(args.results_dir, "figure3_trajectories.png"), args.num_steps
    )
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
