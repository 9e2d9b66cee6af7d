"""Meta-parameter modules: Meta-Weight-Net's architecture, its weighted loss, and that it leaves the model alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metatrain import MetaTrainer, MetaTrainingArguments
from metatrain.losses import weighted_mean
from metatrain.modules import LossWeighter, MetaWeightNet


def test_meta_weight_net_architecture():
    mwn = MetaWeightNet()
    layers = list(mwn.net)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert (layers[0].in_features, layers[0].out_features, layers[2].in_features, layers[2].out_features) == (
        1,
        100,
        100,
        1,
    )
    assert sum(p.numel() for p in mwn.parameters()) == 301
    assert isinstance(mwn, LossWeighter)
    assert MetaWeightNet(hidden_size=7).net[0].out_features == 7


def test_meta_weight_net_weights_are_in_unit_interval_and_see_detached_losses():
    torch.manual_seed(0)
    mwn = MetaWeightNet()
    losses = (torch.rand(6) * 5).requires_grad_()
    weights = mwn(losses)
    assert weights.shape == (6,) and bool(((weights > 0) & (weights < 1)).all())
    (grad_losses,) = torch.autograd.grad(weights.sum(), [losses], allow_unused=True)
    assert grad_losses is None  # the net is fed detached losses: no gradient flows back into the model
    assert all(g is not None for g in torch.autograd.grad(weights.sum(), list(mwn.parameters())))


def test_weighted_loss_is_normalised_and_guards_a_zero_sum():
    losses = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    weights = torch.tensor([0.5, 0.25, 0.25])
    loss = weighted_mean(losses, weights)
    assert torch.isclose(loss, torch.tensor((0.5 + 0.5 + 1.0) / 1.0))
    (grad,) = torch.autograd.grad(loss, [losses])
    assert torch.allclose(grad, weights / weights.sum())
    zero = weighted_mean(losses, torch.zeros(3))
    assert zero.item() == 0.0 and torch.isfinite(zero)

    class Halves(LossWeighter):
        def forward(self, losses):
            return torch.full_like(losses, 0.5)

    assert torch.isclose(Halves().weighted_loss(losses), losses.mean())


def test_meta_weight_net_stays_outside_the_model(tmp_path):
    """An external loss weighter: the model's modules and state keys are untouched by building the trainer, and the
    weighting net's parameters reach only the meta-optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    keys, modules = list(model.state_dict()), [type(m) for m in model.modules()]
    mwn = MetaWeightNet()
    import datasets

    data = datasets.Dataset.from_dict({"pixel_values": torch.randn(8, 1, 2, 2).numpy(), "labels": [0, 1, 2, 0] * 2})
    args = MetaTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    trainer = MetaTrainer(model=model, args=args, train_dataset=data.with_format("torch"),
                          meta_dataset=data.with_format("torch"), meta_module=mwn)  # fmt: skip
    trainer.create_optimizer()
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == modules
    assert trainer.loss_weighter is mwn and trainer.meta_param_names is None
    meta_ids = {id(p) for p in mwn.parameters()}
    assert not meta_ids & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert meta_ids == {id(p) for g in trainer.meta_optimizer.param_groups for p in g["params"]}


# ------------------------------------------------------------------------------------------------ rotation
def test_rotate_images_geometry_and_gradient():
    import math

    from metatrain.modules import rotate_images

    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 8] = 1.0  # right of the centre
    assert (rotate_images(image, math.pi / 2)[0, 0] > 0.5).nonzero().tolist() == [[0, 4]]  # counter-clockwise: top
    assert (rotate_images(image, -math.pi / 2)[0, 0] > 0.5).nonzero().tolist() == [[8, 4]]
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(rotate_images(images, 0.0), images)
    angle = torch.tensor(0.3, requires_grad=True)
    (grad,) = torch.autograd.grad(rotate_images(images, angle).square().sum(), [angle])
    assert torch.isfinite(grad) and grad != 0


def test_learnable_rotation_module():
    from metatrain.modules import InputTransform, LearnableRotation

    rotation = LearnableRotation(degrees=30.0)
    assert isinstance(rotation, InputTransform) and rotation.input_name == "pixel_values"
    assert abs(rotation.degrees - 30.0) < 1e-5 and [n for n, _ in rotation.named_parameters()] == ["angle"]
    assert "degrees=30.00" in repr(rotation)
    with pytest.raises(ValueError, match="padding_mode='wrap'"):
        LearnableRotation(padding_mode="wrap")
