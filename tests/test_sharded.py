"""The meta step under FSDP2 (`fully_shard`) in two processes (gloo): each supported estimator against the unsharded
one, the weights put back exactly, training against the same steps without sharding, and `MetaTrainer`'s meta step on
a sharded model; the estimators and options that cannot run sharded are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from metatrain.estimators import create_estimator
from metatrain.sharded import SHARDED_ESTIMATORS, LocalShards, check_sharded_estimator, is_sharded

ROOT = Path(__file__).resolve().parent.parent
CASES = ["evograd", "evograd_gaussian_antithetic", "t1t2_fd", "first_order"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """`tests/sharded_script.py` under `torchrun --nproc_per_node 2`: one result per rank."""
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "sharded_script.py"), "--output_dir", str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


LAYOUTS = [f"{case}/{where}" for case in CASES for where in ("outside", "attached")] + [
    f"{case}/outside/{layout}" for layout in ("root_owns_head", "no_reshard") for case in
    ("evograd", "t1t2_fd", "first_order")] + ["evograd/outside/no_sync", "t1t2_fd/outside/no_sync"]  # fmt: skip


@pytest.mark.parametrize("run", LAYOUTS)
def test_sharded_hypergradient_equals_the_unsharded_one(two_ranks, run):
    """Each estimator, with the meta-module outside the model and attached to it, also where FSDP keeps weights
    gathered after a forward (the root's, a group set not to reshard) and inside Trainer's `no_sync`."""
    case, where = run.split("/")[:2]
    for rank in two_ranks:
        assert rank["world_size"] == 2
        result = rank[run]
        if case == "first_order" and where == "outside":  # a loss weighter has no direct term: exactly zero
            assert result["scale"] == 0.0
        else:
            assert result["scale"] > 1e-6
        assert result["difference"] <= 1e-5 * result["scale"] + 1e-9
        assert abs(result["meta_loss"][0] - result["meta_loss"][1]) < 1e-6
        assert result["restored"], "the local shards were not put back bit for bit"
        assert result["grads_kept"], "the base step's gradients were changed"
        assert result["forward_matches"], "a forward after the meta step does not see the weights"
        assert result["sync_kept"], "FSDP's gradient-sync setting was changed"


def test_a_meta_step_that_raises_leaves_the_weights_as_they_were(two_ranks):
    for rank in two_ranks:
        result = rank["interrupted"]
        assert result["raised"] and result["restored"] and result["forward_matches"] and result["requires_grad"]


@pytest.mark.parametrize("where", ["outside", "attached"])
def test_sharded_training_equals_unsharded_and_meta_parameters_agree_on_every_rank(two_ranks, where):
    rank0, rank1 = two_ranks[0][f"train/{where}"], two_ranks[1][f"train/{where}"]
    assert rank0["meta_params"] == rank1["meta_params"]
    assert rank0["weights_difference"] < 1e-6
    assert rank0["meta_params_difference"] < 1e-6


@pytest.mark.parametrize("name", ["t1t2", "neumann", "reverse", "hyperdistill", "drmad"])
def test_second_order_estimators_are_refused_naming_the_supported_ones(name):
    with pytest.raises(ValueError, match=r"cannot run under FSDP.*evograd.*first_order.*t1t2_fd"):
        check_sharded_estimator(create_estimator(name))


@pytest.mark.parametrize("options", [{"memory_lean": False}, {"forward_mode": True}])
def test_evograd_paths_that_hold_unsharded_copies_are_refused(options):
    with pytest.raises(ValueError, match="not available under FSDP"):
        check_sharded_estimator(create_estimator("evograd", **options))


def test_supported_estimators_pass_and_unsharded_models_are_named():
    for name in SHARDED_ESTIMATORS:
        check_sharded_estimator(create_estimator(name))
    model = nn.Linear(3, 2)
    assert not is_sharded(model)
    with pytest.raises(ValueError, match=r"\['weight', 'bias'\] are not sharded"):
        LocalShards(model)


def test_meta_trainer_meta_step_on_a_sharded_model(two_ranks):
    rank0, rank1 = two_ranks[0]["trainer"], two_ranks[1]["trainer"]
    for rank in (rank0, rank1):
        assert rank["done"] == [True, True]
        assert rank["restored"]
        for difference, scale in zip(rank["differences"], rank["scales"]):
            assert scale > 1e-6 and difference <= 1e-4 * scale
    assert rank0["meta_params"] == rank1["meta_params"]


def test_a_subclass_of_a_supported_estimator_is_refused():
    """The sharded meta step has its own form of each supported estimator: a subclass's own `estimate` would be
    ignored, so it is refused."""
    from metatrain.estimators import EvoGrad

    class Mine(EvoGrad):
        pass

    with pytest.raises(ValueError, match=r"\(Mine\) cannot run under FSDP"):
        check_sharded_estimator(Mine())


def test_a_run_resumed_from_a_sharded_checkpoint_is_the_same_run(two_ranks):
    """The sharded meta step keeps no state of its own: the model's and optimizer's shards (saved with
    torch.distributed.checkpoint), the meta-module and the meta-optimizer continue the run bit for bit on every
    rank."""
    for rank in two_ranks:
        assert rank["resume"]["resumed"] == rank["resume"]["full"]
    assert two_ranks[0]["resume"]["full"] == two_ranks[1]["resume"]["full"]
