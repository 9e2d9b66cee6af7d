"""Two-process meta-training, launched by `tests/test_distributed.py`:

    torchrun --standalone --nproc_per_node 2 tests/distributed_script.py --output_dir OUT --use_cpu true

Runs three short trainings (T1-T2; EvoGrad with a population per rank; EvoGrad with one shared population) with a
Meta-Weight-Net and an SGD meta-optimizer at learning rate 1 (so a meta update is minus the applied hypergradient),
and a global RNG that drifts apart between the ranks, and writes, per rank, `rank<r>.json`: for every meta step the
local (this rank's) hypergradient, the meta-parameters before and after the step, EvoGrad's noise seed, and the
final meta-parameters and model weights. Then a reverse-mode run (its state holds each rank's own training batches)
with a checkpoint in the second pass over the meta data, and a run resumed from that checkpoint (`"resume"`). Then
an online run over tasks, one per rank, with Reptile, and its resume mid-task (`"online"`).
"""

from __future__ import annotations

import argparse
import json
import os

import datasets
import torch
from torch import nn

from metatrain import MetaTrainer, MetaTrainingArguments
from metatrain.modules import MetaWeightNet

RUNS = {
    "t1t2": ("t1t2", {}),
    "evograd_per_rank": ("evograd", {"sigma": 0.05, "per_rank_noise": True}),
    "evograd_shared": ("evograd", {"sigma": 0.05, "per_rank_noise": False}),
}


def dataset(n: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")


def flat(tensors) -> list[float]:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]).tolist()


def run(name: str, estimator: str, options: dict, output_dir: str, use_cpu: bool) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    args = MetaTrainingArguments(
        output_dir=os.path.join(output_dir, name), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1,
        logging_steps=3, report_to=[], use_cpu=use_cpu, save_strategy="no", disable_tqdm=True, seed=0,
        hypergradient=estimator, hypergradient_kwargs=options, meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0},
    )  # fmt: skip
    trainer = MetaTrainer(
        model=model, args=args, train_dataset=dataset(32, 1), meta_dataset=dataset(16, 2), meta_module=MetaWeightNet()
    )
    steps: list[dict] = []
    estimate, meta_step = trainer.estimator.estimate, trainer.meta_step

    def recording_estimate(*a, **k):
        result = estimate(*a, **k)
        steps[-1]["local"] = flat(result.grads)
        return result

    def recording_meta_step(batch, *rest):
        steps.append({"before": flat(trainer.meta_params)})
        if trainer.args.process_index == 1:
            torch.rand(1)  # the ranks' global RNG streams drift apart: a shared population must not depend on them
        done = meta_step(batch, *rest)
        steps[-1]["after"] = flat(trainer.meta_params)
        return done

    trainer.estimator.estimate, trainer.meta_step = recording_estimate, recording_meta_step
    if estimator == "evograd":
        base_seed = trainer.estimator._base_seed

        def recording_seed():
            seed = base_seed()
            steps[-1]["seed"] = seed
            return seed

        trainer.estimator._base_seed = recording_seed
    trainer.train()
    return {
        "steps": steps,
        "world_size": trainer.accelerator.num_processes,
        "meta_params": flat(trainer.meta_params),
        "model": flat(trainer.model.parameters()),
        "meta_steps_skipped": trainer.meta_steps_skipped,
        "find_unused_parameters": trainer.model_wrapped.find_unused_parameters,
    }


def resume(output_dir: str, use_cpu: bool) -> dict:
    """Reverse mode through 5 steps without interruption, and resumed from its checkpoint at step 3."""

    def trainer(name: str) -> MetaTrainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        args = MetaTrainingArguments(
            output_dir=os.path.join(output_dir, name), per_device_train_batch_size=4, max_steps=5, learning_rate=0.1,
            logging_steps=5, report_to=[], use_cpu=use_cpu, save_strategy="steps", save_steps=3, disable_tqdm=True,
            seed=0, hypergradient="reverse", hypergradient_kwargs={"horizon": 3},
        )  # fmt: skip
        return MetaTrainer(
            model=model, args=args, train_dataset=dataset(32, 1), meta_dataset=dataset(16, 2),
            meta_module=MetaWeightNet(),
        )  # fmt: skip

    full = trainer("resume_full")
    full.train()
    checkpoint = os.path.join(output_dir, "resume_full", "checkpoint-3")
    own = torch.load(
        os.path.join(checkpoint, f"meta_trainer_state_{full.args.process_index}.pt"), weights_only=False
    )  # fmt: skip
    resumed = trainer("resume_resumed")
    resumed.train(resume_from_checkpoint=checkpoint)
    return {
        "checkpoint_meta_data": own["meta_data"],
        "checkpoint_history_labels": [b["labels"].tolist() for _, b, _ in own["estimator"]["history"]],
        "full": {"meta_params": flat(full.meta_params), "model": flat(full.model.parameters())},
        "resumed": {"meta_params": flat(resumed.meta_params), "model": flat(resumed.model.parameters())},
    }


def online(output_dir: str, use_cpu: bool) -> dict:
    """Two tasks in parallel (one per rank): inner optimisations of 3 steps with Reptile, 5 steps without
    interruption, recording each meta step's tasks and each restart, and resumed from the checkpoint at step 4 (in
    the second inner optimisation, where the ranks' weights differ)."""
    from metatrain.data import TaskDistribution, TaskStream
    from metatrain.trainer import MetaTrainerCallback

    class Record(MetaTrainerCallback):
        def __init__(self):
            self.tasks = []

        def on_meta_step(self, args, state, control, *, problem, **kwargs):
            tasks = (problem.train_batch["task"], problem.meta_batch["task"])
            self.tasks.append([state.global_step, *(t.unique().tolist() for t in tasks)])

    y = torch.arange(6).repeat_interleave(12)
    x = torch.randn(len(y), 6, generator=torch.Generator().manual_seed(3)) + y[:, None] * 0.3
    images = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")

    def trainer(name: str, record: Record | None = None) -> MetaTrainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        distribution = TaskDistribution(images, ways=3, examples_per_class=8, seed=0)
        stream = TaskStream(distribution, steps=3, batch_size=4, num_tasks=4, processes=2)
        args = MetaTrainingArguments(
            output_dir=os.path.join(output_dir, name), per_device_train_batch_size=4, max_steps=5, learning_rate=0.1,
            lr_scheduler_type="constant", logging_steps=5, report_to=[], use_cpu=use_cpu, save_strategy="steps",
            save_steps=4, disable_tqdm=True, seed=0, hypergradient="t1t2", meta_inner_steps=3, meta_reptile_lr=0.5,
            meta_batch_size=4,
        )  # fmt: skip
        return MetaTrainer(
            model=model, args=args, train_dataset=stream, meta_dataset=stream.tests(), meta_module=MetaWeightNet(),
            callbacks=[record] if record else None,
        )  # fmt: skip

    record, restarts = Record(), []
    full = trainer("online_full", record)
    restart = full.inner_optimisations.restart

    def recording_restart(params, average=None):
        initialisation = full.inner_optimisations.initialisation
        before, end = flat(initialisation.values()), flat(params.values())
        restart(params, average)
        restarts.append({"phi": before, "end": end, "phi_after": flat(initialisation.values())})

    full.inner_optimisations.restart = recording_restart
    full.train()
    resumed = trainer("online_resumed")
    resumed.train(resume_from_checkpoint=os.path.join(output_dir, "online_full", "checkpoint-4"))
    return {
        "tasks": record.tasks,
        "restarts": restarts,
        **{
            name: {
                "meta_params": flat(t.meta_params),
                "model": flat(t.model.parameters()),
                "initialisation": flat(t.inner_optimisations.initialisation.values()),
            }
            for name, t in (("full", full), ("resumed", resumed))
        },  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--use_cpu", default="true", choices=["true", "false"])
    cli = parser.parse_args()
    results = {
        name: run(name, estimator, options, cli.output_dir, cli.use_cpu == "true")
        for name, (estimator, options) in RUNS.items()
    }
    results["resume"] = resume(cli.output_dir, cli.use_cpu == "true")
    results["online"] = online(cli.output_dir, cli.use_cpu == "true")
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(cli.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
