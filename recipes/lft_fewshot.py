"""Learned feature-wise transformation (LFT) for cross-domain few-shot classification (EvoGrad paper Sec. 4.3, Table 4;
Tseng et al., ICLR 2020).

A metric-based few-shot classifier (timm ResNet backbone, ProtoNet, RelationNet or MatchingNet head) is trained on
episodes from several seen domains and tested on episodes from a held-out unseen domain. Methods, on the same domains,
episodes and seeds: `no_ft` (plain episodic training), `fixed_ft` (feature-wise transformation layers with the hand-set
initial values), `lft_t1t2` and `lft_evograd` (the FT layers learned by MetaTrainer: at each step a pseudo-seen episode
trains the model with the FT layers on, and a pseudo-unseen episode from another seen domain, with the FT layers off
and batch norm on its running statistics (`meta_loss_mode: eval`, as LFT's code), is the meta loss). As in LFT, every
method of a seed starts from the same backbone, pre-trained by classification on the seen domains (`pretrain_steps`,
`pretrain_domains`). Test: mean accuracy and 95% confidence interval over `test_episodes` unseen-domain episodes for
each number of shots. Results go to `<results_dir>/results.json` with `accuracy.png`, `paired_vs_no_ft.png` (each
method minus no FT on the same seed), `seconds_per_step.png` and `meta_step_memory.png` beside it.

    python recipes/lft_fewshot.py                                         # embedded digit domains, ResNet-10
    python recipes/lft_fewshot.py recipes/configs/lft_fewshot_resnet34.yaml
    python recipes/lft_fewshot.py --seeds 0 --max_steps 50 --methods no_ft lft_evograd
    accelerate launch recipes/lft_fewshot.py recipes/configs/lft_fewshot_cdfsl.yaml   # image folders on disk
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import set_seed

from metatrain import MetaTrainingArguments, PerSampleLossTrainer
from metatrain.cli import parse_config
from metatrain.data import (
    DIGIT_DOMAINS,
    DIGIT_SEEN_DOMAINS,
    DIGIT_UNSEEN_DOMAINS,
    EpisodeDataset,
    PooledDomains,
    load_digit_domains,
    load_image_folder_domain,
)
from metatrain.experiments import (
    METHOD_OPTIONS_HELP,
    GridArguments,
    check_resume,
    episode_accuracy,
    evaluate_episodes,
    method_trainer,
    methods_field,
    paired_differences,
    resumes,
    run_grid,
    summarize,
    train_and_measure,
    train_or_resume,
    write_results,
)
from metatrain.models import build_fewshot_model
from metatrain.modules import attach_feature_wise_transforms
from metatrain.plotting import plot_grouped_bars

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "lft_fewshot_digits.yaml")
METHODS = {"no_ft": None, "fixed_ft": None, "lft_t1t2": "t1t2", "lft_evograd": "evograd"}
MODEL_INPUTS = ["support", "support_labels", "query"]
COST_KEYS = ("seconds_per_step", "meta_step_seconds", "meta_step_memory_mb", "peak_cuda_memory_mb")


@dataclass
class LFTArguments(GridArguments):
    """Arguments of the LFT recipe: the domains, backbones and episodes, the pre-training and the FT layers, then the
    grid of methods and seeds."""

    METHODS: ClassVar[dict[str, str | None]] = METHODS
    methods: list[str] | None = methods_field(METHODS)

    seen_domains: list[str] = field(
        default_factory=lambda: list(DIGIT_SEEN_DOMAINS),
        metadata={
            "help": f"Training domains: names of embedded digit domains ({list(DIGIT_DOMAINS)}) or image folders with "
            "one subfolder per class."
        },
    )
    unseen_domain: str = field(
        default=DIGIT_UNSEEN_DOMAINS[0],
        metadata={"help": "The held-out test domain: an embedded digit domain or an image folder."},
    )
    image_size: int = field(default=16, metadata={"help": "Side length of the images."})
    backbones: list[str] = field(
        default_factory=lambda: ["resnet10t"],
        metadata={"help": "timm backbones, each trained with every method (resnet10t is LFT's ResNet-10)."},
    )
    head: str = field(
        default="protonet", metadata={"help": "Metric head: `protonet`, `relationnet` or `matchingnet` (with FCE)."}
    )
    n_way: int = field(default=5, metadata={"help": "Classes per episode."})
    n_shot: int = field(default=5, metadata={"help": "Support examples per class in training episodes."})
    n_query: int = field(default=16, metadata={"help": "Query examples per class in training episodes."})
    train_episodes: int = field(
        default=1000, metadata={"help": "Distinct training episodes (and pseudo-unseen episodes) per run."}
    )
    test_shots: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "Shots of the test episodes."})
    test_episodes: int = field(default=600, metadata={"help": "Unseen-domain test episodes per number of shots."})
    test_queries: int = field(default=15, metadata={"help": "Query examples per class in test episodes."})
    pretrain_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of classification pre-training of the backbone on the pooled seen domains (classes matched "
            "by name) before episodic training, as LFT starts from a pre-trained encoder; done once per seed and "
            "backbone, every method starts from the same weights. 0: train from scratch."
        },
    )
    pretrain_batch_size: int = field(default=64, metadata={"help": "Images per pre-training step."})
    pretrain_domains: list[str] | None = field(
        default=None,
        metadata={
            "help": "Seen domains (entries of `seen_domains`) to pre-train on, e.g. only miniImageNet as LFT; "
            "default: all seen domains."
        },
    )
    ft_init_gamma: float = field(default=0.3, metadata={"help": "Initial theta_gamma of the FT layers."})
    ft_init_beta: float = field(default=0.5, metadata={"help": "Initial theta_beta of the FT layers."})
    method_options: dict[str, dict[str, Any]] | str | None = field(
        default_factory=lambda: {
            "lft_evograd": {"population": 2, "sigma": "lr", "temperature": 0.05, "memory_lean": True}
        },
        metadata={
            "help": f"{METHOD_OPTIONS_HELP} Default: EvoGrad for `lft_evograd` with sigma tied to the model learning "
            "rate (EvoGrad's LFT code) and copies processed one at a time (`memory_lean`)."
        },
    )
    results_dir: str = field(default="outputs/lft_fewshot", metadata={"help": "Where results.json and plots go."})


def load_domains(args: LFTArguments, seed: int) -> tuple[dict, dict]:
    """Seen and unseen domains: embedded digit renderings, or image folders (each name an existing directory)."""
    names = [*args.seen_domains, args.unseen_domain]
    if all(name in DIGIT_DOMAINS for name in names):
        domains = load_digit_domains(args.seen_domains, [args.unseen_domain], image_size=args.image_size, seed=seed)
        return domains["seen"], domains["unseen"]
    load = lambda path: load_image_folder_domain(path, image_size=args.image_size)  # noqa: E731
    keys = [os.path.basename(os.path.normpath(path)) for path in args.seen_domains]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(
            f"seen_domains {args.seen_domains} name two domains alike ({twice}): a folder's domain is its last path "
            "component, so give each domain a folder of its own name (e.g. data/cub, not data/cub/train)."
        )
    seen = dict(zip(keys, map(load, args.seen_domains)))
    return seen, {os.path.basename(os.path.normpath(args.unseen_domain)): load(args.unseen_domain)}


def pretrain(args: LFTArguments, training_args: MetaTrainingArguments, backbone: str, seed: int, seen: dict):
    """The backbone's weights after `pretrain_steps` of classification (a linear layer on the pooled features, then
    dropped) on the pooled seen domains (or `pretrain_domains`), or `None` without pre-training."""
    if not args.pretrain_steps:
        return None
    chosen = args.pretrain_domains or args.seen_domains
    unknown = sorted(set(chosen) - set(args.seen_domains))
    if unknown:
        raise ValueError(
            f"pretrain_domains {unknown} are not seen domains: choose from seen_domains {args.seen_domains} (the "
            "unseen domain is never trained on)."
        )
    keys = dict(zip(args.seen_domains, seen))  # entry of seen_domains -> name of its loaded domain
    pooled = PooledDomains({keys[entry]: seen[keys[entry]] for entry in chosen})
    set_seed(seed)
    net = build_fewshot_model(backbone, args.head).backbone
    net.reset_classifier(len(pooled.classes))
    pretrain_args = dataclasses.replace(
        training_args,
        output_dir=os.path.join(training_args.output_dir, backbone, "pretrain", f"seed{seed}"),
        seed=seed, max_steps=args.pretrain_steps, per_device_train_batch_size=args.pretrain_batch_size,
        dataloader_drop_last=True,  # no last batch of one image, which batch norm cannot train on
        # a checkpoint path is the meta-training run's: with it, as with `true`, pre-training resumes from its own last
        # checkpoint (from step 0 it would overwrite them)
        resume_from_checkpoint="true" if resumes(training_args) else None,
    )  # fmt: skip
    train_or_resume(PerSampleLossTrainer(model=net, args=pretrain_args, train_dataset=pooled))
    net.reset_classifier(0)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def load_data(args: LFTArguments, training_args: MetaTrainingArguments, backbone: str, seed: int) -> tuple:
    """Seen and unseen domains of a seed, and the pre-trained backbone weights (or `None`) every method starts from."""
    seen, unseen = load_domains(args, seed)
    return seen, unseen, pretrain(args, training_args, backbone, seed, seen)


def build_model(args: LFTArguments, backbone: str, method: str, seed: int, pretrained: dict | None = None):
    """The few-shot model of a run (the backbone loaded with the pre-trained weights, if any) and its FT layers (or
    `None` for `no_ft`)."""
    set_seed(seed)
    model = build_fewshot_model(backbone, args.head)
    if pretrained is not None:
        model.backbone.load_state_dict(pretrained)
    transforms = None
    if method != "no_ft":
        transforms = attach_feature_wise_transforms(model.backbone, args.ft_init_gamma, args.ft_init_beta)
        transforms.requires_grad_(False)  # fixed FT: hand-set values; LFT: stepped by the meta-optimizer only
    return model, transforms


def make_episodes(args: LFTArguments, seen: dict, shots: int, queries: int, count: int, episode_seed: int, pool: dict):
    """`count` episodes drawn from the domains `pool` (the seen domains, whose episodes carry their domain id, or the
    unseen one)."""
    ids = {name: i for i, name in enumerate(seen)}
    return EpisodeDataset(pool, args.n_way, shots, queries, count, episode_seed, ids if pool is seen else None)


def build_trainer(args: LFTArguments, training_args: MetaTrainingArguments, backbone: str, method: str, seed: int,
                  data) -> tuple:  # fmt: skip
    """The trainer of one run (a `MetaTrainer` with pseudo-unseen meta episodes for the LFT methods) and its FT layers
    (or `None`)."""
    seen, _, pretrained = data
    model, transforms = build_model(args, backbone, method, seed, pretrained)
    train = make_episodes(args, seen, args.n_shot, args.n_query, args.train_episodes, seed, seen)
    meta = None
    if METHODS[method] is not None:  # pseudo-unseen episodes, for the LFT methods
        meta = make_episodes(args, seen, args.n_shot, args.n_query, args.train_episodes, seed + 1_000_003, seen)
    trainer = method_trainer(
        method, METHODS, args.method_options, training_args, seed, run_dir=(backbone,), model=model,
        compute_metrics=episode_accuracy, model_input_names=MODEL_INPUTS, train_dataset=train, meta_dataset=meta,
        meta_module=lambda: transforms,
    )  # fmt: skip
    return trainer, transforms


def run(args: LFTArguments, training_args: MetaTrainingArguments, backbone: str, method: str, seed: int, data):
    seen, unseen, _ = data
    trainer, transforms = build_trainer(args, training_args, backbone, method, seed, data)
    result = {"method": method, "backbone": backbone, "seed": seed, **train_and_measure(trainer)}
    for shots in args.test_shots:
        # the same test episodes for every method of a seed: a paired comparison
        test = make_episodes(args, seen, shots, args.test_queries, args.test_episodes, 10_000 + seed, unseen)
        metrics = evaluate_episodes(trainer.model, test)
        result[f"test_{shots}shot_accuracy"] = metrics["accuracy"]
        result[f"test_{shots}shot_ci95"] = metrics["accuracy_ci95"]
    if transforms is not None:  # the learned (or fixed) noise scales: their mean, and how far each channel moved
        with torch.no_grad():
            init = {"gamma": args.ft_init_gamma, "beta": args.ft_init_beta}
            for name in init:
                theta = [getattr(layer, f"theta_{name}") for layer in transforms.layers.values()]
                change = (torch.cat([t.flatten() for t in theta]) - init[name]).abs()
                result.setdefault("ft_mean_softplus", {})[name] = float(
                    torch.stack([F.softplus(t, beta=100).mean() for t in theta]).mean()
                )  # per layer, then over layers
                # a mean over channels hides moves of opposite sign: the per-channel distance from the initial value
                result.setdefault("ft_theta_mean_abs_change", {})[name] = float(change.mean())
                result.setdefault("ft_theta_max_abs_change", {})[name] = float(change.max())
    return result, trainer


def cost_ratios(summary: dict) -> dict:
    """T1-T2 over EvoGrad meta step time and memory per backbone (both measured in this run)."""
    ratios = {}
    for backbone, methods in summary.items():
        t1t2, evograd = methods.get("lft_t1t2"), methods.get("lft_evograd")
        if not (t1t2 and evograd) or not evograd["meta_step_seconds_mean"]:
            continue
        ratios[backbone] = {
            "meta_step_time_t1t2_over_evograd": t1t2["meta_step_seconds_mean"] / evograd["meta_step_seconds_mean"],
            "step_time_t1t2_over_evograd": t1t2["seconds_per_step_mean"] / evograd["seconds_per_step_mean"],
        }
        if evograd["meta_step_memory_mb_mean"]:
            ratios[backbone]["meta_step_memory_t1t2_over_evograd"] = (
                t1t2["meta_step_memory_mb_mean"] / evograd["meta_step_memory_mb_mean"]
            )
    return ratios


def save_plots(args: LFTArguments, summary: dict, paired: dict | None = None) -> None:
    colors = {method: f"C{i}" for i, method in enumerate(METHODS)}
    # error bars: the spread over seeds when there are several (it dwarfs one run's 95% CI), else that CI
    spread = "accuracy_std" if len(args.seeds) > 1 else "ci95_mean"
    accuracy = {
        f"{backbone}\n{shots}-shot": {
            method: (100 * s[f"test_{shots}shot_accuracy_mean"], 100 * s[f"test_{shots}shot_{spread}"])
            for method, s in methods.items()
        }
        for backbone, methods in summary.items()
        for shots in args.test_shots
    }
    unseen = os.path.basename(os.path.normpath(args.unseen_domain))
    ylabel = f"accuracy (%), std over {len(args.seeds)} seeds" if len(args.seeds) > 1 else "accuracy (%), 95% CI"
    plot_grouped_bars(accuracy, os.path.join(args.results_dir, "accuracy.png"), ylabel,
                      f"{args.n_way}-way, unseen domain {unseen!r}", colors)  # fmt: skip
    if paired and any(paired.values()):  # each method minus no FT on the same seed: the comparison that counts
        points = lambda d: (100 * d["mean"], None if d["ci95"] is None else 100 * d["ci95"])  # noqa: E731
        differences = {
            f"{backbone}\n{shots}-shot": {m: points(d[f"test_{shots}shot_accuracy"]) for m, d in methods.items()}
            for backbone, methods in paired.items()
            for shots in args.test_shots
        }  # 95% t intervals (none with one seed)
        plot_grouped_bars(differences, os.path.join(args.results_dir, "paired_vs_no_ft.png"),
                          "accuracy minus no FT (points)", f"Paired by seed, 95% CI over {len(args.seeds)} seeds",
                          colors)  # fmt: skip
    for key, name, label in (("seconds_per_step", "seconds_per_step", "seconds per training step"),
                             ("meta_step_memory_mb", "meta_step_memory", "meta step memory (MB)")):  # fmt: skip
        values = {
            backbone: {m: (s[f"{key}_mean"], s[f"{key}_std"]) for m, s in methods.items() if s[f"{key}_mean"]}
            for backbone, methods in summary.items()
        }
        plot_grouped_bars(values, os.path.join(args.results_dir, f"{name}.png"), label, "Cost per method", colors)


def main(argv: list[str] | None = None) -> dict:
    args, training_args = parse_config((LFTArguments, MetaTrainingArguments), argv, DEFAULT_CONFIG)
    check_resume(training_args, backbones=args.backbones, seeds=args.seeds, methods=args.methods)
    accuracy_keys = [f"test_{shots}shot_{kind}" for shots in args.test_shots for kind in ("accuracy", "ci95")]
    results, summary, paired, is_main = [], {}, {}, True
    for backbone in args.backbones:
        runs, is_main = run_grid(
            args.seeds, args.methods, lambda seed, b=backbone: load_data(args, training_args, b, seed),
            lambda method, seed, data, b=backbone: run(args, training_args, b, method, seed, data),
            os.path.join(args.results_dir, backbone), training_args,
        )  # fmt: skip
        results += runs
        summary[backbone] = summarize(runs, [*accuracy_keys, *COST_KEYS])
        if "no_ft" in args.methods:  # each method against no FT on the same seed (same data, episodes, init)
            paired[backbone] = paired_differences(runs, "no_ft", [k for k in accuracy_keys if "accuracy" in k])
    report = {"config": args.to_dict(), "summary": summary, "paired_vs_no_ft": paired,
              "cost_ratios": cost_ratios(summary), "runs": results}  # fmt: skip
    if is_main:
        write_results(args.results_dir, report)
        save_plots(args, summary, paired)
        print(
            json.dumps({"summary": summary, "paired_vs_no_ft": paired, "cost_ratios": report["cost_ratios"]}, indent=2)
        )
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
