"""The pieces of `benchmarks/` that compute numbers: the forward-only EvoGrad variant (`forward_only.py`: K + 1 meta
forwards replace the meta backward) against the standard path on the same noise, `step_cost.py`'s memory
measurement and ratios, and `lft_probe.py` on a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import weighted_mlp_problem

from metatrain.estimators import EvoGrad, HypergradientProblem
from metatrain.utils import cosine, flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import lft_probe  # noqa: E402
from forward_only import ForwardOnlyEvoGrad  # noqa: E402 (not registered: ESTIMATORS stays the library's)
from step_cost import add_ratios, markdown_table, run_configuration  # noqa: E402


def both(params, lam, train_loss, meta_loss, **options):
    """Standard and forward-only estimates drawn from the same seed."""
    out = []
    for forward_only in (False, True):
        torch.manual_seed(3)
        est = (ForwardOnlyEvoGrad if forward_only else EvoGrad)(**options)
        out.append(est.estimate(HypergradientProblem(params, [lam], train_loss, meta_loss)))
    return out


@pytest.mark.parametrize("options", [{"population": 2}, {"population": 5, "noise": "gaussian"}])
def test_forward_only_is_exact_for_a_meta_loss_linear_in_the_weights(options):
    """With `L_meta` linear in theta, `L_meta(theta_k) - L_meta(theta*) = grad L_meta . (theta_k - theta*)` exactly,
    and a direct term `lambda^2` must come through as well."""
    params, lam, train_loss, _ = weighted_mlp_problem()
    direction = {n: torch.randn_like(p) for n, p in params.items()}

    def meta_loss(p, batch):
        return sum((p[n] * direction[n]).sum() for n in p) + (lam**2).sum()

    standard, forward = both(params, lam, train_loss, meta_loss, sigma=0.05, **options)
    torch.testing.assert_close(forward.grads[0], standard.grads[0], rtol=1e-9, atol=1e-12)
    assert forward.meta_loss == pytest.approx(standard.meta_loss.item(), rel=1e-12)
    assert (standard.grads[0] - 2 * lam.detach()).abs().max() > 1e-6  # the part through the weights is not zero


def test_forward_only_scores_the_copies_with_the_held_training_loss():
    """A problem whose `held_train_loss` differs from `train_loss` (a loss weighter's input held at theta): the
    forward-only variant scores the perturbed copies with it, as EvoGrad does, so for a meta loss linear in the
    weights the two still agree exactly."""
    params, lam, train_loss, _ = weighted_mlp_problem()
    direction = {n: torch.randn_like(p) for n, p in params.items()}

    def meta_loss(p, batch):
        return sum((p[n] * direction[n]).sum() for n in p)

    def held(weights):
        return train_loss(weights, None) * (1 + lam.sum())

    out = []
    for cls in (EvoGrad, ForwardOnlyEvoGrad, EvoGrad):
        torch.manual_seed(3)
        held_train_loss = None if len(out) == 2 else held
        problem = HypergradientProblem(params, [lam], train_loss, meta_loss, held_train_loss=held_train_loss)
        out.append(cls(population=3, sigma=0.05).estimate(problem).grads[0])
    standard, forward, unheld = out
    torch.testing.assert_close(forward, standard, rtol=1e-9, atol=1e-12)
    assert (unheld - standard).abs().max() > 1e-6  # the held loss changes the estimate


def test_forward_only_tracks_the_standard_path_on_a_nonlinear_meta_loss():
    """Cross-entropy of an MLP: the curvature error is second order in sigma."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    agreement = {}
    for sigma in (1e-1, 1e-3):
        standard, forward = both(params, lam, train_loss, meta_loss, sigma=sigma, population=4)
        a, b = flatten(forward.grads), flatten(standard.grads)
        agreement[sigma] = (cosine(a, b), (a - b).norm().item() / b.norm().item())
    assert agreement[1e-3][0] > 0.9999 and agreement[1e-3][1] < 1e-2, agreement
    assert agreement[1e-1][1] > 10 * agreement[1e-3][1], agreement  # the error falls with sigma


def test_forward_only_builds_no_graph_through_the_weights():
    """Every meta loss is evaluated at weights that carry no graph: autograd saves nothing for them."""
    params, lam, train_loss, meta_loss = weighted_mlp_problem()
    saved = []

    def counting_meta_loss(p, batch):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            return meta_loss(p, batch)

    torch.manual_seed(0)
    problem = HypergradientProblem(params, [lam], train_loss, counting_meta_loss)
    ForwardOnlyEvoGrad(population=3, sigma=0.01).estimate(problem)
    assert saved == []
    torch.manual_seed(0)
    EvoGrad(population=3, sigma=0.01).estimate(problem)
    assert sum(saved) > 0


def test_ratios_pair_each_row_with_the_plain_rows_of_its_own_run():
    def row(run, method, seconds, cpu, peak):
        timing = {"median_seconds": seconds, "median_cpu_seconds": cpu, "load_average_1min": [1.0, 2.0]}
        return {
            "run": run,
            "workload": "mwn",
            "size": 1,
            "method": method,
            "peak_bytes": peak,
            "num_params": 10,
            **timing,
        }

    results = [
        row("a", "plain", 2.0, 1.0, 100), row("a", "evograd", 6.0, 3.0, 110), row("a", "plain", 1.5, 1.2, 120),
        row("b", "plain", 4.0, 4.0, 400), row("b", "evograd", 6.0, 6.0, 440),
    ]  # fmt: skip
    for r, live in zip(results, [2**20, 3 * 2**20, 2 * 2**20]):  # run b is from before the live meter
        r["live_peak_bytes"] = live
    add_ratios(results)
    # run a: the faster plain (1.5 s wall, 1.0 s CPU) and the smaller peak (100) of its two plain rows
    assert (results[1]["time_ratio"], results[1]["cpu_time_ratio"], results[1]["memory_ratio"]) == (4.0, 3.0, 1.1)
    assert (results[4]["time_ratio"], results[4]["cpu_time_ratio"], results[4]["memory_ratio"]) == (1.5, 1.5, 1.1)
    table = markdown_table(results)
    assert results[1]["live_memory_ratio"] == 3.0 and "live_memory_ratio" not in results[4]
    assert "| mwn | width 1 | 10 | evograd | 6.000 | 4.00 | 3.000 | 3.00 | 0 | 1.10 | 3 | 3.00 | 2.0 |" in table
    assert "| mwn | width 1 | 10 | evograd | 6.000 | 1.50 | 6.000 | 1.50 | 0 | 1.10 |  |  | 2.0 |" in table


def test_a_configuration_times_its_steps_and_meters_one_more():
    """One worker run, tiny: `repeats` timed steps after `warmup`, then one step under the live-tensor meter, which
    sees the step's activations and the meta step's graph."""
    config = {"workload": "mwn", "size": 1, "method": "evograd_lean", "batch_size": 4, "warmup": 1, "repeats": 2,
              "threads": 1, "image_size": 32}  # fmt: skip
    result = run_configuration(config)
    assert len(result["step_seconds"]) == 2 and len(result["cpu_seconds"]) == 2
    assert result["live_peak_bytes"] > 4 * 16 * 32 * 32 * 4  # more than one 16-channel activation of the batch
    assert result["meta_params"] > 0 and result["meta_steps_skipped"] == 0


def test_lft_probe_compares_estimators_at_fixed_states(tmp_path, no_network):
    """Two states of a tiny LFT run: every requested comparison is reported, over the requested numbers of draws."""
    recipe = ["--backbones", "test_resnet", "--image_size", "8", "--n_shot", "1", "--n_query", "2",
              "--train_episodes", "4", "--seeds", "0", "--pretrain_steps", "0", "--disable_tqdm", "true",
              "--output_dir", str(tmp_path / "runs"), "--logging_steps", "1"]  # fmt: skip
    out = tmp_path / "probe.json"
    flags = ["--at_steps", "0", "1", "--draws", "3", "--populations", "2", "--fd_epsilons", "1e-4", "--output"]
    report = lft_probe.main([*flags, str(out), "--", *recipe])
    assert [s["step"] for s in report["states"]] == [0, 1] and json.loads(out.read_text()) == report
    for state in report["states"]:
        assert state["t1t2_norm"] > 0 and -1 <= state["t1t2_fd_epsilon_0.0001_cosine"] <= 1
        evograd = state["evograd_sigma_lr_K2"]
        assert set(evograd["cosine_of_mean_by_draws"]) == {"1", "3"}
        assert evograd["undefined"] == 3 or -1 <= evograd["single_draw_cosine_mean"] <= 1


@pytest.mark.slow
def test_gpu_check_parts_record_failures_and_the_report_reads_them(tmp_path):
    """`gpu_check.sh`'s path through `step_cost.py` (one process, --keep_going) and `gpu_report.py`, tiny, on CPU: a
    configuration that fails gets its error in its row and the rest run; a bf16 MetaTrainer run keeps its logs; the
    report has the ratio tables, the T1-T2 ratios, the precision check, the failed row and the LM recipe's runs."""
    import gpu_report
    import step_cost

    common = ["--in_process", "--keep_going", "--no_plots", "--batch_size", "2", "--warmup", "0", "--repeats", "1"]
    lft = step_cost.main([*common, "--output_dir", str(tmp_path / "lft"), "--widths", "--lft_models",
                          "not_a_model", "resnet10t", "--lft_image_size", "8", "--methods", "plain", "evograd_lean",
                          "t1t2"])  # fmt: skip
    assert [("error" in r, r["size"]) for r in lft] == [(True, "not_a_model")] * 4 + [(False, "resnet10t")] * 4
    assert "Unknown model name 'not_a_model'" in lft[0]["error"]
    bf16 = step_cost.main([*common, "--output_dir", str(tmp_path / "bf16"), "--widths", "1", "--lft_models",
                           "--methods", "plain", "evograd", "--mixed_precision", "bf16",
                           "--logging_steps", "1"])  # fmt: skip
    evograd = bf16[1]
    assert evograd["mixed_precision"] == "bf16" and evograd["steps"] == 2 and evograd["meta_steps_skipped"] == 0
    assert [log["step"] for log in evograd["log_history"]] == [1, 2] and evograd["final_hypergradient_norm"] >= 0

    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_recipe", ROOT / "recipes" / "lm_data_weighting.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    recipe.main(["--seeds", "0", "--num_train", "32", "--num_meta", "8", "--num_test", "8", "--length", "3",
                 "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--meta_batch_size", "8",
                 "--results_dir", str(tmp_path / "lm"), "--output_dir", str(tmp_path / "lm_runs"),
                 "--disable_tqdm", "true", "--bf16", "true", "--use_cpu", "true"])  # fmt: skip

    text = gpu_report.main([str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "report.md").read_text() == text
    lm_checks = {f"lm_{kind}_{estimator}_meta_steps_skipped_is_0": True
                 for kind in ("mwn", "mixture") for estimator in ("evograd", "t1t2_fd")}  # fmt: skip
    assert summary["checks"] == {"bf16_evograd_meta_steps_skipped_is_0": True, **lm_checks}
    assert summary["lm_data_weighting"]["mwn_evograd"]["test_loss_mean"] > 0
    assert "### LM data weighting under bf16" in text and "| mwn_evograd | 0 |" in text
    assert [r["size"] for r in summary["failed_or_skipped_rows"]] == ["not_a_model"] * 4
    assert "| `not_a_model` | failed | failed | failed |" in text
    resnet = next(line for line in text.splitlines() if line.startswith("| `resnet10t` | ") and " ms, " in line)
    assert resnet.count("x, ") == 2  # memory_lean and T1-T2 over plain
    assert "T1-T2 over each method" in text and "| bf16 | EvoGrad (default) | 2 |" in text and "0 (ok)" in text


def test_sharded_memory_runs_every_setup_in_two_processes(tmp_path):
    """`sharded_memory.py` on a tiny MLP under `torchrun --nproc_per_node 2`: every setup on both ranks, FSDP holding
    half of DDP's weights and optimizer state per process."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "benchmarks" / "sharded_memory.py"), "--output_dir", str(tmp_path), "--width", "64",
               "--depth", "2", "--batch_size", "8", "--warmup", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    setups = {(r["setup"], r["rank"]): r for r in rows}
    assert len(setups) == 12
    for (setup, rank), row in setups.items():
        assert row["base_step_mb"] > 0 and row["seconds_per_step"] > 0
        assert (row["meta_step_mb"] is None) == setup.endswith("plain")
        full = setups[(setup.replace("fsdp", "ddp"), rank)]["held_mb"]
        if setup.startswith("fsdp"):  # every layer splits into halves (AdamW keeps a step count per tensor)
            assert row["held_mb"] == pytest.approx(full / 2, rel=1e-3)
