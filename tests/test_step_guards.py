"""The guards on a meta step's outcome (metatrain.step_guards): a hypergradient exactly zero for many steps is warned
about once, and non-finite model weights stop the run with their cause."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import bn_model, image_dataset, make_args, make_trainer, snapshot

from metatrain import MetaTrainer
from metatrain.modules import MetaWeightNet
from metatrain.step_guards import MetaStepGuards


def test_non_finite_model_weights_stop_the_run_with_their_cause(tmp_path, caplog):
    trainer = MetaTrainer(
        model=bn_model(), args=make_args(tmp_path, hypergradient="evograd", max_steps=8),
        train_dataset=image_dataset(64, seed=1, nan=True), meta_dataset=image_dataset(20, seed=2),
        meta_module=MetaWeightNet(),
    )  # fmt: skip
    before = snapshot(trainer.meta_module)
    with caplog.at_level(logging.WARNING, logger="metatrain.step_guards"):
        with pytest.raises(RuntimeError, match=r"first seen at step 1;.*3 meta steps in a row.*NaN"):
            trainer.train()
    assert "the model's weights are not finite (first seen at step 1" in caplog.text
    assert "The meta-parameters are unchanged; the model is not." in caplog.text
    for k, v in snapshot(trainer.meta_module).items():
        assert torch.equal(v, before[k])


def test_a_hypergradient_exactly_zero_for_many_steps_is_warned_about(tmp_path, caplog):
    trainer = make_trainer(tmp_path, hypergradient="first_order", max_steps=4, meta_zero_hypergradient_patience=3)
    with caplog.at_level(logging.WARNING, logger="metatrain.step_guards"):
        trainer.train()
    assert caplog.text.count("exactly zero for 3 meta steps in a row") == 1
    caplog.clear()
    trainer = make_trainer(tmp_path, hypergradient="t1t2", max_steps=4, meta_zero_hypergradient_patience=3)
    with caplog.at_level(logging.WARNING, logger="metatrain.step_guards"):
        trainer.train()
    assert "exactly zero" not in caplog.text


def test_guards_count_in_a_row_and_reset(caplog):
    guards = MetaStepGuards(zero_patience=2, nonfinite_patience=2)
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    with caplog.at_level(logging.WARNING, logger="metatrain.step_guards"):
        guards.done(zero, step=1, estimator_name="first_order")
        guards.done(one, step=2, estimator_name="first_order")  # the run of zeros is broken
        guards.done(zero, step=3, estimator_name="first_order")
        assert "exactly zero" not in caplog.text
        guards.done(zero, step=4, estimator_name="first_order")
    assert caplog.text.count("exactly zero for 2 meta steps in a row (step 4, first_order)") == 1
    bad = {"w": torch.tensor([float("nan")])}
    guards.skipped(bad, torch.tensor(float("nan")), torch.tensor(float("nan")), step=5, skipped=1)
    guards.done(one, step=6, estimator_name="evograd")  # a finite step in between: the count starts again
    guards.skipped(bad, torch.tensor(float("nan")), torch.tensor(float("nan")), step=7, skipped=2)
    with pytest.raises(RuntimeError, match="first seen at step 7; 1 tensors.*2 meta steps in a row"):
        guards.skipped(bad, torch.tensor(float("nan")), torch.tensor(float("nan")), step=8, skipped=3)
