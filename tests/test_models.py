"""Built-in backbones and `build_model`: shapes, parameter counts against the docstrings, shortcuts, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metatrain.models import BUILTIN_MODELS, CifarResNet, ConvNet, ShortcutA, SmallCNN, build_model
from metatrain.models.cifar_resnet import BasicBlock


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models here are tiny: intra-op threads only add overhead, and thrash on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, in_chans, size, model_class",
    [
        ("cifar_resnet32", 3, 8, CifarResNet),
        ("cifar_resnet20", 1, 8, CifarResNet),
        ("small_cnn", 1, 8, SmallCNN),
        ("small_cnn", 3, 5, SmallCNN),
        ("conv4", 3, 16, ConvNet),
        ("conv3", 1, 9, ConvNet),
        ("test_resnet", 1, 16, nn.Module),
    ],
)
def test_build_model_output_shapes(name, in_chans, size, model_class):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_chans=in_chans)
    assert isinstance(model, model_class)
    logits = model(torch.randn(3, in_chans, size, size))
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()


def test_timm_models_are_built_without_weights():
    model = build_model("test_resnet", num_classes=4, in_chans=2, drop_rate=0.1)
    assert model.num_classes == 4 and model.drop_rate == 0.1
    assert model.get_classifier().out_features == 4


def test_cifar_resnet32_structure_and_parameter_count():
    model = build_model("cifar_resnet32", num_classes=10)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 32  # weighted layers: convolutions plus the linear head
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels, model.fc.in_features] == [
        16,
        32,
        64,
    ]
    assert [model.layer1[0].conv1.stride, model.layer2[0].conv1.stride, model.layer3[0].conv1.stride] == [
        (1, 1),
        (2, 2),
        (2, 2),
    ]
    count = num_parameters(model)
    assert count == 464_154 and f"{count:,} parameters" in CifarResNet.__doc__
    assert f"{num_parameters(CifarResNet(32, num_classes=100)):,} with 100 classes" in CifarResNet.__doc__
    assert build_model("cifar_resnet32", 10, width=2).fc.in_features == 128


def test_small_cnn_parameter_count():
    model = build_model("small_cnn", num_classes=10, in_chans=1)
    assert isinstance(model, SmallCNN) and model.fc.in_features == 64
    count = num_parameters(model)
    assert count == num_parameters(SmallCNN(num_classes=10, in_chans=1, width=32))
    assert count == 56_554 and f"{count:,} parameters" in SmallCNN.__doc__
    assert build_model("small_cnn", 10, in_chans=1, width=2).fc.in_features == 128


@pytest.mark.parametrize("depth, in_chans, width, classes", [(4, 3, 32, 5), (3, 1, 32, 10), (1, 2, 3, 4)])
def test_conv_net_structure_and_parameter_count(depth, in_chans, width, classes):
    """MAML's backbone: `features.i` = conv 3x3 (no bias) - norm - ReLU - 2x2 max-pool, then `head`; the count is the
    docstring's formula, and its example is the docstring's number."""
    model = ConvNet(depth, num_classes=classes, in_chans=in_chans, width=width)
    assert [n for n, _ in model.named_children()] == ["features", "pool", "head"] and len(model.features) == depth
    for i, block in enumerate(model.features):
        assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
        conv = block[0]
        assert (conv.in_channels, conv.out_channels) == (in_chans if i == 0 else width, width)
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
        assert block[3].kernel_size == 2
    formula = 9 * in_chans * width + 9 * width**2 * (depth - 1) + 2 * width * depth + (width + 1) * classes
    assert num_parameters(model) == formula
    assert f"{num_parameters(ConvNet()):,} for `depth=4`" in ConvNet.__doc__
    x = torch.randn(2, in_chans, 2**depth, 2**depth + 3)
    assert model(x).shape == (2, classes)
    with pytest.raises(ValueError, match=f"at least {2**depth} pixels a side"):
        model(x[..., :-4, :])


def test_build_model_conv_names_and_width():
    model = build_model("conv4", num_classes=5)
    assert isinstance(model, ConvNet) and model.depth == 4 and model.head.in_features == 32
    assert num_parameters(model) == num_parameters(ConvNet(4, num_classes=5))
    wide = build_model("conv3", num_classes=5, in_chans=1, width=2)
    assert wide.depth == 3 and wide.features[0][0].in_channels == 1 and wide.head.in_features == 64
    assert "conv<depth>" in BUILTIN_MODELS
    for bad in (0, -1):
        with pytest.raises(ValueError, match="depth >= 1"):
            ConvNet(bad)
    with pytest.raises(ValueError, match="depth >= 1"):
        build_model("conv0", num_classes=5)


def test_option_a_shortcut_is_parameter_free_subsample_and_zero_pad():
    shortcut = ShortcutA(4, 8, stride=2)
    assert num_parameters(shortcut) == 0 and len(list(shortcut.buffers())) == 0
    x = torch.randn(2, 4, 6, 6)
    out = shortcut(x)
    assert out.shape == (2, 8, 3, 3)
    torch.testing.assert_close(out[:, 2:6], x[:, :, ::2, ::2])
    assert out[:, :2].abs().sum() == 0 and out[:, 6:].abs().sum() == 0

    model = CifarResNet(20)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and all(num_parameters(s) == 0 for s in shortcuts)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    with pytest.raises(ValueError, match="out_chans"):
        ShortcutA(8, 4)


def test_kaiming_init():
    torch.manual_seed(0)
    conv = CifarResNet(32, width=2).layer3[0].conv2  # 128 * 9 fan-in, 147k weights
    torch.testing.assert_close(conv.weight.std().item(), math.sqrt(2 / (128 * 9)), rtol=0.02, atol=0)


@pytest.mark.parametrize("depth", [2, 31, 33])
def test_bad_depth_raises(depth):
    with pytest.raises(ValueError, match=f"depth={depth}"):
        CifarResNet(depth)
    with pytest.raises(ValueError, match=f"depth={depth}"):
        build_model(f"cifar_resnet{depth}", num_classes=10)


def test_unknown_name_and_width_for_timm_raise():
    with pytest.raises(ValueError, match=r"'resnet_does_not_exist'.*small_cnn.*timm\.list_models"):
        build_model("resnet_does_not_exist", num_classes=10)
    assert "cifar_resnet32" in BUILTIN_MODELS
    with pytest.raises(ValueError, match=r"width=2.*test_resnet"):
        build_model("test_resnet", num_classes=10, width=2)


@pytest.mark.parametrize(
    "name, in_chans, size", [("cifar_resnet20", 3, 8), ("small_cnn", 1, 8), ("test_resnet", 3, 16)]
)
def test_gradient_step_reduces_loss(name, in_chans, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_chans=in_chans)
    x, y = torch.randn(8, in_chans, size, size), torch.arange(8) % 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = F.cross_entropy(model(x), y)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    assert after < before


@pytest.mark.parametrize("stride, in_chans, out_chans", [(1, 4, 4), (2, 4, 8)])
def test_basic_block_in_place_residual_matches_out_of_place_to_second_order(stride, in_chans, out_chans):
    """The residual is added into batch norm's output in place: values, gradients and a Hessian-vector product
    (T1-T2's double backward) through `functional_call` equal those of `relu(bn2(...) + shortcut(x))`."""
    torch.manual_seed(0)
    block = BasicBlock(in_chans, out_chans, stride=stride).train()
    weights = {n: p.detach().clone().requires_grad_() for n, p in block.named_parameters()}
    buffers = {n: b.clone() for n, b in block.named_buffers()}
    x = torch.randn(3, in_chans, 6, 6)

    def out_of_place(w):
        def bn(i, h):
            return F.batch_norm(h, None, None, w[f"bn{i}.weight"], w[f"bn{i}.bias"], training=True)

        h = F.relu(bn(1, F.conv2d(x, w["conv1.weight"], stride=stride, padding=1)))
        return F.relu(bn(2, F.conv2d(h, w["conv2.weight"], padding=1)) + block.shortcut(x))

    results = []
    for forward in (lambda w: functional_call(block, {**buffers, **w}, (x,)), out_of_place):
        out = forward(weights)
        loss = (out**2).mean()
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
        hvp = torch.autograd.grad(sum((g**2).sum() for g in grads), list(weights.values()))
        results.append((out.detach(), [g.detach() for g in grads], hvp))
    (out, grads, hvp), (ref_out, ref_grads, ref_hvp) = results
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(grads + list(hvp), ref_grads + list(ref_hvp)):
        torch.testing.assert_close(a, b)
