"""Recipes run end to end on tiny settings: results JSON, plots, the real image-folder loading path, and the 1-D
EvoGrad problem against its closed form."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def noisy_labels():
    return load_recipe("noisy_labels")


@pytest.mark.slow
def test_noisy_labels_on_embedded_digits(noisy_labels, tmp_path, no_network):
    results = tmp_path / "results"
    report = noisy_labels.main(
        ["--seeds", "0", "--num_train_epochs", "2", "--results_dir", str(results),
         "--output_dir", str(tmp_path / "runs"), "--disable_tqdm", "true"]
    )  # fmt: skip
    assert (results / "test_accuracy.png").stat().st_size > 0 and (results / "weighting.png").stat().st_size > 0
    saved = json.loads((results / "results.json").read_text())
    assert saved["summary"] == report["summary"] and set(saved["summary"]) == set(noisy_labels.METHODS)
    runs = {r["method"]: r for r in saved["runs"]}
    for run in runs.values():
        assert 0.0 <= run["test_accuracy"] <= 1.0 and len(run["test_accuracy_per_epoch"]) == 2
        assert run["seconds_per_step"] > 0
    assert "weighting_function" not in runs["baseline"] and runs["baseline"]["meta_step_seconds"] is None
    for method in ("mwn_t1t2", "mwn_evograd"):
        weights = runs[method]["weighting_function"]["weight"]
        assert len(weights) == 81 and all(0 < w < 1 for w in weights)
        assert runs[method]["meta_steps_skipped"] == 0 and runs[method]["meta_step_seconds"] > 0
    # the default config profiles the meta step: EvoGrad keeps no second-order graph
    assert runs["mwn_evograd"]["meta_step_memory_mb"] < runs["mwn_t1t2"]["meta_step_memory_mb"]


def test_noisy_labels_on_an_image_folder(noisy_labels, image_folder, tmp_path, no_network):
    results = tmp_path / "results"
    report = noisy_labels.main(
        ["--dataset", str(image_folder), "--num_meta_per_class", "1", "--methods", "mwn_t1t2", "--seeds", "0",
         "--max_steps", "2", "--per_device_train_batch_size", "4", "--meta_batch_size", "2",
         "--remove_unused_columns", "false", "--results_dir", str(results), "--output_dir", str(tmp_path / "runs"),
         "--disable_tqdm", "true"]
    )  # fmt: skip
    assert report["runs"][0]["method"] == "mwn_t1t2" and (results / "results.json").is_file()


def test_noisy_labels_rejects_unknown_methods(noisy_labels, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown methods \['mwn_magic'\]"):
        noisy_labels.main(["--methods", "mwn_magic", "--output_dir", str(tmp_path)])


# ------------------------------------------------------------------------------------- resume_from_checkpoint
def tiny_checkpointing_flags(tmp_path) -> list[str]:
    """4 steps of 16 digits, a checkpoint every 2 steps, a log every step."""
    return ["--seeds", "0", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_strategy",
            "steps", "--logging_steps", "1", "--eval_strategy", "no", "--per_device_train_batch_size", "16",
            "--meta_batch_size", "16", "--meta_profile_memory", "false", "--results_dir", str(tmp_path / "results"),
            "--output_dir", str(tmp_path / "runs"), "--disable_tqdm", "true"]  # fmt: skip


def test_noisy_labels_resumes_every_run_of_the_grid(noisy_labels, tmp_path, no_network, caplog):
    """`--resume_from_checkpoint true`: a run with no checkpoint starts from step 0, a finished run (in
    runs_done.json) keeps its result without training again, and an interrupted one continues from the last
    checkpoint in its own output_dir, not from step 0 (it was silently ignored), to the uninterrupted run's result."""
    flags = [*tiny_checkpointing_flags(tmp_path), "--methods", "baseline", "mwn_t1t2", "--resume_from_checkpoint",
             "true"]  # fmt: skip
    interrupted = tmp_path / "runs" / "mwn_t1t2" / "seed0"
    with caplog.at_level(logging.WARNING, logger="metatrain.experiments"):
        first = noisy_labels.main(flags)
    for method in ("baseline", "mwn_t1t2"):
        assert f"No checkpoint in {tmp_path / 'runs' / method / 'seed0'} to resume from: training from step 0" in (
            caplog.text
        )
    assert [r["resumed_from"] for r in first["runs"]] == [None, None]
    assert [r["meta_step_position"] for r in first["runs"]] == [None, "before"]  # the position each run ran
    uninterrupted = json.loads((tmp_path / "results" / "results.json").read_text())["runs"]

    # interrupted in the second run, after its checkpoint at step 2
    shutil.rmtree(interrupted / "checkpoint-4")
    (tmp_path / "results" / "runs_done.json").write_text(json.dumps(uninterrupted[:1]))
    before = json.loads((interrupted / "checkpoint-2" / "trainer_state.json").read_text())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metatrain.experiments"):
        second = noisy_labels.main(flags)
    assert "Run baseline, seed 0 finished before: result kept" in caplog.text
    assert f"Resuming {interrupted} from {interrupted / 'checkpoint-2'} at global step 2." in caplog.text
    baseline, resumed = json.loads((tmp_path / "results" / "results.json").read_text())["runs"]
    assert baseline == uninterrupted[0]  # not trained again: the same timings too
    assert resumed["resumed_from"] == {"checkpoint": str(interrupted / "checkpoint-2"), "global_step": 2}
    # the steps before the checkpoint are its own log entries (a run from step 0 logs them again, timings differ)
    after = json.loads((interrupted / "checkpoint-4" / "trainer_state.json").read_text())
    assert after["log_history"][: len(before["log_history"])] == before["log_history"]
    assert [h["step"] for h in after["log_history"]] == [1, 2, 3, 4] and after["global_step"] == 4
    assert resumed["test_accuracy"] == uninterrupted[1]["test_accuracy"]
    weights = resumed["weighting_function"]["weight"]
    assert weights == pytest.approx(uninterrupted[1]["weighting_function"]["weight"], abs=1e-6)
    assert second["summary"]["mwn_t1t2"]["test_accuracy_mean"] == first["summary"]["mwn_t1t2"]["test_accuracy_mean"]


def test_rotation_resumes_its_single_run_from_a_checkpoint_path(tmp_path, no_network, caplog):
    """A checkpoint path resumes the one run of a one-seed, one-method grid, its per-step angle record included (kept
    in the checkpoint folder, not in the trainer state's callback states, which Trainer would restore by calling
    `AngleRecorder()` without its rotation)."""
    rotation = load_recipe("rotation")
    flags = [*tiny_checkpointing_flags(tmp_path), "--methods", "rotation_t1t2"]
    uninterrupted = rotation.main(flags)["runs"][0]
    checkpoint = tmp_path / "runs" / "rotation_t1t2" / "seed0" / "checkpoint-2"
    saved = json.loads((checkpoint / rotation.ANGLES_NAME).read_text())
    assert saved == pytest.approx(uninterrupted["degrees_per_step"][:2], abs=1e-6)
    (tmp_path / "link").symlink_to(tmp_path / "runs")  # the same output_dir by another path: accepted
    for restore in ("false", "true"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="metatrain.experiments"):
            resumed = rotation.main([*flags, "--resume_from_checkpoint", str(checkpoint),
                                     "--restore_callback_states_from_checkpoint", restore])["runs"][0]  # fmt: skip
        assert f"from {checkpoint} at global step 2." in caplog.text
        assert resumed["resumed_from"] == {"checkpoint": str(checkpoint), "global_step": 2}
        assert len(resumed["degrees_per_step"]) == 4
        assert resumed["degrees_per_step"] == pytest.approx(uninterrupted["degrees_per_step"], abs=1e-6)
        assert resumed["learned_degrees"] == resumed["degrees_per_step"][-1]
        assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
        checkpoint = tmp_path / "link" / "rotation_t1t2" / "seed0" / "checkpoint-2"
    with pytest.raises(ValueError, match="is not a checkpoint: no trainer_state.json"):
        rotation.main([*flags, "--resume_from_checkpoint", str(tmp_path / "runs")])


def test_a_checkpoint_path_of_another_run_is_refused(noisy_labels, tmp_path, no_network):
    """A checkpoint of another method's run (the same meta-state shapes) does not resume this run: the error names
    the path, this run's output_dir and the fix."""
    flags = [*tiny_checkpointing_flags(tmp_path), "--max_steps", "2"]
    noisy_labels.main([*flags, "--methods", "mwn_t1t2"])
    checkpoint = tmp_path / "runs" / "mwn_t1t2" / "seed0" / "checkpoint-2"
    output_dir = tmp_path / "runs" / "mwn_evograd" / "seed0"
    message = (
        re.escape(f"--resume_from_checkpoint {checkpoint} is a checkpoint of the run in {checkpoint.parent}, not of ")
        + re.escape(f"this run, whose output_dir is {output_dir}: pass a checkpoint of this run")
        + ".*or select the run"
    )
    with pytest.raises(ValueError, match=message):
        noisy_labels.main([*flags, "--methods", "mwn_evograd", "--resume_from_checkpoint", str(checkpoint)])
    assert not list(output_dir.glob("checkpoint-*"))  # refused before training


def test_checkpoint_file_names_come_from_transformers():
    """The name of a checkpoint's trainer state is transformers' own, not a copy that could drift from it."""
    import transformers.trainer

    from metatrain import experiments

    assert experiments.TRAINER_STATE_NAME is transformers.trainer.TRAINER_STATE_NAME


class _Run:
    """A stand-in for a recipe's run in `run_grid`: its result (as given), and a trainer of the main process."""

    def __init__(self, results: dict):
        self.results, self.calls = results, []

    def __call__(self, method, seed, data):
        self.calls.append(method)
        return {"seed": seed, "method": method, **self.results.get(method, {})}, self

    def is_world_process_zero(self) -> bool:
        return True


def test_runs_done_survives_a_crash_while_it_is_written(tmp_path):
    """runs_done.json is replaced whole, never truncated: a crash in the middle of writing it (here a result JSON
    cannot hold, found after part of the file is written) leaves the runs finished before, and the grid resumes."""
    from metatrain.experiments import run_grid

    resume = SimpleNamespace(resume_from_checkpoint="true", process_index=0)
    crashing = _Run({"b": {"value": object()}})
    with pytest.raises(TypeError, match="not JSON serializable"):
        run_grid([0], ["a", "b"], lambda seed: None, crashing, str(tmp_path), resume)
    assert json.loads((tmp_path / "runs_done.json").read_text()) == [{"seed": 0, "method": "a"}]
    assert [p.name for p in tmp_path.iterdir()] == ["runs_done.json"]  # no temporary file left behind
    run = _Run({"b": {"value": 1}})
    results, _ = run_grid([0], ["a", "b"], lambda seed: None, run, str(tmp_path), resume)
    assert run.calls == ["b"] and results == [{"seed": 0, "method": "a"}, {"seed": 0, "method": "b", "value": 1}]
    assert json.loads((tmp_path / "runs_done.json").read_text()) == results


@pytest.mark.parametrize("content", ['[{"seed": 0, "method": "a"}, {"se', '{"seed": 0}', '[{"method": "a"}]'])
def test_an_unreadable_runs_done_is_named_with_the_fix(content, tmp_path):
    from metatrain.experiments import run_grid

    (tmp_path / "runs_done.json").write_text(content)
    resume = SimpleNamespace(resume_from_checkpoint="true", process_index=0)
    path = tmp_path / "runs_done.json"
    with pytest.raises(ValueError, match=re.escape(f"Cannot read the finished runs' results from {path} (") + ".*"
                       "Delete it to run those runs again"):  # fmt: skip
        run_grid([0], ["a"], lambda seed: None, _Run({}), str(tmp_path), resume)


@pytest.mark.parametrize("name", ["noisy_labels", "rotation", "lft_fewshot", "metaxl"])
def test_a_checkpoint_path_is_refused_for_a_grid_of_runs(name, tmp_path):
    """One checkpoint cannot resume several runs, each with its own output_dir: the error names the fixes."""
    recipe = load_recipe(name)
    with pytest.raises(ValueError, match=r"names one checkpoint, but the grid has 2 runs .*--resume_from_checkpoint "
                       r"true.*--seeds 0"):  # fmt: skip
        recipe.main(["--seeds", "0", "1", "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path),
                     "--methods", *list(recipe.METHODS)[:1]])  # fmt: skip


@pytest.mark.parametrize("name", ["noisy_labels", "lft_fewshot", "metaxl"])
def test_help_lists_the_recipes_methods(name, capsys):
    recipe = load_recipe(name)
    with pytest.raises(SystemExit):
        recipe.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"any of {list(recipe.METHODS)}" in help_text


@pytest.mark.parametrize("name", ["toy_1d", "compare_estimators"])
def test_recipes_without_trainer_do_not_offer_resumption(name, tmp_path):
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--resume_from_checkpoint'"):
        load_recipe(name).main(["--resume_from_checkpoint", "true", "--results_dir", str(tmp_path)])


# ------------------------------------------------------------------------------------------ toy_1d (EvoGrad 4.1)
STARTS_X, STARTS_LAMBDA, LR = (-1.8, 0.9), (0.2, 0.8), 0.1


@pytest.fixture(scope="module")
def toy_1d():
    return load_recipe("toy_1d")


@pytest.fixture(scope="module")
def run(toy_1d, tmp_path_factory):
    results = tmp_path_factory.mktemp("toy_1d")
    report = toy_1d.main(
        ["--repetitions", "40", "--grid_size", "10", "--seed", "0", "--results_dir", str(results),
         "--start_x", *map(str, STARTS_X), "--start_lambda", *map(str, STARTS_LAMBDA), "--lr", str(LR)]
    )  # fmt: skip
    return results, report


@pytest.mark.slow
def test_files_and_results(run):
    results, report = run
    assert (results / "figure2_hypergradient.png").stat().st_size > 0
    assert (results / "figure3_trajectories.png").stat().st_size > 0
    saved = json.loads((results / "results.json").read_text())
    assert saved["summary"] == report["summary"] and set(saved["summary"]) == {"2", "10", "100"}
    assert saved["config"]["sigma"] == 1.0 and saved["config"]["temperature"] == 0.5
    assert saved["config"]["noise"] == "gaussian" and saved["config"]["evaluate_at"] == "optimum"
    assert len(saved["trajectories"]["ground_truth"]) == 2
    for runs in saved["trajectories"]["evograd"].values():
        assert [len(t["x"]) for t in runs] == [6, 6] and [len(t["lambda"]) for t in runs] == [6, 6]


def test_evograd_tracks_the_closed_form(run):
    summary = run[1]["summary"]
    for k in ("10", "100"):
        assert summary[k]["pearson"] > 0.95, summary
    # more copies, a less noisy mean
    assert summary["100"]["mean_abs_error"] < summary["2"]["mean_abs_error"]


def test_closed_form_is_the_hypergradient_at_the_inner_optimum(toy_1d):
    eps = 1e-6
    for lam in (0.1, 0.5, 1.0, 1.7):
        x_plus, x_minus = toy_1d.inner_optimum(lam + eps), toy_1d.inner_optimum(lam - eps)
        numeric = (toy_1d.val_loss(x_plus) - toy_1d.val_loss(x_minus)) / (2 * eps)
        assert toy_1d.closed_form_hypergradient(lam) == pytest.approx(numeric, abs=1e-8)


def test_ground_truth_follows_the_closed_form(run):
    trajectories = run[1]["trajectories"]
    # one step from (x, lambda) = (-1.8, 0.2) by hand: df_T/dx = 2 (x - 1) + 2 lambda x = -5.6 - 0.72 = -6.32,
    # so x = -1.8 + 0.632; g(0.2) = -0.8 / 1.2^3, so lambda = 0.2 + 0.08 / 1.728
    first = trajectories["ground_truth"][0]
    assert first["x"][1] == pytest.approx(-1.168) and first["lambda"][1] == pytest.approx(0.2 + 0.08 / 1.728)
    # every step: lambda follows g at its own lambda, never EvoGrad's
    for start_x, start_lambda, gt in zip(STARTS_X, STARTS_LAMBDA, trajectories["ground_truth"]):
        x, lam = start_x, start_lambda
        for step in range(1, 6):
            x, lam = x - LR * (2 * (x - 1) + 2 * lam * x), lam - LR * (lam - 1) / (lam + 1) ** 3
            assert (gt["x"][step], gt["lambda"][step]) == pytest.approx((x, lam))
    # EvoGrad takes the same x step, then its own lambda step
    for runs in trajectories["evograd"].values():
        evo = runs[0]
        assert evo["x"][1] == pytest.approx(-1.168) and evo["lambda"][1] != pytest.approx(first["lambda"][1])


def test_unknown_evaluation_point(toy_1d, tmp_path):
    with pytest.raises(ValueError, match="evaluate_at"):
        toy_1d.main(["--evaluate_at", "anywhere", "--results_dir", str(tmp_path)])


# ------------------------------------------------------------------------------ compare_estimators (diagnostics)
@pytest.fixture(scope="module")
def compare_estimators_recipe():
    return load_recipe("compare_estimators")


@pytest.mark.slow
def test_compare_estimators_recipe(compare_estimators_recipe, tmp_path, no_network):
    results = tmp_path / "results"
    report = compare_estimators_recipe.main(
        ["--max_pretrain_steps", "1", "--batch_size", "16", "--meta_batch_size", "16", "--repeats", "2",
         "--stochastic_repeats", "2", "--reference_horizon", "2", "--reverse_horizons", "1", "--neumann_terms", "1",
         "--results_dir", str(results)]
    )  # fmt: skip
    assert (results / "estimators.png").stat().st_size > 0
    saved = json.loads((results / "results.json").read_text())
    assert saved["estimators"] == report["estimators"]
    rows = {r["label"]: r for r in saved["estimators"]}
    expected = ["t1t2", "t1t2_fd", "first_order", "neumann(terms=1)", "evograd(sigma=0.001)",
                "evograd(population=2, sigma=0.001, temperature=0.05, rescale=True)", "evograd(sigma='auto')",
                "evograd(sigma='auto', perturb='^fc\\\\.')", "evograd(sigma='auto', population=10)",
                "evograd(sigma='auto', memory_lean=True)", "hyperdistill(gamma=0.0)", "hyperdistill(gamma=0.99)",
                "reverse(horizon=1)", "reverse(horizon=2)"]  # fmt: skip
    assert list(rows) == expected
    table = (results / "table.md").read_text()
    assert all(f"`{label}`" in table for label in expected) and "training step" in table
    assert saved["state"] == {**saved["state"], "pretrain_steps": 1, "trajectory_steps": 1}
    assert saved["references"]["reverse"] == "reverse(horizon=2)"

    # each against its own reference, and the estimators that equal T1-T2 here
    assert rows["t1t2"]["cosine_t1t2"] == pytest.approx(1, abs=1e-6)
    assert rows["reverse(horizon=2)"]["cosine_reverse"] == pytest.approx(1, abs=1e-6)
    assert rows["reverse(horizon=1)"]["cosine_t1t2"] == pytest.approx(1, abs=1e-6)
    assert rows["reverse(horizon=1)"]["norm_ratio_t1t2"] == pytest.approx(1, rel=1e-4)
    # HyperDistill at gamma = 0 is T1-T2 scaled by its fitted theta (no direct term with a loss weighter)
    assert rows["hyperdistill(gamma=0.0)"]["cosine_t1t2"] == pytest.approx(1, abs=1e-6)
    # on MetaTrainer's objective (the weighting net's input held), the finite-difference T1-T2 is T1-T2
    assert rows["t1t2_fd"]["cosine_t1t2"] > 0.99
    # a loss weighter's direct term is zero: no direction (None in JSON), norm 0
    assert rows["first_order"]["norm"] == 0 and rows["first_order"]["cosine_reverse"] is None
    # EvoGrad's memory-lean path is the default path on the same draws
    lean, plain = rows["evograd(sigma='auto', memory_lean=True)"], rows["evograd(sigma='auto')"]
    assert lean["cosine_of_mean_reverse"] == pytest.approx(plain["cosine_of_mean_reverse"], abs=1e-6)
    for row in rows.values():
        assert row["seconds"] > 0 and row["repeats"] == 2 and row["draws"] == 4  # warm-up, 2 timed, memory call
    assert rows["t1t2"]["seconds_vs_t1t2"] == 1 and saved["training_step"]["seconds"] > 0


# ---------------------------------------------------------------------------------------- rotation (EvoGrad 4.2)
@pytest.mark.slow
def test_rotation_recipe(tmp_path, no_network):
    rotation = load_recipe("rotation")
    results = tmp_path / "results"
    report = rotation.main(
        ["--seeds", "0", "--methods", "baseline", "matched", "rotation_evograd", "rotation_t1t2",
         "--num_train_epochs", "1", "--results_dir", str(results), "--output_dir", str(tmp_path / "runs"),
         "--disable_tqdm", "true"]
    )  # fmt: skip
    assert (results / "angle.png").stat().st_size > 0
    saved = json.loads((results / "results.json").read_text())
    assert saved["summary"] == report["summary"]
    runs = {r["method"]: r for r in saved["runs"]}
    assert set(runs) == {"baseline", "matched", "rotation_evograd", "rotation_t1t2"}
    for method in ("rotation_evograd", "rotation_t1t2"):
        assert len(runs[method]["degrees_per_step"]) == 12 and runs[method]["meta_steps_skipped"] == 0
        assert runs[method]["learned_degrees"] == runs[method]["degrees_per_step"][-1] != 0.0
    assert "learned_degrees" not in runs["baseline"]
    # meta and test images are rotated copies, disjoint from the unrotated training images
    splits = rotation.load_data(rotation.RotationArguments(), seed=0)
    assert len(splits["meta"]) == 100 and len(splits["train"]) + len(splits["meta"]) == 1257
    import math

    from metatrain.modules import rotate_images

    expected = rotate_images(splits["test_unrotated"][:4]["pixel_values"], math.radians(30), padding_mode="border")
    assert torch.allclose(splits["test"][:4]["pixel_values"], expected)
    with pytest.raises(ValueError, match="rotation_magic"):
        rotation.main(["--methods", "rotation_magic", "--output_dir", str(tmp_path)])


@pytest.fixture(scope="module")
def lft_fewshot():
    return load_recipe("lft_fewshot")


def tiny_lft_flags(tmp_path) -> list[str]:
    """A seconds-long run from scratch (the configs pre-train for 300 steps; the pre-training tests ask for it)."""
    return ["--backbones", "test_resnet", "--image_size", "8", "--n_shot", "1", "--n_query", "2",
            "--train_episodes", "4", "--max_steps", "2", "--test_episodes", "6", "--test_queries", "2", "--seeds", "0",
            "--logging_steps", "1", "--results_dir", str(tmp_path / "results"), "--output_dir", str(tmp_path / "runs"),
            "--disable_tqdm", "true", "--pretrain_steps", "0", "--pretrain_batch_size", "8"]  # fmt: skip


@pytest.mark.slow
def test_lft_fewshot_on_embedded_digit_domains(lft_fewshot, tmp_path, no_network):
    report = lft_fewshot.main(tiny_lft_flags(tmp_path))
    results = tmp_path / "results"
    for plot in ("accuracy.png", "paired_vs_no_ft.png", "seconds_per_step.png", "meta_step_memory.png"):
        assert (results / plot).stat().st_size > 0
    saved = json.loads((results / "results.json").read_text())
    assert saved["summary"] == report["summary"] and set(saved["summary"]["test_resnet"]) == set(lft_fewshot.METHODS)
    assert json.loads((results / "test_resnet" / "runs_done.json").read_text()) == saved["runs"]
    paired = saved["paired_vs_no_ft"]["test_resnet"]  # one seed: a difference, no interval
    assert (
        set(paired) == {"fixed_ft", "lft_t1t2", "lft_evograd"} and paired["fixed_ft"]["test_1shot_accuracy"]["n"] == 1
    )
    runs = {r["method"]: r for r in saved["runs"]}
    for run in runs.values():
        for shots in (1, 5):
            assert 0 <= run[f"test_{shots}shot_accuracy"] <= 1 and run[f"test_{shots}shot_ci95"] >= 0
        assert run["seconds_per_step"] > 0
    assert "ft_mean_softplus" not in runs["no_ft"] and runs["no_ft"]["meta_step_seconds"] is None
    # fixed FT keeps the hand-set scales; LFT moves them
    assert runs["fixed_ft"]["ft_mean_softplus"] == pytest.approx({"gamma": 0.3, "beta": 0.5}, abs=1e-6)
    assert runs["fixed_ft"]["ft_theta_max_abs_change"] == {"gamma": 0.0, "beta": 0.0}
    for method in ("lft_t1t2", "lft_evograd"):  # each channel's theta moves (their mean over channels need not)
        mean_change, max_change = runs[method]["ft_theta_mean_abs_change"], runs[method]["ft_theta_max_abs_change"]
        for name in ("gamma", "beta"):
            assert 0 < mean_change[name] <= max_change[name]
        assert runs[method]["meta_step_seconds"] > 0 and runs[method]["meta_steps_skipped"] == 0
    ratios = saved["cost_ratios"]["test_resnet"]
    assert ratios["meta_step_memory_t1t2_over_evograd"] > 1  # memory-lean EvoGrad keeps one copy's graph at a time


@pytest.mark.slow
def test_lft_fewshot_on_image_folder_domains(lft_fewshot, tmp_path, no_network):
    from PIL import Image

    rng = np.random.default_rng(0)
    for domain in ("mini", "cars", "cub"):
        for name in ("a", "b", "c"):
            folder = tmp_path / "data" / domain / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = tmp_path / "data"
    report = lft_fewshot.main(
        [*tiny_lft_flags(tmp_path), "--seen_domains", str(data / "mini"), str(data / "cars"), "--unseen_domain",
         str(data / "cub"), "--n_way", "3", "--test_shots", "1", "--methods", "no_ft", "lft_t1t2", "--head",
         "matchingnet", "--pretrain_steps", "2", "--pretrain_domains", str(data / "mini")]
    )  # fmt: skip
    assert {r["method"] for r in report["runs"]} == {"no_ft", "lft_t1t2"} and report["config"]["head"] == "matchingnet"
    assert report["config"]["unseen_domain"].endswith("cub") and "test_1shot_accuracy" in report["runs"][0]
    assert report["config"]["pretrain_domains"] == [str(data / "mini")]  # pre-trained on one folder's classes first
    with pytest.raises(ValueError, match="Unknown methods"):
        lft_fewshot.main([*tiny_lft_flags(tmp_path), "--methods", "lft_magic"])
    with pytest.raises(ValueError, match=r"name two domains alike \(\[.a.\]\)"):  # one would replace the other
        lft_fewshot.main(
            [*tiny_lft_flags(tmp_path), "--seen_domains", str(data / "mini" / "a"), str(data / "cars" / "a"),
             "--unseen_domain", str(data / "cub"), "--methods", "no_ft"]
        )  # fmt: skip


@pytest.mark.slow
def test_lft_fewshot_pretrains_the_backbone_once_per_seed(lft_fewshot, tmp_path, no_network):
    """`pretrain_steps`: classification on the pooled seen domains gives the backbone weights every method of a seed
    starts from (the same for each call, not the fresh initialisation), and the grid runs from them."""
    from metatrain.cli import parse_config
    from metatrain.models import build_fewshot_model

    flags = [*tiny_lft_flags(tmp_path), "--pretrain_steps", "3"]
    args, training_args = parse_config((lft_fewshot.LFTArguments, lft_fewshot.MetaTrainingArguments), flags)
    seen, unseen, weights = lft_fewshot.load_data(args, training_args, "test_resnet", 0)
    no_pretraining = dataclasses.replace(args, pretrain_steps=0)
    assert lft_fewshot.pretrain(no_pretraining, training_args, "test_resnet", 0, seen) is None
    again = lft_fewshot.pretrain(args, training_args, "test_resnet", 0, seen)
    torch.manual_seed(0)
    fresh = build_fewshot_model("test_resnet").backbone.state_dict()
    assert weights.keys() == fresh.keys() == again.keys() and not any(k.startswith("fc.") for k in weights)
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # deterministic: one start for every method
    assert weights["bn1.running_mean"].abs().sum() > 0  # batch-norm statistics of the seen domains come along
    assert any(not torch.equal(weights[k], fresh[k]) for k in weights if k.endswith("weight"))
    for method in ("no_ft", "lft_evograd"):  # FT layers attach to the pre-trained backbone
        model, _ = lft_fewshot.build_model(args, "test_resnet", method, 0, weights)
        state = model.backbone.state_dict()
        assert all(torch.equal(state[k], weights[k]) for k in weights)
    report = lft_fewshot.main([*flags, "--methods", "no_ft", "lft_evograd"])
    assert report["config"]["pretrain_steps"] == 3 and len(report["runs"]) == 2
    # a subset of the seen domains (LFT: miniImageNet only), never the unseen one
    gray_only = lft_fewshot.pretrain(
        dataclasses.replace(args, pretrain_domains=["gray"]), training_args, "test_resnet", 0, seen
    )
    assert any(not torch.equal(gray_only[k], weights[k]) for k in weights)
    with pytest.raises(ValueError, match=r"pretrain_domains \['low_contrast'\] are not seen domains"):
        lft_fewshot.pretrain(
            dataclasses.replace(args, pretrain_domains=["low_contrast"]), training_args, "test_resnet", 0, seen
        )


def test_lft_fewshot_resumes_pretraining_with_a_checkpoint_path(lft_fewshot, tmp_path, no_network, caplog):
    """A checkpoint path is the meta-training run's: pre-training resumes from its own last checkpoint, as with
    `true`, instead of training from step 0 over its own checkpoints."""
    from metatrain.cli import parse_config

    flags = [*tiny_lft_flags(tmp_path), "--pretrain_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    args, training_args = parse_config((lft_fewshot.LFTArguments, lft_fewshot.MetaTrainingArguments), flags)
    seen, _ = lft_fewshot.load_domains(args, 0)
    weights = lft_fewshot.pretrain(args, training_args, "test_resnet", 0, seen)
    pretraining = tmp_path / "runs" / "test_resnet" / "pretrain" / "seed0"
    shutil.rmtree(pretraining / "checkpoint-4")  # pre-training interrupted after its checkpoint at step 2
    state = (pretraining / "checkpoint-2" / "trainer_state.json").read_text()
    checkpoint = tmp_path / "runs" / "test_resnet" / "no_ft" / "seed0" / "checkpoint-2"
    resuming = dataclasses.replace(training_args, resume_from_checkpoint=str(checkpoint))
    with caplog.at_level(logging.WARNING, logger="metatrain.experiments"):
        again = lft_fewshot.pretrain(args, resuming, "test_resnet", 0, seen)
    assert f"Resuming {pretraining} from {pretraining / 'checkpoint-2'} at global step 2." in caplog.text
    assert (pretraining / "checkpoint-2" / "trainer_state.json").read_text() == state  # not trained again
    assert (pretraining / "checkpoint-4").is_dir()
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # the uninterrupted pre-training's weights


RECIPE_OF_CONFIG = {"noisy_labels": "noisy_labels", "rotation": "rotation", "lft_fewshot": "lft_fewshot",
                    "metaxl": "metaxl", "hyperdistill": "hyperdistill",
                    "lm_data_weighting": "lm_data_weighting"}  # fmt: skip


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "recipes" / "configs").glob("*.yaml")))
def test_every_config_parses_into_its_recipe_arguments(config):
    """Each shipped YAML config names only fields its recipe and `MetaTrainingArguments` have (GPU configs with bf16
    are read with `use_cpu`, as this machine has no GPU)."""
    from metatrain import MetaTrainingArguments
    from metatrain.cli import parse_config

    name = next(recipe for prefix, recipe in RECIPE_OF_CONFIG.items() if config.startswith(prefix))
    arguments = getattr(load_recipe(name), RECIPE_ARGUMENTS[name])
    path = str(ROOT / "recipes" / "configs" / config)
    args, training_args = parse_config((arguments, MetaTrainingArguments), [path, "--use_cpu", "true"])
    assert isinstance(training_args, MetaTrainingArguments) and args.results_dir


@dataclasses.dataclass
class NullableOptions:
    count: int | None = 3
    key: str | None = None
    names: list[str] | None = None


def test_yaml_null_sets_none_and_flags_still_win(tmp_path):
    """YAML `null` is the field's None, not the string "None"; a flag after the file overrides it; an unknown key is an
    error naming it."""
    from metatrain import MetaTrainingArguments
    from metatrain.cli import parse_config

    path = tmp_path / "config.yaml"
    path.write_text("count: null\nkey: null\nnames: null\nmeta_disjoint_key: null\noutput_dir: out\n")
    options, training_args = parse_config((NullableOptions, MetaTrainingArguments), [str(path), "--use_cpu", "true"])
    assert options == NullableOptions(count=None, key=None, names=None)
    assert training_args.meta_disjoint_key is None
    options, _ = parse_config(
        (NullableOptions, MetaTrainingArguments), [str(path), "--count", "5", "--use_cpu", "true"]
    )
    assert options.count == 5
    path.write_text("counts: null\n")
    with pytest.raises(ValueError, match=r"Unknown keys \['counts'\]"):
        parse_config((NullableOptions, MetaTrainingArguments), [str(path)])


RECIPE_ARGUMENTS = {"noisy_labels": "NoisyLabelsArguments", "rotation": "RotationArguments",
                    "lft_fewshot": "LFTArguments", "metaxl": "MetaXLArguments",
                    "hyperdistill": "HyperDistillArguments",
                    "lm_data_weighting": "LMDataWeightingArguments"}  # fmt: skip
EVOGRAD_RESCALED = {"population": 2, "sigma": 0.001, "temperature": 0.05, "rescale": True}
EVOGRAD_LFT = {"population": 2, "sigma": "lr", "temperature": 0.05, "memory_lean": True}
LFT_RUNS = {"no_ft": ("evograd", {}), "fixed_ft": ("evograd", {}), "lft_t1t2": ("t1t2", {}),
            "lft_evograd": ("evograd", EVOGRAD_LFT)}  # fmt: skip
METAXL_RUNS = {"source_only": ("evograd", {}), "joint": ("evograd", {}), "metaxl_t1t2": ("t1t2", {}),
               "metaxl_evograd": ("evograd", EVOGRAD_RESCALED)}  # fmt: skip
# the estimator and options each method of each shipped config ran with before `method_options` replaced
# `evograd_kwargs` (computed from that code); a method without estimator keeps the default `hypergradient`, unused


def hyperdistill_runs(estimation_period: int) -> dict[str, tuple[str, dict]]:
    estimators = {"fo": "first_order", "1step": "t1t2", "drmad": "drmad", "neumann": "neumann",
                  "hyperdistill": "hyperdistill"}  # fmt: skip
    options = {"hyperdistill": {"estimation_period": estimation_period}, "neumann": {"terms": 4}}
    runs = {f"{m}_{e}": (est, dict(options.get(e, {}))) for m in ("anil", "warpgrad", "mwn")
            for e, est in estimators.items() if (m, e) != ("mwn", "fo")}  # fmt: skip
    runs["mwn_hyperdistill"] = ("hyperdistill", {"pi": 1.0})
    return runs


SHIPPED_CONFIG_RUNS = {
    "hyperdistill_cifar100.yaml": hyperdistill_runs(50),
    "hyperdistill_digits.yaml": hyperdistill_runs(10),
    "lft_fewshot_cdfsl.yaml": LFT_RUNS,
    "lm_data_weighting_reverse.yaml": {"plain": ("evograd", {}), "clean_only": ("evograd", {}),
                                       "mwn_evograd": ("evograd", {"population": 2, "sigma": "auto",
                                                                   "temperature": 0.05}),
                                       "mwn_t1t2_fd": ("t1t2_fd", {}),
                                       "mixture_evograd": ("evograd", {"population": 2, "sigma": "auto",
                                                                       "temperature": 0.05}),
                                       "mixture_t1t2_fd": ("t1t2_fd", {})},
    "lft_fewshot_digits.yaml": LFT_RUNS,
    "lft_fewshot_resnet34.yaml": LFT_RUNS,
    "metaxl_generated.yaml": METAXL_RUNS,
    "metaxl_wikiann.yaml": METAXL_RUNS,
    "noisy_labels_cifar10.yaml": {"baseline": ("evograd", {}), "mwn_t1t2": ("t1t2", {}), "mwn_evograd": (
        "evograd", {"population": 2, "sigma": 0.001, "temperature": 0.05})},
    "noisy_labels_digits.yaml": {"baseline": ("evograd", {}), "mwn_t1t2": ("t1t2", {}),
                                 "mwn_evograd": ("evograd", EVOGRAD_RESCALED)},
    "rotation_digits.yaml": {
        "baseline": ("evograd", {}), "matched": ("evograd", {}), "rotation_evograd": ("evograd", EVOGRAD_RESCALED),
        "rotation_t1t2": ("t1t2", {}), "rotation_t1t2_fd": ("t1t2_fd", {}),
        "rotation_first_order": ("first_order", {}), "rotation_neumann": ("neumann", {}),
        "rotation_reverse": ("reverse", {}),
        "rotation_hyperdistill": ("hyperdistill", {}), "rotation_drmad": ("drmad", {}),
    },
}  # fmt: skip


def recipe_runs(config: Path, *flags: str) -> dict[str, tuple[str, dict]]:
    """`{method: (hypergradient, hypergradient_kwargs)}` of the runs of every method of `config`'s recipe."""
    from metatrain import MetaTrainingArguments
    from metatrain.cli import parse_config
    from metatrain.experiments import method_estimator

    recipe = next(name for name in RECIPE_ARGUMENTS if config.name.startswith(name))
    module = load_recipe(recipe)
    arguments = getattr(module, RECIPE_ARGUMENTS[recipe])
    args, training_args = parse_config((arguments, MetaTrainingArguments), [str(config), "--use_cpu", "true", *flags])
    runs = {}
    for method in module.METHODS:
        run_args = dataclasses.replace(
            training_args, **method_estimator(method, module.METHODS, args.method_options, training_args)
        )
        runs[method] = (run_args.hypergradient, run_args.hypergradient_kwargs)
    return runs


@pytest.mark.parametrize("name", list(RECIPE_ARGUMENTS))
def test_recipe_arguments_share_the_grid_arguments(name):
    """Each recipe's arguments subclass `GridArguments`: `methods` defaults to every method of the recipe (rotation
    keeps its own default) and is checked on construction, the grid's flags are in `--help`, and results.json's
    `config` lists the recipe's own fields, then the grid's."""
    from transformers import HfArgumentParser

    from metatrain import MetaTrainingArguments
    from metatrain.experiments import GridArguments

    module = load_recipe(name)
    arguments = getattr(module, RECIPE_ARGUMENTS[name])
    assert issubclass(arguments, GridArguments) and arguments.METHODS is module.METHODS
    args = arguments()
    expected = ["baseline", "matched", "rotation_evograd"] if name == "rotation" else list(module.METHODS)
    seeds = [0, 1, 2, 3, 4] if name == "hyperdistill" else [0, 1, 2]  # HyperDistill reports 5 meta-training runs
    assert args.methods == expected and args.seeds == seeds and args.results_dir == f"outputs/{name}"
    with pytest.raises(ValueError, match=r"Unknown methods \['magic'\]: choose from"):
        arguments(methods=["magic"])
    grid = ["methods", "seeds", "method_options", "results_dir"]
    names = [f.name for f in dataclasses.fields(arguments)]
    assert names[:4] == grid and list(args.to_dict()) == [*names[4:], *grid]
    help_text = HfArgumentParser((arguments, MetaTrainingArguments)).format_help()
    assert all(f"--{flag} " in help_text for flag in names)


def test_every_shipped_config_gives_each_method_the_estimator_and_options_it_had():
    configs = sorted(path.name for path in (ROOT / "recipes" / "configs").glob("*.yaml"))
    assert configs == sorted(SHIPPED_CONFIG_RUNS)
    for name, expected in SHIPPED_CONFIG_RUNS.items():
        assert recipe_runs(ROOT / "recipes" / "configs" / name) == expected, name


def test_recipe_defaults_match_their_default_configs():
    for recipe, arguments in RECIPE_ARGUMENTS.items():
        module = load_recipe(recipe)
        path = Path(module.DEFAULT_CONFIG)
        runs = SHIPPED_CONFIG_RUNS[path.name]
        expected = {method: options for method, (_, options) in runs.items() if options}
        evograd = [method for method in module.METHODS if method.endswith("_evograd")]
        if evograd:  # the other methods' options are in the recipe's run, not its default
            expected = {method: runs[method][1] for method in evograd if runs[method][1]}
        assert getattr(module, arguments)().method_options == expected


def test_hypergradient_kwargs_update_the_method_options_of_the_estimator_they_name():
    """The one rule: a method's options are its `method_options`, updated with `hypergradient_kwargs` where
    `hypergradient` names the method's estimator; a method without estimator gets none."""
    config = ROOT / "recipes" / "configs" / "noisy_labels_digits.yaml"
    runs = recipe_runs(config, "--hypergradient_kwargs", '{"sigma": 0.01, "memory_lean": true}')  # evograd: default
    assert runs["mwn_evograd"] == ("evograd", {**EVOGRAD_RESCALED, "sigma": 0.01, "memory_lean": True})
    assert runs["mwn_t1t2"] == ("t1t2", {}) and runs["baseline"] == ("evograd", {})
    rotation = ROOT / "recipes" / "configs" / "rotation_digits.yaml"
    runs = recipe_runs(rotation, "--hypergradient", "t1t2_fd", "--hypergradient_kwargs", '{"epsilon": 1e-5}')
    assert runs["rotation_t1t2_fd"] == ("t1t2_fd", {"epsilon": 1e-5}) and runs["rotation_neumann"] == ("neumann", {})
    assert runs["rotation_evograd"] == ("evograd", EVOGRAD_RESCALED) and runs["baseline"] == ("t1t2_fd", {})
    # a `--method_options` flag replaces the config's whole mapping
    runs = recipe_runs(rotation, "--method_options", '{"rotation_neumann": {"terms": 5, "alpha": 0.1}}',
                       "--hypergradient", "neumann", "--hypergradient_kwargs", '{"alpha": 0.5}')  # fmt: skip
    assert runs["rotation_neumann"] == ("neumann", {"terms": 5, "alpha": 0.5}) and runs["rotation_evograd"] == (
        "evograd", {})  # fmt: skip


def test_method_options_name_methods_with_an_estimator(tmp_path):
    from metatrain.experiments import parse_method_options

    methods = {"baseline": None, "mwn_evograd": "evograd"}
    assert parse_method_options(None, methods) == {}
    assert parse_method_options('{"mwn_evograd": {"sigma": 0.1}}', methods) == {"mwn_evograd": {"sigma": 0.1}}
    with pytest.raises(ValueError, match=r"names \['baseline', 'mwn_evgrad'\], which run no estimator"):
        parse_method_options({"mwn_evgrad": {}, "baseline": {}}, methods)
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_method_options("{mwn_evograd: 1}", methods)
    with pytest.raises(ValueError, match="must map a method to a dict"):
        parse_method_options({"mwn_evograd": 0.1}, methods)


def test_evograd_kwargs_is_refused_with_its_replacement(noisy_labels, tmp_path):
    with pytest.raises(ValueError, match="`evograd_kwargs` was removed: .*`method_options`.*--hypergradient_kwargs"):
        noisy_labels.main(["--evograd_kwargs", '{"sigma": 0.01}', "--output_dir", str(tmp_path)])
    config = tmp_path / "old.yaml"
    config.write_text("""evograd_kwargs: '{"sigma": 0.01}'\n""")
    with pytest.raises(ValueError, match="`evograd_kwargs` was removed: .*method_options"):
        noisy_labels.main([str(config), "--output_dir", str(tmp_path)])


# ------------------------------------------------------------------------------------------------- hyperdistill
@pytest.fixture(scope="module")
def hyperdistill():
    return load_recipe("hyperdistill")


def tiny_hyperdistill_flags(tmp_path, *methods: str) -> list[str]:
    """2 inner optimisations of 4 steps of 5 examples, 2 meta-test tasks, one seed."""
    return ["--seeds", "0", "--methods", *methods, "--num_tasks", "2", "--test_tasks", "2", "--meta_inner_steps", "4",
            "--neumann_interval", "2", "--examples_per_class", "4", "--per_device_train_batch_size", "5",
            "--meta_batch_size", "5", "--results_dir", str(tmp_path / "results"), "--output_dir",
            str(tmp_path / "runs")]  # fmt: skip


def test_hyperdistill_on_embedded_digits(hyperdistill, tmp_path, no_network):
    """Every estimator on ANIL and HyperDistill on WarpGrad and Meta-Weight-Net: the table, the JVPs each estimator's
    definition gives for T = 4, the meta loss at the end of each inner optimisation, the cosines to exact reverse
    mode (1-step and DrMAD are exact at t = 1), the plots."""
    methods = ["anil_fo", "anil_1step", "anil_drmad", "anil_neumann", "anil_hyperdistill", "warpgrad_hyperdistill",
               "mwn_hyperdistill"]  # fmt: skip
    report = hyperdistill.main(tiny_hyperdistill_flags(tmp_path, *methods))
    results = tmp_path / "results"
    saved = json.loads((results / "results.json").read_text())
    assert set(saved["summary"]) == set(methods) and saved["table"] == report["table"]
    assert set(saved["table"]) == {"anil", "warpgrad", "mwn"} and set(saved["table"]["anil"]) == {
        "fo", "1step", "drmad", "neumann", "hyperdistill"}  # fmt: skip
    runs = {r["method"]: r for r in saved["runs"]}
    # T = 4: DrMAD 1 + 3 + 5 + 7; Neumann (4 terms + 1) x 2 calls; HyperDistill 4 + a fit of 2 x 4 every 10
    jvps = {"anil_fo": 0, "anil_1step": 4, "anil_drmad": 16, "anil_neumann": 10, "anil_hyperdistill": 4.8,
            "warpgrad_hyperdistill": 4.8, "mwn_hyperdistill": 4}  # fmt: skip
    assert {m: r["jvps_per_inner_optimisation"] for m, r in runs.items()} == pytest.approx(jvps)
    for run in runs.values():
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["seconds_per_step"] > 0
        assert len(run["meta_loss_per_inner_optimisation"]) == 2 and run["meta_steps_skipped"] == 0
    assert runs["anil_hyperdistill"]["hypergradient_kwargs"]["horizon"] == 4
    assert runs["mwn_hyperdistill"]["hypergradient_kwargs"] == {"pi": 1.0, "horizon": 4}
    cosines = runs["anil_hyperdistill"]["hypergradient_cosines"]
    assert set(cosines) == {"fo", "1step", "drmad", "neumann", "hyperdistill"}
    assert all(len(c) == 4 for c in cosines.values())
    assert cosines["1step"][0] == pytest.approx(1, abs=1e-4) and cosines["drmad"][0] == pytest.approx(1, abs=1e-4)
    assert saved["cosine_to_exact_rmd"] == cosines
    assert "| hyperdistill |" in (results / "table.md").read_text()
    for name in ("meta_test_accuracy", "convergence_anil", "convergence_warpgrad", "convergence_mwn",
                 "cosine_to_exact_rmd"):  # fmt: skip
        assert (results / f"{name}.png").stat().st_size > 0


def test_hyperdistill_on_an_image_folder(hyperdistill, image_folder, tmp_path, no_network):
    """The real-data path: classes split in label order, the image transform applied when a task reads an example."""
    flags = tiny_hyperdistill_flags(tmp_path, "anil_1step")
    flags[flags.index("--examples_per_class") + 1] = "2"
    report = hyperdistill.main([*flags, "--dataset", str(image_folder), "--class_split", "2", "0", "1", "--ways", "1",
                                "--image_size", "16", "--meta_batch_size", "1"])  # fmt: skip
    assert report["runs"][0]["test_accuracy"] == 1.0  # one class


def test_hyperdistill_rejects_a_class_split_of_other_classes(hyperdistill, image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"class_split=\[2, 2, 1\] must add up to the 3 classes"):
        hyperdistill.main([*tiny_hyperdistill_flags(tmp_path, "anil_1step"), "--dataset", str(image_folder),
                           "--class_split", "2", "2", "1"])  # fmt: skip


def test_lm_data_weighting_recipe(tmp_path, no_network):
    """Every method on a tiny generated task: the results, the share of the plain-to-clean gap each weighting
    recovers, the learned weights of clean and corrupted examples, and the plots."""
    recipe = load_recipe("lm_data_weighting")
    results = tmp_path / "results"
    report = recipe.main([
        "--seeds", "0", "--num_train", "64", "--num_meta", "16", "--num_test", "32", "--length", "3",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--meta_batch_size", "16",
        "--results_dir", str(results), "--output_dir", str(tmp_path / "runs"), "--disable_tqdm", "true",
    ])  # fmt: skip
    runs = {r["method"]: r for r in report["runs"]}
    assert list(runs) == list(recipe.METHODS)
    plain, clean = runs["plain"]["test_loss"], runs["clean_only"]["test_loss"]
    for method in ("mwn_evograd", "mwn_t1t2_fd", "mixture_evograd", "mixture_t1t2_fd"):
        run = runs[method]
        assert run["gap_recovered"] == pytest.approx((plain - run["test_loss"]) / (plain - clean))
        assert run["meta_steps_skipped"] == 0
    for method in ("mwn_evograd", "mwn_t1t2_fd"):
        assert 0 < runs[method]["mean_weight_clean"] < 1 and 0 < runs[method]["mean_weight_corrupted"] < 1
    for method in ("mixture_evograd", "mixture_t1t2_fd"):  # 4 sources of graded quality, the shares moved
        run = runs[method]
        assert len(run["source_shares"]) == 4 and sum(run["source_shares"]) == pytest.approx(1)
        assert run["source_shares"] != [0.25] * 4
        assert run["source_corrupted_share"][0] == 0 and run["source_corrupted_share"][-1] == 1
    assert runs["plain"]["gap_recovered"] is None
    assert (
        json.loads((results / "results.json").read_text())["summary"]["mwn_evograd"]["gap_recovered_mean"] is not None
    )
    for plot in ("test_loss.png", "test_accuracy.png", "weighting.png", "source_shares.png"):
        assert (results / plot).is_file()


@pytest.fixture
def local_causal_lm(tmp_path):
    """A tiny GPT-2 with a BPE tokenizer trained here, saved with `save_pretrained`, and a folder of text files:
    the recipe's real loading path (`from_pretrained`, `load_dataset`) without a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    lines = [" ".join(rng.choice(words, 12)) + "." for _ in range(200)]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.txt").write_text("\n".join(lines))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(tmp_path / "model")
    config = GPT2Config(vocab_size=len(fast), n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=1,
                        eos_token_id=1)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model", tmp_path / "text"


@pytest.mark.parametrize("lora", ["false", "true"])
def test_lm_data_weighting_recipe_on_a_local_model_and_text_dataset(tmp_path, local_causal_lm, no_network, lora):
    """The real path: a causal LM and a text dataset by path, blocks of tokens with a share shuffled, next-token
    accuracy, optionally LoRA adapters."""
    recipe = load_recipe("lm_data_weighting")
    model, text = local_causal_lm
    report = recipe.main([
        "--model", str(model), "--dataset", str(text), "--block_size", "8", "--num_train", "48", "--num_meta", "8",
        "--num_test", "8", "--lora", lora, "--methods", "plain", "mwn_evograd", "--seeds", "0",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--meta_batch_size", "8",
        "--results_dir", str(tmp_path / "results"), "--output_dir", str(tmp_path / "runs"), "--disable_tqdm", "true",
    ])  # fmt: skip
    runs = {r["method"]: r for r in report["runs"]}
    assert list(runs) == ["plain", "mwn_evograd"]
    for run in runs.values():
        assert np.isfinite(run["test_loss"]) and 0 <= run["test_accuracy"] <= 1
    assert runs["mwn_evograd"]["meta_steps_skipped"] == 0
    assert 0 < runs["mwn_evograd"]["mean_weight_corrupted"] < 1
