"""MetaTrainer across processes and precisions: a real 2-process CPU run (gloo), bf16 autocast of every meta
forward, the meta step under fp16 (loss-scaled base gradients, overflow), gradient accumulation against the
equivalent larger batch, DeepSpeed, FSDP1 and second-order estimators under FSDP2 refused, and the example
accelerate configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_trainer, snapshot
from torch import nn

from metatrain import MetaTrainer, MetaTrainingArguments
from metatrain.modules import LearnableRotation, MetaWeightNet
from metatrain.trainer import MetaTrainerCallback
from metatrain.training_args import SUPPORTED_SETUPS
from metatrain.utils import cosine, flatten

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """`tests/distributed_script.py` under `torchrun --nproc_per_node 2 ... --use_cpu true`: one result per rank."""
    out = tmp_path_factory.mktemp("two_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "distributed_script.py"), "--output_dir", str(out), "--use_cpu", "true",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["t1t2", "evograd_per_rank", "evograd_shared"])
def test_hypergradients_are_averaged_and_meta_parameters_identical_on_every_rank(two_ranks, run):
    rank0, rank1 = two_ranks[0][run], two_ranks[1][run]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["steps"]) == len(rank1["steps"]) == 3
    for step0, step1 in zip(rank0["steps"], rank1["steps"]):
        local0, local1 = np.array(step0["local"]), np.array(step1["local"])
        # each rank estimates on its own shard: the two local hypergradients differ, so the check below can fail
        assert np.abs(local0 - local1).max() > 1e-4
        for step in (step0, step1):  # SGD at learning rate 1: the update is minus the applied hypergradient
            update = np.array(step["before"]) - np.array(step["after"])
            np.testing.assert_allclose(update, (local0 + local1) / 2, rtol=1e-4, atol=1e-7)
    assert rank0["meta_params"] == rank1["meta_params"]
    assert rank0["model"] == rank1["model"]  # DDP keeps the base weights in step too
    assert rank0["meta_steps_skipped"] == rank1["meta_steps_skipped"] == 0


@pytest.mark.slow
def test_ddp_searches_for_unused_parameters_only_where_the_model_has_them(two_ranks):
    """Trainer would turn the search on for a plain module (DDP then warns on every rank): every weight of the MLP
    gets a gradient, so it stays off."""
    assert [rank["t1t2"]["find_unused_parameters"] for rank in two_ranks] == [False, False]


@pytest.mark.slow
def test_evograd_noise_is_per_rank_or_shared_by_option(two_ranks):
    """The script lets the ranks' global RNG streams drift apart: a shared population comes from rank 0's seed."""
    for run, shared in (("evograd_per_rank", False), ("evograd_shared", True)):
        seeds0 = [step["seed"] for step in two_ranks[0][run]["steps"]]
        seeds1 = [step["seed"] for step in two_ranks[1][run]["steps"]]
        assert len(set(seeds0)) == 3
        assert all((a == b) == shared for a, b in zip(seeds0, seeds1)), (run, seeds0, seeds1)


@pytest.mark.slow
def test_every_rank_resumes_with_its_own_estimator_state_and_meta_data_position(two_ranks):
    """Reverse mode remembers each rank's own training batches; the checkpoint (in the second pass over the meta
    data) keeps each rank's, and the resumed run ends where the uninterrupted one does."""
    runs = [ranks["resume"] for ranks in two_ranks]
    assert runs[0]["checkpoint_meta_data"] == runs[1]["checkpoint_meta_data"] == {"epoch": 1, "consumed": 1}
    assert len(runs[0]["checkpoint_history_labels"]) == 2
    assert runs[0]["checkpoint_history_labels"] != runs[1]["checkpoint_history_labels"]  # the ranks' own shards
    for run in runs:
        for key in ("meta_params", "model"):
            np.testing.assert_allclose(run["resumed"][key], run["full"][key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_online_run_trains_a_task_per_rank_with_its_own_weights_and_averages_reptile(two_ranks):
    """Tasks in parallel: rank r trains tasks r, r + 2 (3 steps each) and draws its meta batches from them; the ranks'
    weights differ within a task, the initialisation moves by Reptile towards the mean of their end weights and stays
    identical on both, and so do the meta-parameters."""
    runs = [ranks["online"] for ranks in two_ranks]
    for rank, run in enumerate(runs):
        tasks = [step // 3 * 2 + rank for step in range(5)]  # [global step, training batch's, meta batch's]
        assert run["tasks"] == [[step, [task], [task]] for step, task in enumerate(tasks)]
    (restart0,), (restart1,) = runs[0]["restarts"], runs[1]["restarts"]
    assert restart0["phi"] == restart1["phi"] and restart0["phi_after"] == restart1["phi_after"]
    end0, end1, phi = (np.array(v) for v in (restart0["end"], restart1["end"], restart0["phi"]))
    assert np.abs(end0 - end1).max() > 1e-3  # two tasks, two sets of weights
    np.testing.assert_allclose(restart0["phi_after"], phi + 0.5 * ((end0 + end1) / 2 - phi), rtol=1e-5, atol=1e-7)
    assert runs[0]["full"]["meta_params"] == runs[1]["full"]["meta_params"]
    assert runs[0]["full"]["initialisation"] == runs[1]["full"]["initialisation"]
    assert np.abs(np.subtract(runs[0]["full"]["model"], runs[1]["full"]["model"])).max() > 1e-3  # mid-task


@pytest.mark.slow
def test_online_run_resumed_mid_task_is_the_same_run_on_every_rank(two_ranks):
    """The checkpoint at step 4 is inside the second task, where each rank's weights and Adam moments are its own:
    every rank resumes its own and ends where the uninterrupted run does."""
    for run in (ranks["online"] for ranks in two_ranks):
        for key in ("meta_params", "model", "initialisation"):
            np.testing.assert_allclose(run["resumed"][key], run["full"][key], rtol=1e-5, atol=1e-7, err_msg=key)


# ------------------------------------------------------------------------------------------------ mixed precision
class Capture(MetaTrainerCallback):
    def __init__(self):
        self.grads = []

    def on_meta_step(self, args, state, control, *, result, **kwargs):
        self.grads.append(flatten(result.grads))


def first_batch(trainer: MetaTrainer) -> dict:
    """The first training batch, on the trainer's device (`meta_step` takes a prepared batch)."""
    return {k: v.to(trainer.args.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}


def meta_step_grads(trainer: MetaTrainer, train_batch: dict) -> torch.Tensor:
    """The hypergradient of one meta step on `train_batch` and the first meta batch, flattened."""
    capture = Capture()
    trainer.add_callback(capture)
    trainer.meta_batches.rewind()
    try:
        assert trainer.meta_step(train_batch)
    finally:
        trainer.remove_callback(capture)
    return capture.grads[0]


def test_bf16_autocasts_every_meta_forward_and_agrees_with_fp32(tmp_path):
    hypergradients = {}
    for bf16 in (False, True):
        trainer = make_trainer(tmp_path, hypergradient="t1t2", bf16=bf16)
        trainer.create_optimizer()
        forwards = []
        modules = [*trainer.model.modules(), *trainer.meta_module.modules()]
        for module in modules:
            if not list(module.children()):
                module.register_forward_hook(
                    lambda m, i, o, seen=forwards: seen.append(
                        (type(m).__name__, torch.is_autocast_enabled("cpu"), o.dtype)
                    )
                )
        batch = first_batch(trainer)
        hypergradients[bf16] = meta_step_grads(trainer, batch)
        assert {"Conv2d", "Linear", "Sigmoid"} <= {name for name, _, _ in forwards}
        if bf16:  # the model (patched by Accelerate) and the external weighting net (not prepared) alike
            assert all(enabled for _, enabled, _ in forwards), forwards
            assert {dtype for name, _, dtype in forwards if name in ("Conv2d", "Linear")} == {torch.bfloat16}
        else:
            assert not any(enabled for _, enabled, _ in forwards)
        assert all(p.dtype == torch.float32 for p in trainer.meta_params)
    assert cosine(hypergradients[True], hypergradients[False]) > 0.99
    ratio = hypergradients[True].norm() / hypergradients[False].norm()
    assert 0.9 < ratio < 1.1, ratio


def test_evograd_forward_mode_under_bf16_agrees_with_its_backward_pass(tmp_path):
    """EvoGrad's forward mode differentiates the bf16-autocast meta loss by Jacobian-vector products of dual weights
    (autocast casts the tangents with the weights). On the same noise (K=3, so that the cosine is not +/-1 by
    construction) it gives the backward pass's estimate up to bf16 rounding, which differs between the two modes
    (measured: cosine 1 - 1e-9, norm ratio 1.011)."""
    hypergradients = {}
    for forward_mode in (False, True):
        paths = {"memory_lean": True, "forward_mode": False} if not forward_mode else {"forward_mode": True}
        options = {"population": 3, "sigma": 0.05, **paths}
        trainer = make_trainer(tmp_path, hypergradient="evograd", hypergradient_kwargs=options, bf16=True)
        trainer.create_optimizer()
        batch = first_batch(trainer)
        torch.manual_seed(0)
        hypergradients[forward_mode] = meta_step_grads(trainer, batch)
    assert hypergradients[False].norm() > 0
    assert cosine(hypergradients[True], hypergradients[False]) > 0.99
    ratio = hypergradients[True].norm() / hypergradients[False].norm()
    assert 0.95 < ratio < 1.05, ratio


def test_meta_step_ignores_loss_scaled_base_gradients_and_stays_out_of_the_grad_scaler(tmp_path):
    """Under fp16 the meta step runs (`after`) when the base `.grad` holds gradients still multiplied by the loss
    scale, or overflowed ones. The estimators differentiate their own losses with `torch.autograd.grad`, so
    `.grad` must not change the hypergradient, and the meta-optimizer must not be one Accelerate's GradScaler
    unscales or steps."""
    trainer = make_trainer(tmp_path, hypergradient="t1t2")
    trainer.create_optimizer()
    batch = first_batch(trainer)
    initial = snapshot(trainer.meta_module)
    clean = meta_step_grads(trainer, batch)
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    trainer.meta_module.load_state_dict(initial)
    scaled = meta_step_grads(trainer, batch)
    assert torch.equal(scaled, clean)
    assert all(torch.isinf(p.grad).all() for p in trainer.model.parameters())  # untouched
    assert all(trainer.meta_optimizer is not getattr(o, "optimizer", o) for o in trainer.accelerator._optimizers)


def test_fp16_meta_forwards_give_the_fp32_hypergradient_and_an_overflow_is_skipped(tmp_path, monkeypatch):
    """Accelerate runs fp16 on CPU as fp32, so fp16 autocast is put in its place: the meta step in fp16 matches
    fp32 within half precision, and a meta batch that overflows fp16 is skipped, counted and changes nothing."""
    trainer = make_trainer(tmp_path, hypergradient="t1t2")
    trainer.create_optimizer()
    batch = first_batch(trainer)
    fp32 = meta_step_grads(trainer, batch)
    monkeypatch.setattr(trainer.accelerator, "autocast", lambda: torch.autocast("cpu", dtype=torch.float16))
    fp16 = meta_step_grads(trainer, batch)
    assert not torch.equal(fp16, fp32)
    assert cosine(fp16, fp32) > 0.99
    before = snapshot(trainer.meta_module)
    real_next = trainer.meta_batches.next
    monkeypatch.setattr(
        trainer.meta_batches, "next", lambda: {**(b := real_next()), "pixel_values": b["pixel_values"] * 1e5}
    )
    assert not trainer.meta_step(batch)
    assert trainer.meta_steps_skipped == 1
    assert all(torch.equal(v, before[k]) for k, v in snapshot(trainer.meta_module).items())


# ------------------------------------------------------------------------------------------- gradient accumulation
def no_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3))


def accumulated_run(tmp_path, batch_size: int, accumulation: int, meta_module: nn.Module, **overrides):
    options = dict(
        hypergradient="t1t2", max_steps=3, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, meta_batch_size=8, meta_optimizer="sgd", meta_learning_rate=1.0,
        meta_optimizer_kwargs={"momentum": 0.0, "weight_decay": 0.0},
    )  # fmt: skip
    trainer = make_trainer(tmp_path, model=no_bn_model(), meta_module=meta_module, **{**options, **overrides})
    steps, meta_step = [], trainer.meta_step
    trainer.meta_step = lambda batch, *rest: steps.append(len(batch["labels"])) or meta_step(batch, *rest)
    trainer.train()
    return trainer, steps


@pytest.mark.parametrize("position", ["before", "after"])
def test_accumulation_gives_the_meta_steps_of_the_equivalent_larger_batch(tmp_path, position):
    """A rotation meta-module keeps the training loss a plain mean, so 2 micro-batches of 4 give the base step of a
    batch of 8 (Trainer's accumulation): the meta step must then match too, on the joined window."""
    large, large_steps = accumulated_run(tmp_path, 8, 1, LearnableRotation(10.0), meta_step_position=position)
    accumulated, steps = accumulated_run(tmp_path, 4, 2, LearnableRotation(10.0), meta_step_position=position)
    micro, _ = accumulated_run(
        tmp_path, 4, 2, LearnableRotation(10.0), meta_step_position=position, meta_train_batch="micro_batch"
    )
    assert steps == large_steps == [8, 8, 8]
    assert accumulated.state.global_step == large.state.global_step == 3
    angle = {
        name: float(t.meta_module.angle) for name, t in (("large", large), ("acc", accumulated), ("micro", micro))
    }
    assert abs(angle["large"] - 10.0 * np.pi / 180) > 1e-4  # the meta step moved the angle
    assert angle["acc"] == pytest.approx(angle["large"], abs=1e-6)
    assert abs(angle["micro"] - angle["large"]) > 1e-5  # one micro-batch is not the larger batch
    for (name, p), q in zip(accumulated.model.named_parameters(), large.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_accumulation_with_a_weighting_net_meta_steps_on_the_whole_window(tmp_path):
    """Meta-Weight-Net's first meta step (before any base update) equals the larger batch's; later ones differ only
    because Trainer's base step normalises the weighted loss per micro-batch."""
    large, _ = accumulated_run(tmp_path, 8, 1, torch.manual_seed(3) and MetaWeightNet(), max_steps=1)
    accumulated, steps = accumulated_run(tmp_path, 4, 2, torch.manual_seed(3) and MetaWeightNet(), max_steps=1)
    assert steps == [8]
    for p, q in zip(accumulated.meta_params, large.meta_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- sharded training
@pytest.mark.parametrize(
    "options, env, message",
    [({"deepspeed": {"zero_optimization": {"stage": 2}}}, {}, "does not support DeepSpeed"),
     ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, "does not support DeepSpeed"),
     ({"fsdp": True, "fsdp_config": {"version": 1}}, {}, "FSDP version 2 only, got version 1"),
     ({"fsdp": True, "fsdp_config": {"fsdp_version": 1}}, {}, "FSDP version 2 only, got version 1"),
     ({}, {"ACCELERATE_USE_FSDP": "true"}, "FSDP version 2 only, got version 1"),  # accelerate's default
     ({"fsdp": True, "hypergradient": "t1t2"}, {}, r"hypergradient='t1t2' cannot run under FSDP.*'evograd'"),
     ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, None),
     ({"fsdp": True, "hypergradient": "reverse"}, {}, r"'reverse' cannot run under FSDP.*'first_order', 't1t2_fd'"),
     ({"fsdp": True, "meta_diagnostics_steps": 5}, {}, "meta_diagnostics_reference='t1t2' cannot run under FSDP"),
     ({"fsdp": True, "meta_inner_steps": 3}, {}, "leave `meta_inner_steps` unset under FSDP"),
     ({"fsdp": True, "hypergradient": "t1t2_fd", "meta_diagnostics_steps": 5,
       "meta_diagnostics_reference": "evograd"}, {}, None)],
)  # fmt: skip
def test_sharded_setups_the_meta_step_cannot_run_are_refused_naming_the_fix(
    tmp_path, monkeypatch, options, env, message
):
    """DeepSpeed and FSDP1 are refused; FSDP2 is accepted with the first-order estimators only."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if message is None:
        MetaTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **options)
        return
    with pytest.raises(ValueError, match=message) as error:
        MetaTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **options)
    if "DeepSpeed" in message or "version" in message:
        assert SUPPORTED_SETUPS in str(error.value)


def test_fsdp1_in_an_fsdp_config_file_is_refused(tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"version": 1}))
    with pytest.raises(ValueError, match="FSDP version 2 only, got version 1"):
        MetaTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], fsdp=True, fsdp_config=str(path))


# ------------------------------------------------------------------------------------------------ accelerate configs
@pytest.mark.parametrize(
    "name, distributed_type, processes, precision",
    [
        ("single_gpu", "NO", 1, "no"),
        ("multi_gpu", "MULTI_GPU", 2, "no"),
        ("bf16", "MULTI_GPU", 2, "bf16"),
        ("fsdp2", "FSDP", 2, "bf16"),
    ],
)
def test_accelerate_configs_load(name, distributed_type, processes, precision):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "recipes" / "accelerate_configs" / f"{name}.yaml"))
    assert config.distributed_type.value == distributed_type
    assert (config.num_processes, config.mixed_precision, config.use_cpu) == (processes, precision, False)
    if distributed_type == "FSDP":  # the version MetaTrainer accepts
        assert config.fsdp_config["fsdp_version"] == 2
