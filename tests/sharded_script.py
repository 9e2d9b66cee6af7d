"""The meta step on weights sharded by FSDP2's `fully_shard`, in two processes (gloo), launched by
`tests/test_sharded.py`:

    torchrun --standalone --nproc_per_node 2 tests/sharded_script.py --output_dir OUT

For each supported estimator, with a Meta-Weight-Net (outside the model) and with an attached per-feature scale (a
replicated parameter inside the sharded model), it writes per rank `rank<r>.json`: the largest difference between
the mean of the ranks' sharded estimates and the single-process estimate on an unsharded copy of the model (the
objective being the mean of the ranks' losses, on the same batches and, for EvoGrad, the same noise, gathered from
the ranks' shards), whether the local shards and their `.grad` came back bit for bit, and, after three steps of
training (a meta step, then a base step on the weighted loss), the meta-parameters and the gathered base weights,
with the largest difference of the weights from the same steps without sharding; MetaTrainer's meta step on a sharded
model against the unsharded estimate; and four steps of training uninterrupted and resumed from a sharded checkpoint
after the second.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from metatrain.estimators import EvoGrad, HypergradientProblem, create_estimator
from metatrain.modules import MetaWeightNet
from metatrain.objective import MetaObjective
from metatrain.sharded import LocalShards, estimate_sharded, shard_noise

ESTIMATORS = {
    "evograd": ("evograd", {"sigma": 0.05}),
    "evograd_gaussian_antithetic": (
        "evograd",
        {"sigma": 0.05, "population": 4, "noise": "gaussian", "antithetic": True, "rescale": True},
    ),  # fmt: skip
    "t1t2_fd": ("t1t2_fd", {}),
    "first_order": ("first_order", {}),
}
LR = 0.1


class Scale(nn.Module):
    """A per-feature scale: an attached meta-parameter, left out of sharding (replicated)."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def build(attached: bool, layout: str = "layers") -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """`(sharded model, unsharded copy, its meta-module, the copy's meta-module)`; the head has 3 rows, so rank 1's
    shard of it is one row. `layout`: `"layers"` shards each linear layer on its own; `"root_owns_head"` leaves the
    head to the root (which keeps its weights gathered after a forward); `"no_reshard"` sets the first layer not to
    reshard after a forward."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 9), nn.Tanh()] + ([Scale(9)] if attached else []) + [nn.Linear(9, 3)]
    model = nn.Sequential(*layers)
    reference = copy.deepcopy(model)
    meta, meta_reference = (model[2], reference[2]) if attached else (MetaWeightNet(hidden_size=8),) * 2
    for module in (meta, meta_reference):
        module.requires_grad_(False)
    if layout == "layers":
        fully_shard(model[0])
        fully_shard(model[-1])
    elif layout == "root_owns_head":
        fully_shard(model[0])
    else:
        fully_shard(model[0], reshard_after_forward=False)
        fully_shard(model[-1])
    fully_shard(model, ignored_params=set(meta.parameters()) if attached else None)
    return model, reference, meta, meta_reference


def batches(rank: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    return (x[:8], y[:8]), (x[8:], y[8:])


def objective(model: nn.Module, meta: nn.Module) -> MetaObjective:
    return MetaObjective(model, meta, meta_params=[p.detach().clone().requires_grad_() for p in meta.parameters()])


def gathered(t: torch.Tensor) -> torch.Tensor:
    """A shard's pieces from every rank, concatenated along dim 0 (FSDP2's `Shard(0)`)."""
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, t.detach())
    return torch.cat(pieces)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


class GivenNoise(EvoGrad):
    """EvoGrad all at once on given perturbations (the sharded run's, gathered): the unsharded reference."""

    def __init__(self, eps: list[dict[str, torch.Tensor]], **options):
        super().__init__(memory_lean=False, **options)
        self._eps = eps

    def _noise_draw(self, theta, names, sigma, seed):
        eps = self._eps

        class Draw:
            def perturbation(self, k):
                return eps[k]

        draw = Draw()
        draw.theta, draw.names = theta, names
        return draw


def mean_problem(obj: MetaObjective, rank_batches: list[tuple[dict, dict]], params: dict) -> HypergradientProblem:
    """The unsharded problem whose losses are the mean over the ranks' batches."""
    problems = [obj.problem(train, meta, LR, params=params) for train, meta in rank_batches]

    def mean(values):
        return sum(values) / len(values)

    return HypergradientProblem(
        params, obj.meta_params,
        lambda w, _: mean([obj.train_loss(w, train) for train, _ in rank_batches]),
        lambda w, _: mean([obj.meta_loss(w, meta) for _, meta in rank_batches]),
        None, None, LR, lambda w: mean([p.held_train_loss(w) for p in problems]),
    )  # fmt: skip


def groups_sync(model: nn.Module) -> list[bool]:
    return [g.reduce_grads for m in model.modules() if hasattr(m, "_get_fsdp_state")
            for g in m._get_fsdp_state()._fsdp_param_groups]  # fmt: skip


def compare(name: str, attached: bool, layout: str = "layers", no_sync: bool = False) -> dict:
    """The sharded estimate against the unsharded one; the shards, their `.grad`, what a forward sees after it (the
    unsharded model's output), and, with `no_sync` (an accumulation micro-step), FSDP's gradient-sync setting kept."""
    kind, options = ESTIMATORS[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    model, reference, meta, meta_reference = build(attached, layout)
    train, meta_batch = batches(rank)
    sharded = objective(model, meta)
    shards = LocalShards(model)
    before = {n: t.clone() for n, t in shards.local.items()}
    for p in shards.params.values():  # the base step's gradients, which the meta step must leave alone
        p.grad = torch.distributed.tensor.distribute_tensor(torch.ones(p.shape), p.device_mesh, p.placements)
    grads_before = {n: p.grad.to_local().clone() for n, p in shards.params.items()}
    problem = sharded.problem(train, meta_batch, LR, params=shards.params, held_losses=sharded.held_losses(train))
    estimator = create_estimator(kind, **options)
    torch.manual_seed(7)
    if no_sync:
        model.set_requires_gradient_sync(False)
    result = estimate_sharded(estimator, problem, model)
    sync_kept = groups_sync(model) == [not no_sync] * len(groups_sync(model))
    with torch.no_grad():
        forward_matches = torch.allclose(model(train[0]), reference(train[0]), atol=1e-6)
    mean = [g.clone() for g in (*result.grads, result.meta_loss)]
    for g in mean:
        dist.all_reduce(g)
        g /= world
    restored = all(torch.equal(before[n], t) for n, t in shards.local.items())
    grads_kept = all(torch.equal(grads_before[n], p.grad.to_local()) for n, p in shards.params.items())

    unsharded = objective(reference, meta_reference)
    params = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    if kind == "evograd":
        torch.manual_seed(7)
        draw = shard_noise(estimator, shards.local, estimator.resolve_sigma(LR), int(torch.randint(0, 2**62, (1,))))
        eps = [{n: gathered(e) for n, e in draw.stream(k)} for k in range(estimator.population)]
        estimator_reference = GivenNoise(eps, **options)
    else:
        estimator_reference = create_estimator(kind, **options)
    expected = estimator_reference.estimate(mean_problem(unsharded, [batches(r) for r in range(world)], params))
    difference = float((flat(mean[:-1]) - flat(expected.grads)).abs().max())
    return {
        "difference": difference,
        "scale": float(flat(expected.grads).abs().max()),
        "restored": restored,
        "grads_kept": grads_kept,
        "forward_matches": forward_matches,
        "sync_kept": sync_kept,
        "meta_loss": [float(mean[-1]), float(expected.meta_loss)],
    }


def interrupted() -> dict:
    """A training loss that raises at EvoGrad's second copy: the shards, what a forward sees and the weights'
    `requires_grad` as before the call."""
    rank = dist.get_rank()
    model, reference, meta, _ = build(False, "root_owns_head")
    train, meta_batch = batches(rank)
    shards = LocalShards(model)
    before = {n: t.clone() for n, t in shards.local.items()}
    obj = objective(model, meta)
    problem = obj.problem(train, meta_batch, LR, params={}, held_losses=obj.held_losses(train))
    calls = []

    def failing(weights):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return problem.held_train_loss(weights)

    try:
        failing_problem = dataclasses.replace(problem, held_train_loss=failing)
        estimate_sharded(create_estimator("evograd", sigma=0.05), failing_problem, model)
        raised = False
    except RuntimeError:
        raised = True
    restored = all(torch.equal(before[n], t) for n, t in shards.local.items())
    requires_grad = all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        forward_matches = torch.allclose(model(train[0]), reference(train[0]), atol=1e-6)
    return {
        "raised": raised,
        "restored": restored,
        "forward_matches": forward_matches,
        "requires_grad": requires_grad,
    }


def train(attached: bool) -> dict:
    """Three steps: an EvoGrad meta step (SGD), then an SGD base step on the weighted loss of each rank's batch;
    sharded, and unsharded on the mean of the ranks' losses (what DDP computes)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, reference, meta, meta_reference = build(attached)
    runs, meta_start = {}, copy.deepcopy(meta.state_dict())
    for label, net, module in (("sharded", model, meta), ("unsharded", reference, meta_reference)):
        if label == "unsharded" and not attached:  # the same Meta-Weight-Net, from where the sharded run started
            module.load_state_dict(meta_start)
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
        meta_optimizer = torch.optim.SGD(module.parameters(), lr=10.0)
        estimator = create_estimator("evograd", sigma=0.05)
        for step in range(3):
            obj = objective(net, module)
            if label == "sharded":
                train_batch, meta_batch = batches(rank)
                problem = obj.problem(train_batch, meta_batch, LR, params={}, held_losses=obj.held_losses(train_batch))
                torch.manual_seed(100 + step)
                grads = [g.clone() for g in estimate_sharded(estimator, problem, net).grads]
                for g in grads:
                    dist.all_reduce(g)
                    g /= world
            else:
                torch.manual_seed(100 + step)
                draw = shard_noise(estimator, LocalShards(model).local, 0.05, int(torch.randint(0, 2**62, (1,))))
                eps = [{n: gathered(e) for n, e in draw.stream(k)} for k in range(2)]
                params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
                problem = mean_problem(obj, [batches(r) for r in range(world)], params)
                grads = GivenNoise(eps, sigma=0.05).estimate(problem).grads
            for p, g in zip(module.parameters(), grads):
                p.grad = g
            meta_optimizer.step()
            meta_optimizer.zero_grad()
            obj = objective(net, module)
            own = [batches(rank)] if label == "sharded" else [batches(r) for r in range(world)]
            loss = sum(obj._reduce(obj.per_sample({}, t)) for t, _ in own) / len(own)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights = [gathered(p.to_local()) if label == "sharded" else p for p in net.parameters() if p.requires_grad]
        runs[label] = {"meta_params": flat(module.parameters()).tolist(), "weights": flat(weights)}
    return {
        "meta_params": runs["sharded"]["meta_params"],
        "weights": runs["sharded"]["weights"].tolist(),
        "weights_difference": float((runs["sharded"]["weights"] - runs["unsharded"]["weights"]).abs().max()),
        "meta_params_difference": max(
            abs(a - b) for a, b in zip(runs["sharded"]["meta_params"], runs["unsharded"]["meta_params"])
        ),
    }


def sharded_steps(model, meta, optimizer, meta_optimizer, steps: range) -> None:
    """EvoGrad meta steps and Adam base steps on each rank's batch, the noise seeded by the step (as MetaTrainer
    seeds it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    estimator = create_estimator("evograd", sigma=0.05)
    for step in steps:
        obj = objective(model, meta)
        train_batch, meta_batch = batches(rank)
        problem = obj.problem(train_batch, meta_batch, LR, params={}, held_losses=obj.held_losses(train_batch))
        torch.manual_seed(100 + step)
        for p, g in zip(meta.parameters(), estimate_sharded(estimator, problem, model).grads):
            dist.all_reduce(g)
            p.grad = g / world
        meta_optimizer.step()
        meta_optimizer.zero_grad()
        obj = objective(model, meta)
        obj._reduce(obj.per_sample({}, train_batch), batch=train_batch).backward()
        optimizer.step()
        optimizer.zero_grad()


def resume(output_dir: str) -> dict:
    """Four steps without interruption, and two, a sharded checkpoint (torch.distributed.checkpoint: the model's and
    the base optimizer's shards; the replicated meta-module and meta-optimizer), a fresh model and optimizers loaded
    from it, and two more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fresh():
        model, _, meta, _ = build(attached=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, meta, optimizer, torch.optim.Adam(meta.parameters(), lr=1e-2)

    def final(model, meta) -> list[float]:
        return flat([*(gathered(p.to_local()) for p in model.parameters()), *meta.parameters()]).tolist()

    model, meta, optimizer, meta_optimizer = fresh()
    sharded_steps(model, meta, optimizer, meta_optimizer, range(4))
    full = final(model, meta)

    model, meta, optimizer, meta_optimizer = fresh()
    sharded_steps(model, meta, optimizer, meta_optimizer, range(2))
    path = os.path.join(output_dir, "checkpoint")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    if dist.get_rank() == 0:
        torch.save({"meta": meta.state_dict(), "meta_optimizer": meta_optimizer.state_dict()}, path + "_meta.pt")
    dist.barrier()
    model, meta, optimizer, meta_optimizer = fresh()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    saved = torch.load(path + "_meta.pt", weights_only=False)
    meta.load_state_dict(saved["meta"])
    meta_optimizer.load_state_dict(saved["meta_optimizer"])
    sharded_steps(model, meta, optimizer, meta_optimizer, range(2, 4))
    return {"full": full, "resumed": final(model, meta)}


def trainer_steps() -> dict:
    """`MetaTrainer`'s meta step on a model sharded after construction (Trainer's own FSDP needs an accelerator):
    two steps of EvoGrad with a Meta-Weight-Net, each hypergradient against the unsharded estimate of the mean of the
    ranks' losses on the batches and noise of that step."""
    import datasets

    from metatrain import MetaTrainer, MetaTrainingArguments
    from metatrain.trainer import ESTIMATOR_STREAM, MetaTrainerCallback

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    meta_data = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")
    args = MetaTrainingArguments(
        output_dir="unused", use_cpu=True, report_to=[], per_device_train_batch_size=4, learning_rate=LR,
        hypergradient_kwargs={"sigma": 0.05}, meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0},
    )  # fmt: skip
    meta = MetaWeightNet(hidden_size=8)
    differences, scales = [], []

    class Compare(MetaTrainerCallback):
        def on_meta_step(self, args, state, control, *, trainer, problem, result, **kwargs):
            pairs = [None] * world
            dist.all_gather_object(pairs, (problem.train_batch, problem.meta_batch))
            with trainer._step_seeded(ESTIMATOR_STREAM):
                seed = int(torch.randint(0, 2**62, (1,)))
            estimator = trainer.estimator
            draw = shard_noise(estimator, LocalShards(trainer.model).local, estimator.resolve_sigma(LR), seed)
            eps = [{n: gathered(e) for n, e in draw.stream(k)} for k in range(estimator.population)]
            stand_ins = [p.detach().requires_grad_() for p in meta.parameters()]
            unsharded = MetaObjective(reference, meta, meta_params=stand_ins, split_inputs=trainer._split_inputs)
            params = {n: p.detach() for n, p in reference.named_parameters()}
            expected = GivenNoise(eps, sigma=0.05).estimate(mean_problem(unsharded, pairs, params)).grads
            differences.append(float((flat(result.grads) - flat(expected)).abs().max()))
            scales.append(float(flat(expected).abs().max()))

    trainer = MetaTrainer(model=model, args=args, meta_dataset=meta_data, meta_module=meta, callbacks=[Compare()])
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    shards = LocalShards(model)
    before = {n: t.clone() for n, t in shards.local.items()}
    done = []
    for step in range(2):
        trainer.state.global_step = step
        batch = {"pixel_values": x[4 * rank : 4 * rank + 4] + step, "labels": y[4 * rank : 4 * rank + 4]}
        done.append(trainer.meta_step(batch))
    return {
        "done": done,
        "differences": differences,
        "scales": scales,
        "restored": all(torch.equal(before[n], t) for n, t in shards.local.items()),
        "meta_params": flat(meta.parameters()).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    output_dir = parser.parse_args().output_dir
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    out = {"world_size": dist.get_world_size()}
    for attached in (False, True):
        where = "attached" if attached else "outside"
        for name in ESTIMATORS:
            out[f"{name}/{where}"] = compare(name, attached)
        out[f"train/{where}"] = train(attached)
    for layout in ("root_owns_head", "no_reshard"):
        for name in ("evograd", "t1t2_fd", "first_order"):
            out[f"{name}/outside/{layout}"] = compare(name, False, layout)
    for name in ("evograd", "t1t2_fd"):
        out[f"{name}/outside/no_sync"] = compare(name, False, no_sync=True)
    out["interrupted"] = interrupted()
    out["trainer"] = trainer_steps()
    out["resume"] = resume(output_dir)
    with open(os.path.join(output_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
