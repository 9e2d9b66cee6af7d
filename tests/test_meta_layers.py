"""ANIL's meta-layers and WarpGrad's warp layers (metatrain.modules.anil, .warpgrad): attach and detach leave the
model as it was; MetaTrainer learns them (a meta step against a hand-unrolled reference, a direct term, every
meta-parameter moved, none in the base optimizer); checkpoints resume, and what the saved files hold."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
from helpers import Recorder, StopAfter, forward_hooks, make_args, snapshot
from torch import nn
from torch.func import functional_call

from metatrain import MetaTrainer
from metatrain.models import ConvNet
from metatrain.modules import (
    MetaLayers,
    WarpLayer,
    WarpLayers,
    WarpSite,
    attach_meta_layers,
    attach_warp_layers,
    detach_meta_layers,
    detach_warp_layers,
)
from metatrain.modules.anil import REQUIRES_GRAD_BEFORE

BOTTOM = ["features.0", "features.1", "features.2"]
KINDS = ["anil", "warpgrad"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models here are tiny: intra-op threads only add overhead, and thrash on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv_net(depth: int, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(depth, num_classes=3, in_chans=1, width=4)


def images(n: int, seed: int, size: int = 16) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")


def attached(kind: str, seed: int = 0) -> tuple[ConvNet, MetaLayers | WarpLayers]:
    """HyperDistill's two models: ANIL on a conv4 (the bottom three blocks meta-learned), WarpGrad on a conv3 (two
    warp layers after every block)."""
    if kind == "anil":
        model = conv_net(4, seed)
        return model, attach_meta_layers(model, BOTTOM)
    model = conv_net(3, seed)
    return model, attach_warp_layers(model, after=BOTTOM, layers_per_site=2)


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs in training and in evaluation mode, its state (running statistics) left as it was."""
    state, training = snapshot(model), model.training
    with torch.no_grad():
        model.train()
        train = model(x)
        model.load_state_dict(state)
        model.eval()
        evaluated = model(x)
    model.train(training)
    return train, evaluated


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def trainer_for(folder, model, meta_module, **overrides) -> MetaTrainer:
    options = {"hypergradient": "t1t2", "max_steps": 3, "logging_steps": 1, **overrides}
    return MetaTrainer(model=model, args=make_args(folder, **options), train_dataset=images(32, 0),
                       meta_dataset=images(16, 1), meta_module=meta_module)  # fmt: skip


# ------------------------------------------------------------------------------------------------ ANIL: meta-layers
def test_meta_layers_attach_and_detach_leave_the_model_as_it_was():
    """Attaching adds nothing (modules, state dict, outputs, hooks); detaching puts back the `requires_grad` flags
    the model had, including one frozen before, after MetaTrainer turned them all off."""
    model = conv_net(4)
    model.features[1][1].bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before, modules = snapshot(model), [n for n, _ in model.named_modules()]
    x = torch.randn(4, 1, 16, 16)
    reference = outputs(model, x)

    meta_layers = attach_meta_layers(model, BOTTOM)
    assert isinstance(meta_layers, MetaLayers) and meta_layers.names == tuple(BOTTOM)
    assert_same_state(model, before)
    assert [n for n, _ in model.named_modules()] == modules and forward_hooks(model) == 0
    for a, b in zip(outputs(model, x), reference):
        assert torch.equal(a, b)
    meta_ids = {id(p) for p in meta_layers.parameters()}
    expected = {n for n, _ in model.named_parameters() if n.startswith(tuple(f"{b}." for b in BOTTOM))}
    assert {n for n, p in model.named_parameters() if id(p) in meta_ids} == expected and len(meta_ids) == 9
    with pytest.raises(ValueError, match=r"ConvNet already has meta-layers attached \(features.0, features.1, "):
        attach_meta_layers(model, ["features.3"])

    for p in meta_layers.parameters():  # as MetaTrainer does
        p.requires_grad_(False)
    twin = copy.deepcopy(model)  # carries the marks: the model alone is enough to detach
    with pytest.raises(ValueError, match="has no meta-layers of the given meta-layers attached"):
        detach_meta_layers(twin, meta_layers)
    detach_meta_layers(model, meta_layers)
    detach_meta_layers(twin)
    for restored in (model, twin):
        assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags
        assert not any(REQUIRES_GRAD_BEFORE in m.__dict__ for m in restored.modules())
        assert_same_state(restored, before)
    with pytest.raises(ValueError, match="ConvNet has no meta-layers attached: nothing to detach"):
        detach_meta_layers(model)
    again = attach_meta_layers(model, "features.0")  # attaching again after a detach works
    detach_meta_layers(model, again)


@pytest.mark.parametrize(
    "names, frozen_top, match",
    [
        (["features.9"], False, r"no submodule 'features.9' \(in `names`\).*e.g. 'features', 'features.0', "),
        (["backbone"], False, r"no submodule 'backbone'.*e.g. 'features', 'features.0'"),
        ([""], False, r"no submodule ''"),
        ([], False, r"`names` is empty"),
        (["features.0", "features.1", "features.0"], False, r"names 'features.0' more than once"),
        (["features.0.0", "features.0"], False, r"gives 'features.0.0', which lies inside 'features.0'"),
        (["features.0.2"], False, r"'features.0.2' \(ReLU\) has no parameters"),
        (["features", "head"], False, r"hold every trainable parameter of ConvNet: nothing is left"),
        (BOTTOM, True, r"hold every trainable parameter of ConvNet"),  # what is left is frozen
    ],
)
def test_meta_layers_refuse_bad_names(names, frozen_top, match):
    model = conv_net(4)
    if frozen_top:
        for p in [*model.features[3].parameters(), *model.head.parameters()]:
            p.requires_grad_(False)
    with pytest.raises(ValueError, match=match):
        attach_meta_layers(model, names)
    assert not any(REQUIRES_GRAD_BEFORE in m.__dict__ for m in model.modules())  # nothing half attached


# --------------------------------------------------------------------------------------------- WarpGrad: warp layers
def test_warp_layer_is_a_zero_initialised_pre_activation_residual_unit():
    torch.manual_seed(0)
    layer = WarpLayer(4)
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(layer(x), x) and torch.equal(layer.eval()(x), x)
    layer.train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    expected = x + F.conv2d(F.relu(F.batch_norm(x, None, None, layer.norm.weight, layer.norm.bias, training=True)),
                            layer.conv.weight, padding=1)  # fmt: skip
    torch.testing.assert_close(layer(x), expected)
    assert sum(p.numel() for p in layer.parameters()) == 9 * 4 * 4 + 2 * 4


def test_warp_layers_attach_and_detach_leave_the_model_as_it_was():
    """Two warp layers after every block of a conv3: new state-dict keys only under `warp_*`, the unwarped outputs
    at initialisation, warped ones once the layers move, and after detaching the model exactly as before."""
    model = conv_net(3)
    before, modules = snapshot(model), [n for n, _ in model.named_modules()]
    x = torch.randn(4, 1, 8, 8)
    reference = outputs(model, x)
    rng = torch.get_rng_state()

    warps = attach_warp_layers(model, after=BOTTOM)
    assert torch.equal(torch.get_rng_state(), rng)  # the zeroed convolutions draw nothing
    assert isinstance(warps, WarpLayers) and len(warps.sites) == 3
    new_keys = set(model.state_dict()) - set(before)
    parts = ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
             "conv.weight"]  # fmt: skip
    assert new_keys == {f"warp_features_{i}.{j}.{part}" for i in range(3) for j in range(2) for part in parts}
    meta_ids = {id(p) for p in warps.parameters()}
    assert {n for n, p in model.named_parameters() if id(p) in meta_ids} == {
        k for k in new_keys if k.endswith("weight") or k.endswith("bias")
    }
    assert sum(p.numel() for p in warps.parameters()) == 3 * 2 * (9 * 4 * 4 + 2 * 4)
    for i, name in enumerate(BOTTOM):
        site = getattr(model, f"warp_features_{i}")
        assert isinstance(site, WarpSite) and site.attached_after == name
        assert list(model.get_submodule(name)._forward_hooks.values()) == [site.after]
    assert forward_hooks(model) == 3
    for a, b in zip(outputs(model, x), reference):  # the unwarped model at initialisation, exactly
        assert torch.equal(a, b)
    with torch.no_grad():
        model.warp_features_1[1].conv.weight.normal_()
    assert not any(torch.allclose(a, b) for a, b in zip(outputs(model, x), reference))  # the hooks apply them
    with pytest.raises(ValueError, match="ConvNet already has warp layers attached"):
        attach_warp_layers(model, after=["features.0"])

    detach_warp_layers(model, warps)
    assert_same_state(model, before)
    assert [n for n, _ in model.named_modules()] == modules and forward_hooks(model) == 0
    for a, b in zip(outputs(model, x), reference):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ConvNet has no warp layers attached: nothing to detach"):
        detach_warp_layers(model)
    again = attach_warp_layers(model, after="features.2", layers_per_site=1)  # again after a detach, one layer
    assert len(model.warp_features_2) == 1
    detach_warp_layers(model, again)
    assert_same_state(model, before)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def test_warp_sites_are_registered_where_no_container_runs_them():
    """On the nearest module above that does not run its children in order (never inside an nn.Sequential, which
    would run the site as one more stage), else on the followed module itself."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 16, 3))
    x = torch.randn(2, 1, 4, 4)
    reference = outputs(model, x)
    warps = attach_warp_layers(model, after=["0.bn", "2"])
    names = {n for n, m in model.named_modules() if isinstance(m, WarpSite)}
    assert names == {"0.warp_bn", "2.warp"}
    for a, b in zip(outputs(model, x), reference):
        assert torch.equal(a, b)
    twin = copy.deepcopy(model)  # hooks are bound methods: a deep copy warps with its own layers
    twin(x).sum().backward()
    assert twin[0].warp_bn[0].conv.weight.grad is not None and model[0].warp_bn[0].conv.weight.grad is None
    with pytest.raises(ValueError, match="has no warp layers of the given warps attached"):
        detach_warp_layers(twin, warps)
    detach_warp_layers(model)
    assert forward_hooks(model) == 0 and not names & {n for n, _ in model.named_modules()}
    with pytest.raises(ValueError, match=r"'0' and every module above it run their children in order"):
        attach_warp_layers(nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3))), after="0")


def test_warp_layers_refuse_what_they_cannot_place():
    model = conv_net(3)
    keys = list(model.state_dict())
    cases = [
        (dict(after=["features.9"]), r"ConvNet has no submodule 'features.9' \(in `after`\).*'features.0'"),
        (dict(after=["features.0", "features.0"]), r"`after` names 'features.0' more than once"),
        (dict(after=["features.0.2"]), r"Cannot tell the channels of 'features.0.2' \(ReLU\).*Pass `channels=`"),
        (dict(after=BOTTOM, channels=[4, 4]), r"channels has 2 counts for 3 modules"),
        (dict(after=BOTTOM, layers_per_site=0), r"layers_per_site must be a positive integer, got 0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            attach_warp_layers(model, **kwargs)
        assert list(model.state_dict()) == keys and forward_hooks(model) == 0
    attach_warp_layers(model, after="features.0.2", channels=4)  # told the channels, a ReLU is a fine site
    detach_warp_layers(model)
    attach_warp_layers(model, after="features.0", channels=5)
    with pytest.raises(ValueError, match=r"after 'features.0' take feature maps \[B, 5, H, W\].*\(2, 4, 4, 4\)"):
        model(torch.randn(2, 1, 8, 8))


# --------------------------------------------------------------------------------------------- under MetaTrainer
@pytest.mark.parametrize("kind", KINDS)
def test_meta_step_matches_a_hand_unrolled_reference_with_a_direct_term(tmp_path, kind):
    """T1-T2 on the meta-layers: the meta loss at the stepped weights depends on the meta-parameters directly as well
    as through the step, and the meta step's update (SGD, lr 1) is minus autograd's hypergradient."""
    model, meta_module = attached(kind)
    trainer = trainer_for(tmp_path, model, meta_module, meta_optimizer="sgd", meta_learning_rate=1.0,
                          meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0})  # fmt: skip
    trainer.create_optimizer()
    train_batch = next(iter(trainer.get_train_dataloader()))
    meta_batch = next(iter(trainer.get_meta_dataloader()))
    meta_names = set(trainer.meta_param_names)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta = {n: v.clone().requires_grad_() for n, v in values.items() if n not in meta_names}
    lam = {n: values[n].clone().requires_grad_() for n in trainer.meta_param_names}
    bufs = lambda: {n: b.clone() for n, b in model.named_buffers()}  # noqa: E731

    def loss(weights, batch):
        logits = functional_call(model, {**weights, **bufs()}, (batch["pixel_values"],))
        return F.cross_entropy(logits, batch["labels"])

    g = torch.autograd.grad(loss({**theta, **lam}, train_batch), list(theta.values()), create_graph=True)
    stepped = {n: p - 0.1 * gi for (n, p), gi in zip(theta.items(), g)}
    outer = loss({**stepped, **lam}, meta_batch)
    expected = torch.autograd.grad(outer, list(lam.values()))
    held = {n: s.detach() for n, s in stepped.items()}
    direct = torch.autograd.grad(loss({**held, **lam}, meta_batch), list(lam.values()))
    assert sum(float(d.abs().sum()) for d in direct) > 0  # the direct term: meta loss on the stepped weights

    assert trainer.meta_step(train_batch)
    after = dict(model.named_parameters())
    for name, e in zip(lam, expected):
        torch.testing.assert_close(values[name] - after[name].detach(), e, rtol=1e-4, atol=1e-7, msg=name)
    assert all(torch.equal(values[n], after[n]) for n in theta)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("estimator", ["t1t2", "evograd"])
def test_meta_trainer_learns_every_meta_parameter_and_the_base_optimizer_none(tmp_path, kind, estimator):
    model, meta_module = attached(kind)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    recorder = Recorder()
    trainer = trainer_for(tmp_path, model, meta_module, hypergradient=estimator)
    trainer.add_callback(recorder)
    meta_before = [p.detach().clone() for p in meta_module.parameters()]
    head_before = model.head.weight.detach().clone()
    trainer.train()

    prefixes = ("warp_",) if kind == "warpgrad" else tuple(f"{b}." for b in BOTTOM)
    expected = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert set(trainer.meta_param_names) == expected
    base = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    meta_ids = {id(p) for p in meta_module.parameters()}
    assert not base & meta_ids and base  # the base optimizer holds the other weights, none of the meta-parameters
    assert meta_ids == {id(p) for group in trainer.meta_optimizer.param_groups for p in group["params"]}
    logs = [entry for entry in trainer.state.log_history if "hypergradient_norm" in entry]
    assert len(logs) == 3 and all(e["hypergradient_norm"] > 0 and e["meta_steps_skipped"] == 0 for e in logs)
    grads = [event[2].grads for event in recorder.events]
    for i, name in enumerate(trainer.meta_param_names):  # every meta-parameter: a non-zero hypergradient, and moved
        assert any(bool(g[i].ne(0).any()) for g in grads), name
        assert not torch.equal(meta_before[i], list(meta_module.parameters())[i]), name
    assert not torch.equal(head_before, model.head.weight)

    (detach_meta_layers if kind == "anil" else detach_warp_layers)(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: f for n, f in flags.items() if not n.startswith("warp_")
    }


@pytest.mark.parametrize("kind", KINDS)
def test_first_order_sees_the_direct_term(tmp_path, kind):
    """The meta-parameters act in the meta loss: even the first-order estimate (its direct gradient alone) is non-zero,
    unlike a loss weighter's."""
    trainer = trainer_for(tmp_path, *attached(kind), hypergradient="first_order")
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "hypergradient_norm" in entry]
    assert len(logs) == 3 and all(e["hypergradient_norm"] > 0 for e in logs)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_resume_and_the_saved_pair_loads_back(tmp_path, kind):
    """A run interrupted after its checkpoint and resumed ends as the uninterrupted one; the saved model file and
    meta-module file together give back the trained model (attach to a fresh model, then load both)."""
    from safetensors.torch import load_file

    def build(folder):
        return trainer_for(tmp_path / folder, *attached(kind), max_steps=6, save_strategy="steps", save_steps=3)

    full = build("full")
    full.train()
    full.save_model()
    first = build("resumed")
    first.add_callback(StopAfter(3))
    first.train()
    resumed = build("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(full.meta_module.state_dict().items(), resumed.meta_module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    out = tmp_path / "full" / "out"
    fresh, meta_module = attached(kind, seed=1)
    missing, unexpected = fresh.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    # WarpGrad's added layers (weights and buffers) are left out; ANIL's meta-layers are the model's own and stay in
    # (batch norm fills in a missing `num_batches_tracked` without reporting it)
    added = {k for k in fresh.state_dict() if k.startswith("warp_") and not k.endswith("num_batches_tracked")}
    assert set(missing) == added and not unexpected and (kind == "anil") == (not added)
    meta_module.load_state_dict(load_file(out / "meta_module.safetensors"))
    x = torch.randn(4, 1, 16, 16)
    for a, b in zip(outputs(fresh, x), outputs(full.model, x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_the_saved_model_file_alone_loads_into_the_model_as_built(tmp_path, kind):
    """What `from_pretrained` needs: the model file loads strictly into a fresh model as it was built (ANIL: with its
    trained meta-layers; WarpGrad: without warp layers, as for other attached modules)."""
    from safetensors.torch import load_file

    trainer = trainer_for(tmp_path, *attached(kind), max_steps=1)
    trainer.train()
    trainer.save_model()
    conv_net(4 if kind == "anil" else 3).load_state_dict(load_file(tmp_path / "out" / "model.safetensors"))
