"""Markdown tables from a `benchmarks/gpu_check.sh` output folder, to paste into `docs/benchmarks.md`.

    python benchmarks/gpu_report.py outputs/gpu_check            # prints the section, writes report.md beside it

Reads `<folder>/{mwn,lft,bf16,fp16}/results.json` (rows of `benchmarks/step_cost.py`), `<folder>/lm/results.json` (the
LM data-weighting recipe's report) and, when `gpu_check.sh` calls it, the parts' exit statuses (`--parts`); writes
`summary.json` (environment, parts, checks, failed rows) and `report.md`. Ratios follow the project's rule: against
plain training of the same size in the same run (the faster and the smaller of its two plain measurements), and T1-T2
over each method in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import add_ratios, measured  # noqa: E402

from metatrain.tables import markdown_table  # noqa: E402

PARTS = ("mwn", "lft", "bf16", "fp16")
METHOD_NAMES = {
    "plain": "plain",
    "evograd": "EvoGrad (default)",
    "evograd_after": "EvoGrad (default), `after`",
    "evograd_before": "EvoGrad (default), `before`",
    "evograd_all_at_once": "EvoGrad all-at-once",
    "evograd_lean": "EvoGrad `memory_lean`",
    "evograd_lean_after": "EvoGrad `memory_lean`, `after`",
    "evograd_jvp": "EvoGrad `forward_mode`",
    "evograd_jvp_after": "EvoGrad `forward_mode`, `after`",
    "t1t2_fd": "`t1t2_fd`",
    "t1t2": "T1-T2",
}
MB = 2**20


def load(folder: str) -> dict[str, list[dict[str, Any]]]:
    rows = {}
    for part in PARTS:
        path = os.path.join(folder, part, "results.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    rows[part] = json.load(f)["results"]
            except (OSError, ValueError, KeyError) as err:
                print(f"gpu_report: {path} unreadable ({type(err).__name__}: {err}): part {part} left out")
                continue
            add_ratios(rows[part])
    return rows


def environment() -> dict[str, Any]:
    """Versions and the device, read in this process (the same Python and packages the parts ran with)."""
    import importlib
    import platform

    env: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "timm", "datasets", "pyarrow", "huggingface_hub", "numpy"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception as err:  # noqa: BLE001
            env[name] = f"not importable: {type(err).__name__}: {err}"
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                       cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                       tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                       tf32_cudnn=torch.backends.cudnn.allow_tf32)  # fmt: skip
    except Exception as err:  # noqa: BLE001
        env["torch_error"] = str(err)
    return env


def read_parts(path: str | None) -> list[dict[str, Any]]:
    """`gpu_check.sh`'s parts file: name, exit status (or 'skipped'), seconds, log path (or the skip's reason)."""
    parts = []
    if not path or not os.path.isfile(path):
        return parts
    with open(path) as f:
        for line in f:
            name, status, seconds, detail = line.rstrip("\n").split("\t", 3)
            part: dict[str, Any] = {"part": name, "seconds": int(seconds)}
            if status == "skipped":
                part.update(status="skipped", reason=detail)
            else:
                part.update(exit_code=int(status), status="ok" if status == "0" else "failed")
                if status == "124":
                    part["status"] = "stopped at its time limit (rows measured before are kept)"
                if status != "0" and os.path.isfile(detail):
                    with open(detail, errors="replace") as log:
                        part["log_tail"] = log.read()[-3000:]
            parts.append(part)
    return parts


# ------------------------------------------------------------------------------------------------------- tables
def _plain(rows: list[dict[str, Any]], size: Any) -> dict[str, Any] | None:
    plain = [r for r in rows if r["size"] == size and r["method"] == "plain" and measured(r)]
    if not plain:
        return None
    return {
        "median_seconds": min(r["median_seconds"] for r in plain),
        "peak_bytes": min(r["peak_bytes"] for r in plain),
    }


def _row(rows: list[dict[str, Any]], size: Any, method: str) -> dict[str, Any] | None:
    found = [r for r in rows if r["size"] == size and r["method"] == method]
    return found[0] if found else None


def _size_label(workload: str, size: Any) -> str:
    return f"{size}" if workload == "mwn" else f"`{size}`"


def _failed(r: dict[str, Any] | None, short: bool = False) -> str | None:
    if r is None:
        return "not run"
    if "error" in r:
        return "failed" if short else "failed: " + r["error"].splitlines()[0][:200].replace("|", "/")
    if "skipped" in r:
        return "skipped (time budget)"
    return None


def ratio_tables(workload: str, rows: list[dict[str, Any]]) -> str:
    """Per size: plain's time and memory, every method's time and memory over plain, then T1-T2 over each method."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "plain"]
    first = "width" if workload == "mwn" else "backbone"
    lines = []
    for size in sizes:
        plain = _plain(rows, size)
        cells = [f"{plain['median_seconds'] * 1e3:.1f} ms, {plain['peak_bytes'] / MB:.0f} MB" if plain else "failed"]
        for method in methods:
            r = _row(rows, size, method)
            bad = _failed(r, short=True)
            cells.append(bad or (f"{_x(r.get('time_ratio'))}, {_x(r.get('memory_ratio'))}" if plain else ""))
        lines.append([_size_label(workload, size), *cells])
    header = [first, "plain (ms / step, MB)", *(METHOD_NAMES.get(m, m) for m in methods)]
    text = markdown_table(header, lines)
    others = [m for m in methods if m != "t1t2"]
    if "t1t2" in methods and others:
        over = []
        for size in sizes:
            t1t2 = _row(rows, size, "t1t2")
            cells = []
            for method in others:
                r = _row(rows, size, method)
                if _failed(t1t2) or _failed(r):
                    cells.append("")
                    continue
                memory = t1t2["peak_bytes"] / r["peak_bytes"] if r["peak_bytes"] > 0 else None
                cells.append(f"{_x(t1t2['median_seconds'] / r['median_seconds'])}, {_x(memory)}")
            over.append([_size_label(workload, size), *cells])
        header = [first, *(METHOD_NAMES.get(m, m) for m in others)]
        text += "\n\nT1-T2 over each method (time, memory), same run:\n\n" + markdown_table(header, over)
    return text


def absolute_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "workload", "size", "parameters", "method", "ms / step (median)", "min", "x plain", "peak MB", "x plain",
        "peak MB with model", "live tensors MB", "steps",
    ]  # fmt: skip
    lines = []
    for r in rows:
        size = f"width {r['size']}" if r["workload"] == "mwn" else r["size"]
        if not measured(r):
            lines.append([r["workload"], size, "", r["method"], _failed(r, short=True)])
            continue
        absolute, live = _mb(r.get("cuda_absolute_peak_bytes")), _mb(r.get("live_peak_bytes"))
        lines.append([
            r["workload"], size, f"{r['num_params']:,}", r["method"], f"{r['median_seconds'] * 1e3:.2f}",
            f"{r['min_seconds'] * 1e3:.2f}", _x(r.get("time_ratio"), ""), f"{r['peak_bytes'] / MB:.0f}",
            _x(r.get("memory_ratio"), ""), absolute, live, r.get("steps", ""),
        ])  # fmt: skip
    return markdown_table(header, lines)


def _x(value: float | None, unit: str = "x") -> str:
    """A ratio, or `-` where there is none (plain's peak was 0 bytes: in-process on CPU, the smoke run)."""
    return f"{value:.2f}{unit}" if isinstance(value, (int, float)) else "-"


def _mb(value: int | None) -> str:
    return f"{value / MB:.0f}" if value is not None else ""


def _fmt(r: dict[str, Any], key: str) -> str:
    value = r.get(key)
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""


def _skipped_mark(skipped: int | None) -> str:
    """The check on a count of skipped meta steps, as a table cell shows it."""
    return " (ok)" if skipped == 0 else " (**must be 0**)"


def precision_table(parts: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    header = [
        "precision", "method", "steps", "ms / step (median)", "x plain", "peak MB", "x plain", "meta steps skipped",
        "final loss", "final meta loss", "final hypergradient norm",
    ]  # fmt: skip
    lines = []
    checks: dict[str, Any] = {}
    for precision in ("bf16", "fp16"):
        for r in parts.get(precision, []):
            if not measured(r):
                name = METHOD_NAMES.get(r["method"], r["method"])
                lines.append([precision, name, "", _failed(r, short=True)])
                if r["method"] != "plain":
                    checks[f"{precision}_{r['method']}_meta_steps_skipped_is_0"] = None
                continue

            skipped = r.get("meta_steps_skipped", 0)
            mark = "" if r["method"] == "plain" else _skipped_mark(skipped)
            if r["method"] != "plain":
                checks[f"{precision}_{r['method']}_meta_steps_skipped_is_0"] = skipped == 0
            lines.append([
                precision, METHOD_NAMES.get(r["method"], r["method"]), r.get("steps", ""),
                f"{r['median_seconds'] * 1e3:.1f}", _x(r.get("time_ratio"), ""), f"{r['peak_bytes'] / MB:.0f}",
                _x(r.get("memory_ratio"), ""), f"{'' if r['method'] == 'plain' else skipped}{mark}",
                _fmt(r, "final_loss"), _fmt(r, "final_meta_loss"), _fmt(r, "final_hypergradient_norm"),
            ])  # fmt: skip
    return markdown_table(header, lines), checks


def load_lm(folder: str) -> dict[str, Any] | None:
    """The LM data-weighting recipe's report from `<folder>/lm/results.json`, or `None`."""
    path = os.path.join(folder, "lm", "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        if os.path.exists(path):
            print(f"gpu_report: {path} unreadable ({type(err).__name__}: {err}): part lm left out")
        return None


def lm_table(lm: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One row per run of the LM recipe, and the check that no meta step was skipped."""
    header = ["method", "seed", "test loss", "gap recovered", "s / step", "meta step s", "peak CUDA MB",
              "meta steps skipped"]  # fmt: skip
    lines, checks = [], {}
    for r in lm["runs"]:
        skipped = r.get("meta_steps_skipped")
        weighted = r.get("meta_step_seconds") is not None
        if weighted:
            checks[f"lm_{r['method']}_meta_steps_skipped_is_0"] = skipped == 0
        lines.append([
            r["method"], r["seed"], _fmt(r, "test_loss"), _fmt(r, "gap_recovered"), _fmt(r, "seconds_per_step"),
            _fmt(r, "meta_step_seconds"), _fmt(r, "peak_cuda_memory_mb"),
            f"{skipped}{_skipped_mark(skipped)}" if weighted else "",
        ])  # fmt: skip
    return markdown_table(header, lines), checks


def report(folder: str, parts_file: str | None = None, smoke: bool = False) -> tuple[str, dict[str, Any]]:
    parts = load(folder)
    lm = load_lm(folder)
    summary_path = os.path.join(folder, "summary.json")
    old = {}
    if parts_file is None and os.path.isfile(summary_path):  # re-run on a downloaded folder: keep what it recorded
        with open(summary_path) as f:
            old = json.load(f)
    env = old.get("environment") or environment()
    smoke = smoke or bool(old.get("smoke"))
    statuses = read_parts(parts_file) or old.get("parts", [])
    every = [r for rows in parts.values() for r in rows]
    first = next((r for r in every if measured(r)), {})
    device = env.get("device") or first.get("device", "cpu")
    date = old.get("date") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = [
        f"## Step cost on a GPU: {device}{' (SMOKE RUN on CPU: plumbing, not figures)' if smoke else ''}",
        "",
        f"Measured with `bash benchmarks/gpu_check.sh` on {date}: one {device}, torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, timm {env.get('timm')}, "
        f"Python {env.get('python')}. Every configuration ran in one process per part, one after the other "
        "(`step_cost.py --in_process`); a step is `Trainer`'s whole optimizer step (meta step, forward, backward, "
        "update) between `torch.cuda.synchronize()` calls; the median of the timed steps after the warm-up ones. "
        "Memory is the CUDA allocator's peak during `train()` (`torch.cuda.max_memory_allocated`, reset for every "
        "configuration) minus what was allocated before it (the model); the absolute peak is in the full table. "
        "Ratios are against plain training of the same size in the same run (the faster and smaller of its two plain "
        "runs), cells `time, memory`.",
    ]
    for workload, title in (("mwn", "Meta-Weight-Net, CIFAR ResNet-32, random 32x32 images"),
                            ("lft", "LFT, timm ResNets, random images")):  # fmt: skip
        rows = parts.get(workload)
        if not rows:
            out += ["", f"### {title}", "", "No results (see summary.json's parts)."]
            continue
        r0 = rows[0]
        detail = f"Batch {r0['batch_size']}, {r0['image_size']}x{r0['image_size']} images, "
        out += ["", f"### {title}", "",
                f"{detail}{r0['warmup']} warm-up and {r0['repeats']} timed steps per configuration.", "",
                ratio_tables(workload, rows)]  # fmt: skip
    table, checks = precision_table(parts)
    out += ["", "### Mixed precision: Meta-Weight-Net width 1 through `MetaTrainer`, EvoGrad's default path", ""]
    if parts.get("bf16") or parts.get("fp16"):
        r0 = (parts.get("bf16") or parts.get("fp16"))[0]
        out += [f"{r0['warmup'] + r0['repeats'] + 1} steps, batch {r0['batch_size']}, random labels (a loss near "
                "ln 10 is expected); final values are the last logged interval's means.", "", table]  # fmt: skip
    else:
        out += ["No results (see summary.json's parts)."]
    out += ["", "### LM data weighting under bf16 (`recipes/lm_data_weighting.py`, tiny GPT-2, seed 0)", ""]
    if lm:
        config = lm["config"]
        table, lm_checks = lm_table(lm)
        checks.update(lm_checks)
        out += [f"{config.get('num_train')} training examples, {config.get('corruption')} corrupted; peak CUDA memory "
                "over each run's training.", "", table]  # fmt: skip
    else:
        out += ["No results (see summary.json's parts)."]
    out += ["", "### Not measured", ""]
    skipped_parts = [p for p in statuses if p["status"] != "ok"]
    for p in skipped_parts:
        out.append(f"- part `{p['part']}`: {p['status']}" + (f" ({p['reason']})" if p.get("reason") else ""))
    bad = [r for r in every if not measured(r)]
    for r in bad:
        out.append(f"- {r['workload']} {r['size']} {r['method']} ({r.get('mixed_precision', 'no')}): {_failed(r)}")
    if not parts:
        out.append(f"- nothing ran: no results.json under {folder}/{{{','.join(PARTS)}}}.")
    elif not skipped_parts and not bad:
        out.append("- nothing: every configuration ran.")
    out += ["", "### Every row", "", "\n\n".join(absolute_table(rows) for rows in parts.values())]
    text = "\n".join(out) + "\n"
    summary = {
        "date": date,
        "smoke": smoke,
        "environment": env,
        "parts": statuses,
        "checks": checks,
        "lm_data_weighting": lm["summary"] if lm else None,
        "failed_or_skipped_rows": [
            {k: r.get(k) for k in ("workload", "size", "method", "mixed_precision", "error", "skipped")} for r in bad
        ],  # fmt: skip
        "rows": {part: len(rows) for part, rows in parts.items()},
    }
    return text, summary


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="gpu_check.sh's output folder")
    parser.add_argument("--parts", help="gpu_check.sh's parts file (name, exit status, seconds, log)")
    parser.add_argument("--smoke", default="0", help="1: the run was GPU_CHECK_SMOKE=1 (marked in the report)")
    cli = parser.parse_args(argv)
    text, summary = report(cli.folder, cli.parts, smoke=cli.smoke == "1")
    with open(os.path.join(cli.folder, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cli.folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(text)
    for name, ok in summary["checks"].items():
        print(f"check {name}: {'OK' if ok else 'FAILED' if ok is False else 'NOT MEASURED'}")
    return text


if __name__ == "__main__":
    main()
