"""Online meta-learning over a task distribution: tasks drawn from a labelled dataset, read one per inner
optimisation; the weights restart (fixed or Reptile initialisation), the optimizer state is cleared, the estimator
resets, meta batches come from the current task, and a run resumed mid-task is the same run."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from helpers import bn_model, make_args

from metatrain import MetaTrainer, MetaTrainingArguments
from metatrain.data import TaskDistribution, TaskStream
from metatrain.estimators import HyperDistill, HypergradientEstimator, HypergradientResult
from metatrain.modules import MetaWeightNet
from metatrain.trainer import MetaTrainerCallback

STEPS, BATCH = 3, 4


def labelled_images(classes: int = 6, per_class: int = 12, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.randn(len(y), 1, 8, 8, generator=g) + y[:, None, None, None] * 0.3
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")


def distribution(**options) -> TaskDistribution:
    return TaskDistribution(labelled_images(), **{"ways": 3, "examples_per_class": 8, "seed": 0, **options})


def online_trainer(tmp_path, num_tasks=3, estimator=None, callbacks=None, **overrides) -> MetaTrainer:
    stream = TaskStream(distribution(), STEPS, BATCH, num_tasks)
    options = dict(per_device_train_batch_size=BATCH, max_steps=STEPS * num_tasks, meta_inner_steps=STEPS,
                   meta_batch_size=4, lr_scheduler_type="constant", learning_rate=0.01, hypergradient="hyperdistill",
                   hypergradient_kwargs={"horizon": 2, "estimation_period": 1})  # fmt: skip
    options.update(overrides)
    if estimator is not None:
        options.pop("hypergradient_kwargs")
    torch.manual_seed(1)
    return MetaTrainer(
        model=bn_model(), args=make_args(tmp_path, **options), train_dataset=stream, meta_dataset=stream.tests(),
        meta_module=MetaWeightNet(), estimator=estimator, callbacks=callbacks,
    )  # fmt: skip


def test_tasks_are_deterministic_relabelled_and_split():
    dist = distribution()
    task = dist.task(5)
    assert len(task.classes) == 3 and len(set(task.classes.tolist())) == 3
    assert set(task.train_rows.tolist()).isdisjoint(task.test_rows.tolist())
    assert sorted(set(task.train_labels.tolist())) == [0, 1, 2] and len(task.train_rows) == 3 * dist.train_per_class
    labels = np.asarray(dist.dataset["labels"])
    for rows, new in ((task.train_rows, task.train_labels), (task.test_rows, task.test_labels)):
        assert (labels[rows] == task.classes[new]).all()  # the new label j is the j-th class drawn
    again = distribution().task(5)
    assert all(np.array_equal(a, b) for a, b in zip(task, again))
    assert not np.array_equal(dist.task(6).train_rows, task.train_rows)
    stream = TaskStream(dist, STEPS, BATCH, 2)
    assert len(stream) == 2 * STEPS * BATCH and stream[STEPS * BATCH]["task"] == 1
    assert {stream[i]["task"] for i in range(STEPS * BATCH)} == {0}
    tests = stream.tests()
    assert len(tests) == 2 * 3 * dist.test_per_class
    assert int(tests[0]["labels"]) in (0, 1, 2) and tests[len(tests) - 1]["task"] == 1
    # a class split: tasks of the meta-test classes only
    held_out = distribution(classes=[3, 4, 5])
    assert set(held_out.task(0).classes.tolist()) == {3, 4, 5}


def test_task_distribution_refuses_too_few_classes():
    with pytest.raises(ValueError, match="ways=4 classes.*has 3.*lower `ways`"):
        distribution(ways=4, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="examples_per_class=20"):
        distribution(examples_per_class=20)


class Record(MetaTrainerCallback):
    def __init__(self):
        self.steps = []

    def on_meta_step(self, args, state, control, *, trainer, problem, **kwargs):
        self.steps.append((state.global_step, problem.train_batch["task"].unique().tolist(),
                           problem.meta_batch["task"].unique().tolist()))  # fmt: skip


@pytest.mark.parametrize("reptile_lr", [None, 0.5])
def test_weights_restart_from_the_initialisation_and_the_estimator_resets(tmp_path, reptile_lr):
    record = Record()
    trainer = online_trainer(tmp_path, meta_reptile_lr=reptile_lr, callbacks=[record])
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    ends, optimizer_states = [], []
    restart = trainer.inner_optimisations.restart

    def spy(params):
        ends.append({k: v.detach().clone() for k, v in params.items()})
        optimizer_states.append(len(trainer.optimizer.state))
        restart(params)

    trainer.inner_optimisations.restart = spy
    meta_before = [p.detach().clone() for p in trainer.meta_params]
    trainer.train()
    assert len(ends) == 3 and optimizer_states[0] > 0 and len(trainer.optimizer.state) == 0
    # every meta step trained on one task and drew its meta batch from that task's test examples
    assert [(step, [step // STEPS], [step // STEPS]) for step in range(STEPS * 3)] == record.steps
    phi = start
    for w_end in ends:
        if reptile_lr is not None:
            phi = {k: v + reptile_lr * (w_end[k] - v) for k, v in phi.items()}
        assert any(not torch.equal(w_end[k], phi[k]) for k in phi)  # the task moved the weights
    for k, p in trainer.model.named_parameters():  # after the last restart: phi
        torch.testing.assert_close(p.detach(), phi[k], rtol=1e-6, atol=1e-7)
    # the meta-parameters and meta-optimizer carried on; HyperDistill reset at each restart and refitted theta
    assert any(not torch.equal(a, b) for a, b in zip(meta_before, trainer.meta_params))
    state = trainer.estimator.state_dict()
    assert state["step"] == 0 and state["inner"] == 3 and state["theta"] is not None
    assert len(trainer.meta_optimizer.state) > 0


def test_a_run_resumed_mid_task_is_the_same_run(tmp_path):
    common = dict(meta_reptile_lr=0.5, save_strategy="steps", save_steps=4)
    full = online_trainer(tmp_path / "full", **common)
    full.train()
    first = online_trainer(tmp_path / "resumed", **common, max_steps=4)
    first.train()
    resumed = online_trainer(tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-4"))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(full.meta_params, resumed.meta_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for k, v in full.inner_optimisations.initialisation.items():
        torch.testing.assert_close(v, resumed.inner_optimisations.initialisation[k], rtol=1e-5, atol=1e-7)
    assert full.meta_state_dict()["meta_data"] == resumed.meta_state_dict()["meta_data"]
    assert full.estimator.state_dict()["inner"] == resumed.estimator.state_dict()["inner"] == 3


class Remembers(HypergradientEstimator):
    """A stateful estimator without `reset`: it cannot start a new inner optimisation."""

    def estimate(self, problem):
        return HypergradientResult(tuple(torch.zeros_like(m) for m in problem.meta_params), torch.tensor(0.0))

    def state_dict(self):
        return {"calls": 1}


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="cannot reset.*implement its `reset\\(\\)`"):
        online_trainer(tmp_path, estimator=Remembers())
    assert HyperDistill().restartable and not Remembers().restartable
    with pytest.raises(ValueError, match="holds 12 examples per task.*steps=3, batch_size=8"):
        online_trainer(tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="train_dataset must be read task by task"):
        MetaTrainer(model=bn_model(), args=make_args(tmp_path, meta_inner_steps=3), train_dataset=labelled_images(3),
                    meta_dataset=labelled_images(3), meta_module=MetaWeightNet())  # fmt: skip
    with pytest.raises(ValueError, match="meta batch of 30 is more than a task's 12 test examples"):
        online_trainer(tmp_path, meta_batch_size=30)
    with pytest.raises(ValueError, match="set `meta_inner_steps` too"):
        MetaTrainingArguments(output_dir=str(tmp_path), meta_reptile_lr=1.0, use_cpu=True)
    with pytest.raises(ValueError, match="meta_inner_steps"):
        MetaTrainingArguments(output_dir=str(tmp_path), meta_inner_steps=0, use_cpu=True)
