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
from metatrain.data import LabelledExamples, TaskDistribution, TaskStream
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


def test_stream_of_several_processes_deals_each_its_own_tasks():
    """Accelerate deals the stream's batches of `micro_batch_size` to the processes in turn: with 2 processes and
    accumulation over 2 micro-batches, process r reads tasks r, r + 2 in the order one process reads its task."""
    dist = distribution()
    single = TaskStream(dist, STEPS, BATCH, 4)
    stream = TaskStream(dist, STEPS, BATCH, 4, processes=2, micro_batch_size=BATCH // 2)
    assert len(stream) == len(single)
    micro = BATCH // 2
    batches = [list(range(c * micro, (c + 1) * micro)) for c in range(len(stream) // micro)]
    for rank in (0, 1):
        shard = [i for batch in batches[rank::2] for i in batch]
        read = [(stream[i]["task"], int(stream[i]["labels"]), stream[i]["pixel_values"]) for i in shard]
        for e, task in enumerate((rank, rank + 2)):
            block = read[e * STEPS * BATCH : (e + 1) * STEPS * BATCH]
            expected = [single.example_of(task, position) for position in range(STEPS * BATCH)]
            assert [t for t, _, _ in block] == [task] * STEPS * BATCH
            assert all(torch.equal(x, want["pixel_values"]) for (_, _, x), want in zip(block, expected))
    with pytest.raises(ValueError, match="num_tasks=3 must be a multiple of processes=2"):
        TaskStream(dist, STEPS, BATCH, 3, processes=2)
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple of micro_batch_size=3"):
        TaskStream(dist, STEPS, BATCH, 4, processes=2, micro_batch_size=3)


def test_labelled_examples_and_label_noise():
    """Tasks read from tensors in memory give the examples a `datasets.Dataset` gives; `label_noise` redraws a share
    of each task's training labels (the same on every read) and leaves its test labels clean."""
    columns = labelled_images()[:]
    tensors = LabelledExamples(columns["pixel_values"], columns["labels"])
    from_tensors = TaskDistribution(tensors, ways=3, examples_per_class=8, seed=0)
    assert torch.equal(tensors["labels"], columns["labels"])
    assert all(np.array_equal(x, y) for x, y in zip(from_tensors.task(2), distribution().task(2)))
    row = int(from_tensors.task(2).train_rows[0])
    read, expected = from_tensors.example(row, 1, 2), distribution().example(row, 1, 2)
    assert torch.equal(read["pixel_values"], expected["pixel_values"]) and read["labels"] == expected["labels"] == 1
    clean, noisy = distribution(examples_per_class=12), distribution(examples_per_class=12, label_noise=0.5)
    changed = [np.mean(noisy.task(k).train_labels != clean.task(k).train_labels) for k in range(20)]
    assert 0.2 < np.mean(changed) < 0.45  # half redrawn uniformly over 3 classes: a third of them keep their label
    assert np.array_equal(
        noisy.task(3).train_labels, distribution(examples_per_class=12, label_noise=0.5).task(3).train_labels
    )
    assert all(np.array_equal(noisy.task(k).test_labels, clean.task(k).test_labels) for k in range(5))
    with pytest.raises(ValueError, match="label_noise must be in"):
        distribution(label_noise=1.5)


def test_meta_test_solves_each_task_from_the_learned_initialisation(tmp_path):
    """At step size 0 the meta-test scores the initialisation on each task's test examples; a positive step size
    trains on the task first, which lowers the test loss of these separable tasks."""
    trainer = online_trainer(tmp_path, meta_reptile_lr=0.5)
    trainer.train()
    held_out = TaskStream(distribution(seed=7), STEPS, BATCH, 4)
    frozen = trainer.meta_test(held_out, learning_rate=0.0)
    accuracies, losses = [], []
    with torch.no_grad():
        for k in range(4):
            tests = held_out.tests()
            items = [tests.example_of(k, j) for j in range(tests.examples_per_task)]
            x, y = torch.stack([i["pixel_values"] for i in items]), torch.tensor([int(i["labels"]) for i in items])
            trainer.model.train()
            logits = torch.func.functional_call(
                trainer.model, {**{n: b.clone() for n, b in trainer.model.named_buffers()},
                                **trainer.inner_optimisations.initialisation}, (x,))  # fmt: skip
            accuracies.append(float((logits.argmax(-1) == y).float().mean()))
            losses.append(float(torch.nn.functional.cross_entropy(logits, y)))
    assert frozen == pytest.approx({"accuracy": np.mean(accuracies), "loss": np.mean(losses)}, rel=1e-5)
    trained = trainer.meta_test(held_out, learning_rate=0.5)
    assert trained["loss"] < frozen["loss"]
    with pytest.raises(ValueError, match="set `meta_inner_steps`"):
        MetaTrainer(model=bn_model(), args=make_args(tmp_path), train_dataset=labelled_images(3),
                    meta_dataset=labelled_images(3), meta_module=MetaWeightNet()).meta_test(held_out)  # fmt: skip


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

    def spy(params, average=None):
        ends.append({k: v.detach().clone() for k, v in params.items()})
        optimizer_states.append(len(trainer.optimizer.state))
        restart(params, average)

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
    with pytest.raises(ValueError, match="deals its tasks to 2 process.*this run has 1.*build it with processes=1"):
        stream = TaskStream(distribution(), STEPS, BATCH, 4, processes=2)
        args = make_args(tmp_path, meta_inner_steps=STEPS, per_device_train_batch_size=BATCH)
        MetaTrainer(model=bn_model(), args=args, train_dataset=stream, meta_dataset=stream.tests(),
                    meta_module=MetaWeightNet())  # fmt: skip
    with pytest.raises(ValueError, match="train_dataset must be read task by task"):
        MetaTrainer(model=bn_model(), args=make_args(tmp_path, meta_inner_steps=3), train_dataset=labelled_images(3),
                    meta_dataset=labelled_images(3), meta_module=MetaWeightNet())  # fmt: skip
    with pytest.raises(ValueError, match="meta batch of 30 is more than a task's 12 test examples"):
        online_trainer(tmp_path, meta_batch_size=30)
    with pytest.raises(ValueError, match="set `meta_inner_steps` too"):
        MetaTrainingArguments(output_dir=str(tmp_path), meta_reptile_lr=1.0, use_cpu=True)
    with pytest.raises(ValueError, match="meta_inner_steps"):
        MetaTrainingArguments(output_dir=str(tmp_path), meta_inner_steps=0, use_cpu=True)
