"""Recipes run end to end on tiny settings: results JSON, plots, and the real image-folder loading path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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
