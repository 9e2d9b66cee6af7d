"""`MetaObjective` (`metatrain.objective`): its training and meta losses, and the problems it builds, whose
`held_train_loss` feeds a loss weighter the per-sample losses at the problem's weights."""

from __future__ import annotations

import pytest
import torch
from helpers import LR, held_loss_by_hand, per_sample_ce64, shifted, tiny_objective
from torch import nn
from torch.nn import functional as F

from metatrain.modules import MetaWeightNet
from metatrain.objective import MetaObjective


def test_meta_objective_losses_are_the_weighted_and_plain_means():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    weighter = MetaWeightNet(hidden_size=8).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    objective = MetaObjective(model, weighter, per_sample_loss=per_sample_ce64)
    problem = objective.problem((x, y), (x, y), LR)
    params = problem.params
    assert set(params) == {n for n, _ in model.named_parameters()} and not any(
        p.requires_grad for p in params.values()
    )
    assert problem.meta_params == list(weighter.parameters()) and problem.lr == LR
    losses = per_sample_ce64(model(x), y)
    w = weighter(losses)
    torch.testing.assert_close(objective.train_loss(params, (x, y)), (w * losses).sum() / w.sum())
    torch.testing.assert_close(objective.meta_loss(params, (x, y)), losses.mean())
    moved = {name: p + 0.1 for name, p in params.items()}
    torch.testing.assert_close(
        objective.meta_loss(moved, [(x,), y]), F.cross_entropy(torch.func.functional_call(model, moved, (x,)), y)
    )

    plain = MetaObjective(model)
    torch.testing.assert_close(plain.train_loss(params, (x, y)), F.cross_entropy(model(x).float(), y))
    # batches are `(inputs, labels)` pairs: anything else fails, in every loss, the held one too
    mapping = {"pixel_values": x, "labels": y}
    held = objective.problem(mapping, (x, y), LR).held_train_loss
    for call in (lambda: objective.meta_loss(params, mapping), lambda: objective.train_loss(params, mapping),
                 lambda: held(params)):  # fmt: skip
        with pytest.raises(ValueError, match=r"\(inputs, labels\)` pairs, got dict"):
            call()
    with pytest.raises(ValueError, match="meta_params has 1 tensors"):
        MetaObjective(model, weighter, meta_params=[torch.zeros(1, requires_grad=True)])


def test_held_train_loss_feeds_the_weighter_the_losses_at_params():
    objective, (train_batch, meta_batch) = tiny_objective()
    problem = objective.problem(train_batch, meta_batch, LR)
    params, held = problem.params, problem.held_train_loss
    moved = shifted(params)
    # the weighting net's input: the losses at `params`, whatever weights are evaluated
    torch.testing.assert_close(held(moved), held_loss_by_hand(objective, moved, params, train_batch))
    # at `params` the held input is the input itself: the training loss
    torch.testing.assert_close(held(params), objective.train_loss(params, train_batch))
    # elsewhere it is another objective than the training loss, which feeds the losses at the weights evaluated
    torch.testing.assert_close(
        objective.train_loss(moved, train_batch), held_loss_by_hand(objective, moved, moved, train_batch)
    )
    assert not torch.allclose(held(moved), objective.train_loss(moved, train_batch))
    # the held input belongs to the problem's weights: a problem at `moved` holds the losses there
    at_moved = objective.problem(train_batch, meta_batch, LR, params=moved)
    torch.testing.assert_close(at_moved.held_train_loss(moved), objective.train_loss(moved, train_batch))
    torch.testing.assert_close(
        at_moved.held_train_loss(params), held_loss_by_hand(objective, params, moved, train_batch)
    )


def test_held_losses_are_computed_once_without_a_graph(monkeypatch):
    objective, (train_batch, meta_batch) = tiny_objective()
    calls = []
    per_sample = objective.per_sample

    def counting(weights, batch, training=True):
        calls.append((weights, torch.is_grad_enabled()))
        return per_sample(weights, batch, training)

    monkeypatch.setattr(objective, "per_sample", counting)
    problem = objective.problem(train_batch, meta_batch, LR)
    assert calls == []  # nothing computed before an estimator asks
    weights = {name: p.clone().requires_grad_(True) for name, p in shifted(problem.params).items()}
    for _ in range(3):
        torch.autograd.grad(problem.held_train_loss(weights), list(weights.values()))
    assert len(calls) == 4 and [grad for w, grad in calls if w is problem.params] == [False]

    # losses known already (the base step's) are held as given: no forward at `params`
    given = per_sample(problem.params, train_batch).detach()
    calls.clear()
    known = objective.problem(train_batch, meta_batch, LR, held_losses=given)
    torch.testing.assert_close(known.held_train_loss(weights), problem.held_train_loss(weights))
    assert len(calls) == 2 and not any(w is known.params for w, _ in calls)
    # given other losses, the weighter sees those
    other = objective.problem(train_batch, meta_batch, LR, held_losses=given + 1)
    assert not torch.allclose(other.held_train_loss(weights), problem.held_train_loss(weights))


def test_without_a_loss_weighter_nothing_is_held(monkeypatch):
    objective, (train_batch, meta_batch) = tiny_objective()
    plain = MetaObjective(objective.model, per_sample_loss=per_sample_ce64)
    calls = []
    per_sample = plain.per_sample
    monkeypatch.setattr(plain, "per_sample", lambda w, b, training=True: calls.append(w) or per_sample(w, b, training))
    problem = plain.problem(train_batch, meta_batch, LR)
    moved = shifted(problem.params)
    # the training loss at the weights evaluated, one forward there and none at `params`
    expected = F.cross_entropy(torch.func.functional_call(plain.model, moved, (train_batch[0],)), train_batch[1])
    torch.testing.assert_close(problem.held_train_loss(moved), expected)
    assert len(calls) == 1 and calls[0] is moved
