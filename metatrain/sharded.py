"""The meta step under FSDP2 (`fully_shard`): first-order hypergradients computed on this process's local shards of the
weights, which are changed in place and put back exactly, with an ordinary sharded backward for the meta loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .estimators import (
    EvoGrad,
    FirstOrder,
    HypergradientEstimator,
    HypergradientProblem,
    HypergradientResult,
    T1T2FiniteDifference,
)
from .estimators._base import grads_or_zeros
from .estimators.evograd import _dot
from .estimators.evograd_noise import NoiseDraw

# the estimators that need no second-order graph, by name: the ones a sharded model supports
SHARDED_ESTIMATORS = ("evograd", "first_order", "t1t2_fd")
Grads = tuple[torch.Tensor, ...]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` has modules sharded by `fully_shard`."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def _steady(model: nn.Module) -> Iterator[None]:
    """FSDP2 set so that what the local shards hold is what every forward inside the block sees, and what a backward
    inside it reduces is this block's alone: every parameter group reshards after each forward (the root and groups set
    not to would keep a gathered copy that in-place changes of the shards do not reach), gradients are reduced even
    within Trainer's `no_sync` (an accumulation micro-step), and every group is resharded on entry and on exit, also
    when the block raises. The settings are put back after it."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if isinstance(model, FSDPModule):  # the root's settings are final once lazily initialised (its first forward)
        model._get_fsdp_state()._lazy_init()
    states = list(dict.fromkeys(m._get_fsdp_state() for m in modules))
    groups = [g for state in states for g in state._fsdp_param_groups]
    saved_states = [state._auto_reshard_after_forward for state in states]
    saved_groups = [(g.post_forward_mesh_info, g.reduce_grads, g.all_reduce_grads) for g in groups]

    def reshard() -> None:
        for m in modules:
            m.reshard()

    try:
        for m in modules:
            m.set_reshard_after_forward(True, recurse=False)
            m.set_requires_gradient_sync(True, recurse=False)
        reshard()
        yield
    finally:
        reshard()
        for state, auto in zip(states, saved_states):
            state._auto_reshard_after_forward = auto
        for g, (mesh_info, reduce_grads, all_reduce_grads) in zip(groups, saved_groups):
            g.post_forward_mesh_info, g.reduce_grads, g.all_reduce_grads = mesh_info, reduce_grads, all_reduce_grads


def check_sharded_estimator(estimator: HypergradientEstimator) -> None:
    """Raises a `ValueError` naming the supported estimators unless `estimator` can run on sharded weights."""
    if type(estimator) not in (EvoGrad, FirstOrder, T1T2FiniteDifference):  # a subclass may estimate otherwise
        raise ValueError(
            f"The {estimator.name or type(estimator).__name__!r} estimator ({type(estimator).__name__}) cannot run "
            f"under FSDP: the sharded meta step has its own form of {SHARDED_ESTIMATORS} only (the others need a "
            "second-order graph or unsharded weights). Choose one of them with `hypergradient`, or train with DDP."
        )
    if isinstance(estimator, EvoGrad) and (estimator.memory_lean is False or estimator.forward_mode):
        option = "memory_lean=False" if estimator.memory_lean is False else "forward_mode=True"
        raise ValueError(
            f"EvoGrad option {option} is not available under FSDP: there the copies are applied one at a time to the "
            "local shards in place and the meta loss is differentiated by an ordinary sharded backward. Leave "
            "`memory_lean` and `forward_mode` unset."
        )


class LocalShards:
    """The trainable weights of a model sharded by `fully_shard`, as this process's local shards: perturbed in place
    (the forward all-gathers what they hold), restored exactly by copy, and differentiated by an ordinary backward,
    which gives each process its shard of the gradient of the loss averaged over processes.

    Args:
        model (`nn.Module`): the sharded model; its trainable weights must all be sharded (DTensor).
    """

    def __init__(self, model: nn.Module):
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        unsharded = [name for name, p in self.params.items() if not isinstance(p, DTensor)]
        if unsharded:
            raise ValueError(
                f"Trainable weights {unsharded[:4]} are not sharded: under FSDP every trainable weight must be "
                "sharded by `fully_shard` (meta-parameters, which are not trainable weights, stay replicated)."
            )
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for name, p in self.params.items():
            mesh = p.device_mesh
            if mesh.ndim != 1 or mesh.size() != self.world_size:
                raise ValueError(
                    f"Weight {name!r} is sharded over a device mesh of shape {tuple(mesh.shape)}, not over all "
                    f"{self.world_size} processes in one dimension: the sharded meta step supports plain FSDP2 "
                    "(no HSDP or 2-D meshes)."
                )
        self.local = {name: p.to_local() for name, p in self.params.items()}

    @contextlib.contextmanager
    def kept(self) -> Iterator[dict[str, torch.Tensor]]:
        """A copy of the local shards (one shard-sized copy), and the shards put back from it after the block."""
        saved = {name: t.detach().clone() for name, t in self.local.items()}
        try:
            yield saved
        finally:
            self.load(saved)

    @contextlib.contextmanager
    def constant(self) -> Iterator[None]:
        """The weights as constants inside the block: a forward builds no graph through them (the meta-parameters'
        graph is kept), as for the unsharded estimators' detached weights."""
        try:
            for p in self.params.values():
                p.requires_grad_(False)
            yield
        finally:
            for p in self.params.values():
                p.requires_grad_(True)

    @torch.no_grad()
    def load(self, values: dict[str, torch.Tensor]) -> None:
        """Copies `values` into the local shards."""
        for name, t in self.local.items():
            t.copy_(values[name])

    @torch.no_grad()
    def add(self, deltas: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor], alpha: float = 1.0) -> None:
        """Adds `alpha` times each `(name, delta)` to its local shard."""
        for name, delta in deltas.items() if isinstance(deltas, dict) else deltas:
            self.local[name].add_(delta, alpha=alpha)

    def backward(
        self, loss: torch.Tensor, meta_params: Sequence[torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], Grads]:
        """`(local gradient, direct)`: this process's shard of the gradient of `loss` (averaged over processes by the
        sharded backward) w.r.t. every trainable weight, and the gradient of this process's `loss` w.r.t.
        `meta_params`. The weights' `.grad` (the base step's gradients) are put back as they were."""
        held = {name: p.grad for name, p in self.params.items()}
        held_meta = [p.grad for p in meta_params]
        try:
            for p in [*self.params.values(), *meta_params]:
                p.grad = None
            if loss.requires_grad:
                loss.backward()
            grads = {
                name: torch.zeros_like(self.local[name]) if p.grad is None else p.grad.to_local()
                for name, p in self.params.items()
            }
            direct = tuple(torch.zeros_like(p) if p.grad is None else p.grad for p in meta_params)
        finally:
            for name, p in self.params.items():
                p.grad = held[name]
            for p, grad in zip(meta_params, held_meta):
                p.grad = grad
        return grads, direct

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over processes (on the accelerator where the backend needs it: NCCL with shards offloaded to
        the CPU), returned where it was."""
        if self.world_size > 1:
            where = value.device
            if dist.get_backend() == "nccl" and where.type == "cpu":
                value = value.to(torch.device("cuda", torch.cuda.current_device()))
            value = value.clone()
            dist.all_reduce(value)
            value = value.to(where)
        return value

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over processes."""
        return self.all_sum(value) / self.world_size


def shard_noise(estimator: EvoGrad, local: dict[str, torch.Tensor], sigma: float, seed: int) -> NoiseDraw:
    """EvoGrad's perturbations of this process's local shards: each process draws its own shard's from `seed` offset
    by its rank, so together they perturb the whole weights once."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return estimator._noise_draw(local, estimator._perturbed_names(local), sigma, seed + 1_000_003 * rank)


def estimate_sharded(
    estimator: HypergradientEstimator, problem: HypergradientProblem, model: nn.Module
) -> HypergradientResult:
    """`estimator`'s estimate of `problem` on the weights of a sharded `model`, this process's part of it (the
    hypergradient is the mean of the processes' parts, as with DDP). The losses of `problem` are called with no
    substituted weights (`{}`) while the weights are changed in place; a loss weighter's held input must be given
    (`held_losses` of [`~metatrain.objective.MetaObjective.problem`]). The weights are left as they were, bit for bit.

    The objective is the mean over processes of each process's training and meta losses on its own batches, so a
    process's estimate is the same as an unsharded one on that mean.
    """
    check_sharded_estimator(estimator)
    with _steady(model):
        shards = LocalShards(model)
        if isinstance(estimator, EvoGrad):
            return _evograd(estimator, problem, shards)
        if isinstance(estimator, T1T2FiniteDifference):
            return _t1t2_fd(estimator, problem, shards)
        with shards.constant():  # the direct term only: no graph through the weights
            loss = problem.meta_loss({}, problem.meta_batch)
            return HypergradientResult(grads_or_zeros(loss, problem.meta_params), loss.detach())


def _local_dot(grads: dict[str, torch.Tensor], deltas: Iterator[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """`sum_n grads[n] . delta_n` over this process's shards, each product in float32 at least, summed in float64."""
    total = torch.zeros((), dtype=torch.float64, device=next(iter(grads.values())).device)
    for name, delta in deltas:
        total += _dot(grads[name].reshape(-1), delta.reshape(-1))
    return total


def _evograd(estimator: EvoGrad, problem: HypergradientProblem, shards: LocalShards) -> HypergradientResult:
    """EvoGrad one copy at a time on the local shards: copy `k`'s training loss (averaged over processes for the
    softmax), `theta*` in place, and `c_k = grad L_meta(theta*) . eps_k` summed over the shards of every process.
    Memory beyond the weights: one shard-sized copy, the meta loss's graph and its shard-sized gradient, and `K`
    gradients w.r.t. the meta-parameters."""
    sigma = estimator.resolve_sigma(problem.lr)
    meta_params, population = problem.meta_params, estimator.population
    seed = int(torch.randint(0, 2**62, (1,)).item())
    draw = shard_noise(estimator, shards.local, sigma, seed)
    losses, loss_grads = [], []
    with shards.kept() as theta:
        for k in range(population):
            if k:
                shards.load(theta)
            shards.add(draw.stream(k))
            with shards.constant():
                loss_k = problem.held_train_loss({}).reshape(())
                losses.append(loss_k.detach())
                loss_grads.append(grads_or_zeros(loss_k, meta_params))
            del loss_k
        stacked = torch.stack(losses)  # averaged in float64, then in the precision the unsharded path uses
        weights = estimator._softmax_weights(
            shards.all_mean(stacked.double()).to(torch.promote_types(stacked.dtype, torch.float32))
        )
        shards.load(theta)
        for k, w_k in enumerate(weights.tolist()):
            shards.add(draw.stream(k), alpha=w_k)
        loss = problem.meta_loss({}, problem.meta_batch)
        grads, direct = shards.backward(loss, meta_params)
    c = shards.all_sum(torch.stack([_local_dot(grads, draw.stream(k)) for k in range(population)]))
    del grads
    w = weights.double()
    coefficient = -(w * (c - (w * c).sum())) / estimator.temperature
    factor = 1.0
    if estimator.rescale:
        effective = estimator.effective_lr(sigma)
        factor = estimator._check_lr(problem.lr) / effective if effective > 0 else 1.0
    hyper = tuple(
        d + factor * sum(coefficient[k].to(d.dtype) * loss_grads[k][i] for k in range(population))
        for i, d in enumerate(direct)
    )
    return HypergradientResult(hyper, loss.detach())


def _t1t2_fd(
    estimator: T1T2FiniteDifference, problem: HypergradientProblem, shards: LocalShards
) -> HypergradientResult:
    """The finite-difference lookahead on the local shards: `theta'` in place from the sharded training gradient,
    `v = grad L_meta(theta')` by a sharded backward, its norm over every process's shards, and the two shifted
    training losses `theta +/- r v` in place."""
    lr, meta_params = estimator._check_lr(problem.lr), problem.meta_params
    with shards.kept() as theta:
        train_grads, _ = shards.backward(problem.held_train_loss({}), meta_params)  # their .grad kept as it was
        shards.add(train_grads, alpha=-lr)
        del train_grads
        loss = problem.meta_loss({}, problem.meta_batch)
        v, direct = shards.backward(loss, meta_params)
        squares = sum((g.double() ** 2).sum() for g in v.values())
        v_norm = float(shards.all_sum(torch.as_tensor(squares, dtype=torch.float64)).sqrt())
        if lr == 0 or v_norm == 0:
            return HypergradientResult(direct, loss.detach())
        r = estimator.epsilon / v_norm
        shifted = []
        for sign in (1.0, -1.0):
            shards.load(theta)
            shards.add(v, alpha=sign * r)
            with shards.constant():
                shifted.append(grads_or_zeros(problem.held_train_loss({}), meta_params))
    plus, minus = shifted
    hyper = tuple(d - lr * (gp - gm) / (2 * r) for d, gp, gm in zip(direct, plus, minus))
    return HypergradientResult(hyper, loss.detach())
