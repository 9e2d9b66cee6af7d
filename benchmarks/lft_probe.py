"""EvoGrad and `t1t2_fd` against T1-T2 at fixed states of an LFT run: is EvoGrad's hypergradient for the FT layers
T1-T2's plus noise that averaging removes, and at what perturbation scale does a finite perturbation still see T1-T2's
derivative?

An LFT-EvoGrad run of `recipes/lft_fewshot.py` (its config and flags; the first backbone and seed) is trained as the
recipe trains it. At each meta step listed in `--at_steps`, with the meta step's own problem (`on_meta_step`: its
losses and batches, the same FT noise at every evaluation), the script computes T1-T2's hypergradient once,
`t1t2_fd` at each `--fd_epsilons`, and `--draws` EvoGrad estimates for each `--sigmas` x `--populations` (the
config's other EvoGrad options), then lets the run go on; the global RNG is put back, so the draws do not change
the run. Reported per state: the cosine of every single draw to T1-T2 (mean, std, undefined count) and the cosine of
the mean of the first n draws.

    python benchmarks/lft_probe.py --at_steps 0 100 250 --draws 300 --output docs/lft/probe_seed0.json -- --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))
import lft_fewshot  # noqa: E402

from metatrain.cli import parse_config  # noqa: E402
from metatrain.estimators import HypergradientProblem, create_estimator  # noqa: E402
from metatrain.trainer import MetaTrainerCallback  # noqa: E402
from metatrain.utils import cosine, flatten  # noqa: E402

CHECKPOINTS = (1, 3, 10, 30, 100, 300, 1000)  # numbers of draws at which the running mean is compared


def compare(reference: torch.Tensor, estimator, problem: HypergradientProblem, draws: int) -> dict[str, Any]:
    total, singles, by_draws = torch.zeros_like(reference), [], {}
    for n in range(1, draws + 1):
        grads = flatten(estimator.estimate(problem).grads)
        total += grads
        singles.append(cosine(grads, reference))
        if n in CHECKPOINTS or n == draws:
            by_draws[str(n)] = cosine(total / n, reference)
    defined = torch.tensor([c for c in singles if c == c], dtype=torch.float64)
    return {
        "single_draw_cosine_mean": float(defined.mean()) if len(defined) else float("nan"),
        "single_draw_cosine_std": float(defined.std()) if len(defined) > 1 else float("nan"),
        "undefined": len(singles) - len(defined),
        "cosine_of_mean_by_draws": by_draws,
    }


class Probe(MetaTrainerCallback):
    """At the listed meta steps, runs the comparison on the step's own problem (weights, losses, batches)."""

    def __init__(self, at_steps: set[int], analyse):
        self.at_steps, self.analyse, self.calls = at_steps, analyse, 0

    def on_meta_step(self, args, state, control, *, problem, **kwargs):
        if self.calls in self.at_steps:
            self.analyse(self.calls, problem)
        self.calls += 1


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    own, recipe = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--at_steps", type=int, nargs="+", default=[0, 100, 250])
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--sigmas", type=float, nargs="*", default=[], help="default: the config's sigma only")
    parser.add_argument("--populations", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--fd_epsilons", type=float, nargs="*", default=[1e-2, 1e-4, 1e-6])
    parser.add_argument("--output", default="outputs/lft_probe.json")
    cli = parser.parse_args(own)
    recipe = [*recipe, "--max_steps", str(max(cli.at_steps) + 1)]
    args, training_args = parse_config((lft_fewshot.LFTArguments, lft_fewshot.MetaTrainingArguments), recipe,
                                       lft_fewshot.DEFAULT_CONFIG)  # fmt: skip
    backbone, seed = args.backbones[0], args.seeds[0]
    data = lft_fewshot.load_data(args, training_args, backbone, seed)
    trainer, _ = lft_fewshot.build_trainer(args, training_args, backbone, "lft_evograd", seed, data)
    options = trainer.args.hypergradient_kwargs
    report: dict[str, Any] = {"backbone": backbone, "seed": seed, "evograd_options": options, "draws": cli.draws,
                              "states": []}  # fmt: skip

    def analyse(step: int, problem: HypergradientProblem) -> None:
        rng, start = torch.get_rng_state(), time.time()
        reference = flatten(create_estimator("t1t2").estimate(problem).grads)
        state: dict[str, Any] = {"step": step, "t1t2_norm": float(reference.norm())}
        for epsilon in cli.fd_epsilons:
            fd = flatten(create_estimator("t1t2_fd", epsilon=epsilon).estimate(problem).grads)
            state[f"t1t2_fd_epsilon_{epsilon:g}_cosine"] = cosine(fd, reference)
        for sigma in cli.sigmas or [options.get("sigma", 0.001)]:
            for population in cli.populations:
                estimator = create_estimator("evograd", **{**options, "sigma": sigma, "population": population})
                state[f"evograd_sigma_{sigma}_K{population}"] = compare(reference, estimator, problem, cli.draws)
        state["seconds"] = time.time() - start
        report["states"].append(state)
        print(json.dumps(state), flush=True)
        torch.set_rng_state(rng)

    trainer.add_callback(Probe(set(cli.at_steps), analyse))
    trainer.train()
    os.makedirs(os.path.dirname(os.path.abspath(cli.output)), exist_ok=True)
    with open(cli.output, "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
