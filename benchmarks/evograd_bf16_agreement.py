"""EvoGrad under bf16 autocast against fp32, draw by draw: `--draws` meta steps of `MetaTrainer` (same model,
training and meta batch, each with another step's noise, the same in both precisions), at the paper's sigma and
temperature and at `MetaTrainer`'s mixed-precision default. Reports each bf16 draw's cosine and norm against the
fp32 draw on the same noise, the cosine of the two means, and each mean's cosine to fp32 T1-T2. Writes
`evograd_bf16.json`.

    python benchmarks/evograd_bf16_agreement.py --output_dir docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from metatrain import MetaTrainer, MetaTrainingArguments
from metatrain.models import build_model
from metatrain.modules import MetaWeightNet
from metatrain.training_args import MIXED_PRECISION_EVOGRAD
from metatrain.utils import cosine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import RandomImages  # noqa: E402


def hypergradients(estimator: str, options: dict, bf16: bool, draws: int, batch_size: int, width: int):
    """The meta-optimizer's update (SGD at learning rate 1: minus the hypergradient) of `draws` meta steps taken at
    the same weights and batches, each with the noise of another step."""
    torch.manual_seed(0)
    args = MetaTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, use_cpu=True, report_to=[],
        optim="sgd", learning_rate=0.1, bf16=bf16, hypergradient=estimator, hypergradient_kwargs=options,
        meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0},
    )  # fmt: skip
    trainer = MetaTrainer(
        model=build_model("cifar_resnet32", num_classes=10, width=width), args=args,
        train_dataset=RandomImages(batch_size, 1), meta_dataset=RandomImages(batch_size, 2),
        meta_module=MetaWeightNet(),
    )  # fmt: skip
    trainer.create_optimizer()
    batch = {k: v.to(trainer.args.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}
    start = [p.detach().clone() for p in trainer.meta_params]
    rows = []
    for draw in range(draws):
        trainer.state.global_step = draw  # another step's noise, at the same weights and meta batch
        trainer.meta_batches.rewind()
        assert trainer.meta_step(batch)
        rows.append(torch.cat([(s - p.detach()).flatten() for s, p in zip(start, trainer.meta_params)]))
        for p, s in zip(trainer.meta_params, start):
            p.data.copy_(s)
    return torch.stack(rows).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/benchmarks")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    common = dict(draws=cli.draws, batch_size=cli.batch_size, width=cli.width)
    t1t2 = hypergradients("t1t2", {}, False, **{**common, "draws": 1})[0]
    rows = []
    for setting, options in [("paper's sigma 0.001, temperature 0.05", {"sigma": 0.001, "temperature": 0.05}),
                             (f"mixed-precision default {MIXED_PRECISION_EVOGRAD}", {})]:  # fmt: skip
        fp32 = hypergradients("evograd", options or MIXED_PRECISION_EVOGRAD, False, **common)
        bf16 = hypergradients("evograd", options, True, **common)  # the same steps: the same noise as fp32's
        paired = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
        rows.append({
            "setting": setting, "draws": cli.draws, "batch_size": cli.batch_size, "width": cli.width,
            "per_draw_cosine_bf16_to_fp32_mean": float(paired.mean()),
            "per_draw_cosine_bf16_to_fp32_min": float(paired.min()),
            "per_draw_norm_ratio_bf16_to_fp32": float(bf16.norm(dim=1).mean() / fp32.norm(dim=1).mean()),
            "cosine_of_means_bf16_to_fp32": cosine(bf16.mean(0), fp32.mean(0)),
            "cosine_of_mean_to_t1t2_fp32": cosine(fp32.mean(0), t1t2),
            "cosine_of_mean_to_t1t2_bf16": cosine(bf16.mean(0), t1t2),
        })  # fmt: skip
        print(rows[-1], flush=True)
    os.makedirs(cli.output_dir, exist_ok=True)
    with open(os.path.join(cli.output_dir, "evograd_bf16.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
