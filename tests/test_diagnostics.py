"""`compare_estimators` on the problems `MetaObjective` builds (a loss weighter's input held at the current weights or
not), its reports and table, and the memory meters."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import pytest
import torch
from helpers import LR, held_loss_by_hand, per_sample_ce64, shifted, tiny_objective
from torch import nn
from torch.nn import functional as F

import metatrain.diagnostics
import metatrain.utils
from metatrain.diagnostics import EstimatorReport, compare_estimators, format_table
from metatrain.estimators import (
    ESTIMATORS,
    HypergradientEstimator,
    HypergradientProblem,
    HypergradientResult,
    create_estimator,
)


def tiny_problem(model: nn.Module | None = None, per_sample_loss=per_sample_ce64) -> HypergradientProblem:
    """The problem of [`tiny_objective`] at the model's weights, as MetaTrainer's meta step builds it."""
    objective, (train_batch, meta_batch) = tiny_objective(model, per_sample_loss)
    return objective.problem(train_batch, meta_batch, LR, train_batches=lambda n: [train_batch] * n)


def flat(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_t1t2_against_itself_and_first_order_has_no_direction():
    problem = tiny_problem()
    t1t2, first = compare_estimators(problem, ["t1t2", "first_order"], repeats=2)
    assert isinstance(t1t2, EstimatorReport) and (t1t2.name, first.name) == ("t1t2", "first_order")
    for value in (t1t2.cosine, t1t2.cosine_of_mean, t1t2.norm_ratio, t1t2.norm_ratio_of_mean):
        assert abs(value - 1) < 1e-10
    expected = flat(create_estimator("t1t2").estimate(problem).grads)
    torch.testing.assert_close(t1t2.hypergradient, expected, rtol=1e-12, atol=0)
    assert t1t2.norm > 0 and t1t2.reference_norm == pytest.approx(t1t2.norm, rel=1e-12)
    assert t1t2.reference == first.reference == "t1t2"

    # the meta loss of a loss weighter does not depend on it directly: the first-order estimate is exactly zero,
    # whose cosine is undefined (NaN), not orthogonal (0)
    assert first.norm == 0 and first.norm_ratio == 0 and first.norm_ratio_of_mean == 0
    assert math.isnan(first.cosine) and math.isnan(first.cosine_of_mean)

    for report in (t1t2, first):
        assert report.seconds > 0 and report.repeats == 2 and report.memory_kind == "cpu_peak_saved_for_backward"
        assert math.isfinite(report.meta_loss)
    # T1-T2 keeps a second-order graph; first-order builds none here, so it saves nothing for backward
    assert t1t2.memory_bytes > first.memory_bytes >= 0


@pytest.mark.slow
def test_evograd_mean_tracks_t1t2_when_its_step_is_the_learning_rate():
    """`sigma="auto"` sets EvoGrad's effective lookahead step to `lr`: the mean over repeats points where T1-T2
    does, while single estimates of a small population are much noisier. 64 repeats: the mean cosine of single
    estimates spreads widely over noise draws (8 repeats: 0.76-0.99 for K=32 and 0.25-0.99 for K=4 over five
    seeds, each with the old and the new sign noise; 64 repeats, new noise: 0.89-0.98 and 0.23-0.59)."""
    problem = tiny_problem()
    large, small = compare_estimators(
        problem,
        estimators=[
            ("evograd", {"population": 32, "sigma": "auto", "memory_lean": False}),
            ("evograd", {"population": 4, "sigma": "auto", "memory_lean": False}),
        ],
        repeats=64,
    )
    assert large.label == "evograd(population=32, sigma='auto', memory_lean=False)"
    assert large.cosine_of_mean > 0.9 and large.cosine > 0.8
    assert small.cosine_of_mean > 0.9 and small.cosine < small.cosine_of_mean - 0.1
    # the all-at-once path holds every copy's graph: its memory grows with K
    assert large.memory_bytes > small.memory_bytes > 0 and large.seconds > 0 and small.seconds > 0


def test_t1t2_fd_matches_t1t2_on_the_held_objective_only():
    """MetaTrainer holds the weighting net's input at the current weights for estimators that perturb the weights;
    `compare_estimators` keeps the problem's `held_train_loss` by default, where `t1t2_fd` is T1-T2's
    finite-difference version. Without holding, its finite difference also moves the weighting net's input: a
    different objective, twice the norm."""
    problem = tiny_problem()
    (held,) = compare_estimators(problem, ["t1t2_fd"])
    (unheld,) = compare_estimators(problem, ["t1t2_fd"], hold_weighter_inputs=False)
    assert held.cosine > 0.999 and held.norm_ratio == pytest.approx(1, rel=0.02)
    assert unheld.norm_ratio > 1.5 and unheld.cosine < held.cosine - 1e-3
    # the autograd estimators see the same objective either way
    (t1t2,) = compare_estimators(problem, ["t1t2"], hold_weighter_inputs=False)
    assert t1t2.cosine == pytest.approx(1, abs=1e-10) and t1t2.norm_ratio == pytest.approx(1, abs=1e-10)


class HeldInputProbe(HypergradientEstimator):
    """An estimator that perturbs the weights: records the problem's `held_train_loss` and `train_loss` at weights
    off `params`, and returns ones."""

    name = "probe"

    def __init__(self):
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def estimate(self, problem):
        moved = shifted(problem.params)
        with torch.no_grad():
            self._seen.append((problem.held_train_loss(moved), problem.train_loss(moved, problem.train_batch)))
        return HypergradientResult(tuple(torch.ones_like(p) for p in problem.meta_params), torch.tensor(0.0))


def test_compare_estimators_gives_a_perturbing_estimator_the_held_input_or_not():
    objective, (train_batch, meta_batch) = tiny_objective()
    problem = objective.problem(train_batch, meta_batch, LR)
    moved = shifted(problem.params)
    with torch.no_grad():
        expected_held = held_loss_by_hand(objective, moved, problem.params, train_batch)
        expected_plain = objective.train_loss(moved, train_batch)
    assert not torch.allclose(expected_held, expected_plain)

    held, unheld = HeldInputProbe(), HeldInputProbe()
    compare_estimators(problem, [held], repeats=2)
    compare_estimators(problem, [unheld], repeats=2, hold_weighter_inputs=False)
    assert len(held._seen) == len(unheld._seen) == 4  # warm-up, 2 timed calls, the memory call
    for (held_loss, plain_loss), (unheld_loss, same_plain) in zip(held._seen, unheld._seen):
        torch.testing.assert_close(held_loss, expected_held)
        torch.testing.assert_close(plain_loss, expected_plain)
        torch.testing.assert_close(unheld_loss, expected_plain)
        torch.testing.assert_close(same_plain, expected_plain)


def test_compare_estimators_computes_the_held_losses_once_per_problem(monkeypatch):
    """EvoGrad evaluates the held training loss at every copy of every call; the losses at `params` it holds are
    computed once, in the first call that needs them, and reused by every later call on the problem."""
    objective, (train_batch, meta_batch) = tiny_objective()
    at_params = []
    per_sample = objective.per_sample

    def counting(weights, batch, training=True):
        at_params.append(weights is problem.params and batch is train_batch and not torch.is_grad_enabled())
        return per_sample(weights, batch, training)

    monkeypatch.setattr(objective, "per_sample", counting)
    problem = objective.problem(train_batch, meta_batch, LR)
    compare_estimators(problem, [("evograd", {"population": 4}), "t1t2_fd"], repeats=2)
    assert sum(at_params) == 1 and len(at_params) > 20


def test_batch_norm_statistics_and_weights_are_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problem = tiny_problem(model, per_sample_loss=None)  # MetaTrainer's default loss
    reports = compare_estimators(
        problem,
        estimators=["t1t2", "first_order", ("evograd", {"population": 8, "sigma": "auto"}), "t1t2_fd"],
        repeats=2,
    )  # EvoGrad and t1t2_fd on the held objective: the held losses go through the model too
    assert [r.name for r in reports] == ["t1t2", "first_order", "evograd", "t1t2_fd"]
    assert reports[3].cosine > 0.99
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "compare_estimators changed the model's state"
    assert all(p.grad is None for p in [*model.parameters(), *problem.meta_params])
    # the check means something: an ordinary training-mode call does move the running statistics
    model(problem.train_batch[0])
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])


def test_removed_loss_closures_name_their_replacement():
    for name in ("model_losses", "TrainLoss"):
        with pytest.raises(AttributeError, match=rf"diagnostics\.{name} .*metatrain\.objective\.MetaObjective"):
            getattr(metatrain.diagnostics, name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        metatrain.diagnostics.nothing_here  # noqa: B018
    # the vector helpers moved to metatrain.utils and are still importable from here
    for name in ("cosine", "flatten", "ratio"):
        assert getattr(metatrain.diagnostics, name) is getattr(metatrain.utils, name)


def test_format_table_and_to_dict():
    problem = tiny_problem()
    estimators = ["t1t2", "first_order", ("evograd", {"population": 4}), ("evograd", {"population": 8})]
    reports = compare_estimators(problem, estimators=estimators, repeats=2)
    table = format_table(reports)
    lines = table.splitlines()
    assert len(lines) == 2 + len(estimators) and all(line.startswith("| ") or line.startswith("|-") for line in lines)
    assert "cpu_peak_saved_for_backward" in lines[0] and "time (ms)" in lines[0]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]]
    assert rows == ["t1t2", "first_order", "evograd(population=4)", "evograd(population=8)"]
    assert "n/a" in lines[3]
    assert len({len(line.split("|")) for line in lines}) == 1

    dicts = [r.to_dict() for r in reports]
    json.dumps(dicts, allow_nan=False)
    assert dicts[1]["cosine"] is None and dicts[1]["norm"] == 0 and "hypergradient" not in dicts[0]
    assert dicts[2]["options"] == {"population": 4} and dicts[2]["label"] == "evograd(population=4)"


class CountingEstimator(HypergradientEstimator):
    """A stateful stand-in: counts its calls and returns the first-order estimate."""

    name = "counting"

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self._calls = 0

    def estimate(self, problem):
        self._calls += 1
        return HypergradientResult(
            tuple(torch.ones_like(p) * self.scale for p in problem.meta_params), torch.tensor(0.0)
        )

    def state_dict(self):
        return {"calls": self._calls}

    def load_state_dict(self, state):
        self._calls = state["calls"]


def test_estimator_instances_are_reported_and_their_state_restored(monkeypatch):
    problem = tiny_problem()
    counting = CountingEstimator(scale=2.0)
    seen = []
    real_estimate = CountingEstimator.estimate

    def recording(self, problem):
        seen.append(self._calls)
        return real_estimate(self, problem)

    monkeypatch.setattr(CountingEstimator, "estimate", recording)
    (report,) = compare_estimators(problem, estimators=[counting], reference=CountingEstimator(), repeats=3)
    assert seen == [0, 0, 1, 2, 3, 4]  # the reference once, then warm-up, 3 timed calls and the memory call
    assert counting._calls == 0
    assert report.name == "counting" and report.options == {"scale": 2.0}
    assert report.label == "counting(scale=2.0)" and report.reference == "counting(scale=1.0)"
    assert report.cosine == pytest.approx(1.0) and report.norm_ratio == pytest.approx(2.0)


def test_invalid_input_fails_before_any_work():
    problem = tiny_problem()

    def never(weights, batch=None):
        raise AssertionError("computed something before validating the input")

    # every loss, the held one too, fails if called
    problem_never = dataclasses.replace(problem, train_loss=never, meta_loss=never, held_train_loss=never)
    with pytest.raises(AssertionError, match="before validating"):
        compare_estimators(problem_never, ["t1t2_fd"])  # the check below means something
    with pytest.raises(ValueError) as from_registry:
        create_estimator("t1t3")
    with pytest.raises(ValueError) as from_diagnostics:
        compare_estimators(problem_never, estimators=["t1t2", "t1t3"])
    assert str(from_diagnostics.value) == str(from_registry.value)
    with pytest.raises(ValueError, match=r"popsize.*population"):
        compare_estimators(problem_never, estimators=[("evograd", {"popsize": 3})])
    with pytest.raises(ValueError, match="Unknown hypergradient estimator 'nope'"):
        compare_estimators(problem_never, estimators=["t1t2"], reference="nope")
    for empty in ([], (), "t1t2"):
        with pytest.raises(ValueError, match="non-empty list"):
            compare_estimators(problem_never, estimators=empty)
    with pytest.raises(ValueError, match="Cannot build"):
        compare_estimators(problem_never, estimators=[3])
    with pytest.raises(ValueError, match="repeats"):
        compare_estimators(problem_never, estimators=["t1t2"], repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        compare_estimators(problem_never, estimators=["t1t2"], warmup=-1)
    frozen = [p.detach() for p in problem.meta_params]
    with pytest.raises(ValueError, match="require grad"):
        compare_estimators(dataclasses.replace(problem_never, meta_params=frozen), estimators=["t1t2"])
    with pytest.raises(ValueError, match="meta_params` is empty"):
        compare_estimators(dataclasses.replace(problem_never, meta_params=[]), estimators=["t1t2"])


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_registered_estimator_runs_with_its_defaults(name):
    (report,) = compare_estimators(tiny_problem(), estimators=[name])
    assert report.name == name and report.options == {} and report.repeats == 1
    assert math.isfinite(report.norm) and report.seconds > 0 and report.memory_bytes >= 0
    assert report.norm > 0 or name == "first_order"  # a loss weighter's first-order hypergradient is zero


def test_cpu_memory_meter_reports_the_peak_of_graphs_alive_at_once():
    """Two graphs of the same size: held together they count twice, built and freed one after the other once."""
    from metatrain.profiling import MemoryMeter

    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)
    saved = 64 * 256 * 4  # x @ w saves its input x for the gradient w.r.t. w

    with MemoryMeter("cpu") as together:
        first, second = (x @ w).sum(), (2 * x @ w).sum()
        torch.autograd.grad(first + second, w)
    with MemoryMeter("cpu") as one_at_a_time:
        for scale in (1, 2):
            torch.autograd.grad((scale * x @ w).sum(), w)
    assert one_at_a_time.kind == "cpu_peak_saved_for_backward"
    assert saved <= one_at_a_time.peak_bytes < 1.5 * saved
    assert together.peak_bytes >= 2 * saved


def test_live_tensor_meter_counts_an_out_tensor_that_the_op_resizes():
    from metatrain.profiling import LiveTensorMeter

    a = torch.ones(512, 512)
    with LiveTensorMeter() as meter:
        result = torch.add(a, 1, out=torch.empty(0))
    assert meter.peak_bytes == result.nbytes == a.nbytes


def test_live_tensor_meter_counts_a_jacobian_vector_product():
    """Forward-mode AD (EvoGrad's `forward_mode`) passes storage-less zero tangents for inputs without one; the meter
    skips them and counts the primal and the tangent of the result."""
    from torch.autograd import forward_ad

    from metatrain.profiling import LiveTensorMeter

    x, w, tangent = torch.randn(256, 512), torch.randn(512, 512), torch.randn(512, 512)
    with LiveTensorMeter() as meter, forward_ad.dual_level():
        primal, derivative = forward_ad.unpack_dual(x @ forward_ad.make_dual(w, tangent))
        torch.testing.assert_close(derivative, x @ tangent)
    assert meter.peak_bytes >= primal.nbytes + derivative.nbytes


def test_cpu_memory_meter_does_not_count_existing_tensors_it_is_told_of():
    """A graph that saves the weights (a differentiable forward at the real weights, as T1-T2's) adds no memory: with
    the weights excluded only what the block makes counts."""
    from metatrain.profiling import MemoryMeter

    w = torch.randn(512, 512)
    x = torch.randn(4, 512, requires_grad=True)
    for exclude, expected in (((), w.nbytes), ([w], 0)):  # the gradient w.r.t. x needs w only
        with MemoryMeter("cpu", exclude=exclude) as meter:
            torch.autograd.grad((x @ w.detach()).sum(), x)
        assert meter.peak_bytes == expected
    w.requires_grad_()
    with MemoryMeter("cpu", exclude=[w]) as meter:
        torch.autograd.grad(((x * 2) @ w).sum(), [x, w])  # saves the doubled input (new) and the weight (not)
    assert meter.peak_bytes == x.nbytes


def test_live_tensor_meter_counts_new_storages_alive_at_once():
    """Exact bytes: two 1 MiB results alive together count twice, one after the other once, and a storage that an alias
    keeps counts while the alias lives; views, in-place results and tensors from before the block do not count, and the
    backward pass's gradients do."""
    from metatrain.profiling import LiveTensorMeter

    mib = 2**20
    x = torch.randn(mib // 4)  # float32: 1 MiB, from before the block
    with LiveTensorMeter() as together:
        a, b = x * 2, x + 1
        a.add_(1), a.view(-1, 2), b[: len(b) // 2]
        del a, b
    assert together.peak_bytes == 2 * mib
    with LiveTensorMeter() as one_at_a_time:
        for scale in (2, 3):
            y = x * scale
            del y
    assert one_at_a_time.peak_bytes == mib
    with LiveTensorMeter() as alias_outlives:
        y = x * 2
        part = y.detach()[:8]  # keeps y's storage alive after y is gone (a detached alias holds no `_base`)
        del y
        z = x * 3
        del z, part
    assert alias_outlives.peak_bytes == 2 * mib
    w = x.clone().requires_grad_()
    with LiveTensorMeter(min_bytes=mib) as backward:
        (grad,) = torch.autograd.grad((w * w).sum(), w)  # the product, then the gradient as two 1 MiB terms
    assert backward.peak_bytes >= 2 * mib and grad.shape == w.shape


def test_cpu_memory_meter_frees_the_graphs_it_watches():
    """T1-T2 through a ResNet with FT layers under the meter: the hypergradient is the one without it, and repeated
    meta steps leave no tensors behind (wrapping the saved tensors themselves leaked every second-order graph)."""
    import gc

    from torch.func import functional_call

    from metatrain.estimators import T1T2
    from metatrain.models import build_fewshot_model
    from metatrain.modules import attach_feature_wise_transforms
    from metatrain.profiling import MemoryMeter

    torch.manual_seed(0)
    model = build_fewshot_model("test_resnet").train()
    ft_ids = {id(p) for p in attach_feature_wise_transforms(model.backbone).parameters()}
    named = list(model.named_parameters())
    params = {n: p.detach() for n, p in named if id(p) not in ft_ids}
    names, meta = zip(*[(n, p.detach().requires_grad_()) for n, p in named if id(p) in ft_ids])
    support, labels, query = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2] * 2), torch.randn(6, 3, 16, 16)

    def loss(weights, batch):
        logits = functional_call(model, {**weights, **dict(zip(names, meta))}, (support, labels, query))[0]
        return F.cross_entropy(logits, labels)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    torch.manual_seed(1)
    problem = HypergradientProblem(params, meta, loss, loss, lr=0.01)
    expected = T1T2().estimate(problem).grads
    counts = []
    for _ in range(3):
        torch.manual_seed(1)  # the FT layers' noise
        with MemoryMeter("cpu") as meter:
            grads = T1T2().estimate(problem).grads
        counts.append(live_tensors())
    assert meter.peak_bytes > 0
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert counts[2] == counts[1], counts
