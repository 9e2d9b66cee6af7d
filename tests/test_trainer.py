"""MetaTrainer: the meta step against hand-unrolled references, training_step (accumulation, the base step's losses
reused), NaN skips, logging and agreement with a reference, the meta-step event, transformers and plain models.
Checkpoints and resume: test_checkpointing.py; the guards on a meta step's outcome: test_step_guards.py."""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import datasets
import pytest
import torch
from helpers import (
    OneStepLookahead,
    Recorder,
    Scale,
    image_dataset,
    make_args,
    make_trainer,
    snapshot,
    tiny_bert,
    tiny_tokenizer,
    tokenized_text_dataset,
)
from torch import nn
from torch.func import functional_call

from metatrain import MetaTrainer
from metatrain.diagnostics import cosine, flatten
from metatrain.estimators import create_estimator
from metatrain.losses import weighted_mean
from metatrain.modules import MetaWeightNet
from metatrain.trainer import MetaTrainerCallback
from metatrain.utils import step_seed


def unrolled_hypergradient(model, mwn, train_batch, meta_batch, meta_training_mode: bool = True):
    """Reference: one SGD step (lr 0.1) on the weighted training loss unrolled by hand, with its own copies of weights
    and buffers, and the meta loss's gradient w.r.t. the weighting net through it; the meta loss's forward runs with
    the model in training mode or not (`meta_training_mode`)."""
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lam = {n: p.detach().clone().requires_grad_() for n, p in mwn.named_parameters()}
    bufs = lambda: {n: b.clone() for n, b in model.named_buffers()}  # noqa: E731
    ce = nn.functional.cross_entropy(
        functional_call(model, {**theta, **bufs()}, (train_batch["pixel_values"],)), train_batch["labels"],
        reduction="none",
    )  # fmt: skip
    inner = weighted_mean(ce, functional_call(mwn, lam, (ce,)))
    g = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    stepped = {n: p - 0.1 * gi for (n, p), gi in zip(theta.items(), g)}
    model.train(meta_training_mode)
    logits = functional_call(model, {**stepped, **bufs()}, (meta_batch["pixel_values"],))
    model.train()
    outer = nn.functional.cross_entropy(logits, meta_batch["labels"])
    return dict(zip(lam, torch.autograd.grad(outer, list(lam.values()))))


def test_meta_step_matches_unrolled_reference_and_touches_nothing_else(tmp_path):
    trainer = make_trainer(
        tmp_path, hypergradient="t1t2", meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0},
    )  # fmt: skip
    trainer.create_optimizer()
    model, mwn = trainer.model, trainer.meta_module
    train_batch = next(iter(trainer.get_train_dataloader()))
    meta_batch = next(iter(trainer.get_meta_dataloader()))
    model_before, mwn_before = snapshot(model), snapshot(mwn)
    expected = unrolled_hypergradient(model, mwn, train_batch, meta_batch)

    assert trainer.meta_step(train_batch)
    for name, p in mwn.named_parameters():  # SGD with lr 1: the update is minus the hypergradient
        torch.testing.assert_close(mwn_before[name] - p.detach(), expected[name], rtol=1e-4, atol=1e-7)
        assert not p.requires_grad and p.grad is None
    for name, value in snapshot(model).items():  # weights and BatchNorm running statistics untouched
        assert torch.equal(value, model_before[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_meta_loss_in_eval_mode_uses_running_statistics_and_matches_reference(tmp_path):
    """`meta_loss_mode="eval"` (LFT's code): the meta loss's forward normalizes by batch norm's running statistics, the
    lookahead's training loss by the batch's own. Checked against autograd through a hand-unrolled SGD step."""
    trainer = make_trainer(
        tmp_path, hypergradient="t1t2", meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0}, meta_loss_mode="eval",
    )  # fmt: skip
    trainer.create_optimizer()
    model, mwn = trainer.model, trainer.meta_module
    with torch.no_grad():  # running statistics far from any batch's, so that the two modes differ
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(4.0)
    train_batch = next(iter(trainer.get_train_dataloader()))
    meta_batch = next(iter(trainer.get_meta_dataloader()))
    model_before, mwn_before = snapshot(model), snapshot(mwn)
    expected = unrolled_hypergradient(model, mwn, train_batch, meta_batch, meta_training_mode=False)
    in_train_mode = unrolled_hypergradient(model, mwn, train_batch, meta_batch)
    assert not all(torch.allclose(expected[n], in_train_mode[n], rtol=1e-2) for n in expected)

    assert trainer.meta_step(train_batch)
    for name, p in mwn.named_parameters():
        torch.testing.assert_close(mwn_before[name] - p.detach(), expected[name], rtol=1e-4, atol=1e-7)
    assert model.training and all(m.training for m in model.modules())
    for name, value in snapshot(model).items():  # weights and running statistics untouched
        assert torch.equal(value, model_before[name]), name
    with pytest.raises(ValueError, match="meta_loss_mode='test'.*'train', 'eval'"):
        make_args(tmp_path, meta_loss_mode="test")


@pytest.mark.parametrize("estimator", ["evograd", "t1t2", "first_order"])
def test_train_runs_logs_and_keeps_meta_params_out_of_base_optimizer(tmp_path, estimator):
    trainer = make_trainer(tmp_path, hypergradient=estimator, hypergradient_kwargs='{"sigma": 0.01}'
                           if estimator == "evograd" else None)  # fmt: skip
    before = snapshot(trainer.meta_module)
    trainer.train()
    base_ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not base_ids & {id(p) for p in trainer.meta_module.parameters()}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"meta_loss", "hypergradient_norm", "meta_step_seconds", "meta_steps_skipped"} <= set(entry)
        assert entry["meta_loss"] > 0 and entry["meta_steps_skipped"] == 0
    changed = any(not torch.equal(before[k], v) for k, v in snapshot(trainer.meta_module).items())
    # first-order has no direct term here: only the meta-optimizer's weight decay moves the weighting net
    assert changed
    if estimator == "first_order":
        assert all(entry["hypergradient_norm"] == 0.0 for entry in logs)
    else:
        assert all(entry["hypergradient_norm"] > 0.0 for entry in logs)


@pytest.mark.parametrize(
    "estimator, options",
    [("t1t2_fd", None), ("neumann", {"terms": 3}), ("reverse", {"horizon": 2}), ("hyperdistill", None),
     ("drmad", {"horizon": 3}),
     ("evograd", {"memory_lean": True, "population": 4, "sigma": "auto"}),
     ("evograd", {"forward_mode": True, "population": 3, "sigma": "auto"})],
)  # fmt: skip
def test_every_estimator_trains(tmp_path, estimator, options):
    trainer = make_trainer(tmp_path, hypergradient=estimator, hypergradient_kwargs=options)
    before = snapshot(trainer.meta_module)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["hypergradient_norm"] > 0 and entry["meta_steps_skipped"] == 0 for entry in logs)
    assert any(not torch.equal(before[k], v) for k, v in snapshot(trainer.meta_module).items())


@pytest.mark.parametrize("position", ["before", "after"])
def test_one_meta_step_per_optimizer_step_with_accumulation(tmp_path, position, monkeypatch):
    trainer = make_trainer(
        tmp_path, gradient_accumulation_steps=3, max_steps=4, meta_interval=2, meta_step_position=position
    )
    calls = []
    real = trainer.meta_step
    monkeypatch.setattr(trainer, "meta_step", lambda *a: calls.append(trainer.state.global_step) or real(*a))
    trainer.train()
    assert trainer.state.global_step == 4
    assert calls == [0, 2]


def count_forwards(tmp_path, position: str, accumulation: int, meta_train_batch: str):
    """Trains 2 steps of EvoGrad (K=2); returns the model's forwards, and per meta step its training batch size and
    whether it got the base step's losses, having checked those against a fresh forward at the current weights."""
    trainer = make_trainer(
        tmp_path, hypergradient="evograd", hypergradient_kwargs={"sigma": 0.01}, meta_step_position=position,
        gradient_accumulation_steps=accumulation, per_device_train_batch_size=8 // accumulation, max_steps=2,
        meta_train_batch=meta_train_batch,
    )  # fmt: skip
    model, count, seen, real = trainer.model, [], [], trainer.meta_step
    model.register_forward_pre_hook(lambda *_: count.append(1))

    def checking(batch, base_losses=None):
        seen.append((len(batch["labels"]), base_losses is not None))
        if base_losses is not None:
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            with torch.no_grad():
                logits = functional_call(
                    model, {**dict(model.named_parameters()), **buffers}, (batch["pixel_values"],)
                )
            count.pop()  # this check's own forward
            expected = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            torch.testing.assert_close(base_losses, expected)
        return real(batch, base_losses)

    trainer.meta_step = checking
    trainer.train()
    assert trainer.meta_steps_skipped == 0
    return len(count), seen


@pytest.mark.parametrize(
    "hypergradient, meta_module, overrides, position",
    [("evograd", None, {}, "after"), ("t1t2_fd", None, {}, "after"), ("t1t2", None, {}, "before"),
     ("evograd", "rotation", {}, "before"), ("evograd", None, {"gradient_accumulation_steps": 2}, "before"),
     ("evograd", None, {"gradient_accumulation_steps": 2, "meta_train_batch": "micro_batch"}, "after"),
     ("evograd", None, {"meta_step_position": "before"}, "before"),
     ("t1t2", None, {"meta_step_position": "after"}, "after")],
)  # fmt: skip
def test_the_meta_step_position_is_after_where_it_saves_a_forward(tmp_path, hypergradient, meta_module, overrides,
                                                                  position):  # fmt: skip
    """Unset, the meta step runs `after` the base step's forward where that spares it one (a loss weighter's held
    input for EvoGrad and `t1t2_fd`, not on a joined window) and `before` otherwise; a set position is kept."""
    from metatrain.modules import LearnableRotation

    module = LearnableRotation(degrees=10.0) if meta_module == "rotation" else None
    trainer = make_trainer(tmp_path, hypergradient=hypergradient, meta_module=module, **overrides)
    assert trainer.meta_step_position == position


def test_token_level_labels_reuse_the_base_step_losses_too(tmp_path):
    """Per-example losses of a token-classification batch are one per example while its labels are per token: `after`
    still hands them to the meta step, which then runs no forward of its own at the current weights."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, max_position_embeddings=16)  # fmt: skip
    model = BertForTokenClassification(config)
    g = torch.Generator().manual_seed(0)
    data = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"input_ids": torch.randint(1, 50, (n, 5), generator=g).numpy(),
         "labels": torch.randint(0, 3, (n, 5), generator=g).numpy()}
    ).with_format("torch")  # fmt: skip
    trainer = MetaTrainer(model=model, args=make_args(tmp_path, hypergradient="evograd", max_steps=2),
                          train_dataset=data(32), meta_dataset=data(16), meta_module=MetaWeightNet())  # fmt: skip
    assert trainer.meta_step_position == "after"
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer.train()
    assert trainer.meta_steps_skipped == 0
    assert len(forwards) == 2 * 4  # per step: the base forward, K=2 copies and the meta forward; none at the weights


@pytest.mark.parametrize(
    "accumulation, meta_train_batch, size, reused",
    [(1, "window", 8, True), (2, "window", 8, False), (2, "micro_batch", 4, True)],
)
def test_meta_step_after_reuses_the_base_step_losses(tmp_path, accumulation, meta_train_batch, size, reused):
    """`after`, the weighting net's held input is the base step's per-example losses of the meta step's training
    batch, equal to a fresh forward at the current weights, and EvoGrad's step runs one forward of the model fewer
    than `before`, where the meta step computes them itself. Not on a joined window: its batch norm statistics are
    not those of the micro-batches the base step saw."""
    before, seen_before = count_forwards(tmp_path, "before", accumulation, meta_train_batch)
    after, seen_after = count_forwards(tmp_path, "after", accumulation, meta_train_batch)
    assert seen_before == [(size, False)] * 2 and seen_after == [(size, reused)] * 2
    # per step: the base forwards, K=2 copies, the meta forward, and the forward at the current weights unless reused
    assert (before, after) == (2 * (accumulation + 4), 2 * (accumulation + 4 - reused))


@pytest.mark.parametrize("estimator, options", [("t1t2", None), ("evograd", {"sigma": "auto"})])
def test_learning_rate_warmup_from_zero(tmp_path, estimator, options):
    """The lookahead uses the scheduled learning rate, which a warmup starts at 0."""
    trainer = make_trainer(tmp_path, hypergradient=estimator, hypergradient_kwargs=options, warmup_steps=2)
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.meta_steps_skipped == 0


def test_non_finite_hypergradient_skips_meta_step(tmp_path, caplog):
    trainer = make_trainer(tmp_path, meta_nan=True, hypergradient="evograd", meta_diagnostics_steps=1)
    before = snapshot(trainer.meta_module)
    with caplog.at_level(logging.WARNING, logger="metatrain.step_guards"):
        trainer.train()
    assert trainer.meta_steps_skipped == 4
    assert "meta step skipped" in caplog.text
    for k, v in snapshot(trainer.meta_module).items():
        assert torch.equal(v, before[k])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = [entry for entry in trainer.state.log_history if "meta_steps_skipped" in entry]
    assert logs[-1]["meta_steps_skipped"] == 4
    # a skipped step has no agreement with the reference: counted apart, never averaged in as a perfect cosine
    assert sum(entry["hypergradient_cosine_undefined_steps"] for entry in logs) == 4
    assert all(math.isnan(entry["hypergradient_cosine_to_t1t2"]) for entry in logs)


def test_a_skipped_meta_step_leaves_the_estimator_state_as_it_was(tmp_path):
    """HyperDistill's running average, distilled batch, count of inner optimisations and fitted theta must not take in
    a step that is skipped: the state after the run is that of a run whose skipped call never happened."""
    from metatrain.estimators import HyperDistill

    calls, before = [], []

    class FailingSecondCall(HyperDistill):
        def estimate(self, problem):
            before.append(copy.deepcopy(self.state_dict()))
            result = super().estimate(problem)
            calls.append(self.state_dict()["step"])
            if len(calls) == 2:
                return type(result)(tuple(torch.full_like(g, math.nan) for g in result.grads), result.meta_loss)
            return result

    options = {"gamma": 0.9, "horizon": 1, "estimation_period": 1}  # a fit of theta at every call
    trainer = make_trainer(tmp_path, estimator=FailingSecondCall(**options))
    trainer.train()
    assert trainer.meta_steps_skipped == 1
    assert calls == [1, 2, 2, 3]  # the third call took the skipped one's place
    assert trainer.estimator.state_dict()["step"] == 3
    # all of it, running average, distilled batch, generator, inner optimisations and theta, as before the skipped call
    assert before[1]["theta"] is not None and before[1]["w_star"] is not None and before[1]["inner"] == 1
    torch.testing.assert_close(before[2], before[1], rtol=0, atol=0)


def test_embedded_meta_module_on_transformers_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, max_position_embeddings=16)  # fmt: skip
    model = BertForSequenceClassification(config)
    scale = Scale(16)
    model.bert.add_module("meta_scale", scale)
    handle = model.bert.encoder.layer[0].output.register_forward_hook(scale)

    def text_dataset(n, seed):
        g = torch.Generator().manual_seed(seed)
        return datasets.Dataset.from_dict(
            {"input_ids": torch.randint(1, 50, (n, 8), generator=g).numpy(),
             "attention_mask": torch.ones(n, 8, dtype=torch.long).numpy(),
             "labels": torch.randint(0, 3, (n,), generator=g).numpy()}
        ).with_format("torch")  # fmt: skip

    trainer = MetaTrainer(
        model=model, args=make_args(tmp_path, hypergradient="t1t2", gradient_accumulation_steps=2),
        train_dataset=text_dataset(32, 0), meta_dataset=text_dataset(16, 1), meta_module=scale,
    )  # fmt: skip
    assert trainer.meta_param_names == ["bert.meta_scale.log_scale"]
    trainer.train()
    assert not torch.equal(scale.log_scale, torch.zeros(16))
    base_ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(scale.log_scale) not in base_ids
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["hypergradient_norm"] > 0 for entry in logs)
    # the loss is a per-batch mean whatever the accumulation (no num_items_in_batch doubling)
    assert 0.5 < logs[0]["loss"] < 2.0
    metrics = trainer.evaluate(text_dataset(16, 2))
    assert "eval_loss" in metrics
    handle.remove()


def test_timm_model_with_pixel_values(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    trainer = make_trainer(tmp_path, model=model, max_steps=2, per_device_train_batch_size=4)
    trainer.train()
    metrics = trainer.evaluate(image_dataset(8, 5))
    assert metrics["eval_loss"] > 0


def test_meta_step_memory_is_logged_and_t1t2_costs_more_than_evograd(tmp_path):
    memory = {}
    for estimator in ("evograd", "t1t2"):
        trainer = make_trainer(tmp_path / estimator, hypergradient=estimator, meta_profile_memory=True, max_steps=2)
        trainer.train()
        memory[estimator] = trainer.state.log_history[0]["meta_step_memory_mb"]
    assert 0 < memory["evograd"] < memory["t1t2"]


def test_input_transform_rotates_training_inputs_only_and_meta_step_matches_reference(tmp_path):
    from metatrain.modules import LearnableRotation, rotate_images

    rotation = LearnableRotation(degrees=10.0)
    trainer = make_trainer(
        tmp_path, meta_module=rotation, hypergradient="t1t2", meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0},
    )  # fmt: skip
    trainer.create_optimizer()
    model = trainer.model
    train_batch = next(iter(trainer.get_train_dataloader()))
    meta_batch = next(iter(trainer.get_meta_dataloader()))
    angle = rotation.angle.detach().clone()

    # reference: one SGD step on rotated training inputs, meta loss on unrotated meta inputs
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lam = angle.clone().requires_grad_()
    bufs = lambda: {n: b.clone() for n, b in model.named_buffers()}  # noqa: E731
    rotated = rotate_images(train_batch["pixel_values"], lam)
    inner = nn.functional.cross_entropy(functional_call(model, {**theta, **bufs()}, (rotated,)), train_batch["labels"])
    g = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    stepped = {n: p - 0.1 * gi for (n, p), gi in zip(theta.items(), g)}
    outer = nn.functional.cross_entropy(
        functional_call(model, {**stepped, **bufs()}, (meta_batch["pixel_values"],)), meta_batch["labels"]
    )
    (expected,) = torch.autograd.grad(outer, [lam])
    assert expected != 0

    assert trainer.meta_step(train_batch)
    torch.testing.assert_close(angle - rotation.angle.detach(), expected, rtol=1e-4, atol=1e-7)

    # the base step and evaluation: training batches are rotated, evaluation batches are not
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].detach().clone())))
    batch = {k: v[:4] for k, v in train_batch.items()}
    model.train()
    trainer.compute_loss(model, batch)
    model.eval()
    trainer.compute_loss(model, batch)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen[0][1], rotation(batch["pixel_values"]))
    assert seen[0][0] and not seen[1][0] and torch.equal(seen[1][1], batch["pixel_values"])
    trainer.train()
    assert all(entry["hypergradient_norm"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_agreement_with_a_reference_is_logged(tmp_path):
    """HyperDistill with gamma = 0 is T1-T2 times its fitted theta on a loss weighter (no direct term), so the logged
    cosine must be 1 and the norm ratio theta."""
    trainer = make_trainer(
        tmp_path, hypergradient="hyperdistill", hypergradient_kwargs={"gamma": 0.0}, meta_diagnostics_steps=2
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["hypergradient_cosine_to_t1t2"] > 0.999
        assert abs(entry["hypergradient_norm_ratio_to_t1t2"] - trainer.estimator.theta) < 1e-3
        assert entry["hypergradient_cosine_undefined_steps"] == 0
    assert abs(trainer.estimator.theta - 1) > 0.01
    plain = make_trainer(tmp_path / "plain", hypergradient="t1t2_fd")
    plain.train()
    assert not any("hypergradient_cosine_to_t1t2" in entry for entry in plain.state.log_history)
    # a zero hypergradient (first_order: the meta loss does not depend on the weighting net) has no direction: its
    # steps are counted apart and the cosine is NaN, not 0; the norm ratio says 0
    zero = make_trainer(tmp_path / "zero", hypergradient="first_order", meta_diagnostics_steps=2)
    zero.train()
    logs = [entry for entry in zero.state.log_history if "loss" in entry]
    assert [entry["hypergradient_cosine_undefined_steps"] for entry in logs] == [1, 1]
    assert all(math.isnan(e["hypergradient_cosine_to_t1t2"]) for e in logs)
    assert all(e["hypergradient_norm_ratio_to_t1t2"] == 0 for e in logs)
    with pytest.raises(ValueError, match="keeps state"):
        make_trainer(tmp_path, meta_diagnostics_steps=1, meta_diagnostics_reference="reverse")
    with pytest.raises(ValueError, match="meta_diagnostics_reference='exact'"):
        make_args(tmp_path, meta_diagnostics_steps=1, meta_diagnostics_reference="exact")


def test_weighting_net_inputs_are_held_at_the_current_weights_for_perturbing_estimators(tmp_path):
    """The finite-difference lookahead evaluates the training loss at perturbed weights. The weighting net must still
    see the per-sample losses at the current weights (autograd estimators see them detached there): only then does
    it agree with T1-T2. Fed the perturbed losses it differed by up to 12x in norm on this problem."""
    trainer = make_trainer(tmp_path, hypergradient="t1t2_fd", meta_diagnostics_steps=1, logging_steps=1)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "hypergradient_cosine_to_t1t2" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert entry["hypergradient_cosine_to_t1t2"] > 0.999
        assert abs(entry["hypergradient_norm_ratio_to_t1t2"] - 1) < 0.02


def test_a_perturbing_reference_is_measured_on_the_held_objective(tmp_path):
    trainer = make_trainer(
        tmp_path, hypergradient="t1t2", meta_diagnostics_steps=1, meta_diagnostics_reference="t1t2_fd", logging_steps=1
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "hypergradient_cosine_to_t1t2_fd" in entry]
    assert len(logs) == 4 and all(entry["hypergradient_cosine_to_t1t2_fd"] > 0.999 for entry in logs)


# -------------------------------------------------------------------------------------- attached transforms (LFT)
class InFloat64(nn.Module):
    """`model` in float64, fed float32 inputs: for checks that float32 rounding would drown."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.double()

    def forward(self, x):
        return self.model(x.double())


def lft_trainer(tmp_path, float64: bool = False, **overrides):
    import timm

    from metatrain.modules import attach_feature_wise_transforms

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1, zero_init_last=False)
    model = InFloat64(model) if float64 else model
    transforms = attach_feature_wise_transforms(model)
    trainer = make_trainer(tmp_path, model=model, meta_module=transforms, **overrides)
    return trainer, model, transforms


def test_attached_transform_is_off_in_the_meta_loss_and_meta_step_matches_reference(tmp_path):
    """LFT's bilevel step: the lookahead uses the training loss with the FT layers on, the meta loss runs with them
    off. Checked against autograd through a hand-unrolled SGD step with the same FT noise."""
    trainer, model, transforms = lft_trainer(
        tmp_path, hypergradient="t1t2", meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0},
    )  # fmt: skip

    seed = lambda stream: step_seed(trainer.args.seed, 0, stream)  # noqa: E731  the meta step's draws at step 0
    trainer.create_optimizer()
    train_batch = next(iter(trainer.get_train_dataloader()))
    meta_batch = next(iter(trainer.get_meta_dataloader()))
    ft_names = [n for n, _ in model.named_parameters() if "ft_" in n]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if "ft_" not in n}
    lam = {n: before[n].clone().requires_grad_() for n in ft_names}
    bufs = lambda: {n: b.clone() for n, b in model.named_buffers()}  # noqa: E731
    torch.manual_seed(seed(1))
    logits = functional_call(model, {**theta, **lam, **bufs()}, (train_batch["pixel_values"],))
    inner = nn.functional.cross_entropy(logits, train_batch["labels"])
    g = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    stepped = {n: p - 0.1 * gi for (n, p), gi in zip(theta.items(), g)}
    with transforms.disabled():
        outer = nn.functional.cross_entropy(
            functional_call(model, {**stepped, **lam, **bufs()}, (meta_batch["pixel_values"],)), meta_batch["labels"]
        )
    expected = torch.autograd.grad(outer, list(lam.values()), retain_graph=True)
    assert all(e.abs().sum() > 0 for e in expected)
    # the meta loss with the FT layers on is another objective: its hypergradient differs
    torch.manual_seed(seed(0))
    outer_on = nn.functional.cross_entropy(
        functional_call(model, {**stepped, **lam, **bufs()}, (meta_batch["pixel_values"],)), meta_batch["labels"]
    )
    on = torch.autograd.grad(outer_on, list(lam.values()))
    assert not all(torch.allclose(a, b, rtol=1e-2) for a, b in zip(on, expected))

    assert trainer.meta_step(train_batch)
    after = dict(model.named_parameters())
    for name, e in zip(ft_names, expected):
        torch.testing.assert_close(before[name] - after[name].detach(), e, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(before[n], p) for n, p in after.items() if "ft_" not in n)
    assert transforms.enabled


class WithoutCommonNoise(MetaTrainerCallback):
    """`t1t2_fd` and T1-T2 on the meta step's problem with fresh random draws at every loss call."""

    def on_meta_step(self, args, state, control, *, objective, problem, **kwargs):
        fresh = copy.copy(objective)
        fresh.noise = lambda stream: contextlib.nullcontext()
        redrawn = fresh.problem(problem.train_batch, problem.meta_batch, problem.lr, params=problem.params)
        fd = create_estimator("t1t2_fd", epsilon=1e-5).estimate(redrawn)
        self.cosine = cosine(flatten(fd.grads), flatten(create_estimator("t1t2").estimate(redrawn).grads))


def test_random_layers_draw_the_same_noise_at_every_weight_of_one_meta_step(tmp_path):
    """Finite differences of a training loss with LFT's noise only make sense when both evaluations see the same
    noise: the trainer fixes the draws within a meta step, so `t1t2_fd` agrees with T1-T2. (In float64: in float32 the
    finite difference's rounding moves the cosine of one step with the thread count.)"""
    options = dict(hypergradient="t1t2_fd", hypergradient_kwargs={"epsilon": 1e-5}, meta_diagnostics_steps=1)
    trainer, _, _ = lft_trainer(tmp_path, float64=True, logging_steps=1, **options)
    batch = next(iter(trainer.get_train_dataloader()))
    rng_before = torch.random.get_rng_state()
    trainer.meta_step(batch)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # neither the noise nor the meta data move the RNG
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "hypergradient_cosine_to_t1t2" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert entry["hypergradient_cosine_to_t1t2"] > 0.999

    # without common draws the finite difference measures the noise, not the weights
    without = WithoutCommonNoise()
    trainer, _, _ = lft_trainer(tmp_path / "fresh", float64=True, callbacks=[without], **options)
    trainer.meta_step(batch)
    assert without.cosine < 0.5


def test_the_estimators_noise_comes_from_the_run_seed_and_step_and_leaves_the_global_rng(tmp_path):
    """EvoGrad's population at a step is the same whatever the global RNG holds, and drawing it moves nothing."""
    updates = []
    for global_seed in (0, 1):
        trainer = make_trainer(tmp_path / str(global_seed), hypergradient="evograd", meta_optimizer="sgd",
                               meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0})  # fmt: skip
        trainer.create_optimizer()
        train_batch = next(iter(trainer.get_train_dataloader()))
        before = snapshot(trainer.meta_module)
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        assert trainer.meta_step(train_batch)
        assert torch.equal(torch.get_rng_state(), state)
        updates.append({k: before[k] - v for k, v in snapshot(trainer.meta_module).items()})
    assert any(v.abs().sum() > 0 for v in updates[0].values())
    for k, v in updates[0].items():
        assert torch.equal(v, updates[1][k]), k


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_set_through_accelerate_is_seen(tmp_path, monkeypatch, precision):
    """`accelerate launch` configs set `ACCELERATE_MIXED_PRECISION`, not the flags."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
    if precision == "fp16":
        with pytest.raises(ValueError, match="fp16=True on CPU"):
            make_trainer(tmp_path, hypergradient="evograd")
    else:
        assert make_trainer(tmp_path, hypergradient="evograd").estimator.sigma == 0.01


def test_evograd_under_bf16_perturbs_at_a_scale_bf16_resolves(tmp_path, caplog):
    from metatrain.trainer import MIXED_PRECISION_EVOGRAD

    trainer = make_trainer(tmp_path, hypergradient="evograd", bf16=True)
    assert trainer.estimator.sigma == MIXED_PRECISION_EVOGRAD["sigma"]
    assert trainer.estimator.temperature == MIXED_PRECISION_EVOGRAD["temperature"]
    # the same expected lookahead step as the paper's sigma 0.001 and temperature 0.05
    step = MIXED_PRECISION_EVOGRAD["sigma"] ** 2 / MIXED_PRECISION_EVOGRAD["temperature"]
    assert math.isclose(step, 0.001**2 / 0.05)
    assert make_trainer(tmp_path, hypergradient="evograd").estimator.sigma == 0.001  # fp32 keeps the paper's
    with caplog.at_level(logging.WARNING, logger="metatrain.trainer"):
        chosen = make_trainer(tmp_path, hypergradient="evograd", bf16=True, hypergradient_kwargs={"sigma": 0.001})
    assert chosen.estimator.sigma == 0.001 and "sigma=0.001 under bf16" in caplog.text


def test_cpu_runs_do_not_pin_memory(tmp_path):
    import warnings

    if torch.cuda.is_available():
        pytest.skip("a GPU is there: pinning is right")
    trainer = make_trainer(tmp_path, max_steps=2, use_cpu=False)  # on CPU for want of a GPU, not by request
    assert trainer.args.dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]


@pytest.mark.parametrize("estimator", ["t1t2", "neumann", "reverse", "hyperdistill"])
def test_second_order_estimators_train_a_model_with_fused_attention(tmp_path, estimator):
    """Without dropout a BERT's attention runs a fused kernel that has no double backward: the meta step of an
    estimator that differentiates through a gradient must run attention on the math backend."""
    tokenizer = tiny_tokenizer(tmp_path)
    from transformers import DataCollatorWithPadding

    def build(**options):
        return MetaTrainer(
            model=tiny_bert(tokenizer.vocab_size),
            args=make_args(tmp_path, hypergradient=estimator, max_steps=3, hypergradient_kwargs=options),
            train_dataset=tokenized_text_dataset(tokenizer, 24, 0),
            meta_dataset=tokenized_text_dataset(tokenizer, 8, 1),
            meta_module=MetaWeightNet(), data_collator=DataCollatorWithPadding(tokenizer),
        )  # fmt: skip

    if estimator == "hyperdistill":  # its default mixes rows of batches, which dynamic padding makes unequal
        with pytest.raises(ValueError, match="padding='max_length'.*batch_mixing='replace'"):
            build().train()
    trainer = build(**({"batch_mixing": "replace"} if estimator == "hyperdistill" else {}))
    trainer.train()
    assert trainer.meta_steps_skipped == 0


def test_a_user_estimator_trains_through_meta_trainer_and_the_meta_step_event_sees_every_step(tmp_path):
    recorders = {}
    for name in ("t1t2", "user"):
        recorders[name] = Recorder()
        trainer = make_trainer(
            tmp_path / name, hypergradient="t1t2", estimator=OneStepLookahead() if name == "user" else None,
            callbacks=[recorders[name]],
        )  # fmt: skip
        trainer.train()
        assert trainer.meta_steps_skipped == 0
    user, reference = recorders["user"].events, recorders["t1t2"].events
    assert [e[0] for e in user] == [0, 1, 2, 3] and all(not e[4] for e in user)
    for (_, again, mine, norm, _, _), (_, _, theirs, _, _, _) in zip(user, reference):
        assert norm > 0
        for a, b, c in zip(mine.grads, theirs.grads, again.grads):  # the same run, and the event's problem again
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-8)


def test_the_meta_step_event_reports_a_skipped_step(tmp_path):
    recorder = Recorder()
    make_trainer(tmp_path, meta_nan=True, hypergradient="evograd", callbacks=[recorder], max_steps=2).train()
    assert [e[4] for e in recorder.events] == [True, True]
