"""Agreement of EvoGrad's forward-only meta step (`benchmarks/forward_only.py`) with the standard one, on the
benchmark's workloads: for each of `--draws` noise seeds, both estimate the hypergradient of one `MetaTrainer` meta
step on the same training and meta batch from the same noise; reports the cosine and norm ratio of forward-only to
standard (mean, min) and writes `forward_agreement.json`.

    python benchmarks/evograd_forward_agreement.py --output_dir outputs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

from metatrain import MetaTrainer, MetaTrainingArguments
from metatrain.models import build_model
from metatrain.modules import MetaWeightNet, attach_feature_wise_transforms
from metatrain.trainer import MetaTrainerCallback
from metatrain.utils import cosine, flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forward_only  # noqa: E402
from _data import RandomImages  # noqa: E402

forward_only.register()


class Capture(MetaTrainerCallback):
    """Keeps the hypergradient of every meta step."""

    def __init__(self):
        self.results = []

    def on_meta_step(self, args, state, control, *, result, **kwargs):
        self.results.append(result)


def agreement(workload: str, size, sigma: float, draws: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    if workload == "mwn":
        model = build_model("cifar_resnet32", num_classes=10, width=size)
        meta_module = MetaWeightNet()
    else:
        model = build_model(size, num_classes=10, zero_init_last=False)
        meta_module = attach_feature_wise_transforms(model)
    grads = {}
    for use_forward in (False, True):
        args = MetaTrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, use_cpu=True, report_to=[],
            optim="sgd", learning_rate=0.1, hypergradient="evograd_forward" if use_forward else "evograd",
            hypergradient_kwargs={"sigma": sigma},
        )  # fmt: skip
        trainer = MetaTrainer(
            model=model, args=args, train_dataset=RandomImages(batch_size, 1),
            meta_dataset=RandomImages(batch_size, 2), meta_module=meta_module,
        )  # fmt: skip
        trainer.create_optimizer()
        batch = {k: v.to(trainer.args.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}
        captured = Capture()
        trainer.add_callback(captured)
        state = {k: v.clone() for k, v in meta_module.state_dict().items()}
        for draw in range(draws):
            # the meta step seeds its noise by the step: another step's noise, the same for both estimators
            trainer.state.global_step = 100 + draw
            trainer.meta_batches.rewind()
            trainer.meta_step(batch)
            meta_module.load_state_dict(state)  # every draw at the same meta-parameters
        grads[use_forward] = [flatten(r.grads) for r in captured.results]
    cosines = [cosine(f, s) for f, s in zip(grads[True], grads[False])]
    ratios = [float(f.norm() / s.norm()) for f, s in zip(grads[True], grads[False])]
    return {
        "workload": workload, "size": size, "sigma": sigma, "draws": draws,
        "cosine_mean": statistics.mean(cosines), "cosine_min": min(cosines),
        "norm_ratio_mean": statistics.mean(ratios), "norm_ratio_min": min(ratios), "norm_ratio_max": max(ratios),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/benchmarks")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    rows = [
        agreement("mwn", 1, 0.001, cli.draws, cli.batch_size),
        agreement("mwn", 1, 0.01, cli.draws, cli.batch_size),
        agreement("lft", "resnet10t", 0.001, cli.draws, cli.batch_size),
    ]
    os.makedirs(cli.output_dir, exist_ok=True)
    with open(os.path.join(cli.output_dir, "forward_agreement.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| workload | sigma | draws | cosine mean (min) | norm ratio mean (min, max) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        size = f"ResNet-32 width {r['size']}" if r["workload"] == "mwn" else r["size"]
        print(
            f"| {r['workload']}, {size} | {r['sigma']} | {r['draws']} | {r['cosine_mean']:.4f} "
            f"({r['cosine_min']:.4f}) | {r['norm_ratio_mean']:.3f} ({r['norm_ratio_min']:.3f}, "
            f"{r['norm_ratio_max']:.3f}) |"
        )


if __name__ == "__main__":
    main()
