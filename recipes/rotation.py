"""Learning a rotation of the training images from rotated validation images (EvoGrad paper Sec. 4.2, Table 3).

Validation (meta) and test images are rotated by `true_degrees` (30), training images are not. The meta-parameter
is the angle of a `metatrain.modules.LearnableRotation` applied to the training images; solving the meta-problem
means finding the hidden rotation. Compares, on the same splits and seeds: `baseline` (train unrotated, test rotated),
`matched` (train and test both unrotated: the accuracy to reach) and `rotation_<estimator>` (learned rotation).
Results go to `<results_dir>/results.json` with `angle.png` (learned angle over training) beside it.

    python recipes/rotation.py                                     # embedded digits, 30 degrees, 3 seeds, EvoGrad
    python recipes/rotation.py --seeds 0 --methods baseline rotation_evograd rotation_t1t2
    accelerate launch recipes/rotation.py
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets
import numpy as np
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from metatrain import MetaTrainingArguments
from metatrain.cli import parse_config
from metatrain.data import class_balanced_meta_split, load_digits_dataset
from metatrain.estimators import ESTIMATORS
from metatrain.experiments import (
    METHOD_OPTIONS_HELP,
    GridArguments,
    accuracy,
    method_trainer,
    per_method,
    run_and_report,
    train_and_measure,
)
from metatrain.models import build_model
from metatrain.modules import LearnableRotation, rotate_images
from metatrain.plotting import plot_curves

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "rotation_digits.yaml")
ANGLES_NAME = "learned_degrees.json"  # in each checkpoint: the angle after every step so far
# each method and the estimator it learns the rotation with (none for the fixed-model methods)
METHODS = {"baseline": None, "matched": None, **{f"rotation_{name}": name for name in ESTIMATORS}}
logger = logging.getLogger(__name__)


@dataclass
class RotationArguments(GridArguments):
    """Arguments of the rotation recipe: the hidden rotation, the model and the meta split, then the grid of methods
    and seeds."""

    METHODS: ClassVar[dict[str, str | None]] = METHODS

    true_degrees: float = field(default=30.0, metadata={"help": "Rotation of the meta and test images."})
    model: str = field(default="small_cnn", metadata={"help": "`small_cnn`, `cifar_resnet32` or a timm model name."})
    num_meta_per_class: int = field(default=10, metadata={"help": "Rotated meta (validation) images per class."})
    methods: list[str] = field(
        default_factory=lambda: ["baseline", "matched", "rotation_evograd"],
        metadata={"help": f"Any of {list(METHODS)}; `rotation_<name>` learns the rotation with estimator <name>."},
    )
    method_options: dict[str, dict[str, Any]] | str | None = field(
        default_factory=lambda: {
            "rotation_evograd": {"population": 2, "sigma": 0.001, "temperature": 0.05, "rescale": True}
        },
        metadata={
            "help": f"{METHOD_OPTIONS_HELP} Default: the paper's EvoGrad values for `rotation_evograd`, with the "
            "estimate rescaled to the learning rate."
        },
    )
    results_dir: str = field(default="outputs/rotation", metadata={"help": "Where results.json and plots go."})


def rotated(split: datasets.Dataset, degrees: float) -> datasets.Dataset:
    """`split` with its images rotated (edge pixels fill the corners, as background does in digits)."""
    rows = split[:]  # formatted as torch tensors
    images = rotate_images(rows["pixel_values"], math.radians(degrees), padding_mode="border")
    columns = {"pixel_values": images.numpy(), "labels": rows["labels"].numpy()}
    return datasets.Dataset.from_dict(columns, features=split.features).with_format("torch")


def load_data(args: RotationArguments, seed: int) -> dict[str, datasets.Dataset]:
    """Train (unrotated), meta (rotated, disjoint from train), test (rotated) and test_unrotated splits."""
    base = load_digits_dataset(seed=seed)
    labels = np.asarray(base["train"]["labels"])
    train_indices, meta_indices = class_balanced_meta_split(labels, args.num_meta_per_class, seed)
    return {
        "train": base["train"].select(train_indices),
        "meta": rotated(base["train"].select(meta_indices), args.true_degrees),
        "test": rotated(base["test"], args.true_degrees),
        "test_unrotated": base["test"],
    }


class AngleRecorder(TrainerCallback):
    """Records the learned angle (degrees) after every optimizer step. Each checkpoint keeps the record so far in
    `learned_degrees.json` beside its trainer state, and a run resumed from it starts from that record: a resumed
    run's record covers the steps before the checkpoint too."""

    def __init__(self, rotation: LearnableRotation):
        self.rotation, self.degrees = rotation, []

    @staticmethod
    def checkpoint_file(args, state) -> str:
        """Where the checkpoint of `state.global_step` keeps the record (the folder `Trainer` saves it in)."""
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", ANGLES_NAME)

    def on_train_begin(self, args, state, control, **kwargs):
        self.degrees = []
        if not state.global_step:
            return
        path = self.checkpoint_file(args, state)  # resumed from the checkpoint of that step
        if os.path.isfile(path):
            with open(path) as f:
                self.degrees = json.load(f)[: state.global_step]
        else:
            logger.warning("%s is missing: the angles of the %d steps before the resume are unknown (null).", path,
                           state.global_step)  # fmt: skip
        self.degrees += [None] * (state.global_step - len(self.degrees))

    def on_step_end(self, args, state, control, **kwargs):
        self.degrees.append(self.rotation.degrees)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with open(self.checkpoint_file(args, state), "w") as f:
                json.dump(self.degrees, f)


def run(args: RotationArguments, training_args: MetaTrainingArguments, method: str, seed: int, splits) -> dict:
    set_seed(seed)
    model = build_model(args.model, num_classes=10, in_chans=1)
    test = splits["test_unrotated"] if method == "matched" else splits["test"]
    trainer = method_trainer(
        method, METHODS, args.method_options, training_args, seed, model=model, train_dataset=splits["train"],
        eval_dataset=test, compute_metrics=accuracy, meta_dataset=splits["meta"],
        meta_module=lambda: LearnableRotation(degrees=0.0, padding_mode="border"),
    )  # fmt: skip
    recorder = AngleRecorder(trainer.meta_module) if METHODS[method] is not None else None
    if recorder is not None:
        trainer.add_callback(recorder)
    costs = train_and_measure(trainer)
    result = {"method": method, "seed": seed, "test_accuracy": trainer.evaluate()["eval_accuracy"], **costs}
    if recorder is not None:
        result["learned_degrees"] = recorder.rotation.degrees
        result["degrees_per_step"] = recorder.degrees
    return result, trainer


def main(argv: list[str] | None = None) -> dict:
    args, training_args = parse_config((RotationArguments, MetaTrainingArguments), argv, DEFAULT_CONFIG)
    report, is_main = run_and_report(
        args, training_args, lambda seed: load_data(args, seed),
        lambda method, seed, splits: run(args, training_args, method, seed, splits),
        ("test_accuracy", "learned_degrees"),
    )  # fmt: skip
    if is_main:
        curves = per_method(report["runs"], "degrees_per_step")
        if curves:
            title = f"Learned rotation (true: {args.true_degrees:g} degrees)"
            path = os.path.join(args.results_dir, "angle.png")
            true = (args.true_degrees, "true rotation")
            plot_curves(curves, path, "optimizer step", "learned angle (degrees)", title, reference=true)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
