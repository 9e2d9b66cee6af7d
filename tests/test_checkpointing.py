"""MetaTrainer's checkpoints (metatrain.checkpointing): a resumed run is the same run (estimator state, meta data
position, evaluation between checkpoint and step), the best checkpoint's meta-module comes back with its model, and
an attached meta-module is saved apart from the model."""

from __future__ import annotations

import logging
import os

import datasets
import pytest
import torch
from helpers import Scale, StopAfter, image_dataset, make_args, make_trainer, tiny_bert
from torch import nn
from transformers import TrainerCallback

from metatrain import MetaTrainer
from metatrain.modules import MetaWeightNet


@pytest.mark.parametrize(
    "estimator, options",
    [("evograd", {"sigma": 0.01, "population": 3}), ("reverse", {"horizon": 3}),
     ("hyperdistill", {"gamma": 0.9, "horizon": 2, "estimation_period": 2})],
)  # fmt: skip
def test_resume_continues_the_same_run(tmp_path, estimator, options):
    """EvoGrad's noise comes from the RNG state; reverse mode and HyperDistill carry their running state (remembered
    steps; running average, distilled batch, generator, fitted theta) in the checkpoint, and HyperDistill's fits of
    theta (calls 1 and 5 here, one on each side of the checkpoint) draw training batches from a resumable position."""
    common = dict(max_steps=7, save_strategy="steps", save_steps=4, hypergradient=estimator,
                  hypergradient_kwargs=options)  # fmt: skip
    full = make_trainer(tmp_path / "full", **common)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-4"
    assert os.path.isfile(checkpoint / "meta_module.safetensors")
    # 20 meta examples in batches of 8 are 3 meta batches a pass: the checkpoint lies in the second pass, whose
    # order a resumed run must draw again
    saved = torch.load(checkpoint / "meta_trainer_state.pt", weights_only=False)
    assert saved["meta_data"] == {"epoch": 1, "consumed": 1}

    first = make_trainer(tmp_path / "resumed", **common)
    first.add_callback(StopAfter(4))  # an interrupted run: same schedule, stops right after the checkpoint
    first.train()
    assert first.state.global_step == 4
    resumed = make_trainer(tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-4"))
    assert resumed.state.global_step == 7
    assert resumed.meta_state_dict()["meta_data"] == full.meta_state_dict()["meta_data"]
    assert resumed.meta_state_dict()["rollout_data"] == full.meta_state_dict()["rollout_data"]
    if estimator == "hyperdistill":
        assert full.meta_state_dict()["rollout_data"]["consumed"] > 0
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(full.meta_module.parameters(), resumed.meta_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    exp_avg = lambda t: [s["exp_avg"] for s in t.meta_optimizer.state.values()]  # noqa: E731
    for a, b in zip(exp_avg(full), exp_avg(resumed)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


class LastMetaModule(TrainerCallback):
    """Keeps the meta-module's state after every step: at the end, its last state before the best one is loaded."""

    def __init__(self, meta_module):
        self.meta_module, self.last = meta_module, None

    def on_step_end(self, args, state, control, **kwargs):
        self.last = {k: v.detach().clone() for k, v in self.meta_module.state_dict().items()}


def test_resuming_with_another_meta_step_position_is_warned_about(tmp_path, caplog):
    """The checkpoint keeps the position its run placed the meta step at: a trainer resuming it at another one (e.g.
    the default chose otherwise) says that it is not continuing the same run, and how to."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, hypergradient="evograd")
    first = make_trainer(tmp_path, **common)
    assert first.meta_step_position == "after"
    first.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    with caplog.at_level(logging.WARNING, logger="metatrain.checkpointing"):
        make_trainer(tmp_path, **common).train(resume_from_checkpoint=checkpoint)
        assert "meta step" not in caplog.text
        make_trainer(tmp_path, meta_step_position="before", **common).train(resume_from_checkpoint=checkpoint)
    assert "placed the meta step 'after' the base step's forward, this trainer places it 'before'" in caplog.text
    assert "Set `meta_step_position='after'`" in caplog.text


def test_best_model_at_end_comes_with_its_meta_module(tmp_path):
    """`load_best_model_at_end` restores the best checkpoint's weights; an external meta-module must come back from the
    same checkpoint, or the pair saved after training would not belong together."""
    from safetensors.torch import load_file

    evaluations = []

    def first_is_best(eval_pred):
        evaluations.append(1)
        return {"order": -len(evaluations)}

    trainer = make_trainer(
        tmp_path, max_steps=3, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
        hypergradient="t1t2", load_best_model_at_end=True, metric_for_best_model="order", greater_is_better=True,
        eval_dataset=image_dataset(8, seed=3),
    )  # fmt: skip
    trainer.compute_metrics = first_is_best
    last = LastMetaModule(trainer.meta_module)
    trainer.add_callback(last)
    trainer.train()
    best = tmp_path / "out" / "checkpoint-1"
    assert trainer.state.best_model_checkpoint == str(best)
    saved = load_file(best / "meta_module.safetensors")
    assert any(not torch.equal(v, saved[k]) for k, v in last.last.items())  # the last state was another
    for k, v in trainer.meta_module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for k, v in load_file(best / "model.safetensors").items():
        assert torch.equal(trainer.model.state_dict()[k], v), k


def dropout_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 36, 3)
    )  # fmt: skip


def assert_same_run(a: MetaTrainer, b: MetaTrainer) -> None:
    """Model and meta-module weights equal to the last bit."""
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    for (name, x), y in zip(a.meta_module.state_dict().items(), b.meta_module.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("estimator", ["evograd", "t1t2_fd"])
def test_resume_from_an_epoch_end_checkpoint_with_evaluation_is_the_same_run(tmp_path, estimator):
    """The checkpoint at an epoch's last step is written before that epoch's evaluation, which builds a loader (a draw
    from the global RNG): the resumed run, and a run without evaluation, must still be the same run, bit for bit,
    with dropout in the model and the estimator's own noise."""
    common = dict(max_steps=-1, num_train_epochs=2, save_strategy="steps", save_steps=4, hypergradient=estimator)

    def trainer(folder, **overrides):
        return MetaTrainer(
            model=dropout_model(), args=make_args(tmp_path / folder, **{**common, **overrides}),
            train_dataset=image_dataset(32, seed=1), eval_dataset=image_dataset(16, seed=3),
            meta_dataset=image_dataset(20, seed=2), meta_module=MetaWeightNet(),
        )  # fmt: skip

    full = trainer("full", eval_strategy="epoch")
    full.train()
    assert full.state.global_step == 8
    first = trainer("resumed", eval_strategy="epoch")
    first.add_callback(StopAfter(4))
    first.train()
    resumed = trainer("resumed", eval_strategy="epoch")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-4"))
    assert resumed.state.global_step == 8
    assert_same_run(full, resumed)
    unevaluated = trainer("unevaluated", eval_strategy="no")
    unevaluated.train()
    assert_same_run(full, unevaluated)


def test_an_attached_meta_module_is_saved_apart_from_the_model(tmp_path):
    """`from_pretrained` loads the saved model as it was built (no unexpected keys); the meta-module has its own file,
    and resuming and `load_best_model_at_end` bring it back."""
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    def build(folder, **overrides):
        model = tiny_bert(50)
        scale = Scale(16)
        model.bert.add_module("meta_scale", scale)
        model.bert.encoder.layer[0].output.register_forward_hook(scale)
        data = lambda n, seed: datasets.Dataset.from_dict(  # noqa: E731
            {"input_ids": torch.randint(1, 50, (n, 8), generator=torch.Generator().manual_seed(seed)).numpy(),
             "labels": (torch.arange(n) % 3).numpy()}
        ).with_format("torch")  # fmt: skip
        options = dict(hypergradient="t1t2", max_steps=6, save_strategy="steps", save_steps=3, eval_strategy="steps",
                       eval_steps=3, **overrides)  # fmt: skip
        return MetaTrainer(model=model, args=make_args(tmp_path / folder, **options), train_dataset=data(32, 0),
                           eval_dataset=data(8, 2), meta_dataset=data(16, 1), meta_module=scale)  # fmt: skip

    full = build("full")
    full.train()
    full.save_model()
    out = tmp_path / "full" / "out"
    assert "bert.meta_scale.log_scale" not in load_file(out / "model.safetensors")
    torch.testing.assert_close(load_file(out / "meta_module.safetensors")["log_scale"], full.meta_module.log_scale)
    _, info = BertForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"]
    first = build("resumed")
    first.add_callback(StopAfter(3))
    first.train()
    resumed = build("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-3"))
    assert_same_run(full, resumed)
    best = build("best", load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    best.train()  # the worse loss is the "best": checkpoint 3's pair comes back
    at_3 = load_file(tmp_path / "best" / "out" / "checkpoint-3" / "meta_module.safetensors")["log_scale"]
    assert best.state.best_model_checkpoint.endswith("checkpoint-3")
    assert torch.equal(best.meta_module.log_scale.detach(), at_3)
