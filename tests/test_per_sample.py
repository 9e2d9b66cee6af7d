"""`PerSampleLossTrainer` (`metatrain.per_sample`): a plain module trained and evaluated on per-example losses."""

from __future__ import annotations

from helpers import bn_model, image_dataset, make_args


def test_per_sample_loss_trainer_trains_a_plain_module(tmp_path):
    from metatrain import PerSampleLossTrainer

    trainer = PerSampleLossTrainer(
        model=bn_model(), args=make_args(tmp_path, max_steps=3), train_dataset=image_dataset(32, 0)
    )
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.args.label_names == ["labels"]
    assert trainer.evaluate(image_dataset(8, 1))["eval_loss"] > 0
