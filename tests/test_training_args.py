"""MetaTrainingArguments: the meta-optimizer's options (`meta_optimizer_kwargs`) and the fields they replaced."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import datasets
import pytest
import torch
from torch import nn

from metatrain import MetaTrainer, MetaTrainingArguments
from metatrain.cli import parse_config
from metatrain.modules import MetaWeightNet

# the meta-optimizers as `create_meta_optimizer` built them from the removed fields' defaults (meta_weight_decay=1e-4,
# meta_momentum=0.9, meta_nesterov=False, meta_adam_beta1=0.9, meta_adam_beta2=0.999): the independent reference
BEFORE = {
    "sgd": lambda params: torch.optim.SGD(params, 1e-3, momentum=0.9, nesterov=False, weight_decay=1e-4),
    "adam": lambda params: torch.optim.Adam(params, 1e-3, betas=(0.9, 0.999), weight_decay=1e-4),
    "adamw": lambda params: torch.optim.AdamW(params, 1e-3, betas=(0.9, 0.999), weight_decay=1e-4),
}


def make_args(tmp_path, **overrides) -> MetaTrainingArguments:
    options = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no")
    return MetaTrainingArguments(**{**options, **overrides})


def make_trainer(args: MetaTrainingArguments) -> MetaTrainer:
    def dataset(n: int, seed: int) -> datasets.Dataset:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")

    torch.manual_seed(0)
    return MetaTrainer(
        model=nn.Linear(4, 3), args=args, train_dataset=dataset(16, 1), meta_dataset=dataset(8, 2),
        meta_module=MetaWeightNet(),
    )  # fmt: skip


def options(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_default_meta_optimizer_is_unchanged(tmp_path, name):
    """Without `meta_optimizer_kwargs`, each meta-optimizer has the options (and takes the steps) it had when they were
    separate fields."""
    trainer = make_trainer(make_args(tmp_path, meta_optimizer=name))
    optimizer = trainer.create_meta_optimizer()
    reference_params = [p.detach().clone().requires_grad_() for p in trainer.meta_params]
    reference = BEFORE[name](reference_params)
    assert type(optimizer) is type(reference)
    assert options(optimizer) == options(reference)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(trainer.meta_params, reference_params):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, q in zip(trainer.meta_params, reference_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_meta_optimizer_kwargs_update_the_defaults(tmp_path):
    """Options given update the defaults; the others keep theirs, and `meta_learning_rate` gives `lr`."""
    args = make_args(tmp_path, meta_optimizer="sgd", meta_learning_rate=0.5, meta_optimizer_kwargs={"nesterov": True})
    optimizer = make_trainer(args).create_meta_optimizer()
    group = options(optimizer)[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.5, 0.9, True, 1e-4)
    args = make_args(tmp_path, meta_optimizer_kwargs={"weight_decay": 0.0})
    group = options(make_trainer(args).create_meta_optimizer())[0]
    assert (group["weight_decay"], group["betas"]) == (0.0, (0.9, 0.999))


def test_meta_optimizer_kwargs_from_the_command_line_and_yaml(tmp_path):
    """A JSON string from a flag and a mapping from the YAML config reach the optimizer; JSON lists become tuples."""
    flags = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    (args,) = parse_config(
        (MetaTrainingArguments,),
        [*flags, "--meta_optimizer", "sgd", "--meta_optimizer_kwargs", '{"momentum": 0.5, "nesterov": true}'],
    )
    assert args.meta_optimizer_kwargs == {"momentum": 0.5, "nesterov": True}
    config = tmp_path / "config.yaml"
    config.write_text("meta_optimizer: adamw\nmeta_optimizer_kwargs: {betas: [0.8, 0.99], weight_decay: 0.0}\n")
    (args,) = parse_config((MetaTrainingArguments,), [str(config), *flags])
    assert args.meta_optimizer_kwargs == {"betas": (0.8, 0.99), "weight_decay": 0.0}
    group = options(make_trainer(args).create_meta_optimizer())[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.99), 0.0, 1e-8)
    assert json.loads(args.to_json_string())["meta_optimizer_kwargs"] == {"betas": [0.8, 0.99], "weight_decay": 0.0}


def test_args_copy_pickle_and_replace(tmp_path):
    """`__new__` checks keywords only: copies, pickles and `dataclasses.replace` still work."""
    args = make_args(tmp_path, meta_optimizer="sgd", meta_optimizer_kwargs='{"momentum": 0.0}')
    for other in (copy.deepcopy(args), pickle.loads(pickle.dumps(args)), dataclasses.replace(args)):
        assert other.meta_optimizer_kwargs == {"momentum": 0.0} and other.meta_optimizer == "sgd"
    with pytest.raises(ValueError, match="'momentum'.*meta_optimizer='adam'"):
        dataclasses.replace(args, meta_optimizer="adam")


def test_bad_meta_optimizer_kwargs(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown option 'betas'.*torch\.optim\.SGD.*accepted are \[.*'momentum'"):
        make_args(tmp_path, meta_optimizer="sgd", meta_optimizer_kwargs={"betas": [0.9, 0.99]})
    with pytest.raises(ValueError, match=r"Unknown option 'momentum'.*accepted are \[.*'betas'"):
        make_args(tmp_path, meta_optimizer_kwargs={"momentum": 0.9})
    with pytest.raises(ValueError, match="meta_learning_rate"):
        make_args(tmp_path, meta_optimizer_kwargs={"lr": 0.1})
    with pytest.raises(ValueError, match="not valid JSON"):
        make_args(tmp_path, meta_optimizer_kwargs="{weight_decay: 0}")
    with pytest.raises(ValueError, match="must be a dict"):
        make_args(tmp_path, meta_optimizer_kwargs="[0.1]")


@pytest.mark.parametrize(
    "removed, replacement",
    [
        ({"meta_weight_decay": 1e-4}, "{'weight_decay': 0.0001}"),
        ({"meta_momentum": 0.0, "meta_nesterov": True}, "{'momentum': 0.0, 'nesterov': True}"),
        ({"meta_adam_beta2": 0.99}, "{'betas': (0.9, 0.99)}"),
        ({"meta_adam_beta1": 0.8, "meta_adam_beta2": 0.99}, "{'betas': (0.8, 0.99)}"),
    ],
)
def test_removed_fields_as_keywords(tmp_path, removed, replacement):
    with pytest.raises(TypeError) as err:
        make_args(tmp_path, **removed)
    verb = "was" if len(removed) == 1 else "were"
    assert str(err.value) == f"{' and '.join(removed)} {verb} removed: pass meta_optimizer_kwargs={replacement}"


def test_removed_fields_from_the_command_line_and_yaml(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    with pytest.raises(ValueError) as err:
        parse_config((MetaTrainingArguments,), [*flags, "--meta_weight_decay", "1e-4"])
    assert "`meta_weight_decay` was removed" in str(err.value)
    assert """`--meta_optimizer_kwargs '{"weight_decay": 0.0001}'`""" in str(err.value)
    config = tmp_path / "config.yaml"
    config.write_text("meta_optimizer: sgd\nmeta_momentum: 0.0\nmeta_nesterov: true\n")
    with pytest.raises(ValueError) as err:
        parse_config((MetaTrainingArguments,), [str(config), *flags, "--meta_adam_beta2=0.99"])
    assert "`meta_adam_beta2` and `meta_momentum` and `meta_nesterov` were removed" in str(err.value)
    assert 'meta_optimizer_kwargs: {"betas": [0.9, 0.99], "momentum": 0.0, "nesterov": true}' in str(err.value)
