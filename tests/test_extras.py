"""The core installs without the extras: what needs one names it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# the packages of the `vision` and `recipes` extras, made unimportable in a fresh interpreter
BLOCK = """
import sys
for name in ("timm", "torchvision", "sklearn", "matplotlib", "scipy", "seqeval"):
    sys.modules[name] = None
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_meta_trainer_trains_without_the_extras(tmp_path):
    done = run(f"""
        import torch, datasets
        from torch import nn
        from metatrain import MetaTrainer, MetaTrainingArguments
        from metatrain.modules import MetaWeightNet
        data = datasets.Dataset.from_dict(
            {{"pixel_values": torch.randn(16, 4).numpy(), "labels": [0, 1] * 8}}
        ).with_format("torch")
        args = MetaTrainingArguments(output_dir={str(tmp_path)!r}, use_cpu=True, report_to=[], max_steps=2,
                                     per_device_train_batch_size=4, hypergradient="evograd")
        trainer = MetaTrainer(model=nn.Linear(4, 2), args=args, train_dataset=data, meta_dataset=data,
                              meta_module=MetaWeightNet())
        trainer.train()
        print("steps", trainer.state.global_step)
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steps 2" in done.stdout


def test_what_needs_an_extra_names_it():
    done = run("""
        import pytest
        from metatrain.models import build_model
        from metatrain.modules import attach_feature_wise_transforms
        from metatrain.data import load_digits_dataset
        from metatrain.metrics import entity_scores
        from metatrain.experiments import paired_differences
        for call, extra in (
            (lambda: build_model("resnet18", num_classes=2), "vision"),
            (lambda: attach_feature_wise_transforms(build_model("small_cnn", num_classes=2)), "vision"),
            (load_digits_dataset, "recipes"),
            (lambda: entity_scores([["O"]], [["O"]]), "recipes"),
            (lambda: paired_differences([{"seed": 0, "method": "a", "x": 1.0}], "a", ["x"]), "recipes"),
        ):
            with pytest.raises(ImportError, match=rf"pip install 'metatrain-hf\\[{extra}\\]'"):
                call()
        try:
            import metatrain.plotting
        except ImportError as err:
            assert "metatrain-hf[recipes]" in str(err), err
        else:
            raise AssertionError("metatrain.plotting imported without matplotlib")
        print("ok")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok" in done.stdout
