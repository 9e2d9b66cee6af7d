"""Wall time and peak memory of one training step of `MetaTrainer`, per hypergradient estimator, against plain
training of the same model (EvoGrad paper, Figure 6; issue 6).

    python benchmarks/step_cost.py --output_dir outputs/benchmarks

Workloads:
- `mwn`: Meta-Weight-Net on the CIFAR ResNet-32 (`cifar_resnet32` at width multipliers `--widths`), batch 100 of
  random 3x32x32 images, 10 classes, meta batch 100, EvoGrad with the paper's K=2.
- `lft`: feature-wise transformation layers (`attach_feature_wise_transforms`) on timm ResNets (`--lft_models`),
  plain classification loss on random images of side `--lft_image_size` (32 by default), the FT layers off in the
  meta loss.

Methods ending in `_after` or `_before` set `meta_step_position`; the others leave it to the library, which runs
EvoGrad and `t1t2_fd` `after` the base step's forward on `mwn` (reusing its per-example losses as the weighting net's
input instead of a forward of their own) and every meta step `before` on `lft`.

Every configuration runs in a fresh process, one after the other, with `torch.set_num_threads(--threads)`: a step is
the whole optimizer step Trainer takes (meta step, forward, backward, base update), timed between the `on_step_begin`
and `on_step_end` callbacks; the first `--warmup` steps are dropped and the median of the next `--repeats` is reported,
in wall time and in the process's CPU time (with one thread, the CPU time is the step's work, less sensitive to other
jobs on a shared machine than wall time). Memory is the process's: on CPU the peak resident set size (`VmHWM`, reset
through `/proc/self/clear_refs` just before `train()`) minus the resident set size at that point, so model, data and
imports are excluded and everything training adds (optimizer state, activations, the meta step's graphs, allocator
caching) is included; on a GPU the CUDA allocator's peak during `train()` minus what was allocated before it. One
more step after the timed ones (untimed) runs under `metatrain.profiling.LiveTensorMeter`: the peak of the tensors
made in that step that are alive at once (`live_peak_bytes`), which the allocator's caching and fragmentation do not
move, unlike the resident set size; it leaves out what the step does not make (weights, optimizer state from earlier
steps). Each step's minor page faults (`median_minor_faults`: pages the kernel mapped for the process, fresh memory
from the allocator) are counted too. `--max_grad_norm 0` trains without Trainer's gradient clipping, as the official
EvoGrad and MWN scripts do; it changes the numbers, not the work: `Trainer` still computes the gradient norm for its
logs (`clip_grad_norm_` with an infinite bound, which also scales every gradient by 1). Ratios are taken against
plain training measured in the same run (`--append` adds a run to an existing `results.json`; each run keeps its own
plain reference). Writes `results.json`, `time.png`, `cpu_time.png`,
`memory.png`, `live_memory.png`, `cpu_time_ratio.png`, `memory_ratio.png` and prints a Markdown table; `--plot_from`
redraws these from saved runs.

On a GPU (`benchmarks/gpu_check.sh`): `--in_process` runs every configuration in the driver's process (the CUDA
allocator's peak is reset for each, and a fresh process would cost seconds of imports and CUDA start-up per row),
`--keep_going` records a failing configuration's error in its row and goes on, `--deadline_s` skips the rows that
would start after that many seconds, `--mixed_precision bf16|fp16` trains under autocast, `--logging_steps` keeps
`Trainer`'s logs (loss, meta loss, hypergradient norm) in each row, and `--no_plots` writes `results.json` alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

# method: (estimator, its options, other MetaTrainingArguments); `_after` / `_before` methods set
# `meta_step_position`, the others leave it unset (the library's choice)
AFTER = {"meta_step_position": "after"}
BEFORE = {"meta_step_position": "before"}
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]] | None] = {
    "plain": None,
    "first_order": ("first_order", {}, {}),
    "evograd": ("evograd", {}, {}),
    "evograd_after": ("evograd", {}, AFTER),
    "evograd_before": ("evograd", {}, BEFORE),
    "evograd_all_at_once": ("evograd", {"memory_lean": False}, {}),
    "evograd_lean": ("evograd", {"memory_lean": True}, {}),
    "evograd_lean_after": ("evograd", {"memory_lean": True}, AFTER),
    "evograd_jvp": ("evograd", {"forward_mode": True}, {}),
    "evograd_jvp_after": ("evograd", {"forward_mode": True}, AFTER),
    "evograd_forward": ("evograd_forward", {}, {}),  # benchmarks/forward_only.py, not part of the library
    "t1t2": ("t1t2", {}, {}),
    "t1t2_fd": ("t1t2_fd", {}, {}),
    "t1t2_fd_after": ("t1t2_fd", {}, AFTER),
    "neumann": ("neumann", {}, {}),
    "hyperdistill": ("hyperdistill", {}, {}),
}


# ------------------------------------------------------------------------------------------------------- worker
def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not every sandbox has it
        return -1.0


def run_configuration(config: dict[str, Any]) -> dict[str, Any]:
    """Trains `warmup + repeats` steps of one configuration and returns its step times and peak memory.

    Optional keys: `mixed_precision` ("no", "bf16" or "fp16"; Trainer's autocast), `logging_steps` (keep Trainer's
    logs in `log_history` and the last one's loss, meta loss and hypergradient norm as `final_*`), `max_grad_norm`.
    """
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from metatrain import MetaTrainer, MetaTrainingArguments
    from metatrain.models import build_model
    from metatrain.modules import MetaWeightNet, attach_feature_wise_transforms
    from metatrain.per_sample import PerSampleLossTrainer
    from metatrain.profiling import LiveTensorMeter, MemoryMeter

    torch.set_num_threads(config["threads"])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import forward_only
    from _data import RandomImages

    if config["method"] == "evograd_forward":  # only where used: in-process runs share the registry
        forward_only.register()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, timed = config["batch_size"], config["warmup"] + config["repeats"]
    steps = timed + 1  # the last step runs under the live-tensor meter, untimed
    if config["workload"] == "mwn":
        model = build_model("cifar_resnet32", num_classes=10, width=config["size"])
    else:
        model = build_model(config["size"], num_classes=10, zero_init_last=False)
    num_params = sum(p.numel() for p in model.parameters())

    class StepTimer(TrainerCallback):
        """Times every step; the step after the timed ones runs under a [`LiveTensorMeter`] instead."""

        def __init__(self):
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self.minor_faults: list[int] = []  # pages the kernel had to map (and zero) for the process during the step
            self.live = LiveTensorMeter()

        def _sync(self):
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            if state.global_step == timed:
                self.live.__enter__()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
            self.faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.times.append(time.perf_counter() - self.start)
            self.cpu_times.append(time.process_time() - self.cpu_start)
            self.minor_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults_start)
            if state.global_step == timed + 1:
                self.live.__exit__(None, None, None)

    class LogRecorder(TrainerCallback):
        def __init__(self):
            self.logs: list[dict[str, Any]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # the periodic logs, not the run's summary
                self.logs.append({"step": state.global_step, **{k: v for k, v in logs.items() if _is_number(v)}})

    timer, recorder = StepTimer(), LogRecorder()
    precision = config.get("mixed_precision", "no")
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={precision!r}: choose no, bf16 or fp16")
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, learning_rate=0.1,
        optim="sgd", logging_steps=config.get("logging_steps") or 10**6, report_to=[], use_cpu=device.type == "cpu",
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        max_grad_norm=config.get("max_grad_norm", 1.0), bf16=precision == "bf16", fp16=precision == "fp16",
    )  # fmt: skip
    train_data = RandomImages(steps * batch, seed=1, size=config["image_size"])
    method = METHODS[config["method"]]
    meta_params = 0
    if method is None:
        trainer = PerSampleLossTrainer(
            model=model, args=TrainingArguments(**common), train_dataset=train_data, callbacks=[timer, recorder]
        )
    else:
        name, options, overrides = method
        meta_module = MetaWeightNet() if config["workload"] == "mwn" else attach_feature_wise_transforms(model)
        meta_params = sum(p.numel() for p in meta_module.parameters())
        args = MetaTrainingArguments(**common, **overrides, hypergradient=name, hypergradient_kwargs=options)
        trainer = MetaTrainer(
            model=model, args=args, train_dataset=train_data,
            meta_dataset=RandomImages(batch, seed=2, size=config["image_size"]), meta_module=meta_module,
            callbacks=[timer, recorder],
        )  # fmt: skip
    start_load = _load_average()
    with MemoryMeter(device, cpu="rss") as memory:
        trainer.train()
    measured = timer.times[config["warmup"] : timed]
    last = recorder.logs[-1] if recorder.logs else {}
    cuda = {}
    if device.type == "cuda":  # the allocator's figures with the model and data: what the card must hold
        cuda = {"cuda_start_bytes": memory.start_bytes, "cuda_absolute_peak_bytes": memory.absolute_peak_bytes}
    return {
        **config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "num_params": num_params,
        "meta_params": meta_params,
        "step_seconds": measured,
        "median_seconds": statistics.median(measured),
        "min_seconds": min(measured),
        "cpu_seconds": timer.cpu_times[config["warmup"] : timed],
        "median_cpu_seconds": statistics.median(timer.cpu_times[config["warmup"] : timed]),
        "median_minor_faults": statistics.median(timer.minor_faults[config["warmup"] : timed]),
        "load_average_1min": [start_load, _load_average()],  # of the whole machine, before and after
        "peak_bytes": memory.peak_bytes,
        "memory_kind": memory.kind,
        "live_peak_bytes": timer.live.peak_bytes,  # one step, tensors made in it (LiveTensorMeter), any device
        "meta_steps_skipped": getattr(trainer, "meta_steps_skipped", 0),
        "steps": trainer.state.global_step,
        "torch_version": torch.__version__,
        **cuda,
        **({"log_history": recorder.logs} if config.get("logging_steps") else {}),
        **({f"final_{k}": last[k] for k in ("loss", "meta_loss", "hypergradient_norm", "grad_norm") if k in last}),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def measured(r: dict[str, Any]) -> bool:
    """Whether a row holds a measurement (not a configuration that failed or was skipped)."""
    return "median_seconds" in r


# ------------------------------------------------------------------------------------------------------- driver
def configurations(cli: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method per workload and size, with plain training both first and last (the machine's load drifts)."""
    sizes = [("mwn", w) for w in cli.widths] + [("lft", name) for name in cli.lft_models]
    methods = ["plain", *[m for m in cli.methods if m != "plain"], "plain"]
    return [
        {"workload": workload, "size": size, "method": method, "batch_size": cli.batch_size, "warmup": cli.warmup,
         "repeats": cli.repeats, "threads": cli.threads, "max_grad_norm": cli.max_grad_norm,
         "image_size": 32 if workload == "mwn" else cli.lft_image_size, "mixed_precision": cli.mixed_precision,
         "logging_steps": cli.logging_steps}
        for workload, size in sizes
        for method in methods
    ]  # fmt: skip


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Time and memory of each configuration over plain training of the same workload and size in the same run:
    the faster of its two plain measurements, and the smaller of their peaks (both conservative for the ratios)."""
    plain: dict[tuple, list[dict[str, Any]]] = {}
    results = [r for r in results if measured(r)]  # failed or skipped rows have no figures
    for r in results:
        if r["method"] == "plain":
            plain.setdefault((r["run"], r["workload"], r["size"]), []).append(r)
    for r in results:
        bases = plain.get((r["run"], r["workload"], r["size"]))
        if bases:
            seconds, peak = min(b["median_seconds"] for b in bases), min(b["peak_bytes"] for b in bases)
            r["time_ratio"] = r["median_seconds"] / seconds
            r["cpu_time_ratio"] = r["median_cpu_seconds"] / min(b["median_cpu_seconds"] for b in bases)
            r["memory_ratio"] = r["peak_bytes"] / peak if peak > 0 else None
            live = [b.get("live_peak_bytes") for b in bases]  # absent in runs from before the live meter
            if r.get("live_peak_bytes") is not None and None not in live and min(live) > 0:
                r["live_memory_ratio"] = r["live_peak_bytes"] / min(live)


def markdown_table(results: list[dict[str, Any]]) -> str:
    from metatrain.tables import markdown_table as table

    header = [
        "workload", "size", "parameters", "method", "wall s / step (median)", "x plain", "CPU s / step (median)",
        "x plain", "peak memory (MB)", "x plain", "live tensors (MB)", "x plain", "load",
    ]  # fmt: skip

    def ratio(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.2f}" if r.get(key) is not None else ""

    rows = []
    for r in results:
        size = f"width {r['size']}" if r["workload"] == "mwn" else r["size"]
        if not measured(r):
            reason = str(r.get("error") or r.get("skipped") or "no result").splitlines()[0][:100].replace("|", "/")
            rows.append([r["workload"], size, "", r["method"], reason])
            continue
        live = f"{r['live_peak_bytes'] / 2**20:.0f}" if r.get("live_peak_bytes") is not None else ""
        rows.append([
            r["workload"], size, f"{r['num_params']:,}", r["method"], f"{r['median_seconds']:.3f}",
            ratio(r, "time_ratio"), f"{r['median_cpu_seconds']:.3f}", ratio(r, "cpu_time_ratio"),
            f"{r['peak_bytes'] / 2**20:.0f}", ratio(r, "memory_ratio"), live, ratio(r, "live_memory_ratio"),
            f"{max(r['load_average_1min']):.1f}",
        ])  # fmt: skip
    return table(header, rows)


def plot(results: list[dict[str, Any]], output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in results})
    for key, label, filename in (
        ("median_seconds", "wall seconds per training step (median)", "time.png"),
        ("median_cpu_seconds", "CPU seconds per training step (median)", "cpu_time.png"),
        ("peak_bytes", "peak memory over the pre-training state (MB)", "memory.png"),
        ("cpu_time_ratio", "CPU time per step / plain training's (same run)", "cpu_time_ratio.png"),
        ("memory_ratio", "peak memory / plain training's (same run)", "memory_ratio.png"),
        ("live_peak_bytes", "peak of live tensors made in one step (MB)", "live_memory.png"),
    ):
        fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
        for ax, workload in zip(axes[0], workloads):
            rows = [r for r in results if r["workload"] == workload and measured(r) and r.get(key) is not None]
            for method in dict.fromkeys(r["method"] for r in rows):
                best: dict[int, float] = {}  # plain is measured twice per size: the smaller of the two
                for r in rows:
                    if r["method"] == method:
                        best[r["num_params"]] = min(best.get(r["num_params"], float("inf")), r[key])
                xs, ys = zip(*sorted(best.items()))
                ys = [y / 2**20 for y in ys] if key.endswith("peak_bytes") else ys
                color = plt.cm.tab20(list(METHODS).index(method) % 20)  # one color per method in every panel
                ax.plot(xs, ys, marker="o", label=method, color=color, linestyle="--" if method == "plain" else "-")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("model parameters")
            ax.set_ylabel(label)
            ax.set_title({"mwn": "MWN, CIFAR ResNet-32 widths", "lft": "LFT, timm ResNets"}.get(workload, workload))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, filename), dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--output_dir", default="outputs/benchmarks")
    parser.add_argument("--widths", type=int, nargs="*", default=[1, 2, 3, 4, 5], help="ResNet-32 width multipliers")
    parser.add_argument("--lft_models", nargs="*", default=["resnet10t", "resnet18", "resnet34"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--lft_image_size", type=int, default=32, help="side of the LFT workload's random images")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped before the timed ones")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every configuration")
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0,
        help="Trainer's gradient clipping (its default, 1.0); 0 trains without it, as the official EvoGrad and MWN "
        "scripts do (the same work: Trainer still computes the norm for its logs)",
    )  # fmt: skip
    parser.add_argument("--append", action="store_true", help="add to the output directory's results.json")
    parser.add_argument(
        "--mixed_precision", default="no", choices=["no", "bf16", "fp16"], help="Trainer's bf16 / fp16 autocast"
    )
    parser.add_argument(
        "--logging_steps", type=int, default=0,
        help="keep Trainer's logs every this many steps in each row (log_history, final_loss, final_meta_loss, "
        "final_hypergradient_norm); 0: no logs",
    )  # fmt: skip
    parser.add_argument(
        "--in_process", action="store_true",
        help="run every configuration in this process, one after the other (for a GPU: the CUDA allocator's peak is "
        "reset per configuration; on CPU the peak RSS would carry over between rows, so do not use it there for "
        "figures)",
    )  # fmt: skip
    parser.add_argument(
        "--keep_going",
        action="store_true",
        help="a configuration that fails gets its error in its row (`error`) and the next one runs",
    )
    parser.add_argument(
        "--deadline_s", type=float, default=0,
        help="with --keep_going, skip (row `skipped`) every configuration that would start this many seconds after "
        "the first one did; 0: no deadline",
    )  # fmt: skip
    parser.add_argument("--no_plots", action="store_true", help="write results.json and the table, no figures")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration, as JSON, in this process
    parser.add_argument(
        "--plot_from", nargs="+", metavar="RESULTS_JSON",
        help="measure nothing: plot the rows of these results.json files (e.g. runs of different widths) together "
        "into --output_dir; each row keeps the ratios of its own run",
    )  # fmt: skip
    cli = parser.parse_args(argv)
    if cli.plot_from:
        results = []
        for source in cli.plot_from:
            with open(source) as f:  # a run's rows pair within their file (older run ids have one-second resolution)
                results += [{**r, "run": f"{source}:{r['run']}"} for r in json.load(f)["results"]]
        add_ratios(results)
        os.makedirs(cli.output_dir, exist_ok=True)
        plot(results, cli.output_dir)
        print(markdown_table(results))
        return results
    if cli.worker:
        print("RESULT " + json.dumps(run_configuration(json.loads(cli.worker))), flush=True)
        return []
    if "plain" not in cli.methods:
        raise ValueError(f"--methods {cli.methods} lacks 'plain': the ratios are taken against it in the same run.")
    os.makedirs(cli.output_dir, exist_ok=True)
    path = os.path.join(cli.output_dir, "results.json")
    results: list[dict[str, Any]] = []
    if cli.append and os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)["results"]
    # ratios pair each configuration with plain training of its own run: runs started within one second (in parallel)
    # must not share an id
    run = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{os.getpid()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(cli.threads), "MKL_NUM_THREADS": str(cli.threads)}
    configs, start = configurations(cli), time.monotonic()
    for i, config in enumerate(configs):
        label = f"[{i + 1}/{len(configs)}] {config['workload']} {config['size']} {config['method']}"
        elapsed = time.monotonic() - start
        if cli.keep_going and cli.deadline_s and elapsed > cli.deadline_s:
            reason = f"time budget: {elapsed:.0f} s > --deadline_s {cli.deadline_s:g}"
            result = {**config, "run": run, "skipped": reason}
        else:
            try:
                result = {**_measure(config, cli.in_process, env), "run": run}
            except Exception as err:  # noqa: BLE001 (any failure of one configuration is recorded, with --keep_going)
                if not cli.keep_going:
                    raise
                message = str(err) if isinstance(err, ConfigurationFailed) else f"{type(err).__name__}: {err}"
                result = {**config, "run": run, "error": message[:4000]}
        results.append(result)
        if measured(result):
            print(f"{label}: {result['median_seconds']:.4f} s/step, {result['peak_bytes'] / 2**20:.0f} MB "
                  f"({time.monotonic() - start:.0f} s)", flush=True)  # fmt: skip
        else:
            reason = result.get("error") or result.get("skipped")
            print(
                f"{label}: {'FAILED' if 'error' in result else 'SKIPPED'}: {reason.splitlines()[0][:300]}", flush=True
            )
        add_ratios(results)
        with open(path + ".tmp", "w") as f:  # after every configuration, so an interrupted run keeps what it measured
            json.dump({"threads": cli.threads, "results": results}, f, indent=1)
        os.replace(path + ".tmp", path)  # whole or not at all, even if the run is killed while writing
    if not cli.no_plots:
        plot(results, cli.output_dir)
    print(markdown_table(results))
    return results


class ConfigurationFailed(RuntimeError):
    """A configuration's error, its message already saying what failed and where."""


def _measure(config: dict[str, Any], in_process: bool, env: dict[str, str]) -> dict[str, Any]:
    """One configuration's row: in this process, or in a fresh one (the default)."""
    if in_process:
        import gc

        import torch

        failure = None
        try:
            return run_configuration(config)
        except Exception as err:
            # the error first, then the traceback's last lines (where it failed); the traceback itself is dropped,
            # so the frames' tensors (an OOM's half-built graph) are freed before the next configuration
            failure = f"{type(err).__name__}: {err}\n" + "".join(traceback.format_exception(err)[-4:])
        finally:  # what this configuration left: a trainer in a reference cycle, cached blocks
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        raise ConfigurationFailed(failure)
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)], env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise ConfigurationFailed(f"configuration {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


if __name__ == "__main__":
    main()
