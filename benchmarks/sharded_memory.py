"""Per-process memory and time of a training step under FSDP2 (`fully_shard`) and under DDP, plain and with the meta
step of EvoGrad or `t1t2_fd` (Meta-Weight-Net), in two processes:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/sharded_memory.py

The model is an MLP of `--depth` square layers of `--width` (each layer sharded on its own under FSDP), AdamW, batch
`--batch_size` per process. For each setup every process runs `--warmup` steps, then one measured step under
`metatrain.profiling.LiveTensorMeter` (the peak of the tensors the step makes that are alive at once: all-gathered
weights, activations, gradients, the meta step's copies; not the weights and optimizer state from before) for the
base step and for the meta step separately, beside what each process holds between steps (its weights, or its
shards of them, and the optimizer's state); the steps before it but the first are timed. Writes `results.json`
(rank 0) and prints a Markdown table; with `--device cuda` on a GPU the step peaks are the CUDA allocator's, over
what was allocated when the step began.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from metatrain.estimators import create_estimator
from metatrain.modules import MetaWeightNet
from metatrain.objective import MetaObjective
from metatrain.profiling import LiveTensorMeter, MemoryMeter
from metatrain.sharded import estimate_sharded

SETUPS = tuple(f"{kind}_{method}" for kind in ("ddp", "fsdp") for method in ("plain", "evograd", "t1t2_fd"))


def mlp(width: int, depth: int, classes: int = 10) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


class Meter:
    """The live-tensor peak on CPU, the CUDA allocator's peak over the start on a GPU, in MB."""

    def __init__(self, device: torch.device, on: bool = True):
        self.device, self.mb = device, 0.0
        self.meter = contextlib.nullcontext()
        if on:
            self.meter = LiveTensorMeter() if device.type == "cpu" else MemoryMeter(device)

    def __enter__(self) -> Meter:
        self.meter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.meter.__exit__(*exc)
        self.mb = getattr(self.meter, "peak_bytes", 0) / 2**20


def run(setup: str, args: argparse.Namespace, device: torch.device) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = mlp(args.width, args.depth).to(device)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    sharded = setup.startswith("fsdp")
    if sharded:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        net, inner = model, model
    else:
        net, inner = DistributedDataParallel(model), model
    meta = MetaWeightNet().to(device).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    method = setup.split("_", 1)[1]
    estimator = None if method == "plain" else create_estimator(method)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch_size, args.width, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g)
    batch, meta_batch = (x.to(device), y.to(device)), (x.flip(0).to(device), y.flip(0).to(device))
    base_mb, meta_mb, seconds = [], [], []
    for step in range(args.warmup + 1):
        measured = step == args.warmup
        start = time.perf_counter()
        if estimator is not None:
            stand_ins = [p.detach().requires_grad_() for p in meta.parameters()]
            objective = MetaObjective(inner, meta, meta_params=stand_ins)
            with Meter(device, measured) as meter:
                if sharded:
                    problem = objective.problem(batch, meta_batch, 1e-3, params={},
                                                held_losses=objective.held_losses(batch))  # fmt: skip
                    grads = estimate_sharded(estimator, problem, inner).grads
                else:
                    grads = estimator.estimate(objective.problem(batch, meta_batch, 1e-3)).grads
                for p, grad in zip(meta.parameters(), grads):
                    dist.all_reduce(grad)
                    p.sub_(grad / dist.get_world_size(), alpha=1e-3)
            if measured:
                meta_mb.append(meter.mb)
        with Meter(device, measured) as meter:
            losses = nn.functional.cross_entropy(net(batch[0]), batch[1], reduction="none")
            weights = meta(losses)
            ((weights * losses).sum() / weights.sum()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if measured:
            base_mb.append(meter.mb)
        elif step:  # the first step allocates the optimizer's state
            seconds.append(time.perf_counter() - start)
    held = [p.to_local() if isinstance(p, DTensor) else p for p in net.parameters()]
    held += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    held = [t.to_local() if isinstance(t, DTensor) else t for t in held]
    return {
        "setup": setup, "rank": rank, "weights_mb": weights_mb, "base_step_mb": base_mb[0],
        "meta_step_mb": meta_mb[0] if meta_mb else None,
        "held_mb": sum(t.numel() * t.element_size() for t in held) / 2**20,
        "seconds_per_step": sum(seconds) / len(seconds),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/sharded_memory")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4, help="Steps before the measured one.")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rows = []
    for setup in SETUPS:
        row = run(setup, args, device)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, row)
        rows += gathered
    if dist.get_rank() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "results.json")
        config = {k: v for k, v in vars(args).items() if k != "output_dir"}
        with open(path, "w") as f:
            json.dump({"config": {**config, "world_size": dist.get_world_size()}, "rows": rows}, f, indent=2)
        print("| setup | rank | weights MB (full) | held between steps MB | base step MB | meta step MB | s / step |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            meta = "" if r["meta_step_mb"] is None else f"{r['meta_step_mb']:.1f}"
            print(f"| {r['setup']} | {r['rank']} | {r['weights_mb']:.1f} | {r['held_mb']:.1f} | "
                  f"{r['base_step_mb']:.1f} | {meta} | {r['seconds_per_step']:.3f} |")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
