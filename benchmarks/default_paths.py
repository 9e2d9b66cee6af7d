"""The meta step's cost by EvoGrad path and by estimator, measured by `MetaTrainer` itself: Meta-Weight-Net on a CIFAR
ResNet-32, LFT's feature-wise layers in a timm ResNet-18, and a tiny BERT with Meta-Weight-Net, in full or with LoRA
adapters (`bert_lora`, peft; not in the default run). For each workload: plain training, T1-T2, EvoGrad's default (what
`hypergradient="evograd"` alone gives, also with `meta_step_position="before"`) beside each path it can take
(`all_at_once`, `lean`, `forward`), and every other estimator by its name alone. Memory is `meta_step_memory_mb`
(`meta_profile_memory`: on CPU the peak of bytes saved for backward, on GPU the allocator's peak), time
`meta_step_seconds` and the whole step's seconds, medians of `--repeats` interleaved rounds (each round runs every
method once, in a new order); `position` is the `meta_step_position` the trainer ran. Writes `default_paths.json` and
`default_paths.md`.

    python benchmarks/default_paths.py --output_dir docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification

from metatrain import MetaTrainer, MetaTrainingArguments, PerSampleLossTrainer
from metatrain.estimators import EvoGrad
from metatrain.models import build_model
from metatrain.modules import MetaWeightNet, attach_feature_wise_transforms
from metatrain.tables import markdown_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import RandomImages  # noqa: E402

# MetaTrainingArguments of each method; None: plain training
METHODS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "t1t2": {"hypergradient": "t1t2"},
    "evograd (default)": {"hypergradient": "evograd"},
    "evograd (default), before": {"hypergradient": "evograd", "meta_step_position": "before"},
    "evograd all_at_once": {"hypergradient": "evograd", "hypergradient_kwargs": {"memory_lean": False}},
    "evograd lean": {"hypergradient": "evograd", "hypergradient_kwargs": {"memory_lean": True}},
    "evograd forward": {"hypergradient": "evograd", "hypergradient_kwargs": {"forward_mode": True}},
    # every other estimator by its name alone
    "first_order": {"hypergradient": "first_order"},
    "t1t2_fd": {"hypergradient": "t1t2_fd"},
    "neumann": {"hypergradient": "neumann"},
    "reverse": {"hypergradient": "reverse"},
    "hyperdistill": {"hypergradient": "hyperdistill"},
    # its step without the fit of theta that the default runs at the first call (every 50 inner optimisations)
    "hyperdistill, pi=1": {"hypergradient": "hyperdistill", "hypergradient_kwargs": {"pi": 1.0}},
    "drmad": {"hypergradient": "drmad"},
}


class RandomTokens(torch.utils.data.Dataset):
    """`n` random token sequences of `length` with labels in 0..1, fixed by `seed`."""

    def __init__(self, n: int, seed: int, length: int = 32, vocab: int = 1000):
        g = torch.Generator().manual_seed(seed)
        self.ids, self.y = torch.randint(5, vocab, (n, length), generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.y[i]}


def workload(name: str, batch: int, steps: int) -> tuple[torch.nn.Module, torch.nn.Module | None, Any, Any]:
    """`(model, meta-module, train set, meta set)` of a workload; the meta-module is built for the meta methods."""
    torch.manual_seed(0)
    n = batch * steps
    if name == "mwn":
        return build_model("cifar_resnet32", num_classes=10), "mwn", RandomImages(n, 1), RandomImages(n, 2)
    if name == "lft":
        model = build_model("resnet18", num_classes=10, zero_init_last=False)
        return model, "lft", RandomImages(n, 1), RandomImages(n, 2)
    if name in ("bert", "bert_lora"):
        config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=256, num_labels=2)  # fmt: skip
        model = BertForSequenceClassification(config)
        if name == "bert_lora":  # LoRA adapters on query and value (peft); the rest frozen
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]))
        return model, "mwn", RandomTokens(n, 1), RandomTokens(n, 2)
    raise ValueError(f"Unknown workload {name!r}: choose mwn, lft, bert or bert_lora.")


def run(name: str, method: str, batch: int, steps: int, threads: int) -> dict[str, float | None]:
    torch.set_num_threads(threads)
    model, kind, train, meta = workload(name, batch, steps)
    spec = METHODS[method]
    args = MetaTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, use_cpu=True,
        report_to=[], optim="sgd", learning_rate=0.01, logging_steps=steps, save_strategy="no",
        disable_tqdm=True, meta_profile_memory=True, dataloader_num_workers=0,
        **(spec or {}),
    )  # fmt: skip
    if spec is None:
        trainer = PerSampleLossTrainer(model=model, args=args, train_dataset=train)
    else:
        meta_module = MetaWeightNet() if kind == "mwn" else attach_feature_wise_transforms(model)
        trainer = MetaTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta, meta_module=meta_module)
    output = trainer.train()
    means = trainer.meta_statistics.means() if spec else {}
    path = trainer.estimator.path if spec and isinstance(trainer.estimator, EvoGrad) else None
    return {
        "seconds_per_step": output.metrics["train_runtime"] / steps,
        "meta_step_seconds": means.get("meta_step_seconds"),
        "meta_step_memory_mb": means.get("meta_step_memory_mb"),
        "evograd_path": path,
        "position": trainer.meta_step_position if spec else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["mwn", "lft", "bert"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (each with a meta step)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/default_paths")
    cli = parser.parse_args()
    rng = random.Random(0)
    runs: dict[tuple[str, str], list[dict]] = {}
    for name in cli.workloads:
        for round_ in range(cli.repeats):
            order = list(cli.methods)
            rng.shuffle(order)
            for method in order:
                runs.setdefault((name, method), []).append(run(name, method, cli.batch_size, cli.steps, cli.threads))
                print(name, round_, method, runs[(name, method)][-1], flush=True)

    def median(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    rows = []
    for name in cli.workloads:
        keys = ("seconds_per_step", "meta_step_seconds", "meta_step_memory_mb")
        summary = {m: {k: median(runs[(name, m)], k) for k in keys} for m in cli.methods}
        for method in cli.methods:
            path = runs[(name, method)][0]["evograd_path"]
            position = runs[(name, method)][0]["position"]
            row = {"workload": name, "method": method, **summary[method], "evograd_path": path, "position": position}
            for base in ("plain", "t1t2"):
                if base in summary and summary[base]["seconds_per_step"]:
                    row[f"time_vs_{base}"] = row["seconds_per_step"] / summary[base]["seconds_per_step"]
            t1t2 = summary.get("t1t2", {}).get("meta_step_memory_mb")
            if t1t2 and row["meta_step_memory_mb"] is not None:
                row["memory_vs_t1t2"] = row["meta_step_memory_mb"] / t1t2
            rows.append(row)

    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    table = markdown_table(
        ["workload", "method", "path", "position", "s / step", "x plain", "x T1-T2", "meta step s", "meta step MB",
         "x T1-T2"],
        [[r["workload"], r["method"], r["evograd_path"] or "", r["position"] or "", fmt(r["seconds_per_step"], ".3f"),
          fmt(r.get("time_vs_plain"), ".2f"), fmt(r.get("time_vs_t1t2"), ".2f"), fmt(r["meta_step_seconds"], ".3f"),
          fmt(r["meta_step_memory_mb"], ".2f"), fmt(r.get("memory_vs_t1t2"), ".2f")] for r in rows],
        right_from=4,
    )  # fmt: skip
    os.makedirs(cli.output_dir, exist_ok=True)
    setup = {"batch_size": cli.batch_size, "steps": cli.steps, "repeats": cli.repeats, "threads": cli.threads,
             "torch": torch.__version__, "device": "cpu"}  # fmt: skip
    with open(os.path.join(cli.output_dir, "default_paths.json"), "w") as f:
        json.dump({"setup": setup, "rows": rows, "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}}, f, indent=1)
    with open(os.path.join(cli.output_dir, "default_paths.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
