"""Meta-parameter modules: Meta-Weight-Net's architecture, its weighted loss, and that it leaves the model alone."""

from __future__ import annotations

import pytest
import torch
from helpers import forward_hooks
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
    assert trainer.meta_param_names is None
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
    wide = torch.zeros(1, 1, 9, 17)  # a non-square image turns rigidly: 4 px right of the centre goes 4 px up
    wide[0, 0, 4, 12] = 1.0
    assert (rotate_images(wide, math.pi / 2)[0, 0] > 0.5).nonzero().tolist() == [[0, 8]]
    wide.zero_()
    wide[0, 0, 2, 8] = 1.0  # 2 px above it goes 2 px left
    assert (rotate_images(wide, math.pi / 2)[0, 0] > 0.5).nonzero().tolist() == [[4, 6]]
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
    from metatrain.modules import rotate_images

    images = torch.rand(2, 1, 8, 8) + 1.0  # no zeros of their own: the corners show the padding
    outputs = {}
    for mode in ("zeros", "border"):
        rotation = LearnableRotation(degrees=45.0, padding_mode=mode)
        outputs[mode] = rotation(images)
        torch.testing.assert_close(outputs[mode], rotate_images(images, rotation.angle, padding_mode=mode))
    assert outputs["zeros"][0, 0, 0, 0] < 1.0 <= outputs["border"][0, 0, 0, 0]


# ---------------------------------------------------------------------------------- feature-wise transforms (LFT)
def ft_model(seed: int = 0, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "test_resnet", pretrained=False, num_classes=3, in_chans=1, zero_init_last=False, **kwargs
    )


@pytest.mark.parametrize("name, count", [("resnet10t", 3712), ("resnet18", 5632), ("resnet34", 9344)])
def test_feature_wise_transform_meta_parameter_counts(name, count):
    """3,712 on ResNet-10 is the LFT paper's count: FT after bn2 of every block and after every shortcut BN."""
    import timm

    from metatrain.modules import attach_feature_wise_transforms

    model = timm.create_model(name, pretrained=False, num_classes=5, zero_init_last=False)
    transforms = attach_feature_wise_transforms(model)
    assert sum(p.numel() for p in transforms.parameters()) == count
    model_ids = {id(p) for p in model.parameters()}
    assert all(id(p) in model_ids for p in transforms.parameters())


def test_feature_wise_transform_layer():
    from metatrain.modules import FeatureWiseTransform

    layer = FeatureWiseTransform(4)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(layer.eval()(x), x)
    layer.train()
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    noise_gamma, noise_beta = torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1)
    gamma = 1 + noise_gamma * nn.functional.softplus(torch.tensor(0.3), beta=100)
    beta = noise_beta * nn.functional.softplus(torch.tensor(0.5), beta=100)
    torch.testing.assert_close(out, gamma * x + beta)
    layer.enabled = False
    assert torch.equal(layer(x), x)


def test_feature_wise_transforms_attach_detach_round_trip():
    from metatrain.modules import attach_feature_wise_transforms, detach_feature_wise_transforms

    model = ft_model()
    x = torch.randn(4, 1, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    eval_before = model(x)
    model.train()
    torch.manual_seed(1)
    train_before = model(x)
    model.load_state_dict(before)  # undo the running-statistics update

    transforms = attach_feature_wise_transforms(model)
    names = [n for n, _ in model.named_parameters()]
    assert "layer1.0.ft_bn2.theta_gamma" in names and "layer2.0.ft_shortcut.theta_beta" in names
    assert set(before) < set(model.state_dict())
    model.eval()
    assert torch.equal(model(x), eval_before)  # identity in evaluation mode
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(model(x), train_before)
    model.load_state_dict({**model.state_dict(), **before})
    with transforms.disabled():  # off for pseudo-unseen and test forwards
        torch.manual_seed(1)
        torch.testing.assert_close(model(x), train_before)
    assert all(layer.enabled for layer in transforms.layers.values())
    model.load_state_dict({**model.state_dict(), **before})
    with pytest.raises(ValueError, match="already has feature-wise transforms"):
        attach_feature_wise_transforms(model)

    detach_feature_wise_transforms(model, transforms)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any("ft_" in n for n, _ in model.named_modules()) and forward_hooks(model) == 0
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), train_before)
    with pytest.raises(ValueError, match="Sequential has no residual block"):
        attach_feature_wise_transforms(nn.Sequential(nn.Conv2d(1, 2, 3)))


def _zero_init_model() -> nn.Module:
    import timm

    return timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1)  # timm's default: zeroed


def test_feature_wise_transforms_warn_about_zero_init_last(caplog):
    import logging

    import timm

    from metatrain.modules import attach_feature_wise_transforms

    with caplog.at_level(logging.WARNING):
        attach_feature_wise_transforms(_zero_init_model())
    assert "zero_init_last" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # one warning for the whole model, not one per block
        attach_feature_wise_transforms(timm.create_model("resnet26", pretrained=False, num_classes=3))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "8 of 8 blocks" in message and "layer1.0.bn3, layer1.1.bn3, layer2.0.bn3 and 5 more" in message
    assert "zero_init_last=False" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        attach_feature_wise_transforms(timm.create_model("resnet26", pretrained=False, zero_init_last=False))
    assert not caplog.records


def test_feature_wise_transforms_follow_the_last_norm_of_bottleneck_blocks(caplog):
    """A Bottleneck's residual branch ends with bn3 (bn2 is its middle norm): FT goes there, and timm's zero_init_last
    (which zeroes bn3) is warned about."""
    import logging

    from timm.models.resnet import Bottleneck, ResNet

    from metatrain.modules import attach_feature_wise_transforms, detach_feature_wise_transforms

    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3, in_chans=1)  # timm's default zero_init_last
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        transforms = attach_feature_wise_transforms(model)
    assert "4 of 4 blocks have an all-zero weight" in caplog.text and "layer1.0.bn3" in caplog.text
    modules = dict(model.named_modules())
    assert "layer1.0.ft_bn3" in modules and not any(name.endswith("ft_bn2") for name in modules)
    channels = sum(
        b.bn3.num_features + b.downsample[-1].num_features for b in model.modules() if isinstance(b, Bottleneck)
    )
    assert sum(p.numel() for p in transforms.parameters()) == 2 * channels
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    out = model(x)
    detach_feature_wise_transforms(model, transforms)
    assert list(model.state_dict()) == list(before) and not any("ft_" in n for n, _ in model.named_modules())
    torch.testing.assert_close(model(x), out)


def test_a_deep_copy_of_the_model_uses_its_own_feature_wise_transforms():
    """The hooks are bound methods of the FT layers: a deep copy (an EMA model, a snapshot) hooks its own copies."""
    import copy

    from metatrain.modules import attach_feature_wise_transforms

    model = ft_model()
    attach_feature_wise_transforms(model)
    twin = copy.deepcopy(model).train()
    twin(torch.randn(2, 1, 16, 16)).sum().backward()
    assert twin.layer1[0].ft_bn2.theta_gamma.grad is not None
    assert model.layer1[0].ft_bn2.theta_gamma.grad is None


def test_feature_wise_transforms_train_under_meta_trainer(tmp_path):
    """Embedded meta-parameters: found in the model by identity, kept out of the base optimizer, stepped by the
    meta-optimizer with a non-zero hypergradient."""
    import datasets

    from metatrain import MetaTrainer, MetaTrainingArguments
    from metatrain.modules import attach_feature_wise_transforms

    model = ft_model()
    transforms = attach_feature_wise_transforms(model)
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict(
        {"pixel_values": torch.randn(32, 1, 16, 16, generator=g).numpy(), "labels": [0, 1, 2, 0] * 8}
    ).with_format("torch")
    args = MetaTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, logging_steps=1,
                                 per_device_train_batch_size=8, learning_rate=0.1, hypergradient="t1t2",
                                 disable_tqdm=True)  # fmt: skip
    trainer = MetaTrainer(model=model, args=args, train_dataset=data, meta_dataset=data, meta_module=transforms)
    before = {k: v.clone() for k, v in transforms.state_dict().items()}
    trainer.train()
    assert trainer.meta_param_names is not None and all("ft_" in n for n in trainer.meta_param_names)
    base = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not base & {id(p) for p in transforms.parameters()}
    assert all(e["hypergradient_norm"] > 0 for e in trainer.state.log_history if "hypergradient_norm" in e)
    assert any(not torch.equal(before[k], v) for k, v in transforms.state_dict().items())


# ResNet-family models: plain, deep stem with average-pool shortcut ("d", "t"), squeeze-excitation, ResNeXt, ECA and
# group norm, with BasicBlock or Bottleneck blocks (built two blocks deep in the first stage, one in the others)
RESNET_FAMILY = ["resnet10t", "resnet18", "resnet18d", "resnet50", "resnet50d", "seresnet18", "seresnext26d_32x4d",
                 "ecaresnet26t", "resnext50_32x4d", "resnet50_gn"]  # fmt: skip
# other blocks: the old match (any module with a `bn2` batch norm) hooked the first three silently, EfficientNet even
# on its head's bn2; the others are timm ResNets or ResNet-like models built from other blocks
OTHER_ARCHITECTURES = ["efficientnet_b0", "mobilenetv3_small_050", "dla34", "skresnet18", "resnest14d", "resnetv2_50"]


@pytest.mark.parametrize("name", OTHER_ARCHITECTURES)
def test_feature_wise_transforms_refuse_blocks_they_do_not_know(name):
    import timm

    from metatrain.modules import attach_feature_wise_transforms

    model = timm.create_model(name, pretrained=False, num_classes=3)
    keys = list(model.state_dict())
    with pytest.raises(ValueError) as error:
        attach_feature_wise_transforms(model)
    message = str(error.value)
    assert message.startswith(f"{type(model).__name__} ") and "no residual block" in message
    assert "timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck" in message
    assert "timm.create_model('resnet10t'" in message and "zero_init_last=False" in message
    if name == "skresnet18":  # a timm ResNet of other blocks says which
        assert "(a timm ResNet of SelectiveKernelBasic blocks)" in message
    assert list(model.state_dict()) == keys and forward_hooks(model) == 0


@pytest.mark.parametrize("name", RESNET_FAMILY)
def test_feature_wise_transforms_attach_to_the_resnet_family_and_detach_from_the_model_alone(name):
    """FT after the last norm of every block's residual branch (before SE / ECA attention) and after every shortcut;
    every FT parameter moves the output; `detach_feature_wise_transforms(model)` restores the model exactly."""
    import timm
    from timm.models.resnet import BasicBlock, Bottleneck

    from metatrain.modules import attach_feature_wise_transforms, detach_feature_wise_transforms

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, zero_init_last=False, layers=(2, 1, 1, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reference = model(x)
    transforms = attach_feature_wise_transforms(model)
    blocks = {n: b for n, b in model.named_modules() if isinstance(b, (BasicBlock, Bottleneck))}
    expected = set()
    for block_name, block in blocks.items():
        norm, attribute = (block.bn3, "ft_bn3") if isinstance(block, Bottleneck) else (block.bn2, "ft_bn2")
        assert list(norm._forward_hooks.values()) == [getattr(block, attribute).after]
        expected |= {f"{block_name}.{attribute}.theta_gamma", f"{block_name}.{attribute}.theta_beta"}
        if block.downsample is not None:
            assert list(block.downsample._forward_hooks.values()) == [block.ft_shortcut.after]
            expected |= {f"{block_name}.ft_shortcut.theta_gamma", f"{block_name}.ft_shortcut.theta_beta"}
    # the keys attaching adds to the state dict: exactly the names of the meta-parameters in `named_parameters()`
    assert set(model.state_dict()) - set(before) == expected
    meta_ids = {id(p) for p in transforms.parameters()}
    assert {n for n, p in model.named_parameters() if id(p) in meta_ids} == expected
    assert forward_hooks(model) == len(transforms.layers) == len(expected) // 2
    torch.testing.assert_close(model(x), reference)  # identity in evaluation mode
    model.train()
    grads = torch.autograd.grad(model(x).square().mean(), list(transforms.parameters()))
    assert all(bool(g.ne(0).any()) for g in grads)
    model.load_state_dict({**model.state_dict(), **before})  # undo the running-statistics update

    detach_feature_wise_transforms(model)
    assert list(model.state_dict()) == list(before) and forward_hooks(model) == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.eval()
    torch.testing.assert_close(model(x), reference)


def test_detach_feature_wise_transforms_without_the_handle():
    """The model alone finds what is attached to it, deep copies included; the handle form detaches only its own
    layers; a model with nothing attached is a clear error."""
    import copy

    from metatrain.modules import attach_feature_wise_transforms, detach_feature_wise_transforms

    model = ft_model()
    keys = list(model.state_dict())
    transforms = attach_feature_wise_transforms(model)
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match="has no feature-wise transforms of the given transforms attached"):
        detach_feature_wise_transforms(twin, transforms)
    detach_feature_wise_transforms(twin)
    assert list(twin.state_dict()) == keys and forward_hooks(twin) == 0
    assert forward_hooks(model) == len(transforms.layers)  # the original keeps its own hooks
    twin.train()
    before = model.layer1[0].ft_bn2.theta_gamma.detach().clone()
    twin(torch.randn(2, 1, 16, 16)).sum().backward()
    assert torch.equal(model.layer1[0].ft_bn2.theta_gamma, before) and model.layer1[0].ft_bn2.theta_gamma.grad is None

    detach_feature_wise_transforms(model)
    assert list(model.state_dict()) == keys and forward_hooks(model) == 0
    for args in ((model,), (model, transforms)):
        with pytest.raises(ValueError, match="ResNet has no feature-wise transforms attached: nothing to detach"):
            detach_feature_wise_transforms(*args)
    again = attach_feature_wise_transforms(model)  # attaching again after a detach works
    detach_feature_wise_transforms(model, again)
    assert list(model.state_dict()) == keys and forward_hooks(model) == 0


# --------------------------------------------------------------------------------------------- source weights
def test_source_weights_weigh_each_example_by_its_sources_share():
    from metatrain.modules import SourceWeights

    weights = SourceWeights(3, scale=2.0)
    with torch.no_grad():
        weights.logits.copy_(torch.tensor([0.5, -0.2, 0.1]))
    shares = torch.softmax(2.0 * weights.logits.detach(), dim=0)
    torch.testing.assert_close(weights.shares().detach(), shares)
    with weights.batch_context({"source": [0, 2, 2, 1]}):
        torch.testing.assert_close(weights(torch.ones(4)).detach(), 3 * shares[[0, 2, 2, 1]])
        with weights.batch_context({"source": torch.tensor([1])}):  # nested: the inner batch, then the outer again
            torch.testing.assert_close(weights(torch.ones(1)).detach(), 3 * shares[[1]])
        assert weights(torch.ones(4)).shape == (4,)
        with pytest.raises(ValueError, match="4 sources for 2 losses"):
            weights(torch.ones(2))
    with pytest.raises(ValueError, match="no 'source' column"):
        weights(torch.ones(4))
    with weights.batch_context({"source": [0, 3]}), pytest.raises(ValueError, match=r"ids in \[0, 3\), got \[0, 3\]"):
        weights(torch.ones(2))
    for bad in ({"num_sources": 0}, {"num_sources": 2, "scale": 0.0}):
        with pytest.raises(ValueError, match="SourceWeights needs"):
            SourceWeights(**bad)
    assert weights.batch_keys == ("source",) and SourceWeights(2, key="domain").batch_keys == ("domain",)


def test_source_weights_in_meta_trainer_weigh_the_base_and_the_meta_steps_training_loss(tmp_path):
    """The base step's loss and the meta step's training loss are the source-weighted means (the batch's `source`
    column reaches the module though the model never sees it), and the shares learn from the hypergradient."""
    from helpers import image_dataset, make_args

    from metatrain.losses import per_sample_cross_entropy
    from metatrain.modules import SourceWeights

    train = image_dataset(64, seed=1)
    train = train.add_column("source", [i % 3 for i in range(64)]).with_format("torch")
    weights = SourceWeights(3)
    with torch.no_grad():
        weights.logits.copy_(torch.tensor([0.3, 0.0, -0.3]))
    torch.manual_seed(0)
    trainer = MetaTrainer(
        model=nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
        args=make_args(tmp_path, hypergradient="t1t2", remove_unused_columns=False),
        train_dataset=train, meta_dataset=image_dataset(20, seed=2), meta_module=weights,
    )  # fmt: skip
    batch = trainer._prepare_inputs(train[:8])
    model = trainer.model
    losses = per_sample_cross_entropy(model(batch["pixel_values"]), batch["labels"])
    expected = weighted_mean(losses, 3 * torch.softmax(weights.logits, 0)[batch["source"]])
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), expected)
        params = {n: p.detach() for n, p in model.named_parameters()}
        torch.testing.assert_close(trainer.meta_objective().train_loss(params, batch), expected)
    before = weights.logits.detach().clone()
    trainer.train()
    assert trainer.meta_steps_skipped == 0 and not torch.equal(weights.logits.detach(), before)
