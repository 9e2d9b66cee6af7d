"""Pieces the recipes share: their grid arguments, the trainer of one run of a method, the seeds x methods grid and
its resumption, the accuracy metric, per-method summaries and the results."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from .data.episodes import stack_images
from .per_sample import PerSampleLossTrainer
from .profiling import MemoryMeter
from .trainer import MetaTrainer
from .utils import evaluation_mode, require

logger = logging.getLogger(__name__)
RUNS_DONE_NAME = "runs_done.json"
METHOD_OPTIONS_HELP = (
    "Per method that runs an estimator, that estimator's options (a YAML mapping or JSON), updated with "
    "`hypergradient_kwargs` where `hypergradient` names the same estimator (see "
    "`metatrain.experiments.method_estimator`)."
)


def accuracy(eval_pred) -> dict[str, float]:
    """`compute_metrics` for classification: the fraction of argmax predictions equal to the labels."""
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def _episode_summary(per_episode: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(per_episode.mean()),
        "accuracy_ci95": float(1.96 * per_episode.std() / np.sqrt(len(per_episode))),
        "episodes": len(per_episode),
    }


def episode_accuracy(eval_pred) -> dict[str, float]:
    """`compute_metrics` for few-shot episodes (logits `[E, Q, N]`, labels `[E, Q]`): the mean accuracy over episodes
    and the half-width of its 95% confidence interval, `1.96 * std / sqrt(E)`, as few-shot papers report it."""
    logits, labels = eval_pred
    return _episode_summary((np.argmax(logits, axis=-1) == labels).mean(axis=-1))


@torch.no_grad()
def evaluate_episodes(model, episodes, batch_size: int = 256, episodes_per_batch: int = 50) -> dict[str, float]:
    """Few-shot test accuracy of a [`~metatrain.models.FewShotClassifier`] in evaluation mode on the episodes of an
    [`~metatrain.data.EpisodeDataset`], from features computed once per image.

    In evaluation mode an image's features do not depend on the episode it is in (batch norm uses its running
    statistics), so each image of the test domains goes through the backbone once and every episode reads its support
    and query features from that cache: the same logits as `Trainer.evaluate` on the same episodes with
    [`episode_accuracy`], without embedding each image once per episode it appears in (600 5-way 5-shot episodes
    with 15 queries embed 60,000 images; a 540-image domain needs 540).

    Returns:
        `dict`: `accuracy`, `accuracy_ci95` and `episodes`, as [`episode_accuracy`].
    """
    device = next(model.parameters()).device
    n_way, shots = episodes.n_way, episodes.k_shot
    support_labels = torch.arange(n_way, device=device).repeat_interleave(shots)
    query_labels = torch.arange(n_way).repeat_interleave(episodes.n_query).numpy()
    accuracies = []
    with evaluation_mode(model):
        features = {}
        for name, domain in episodes.domains.items():
            chunks = []
            for start in range(0, len(domain), batch_size):
                images = stack_images(domain[start : start + batch_size][episodes.image_key])
                chunks.append(model.embed(images.to(device)))
            features[name] = torch.cat(chunks)
        for start in range(0, len(episodes), episodes_per_batch):
            drawn = [episodes.draw(i) for i in range(start, min(start + episodes_per_batch, len(episodes)))]
            support = torch.stack([features[n][torch.as_tensor(picks[:, :shots].reshape(-1))] for n, picks in drawn])
            query = torch.stack([features[n][torch.as_tensor(picks[:, shots:].reshape(-1))] for n, picks in drawn])
            logits = model.head(support, support_labels.expand(len(drawn), -1), query)
            accuracies += list((logits.argmax(-1).cpu().numpy() == query_labels).mean(-1))
    return _episode_summary(np.asarray(accuracies))


def resumes_last_checkpoints(args: TrainingArguments) -> bool:
    """Whether `args.resume_from_checkpoint` is `true`: every run resumes from the last checkpoint in its own
    `output_dir` (a path instead names the one checkpoint of a single run)."""
    value = args.resume_from_checkpoint
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _checkpoint_path(args: TrainingArguments) -> str | None:
    value = args.resume_from_checkpoint
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false")):
        return None
    return None if resumes_last_checkpoints(args) else value


def resumes(args: TrainingArguments) -> bool:
    """Whether `args.resume_from_checkpoint` asks to resume at all: `true`, or a checkpoint path."""
    return resumes_last_checkpoints(args) or _checkpoint_path(args) is not None


def check_checkpoint_belongs(checkpoint: str, output_dir: str) -> None:
    """Raises a `ValueError` unless the checkpoint folder `checkpoint` is in `output_dir` (real paths compared): a
    checkpoint of another run (another method, seed or recipe) can have meta-state of the same shapes and would
    resume silently."""
    parent = os.path.dirname(os.path.realpath(checkpoint))
    if parent != os.path.realpath(output_dir):
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} is a checkpoint of the run in {parent}, not of this run, whose "
            f"output_dir is {output_dir}: pass a checkpoint of this run (a `{PREFIX_CHECKPOINT_DIR}-<step>` folder "
            "in its output_dir, or `true` for the last one there), or select the run (method, seed...) the "
            "checkpoint belongs to."
        )


def check_resume(args: TrainingArguments, **grid: Sequence[Any]) -> None:
    """Checks `args.resume_from_checkpoint` against a recipe's grid of runs, before any run starts.

    `true` resumes every run from the last checkpoint in its own `output_dir` (and keeps the results of the runs that
    had finished, see [`run_grid`]); a checkpoint path is one run's, so it is accepted only when the grid has a single
    run.

    Args:
        grid (`Sequence`): the values of each axis of the grid, by the flag that sets them, e.g.
            `seeds=[0, 1], methods=["baseline"]`.

    Raises:
        `ValueError`: a path given to a grid of several runs, or a path that is not a checkpoint folder.
    """
    path = _checkpoint_path(args)
    if path is None:
        return
    runs = math.prod(len(values) for values in grid.values())
    if runs > 1:
        axes = " x ".join(f"{len(values)} {name} {list(values)}" for name, values in grid.items())
        pick = " ".join(f"--{name} {values[0]}" for name, values in grid.items())
        raise ValueError(
            f"--resume_from_checkpoint {path} names one checkpoint, but the grid has {runs} runs ({axes}), each with "
            "its own output_dir: pass `--resume_from_checkpoint true` to resume every run from the last checkpoint in "
            f"its own output_dir, or select the run the checkpoint belongs to (e.g. {pick})."
        )
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        raise ValueError(
            f"--resume_from_checkpoint {path} is not a checkpoint: no {TRAINER_STATE_NAME} in it (pass a "
            f"`{PREFIX_CHECKPOINT_DIR}-<step>` folder, or `true` for the last one in the run's output_dir)."
        )


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint (`checkpoint-<step>` with its `trainer_state.json`) in `output_dir`, or `None`;
    a newer one without its state (a save that was interrupted) is passed over, with a warning."""
    if not os.path.isdir(output_dir):
        return None
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    steps = sorted(
        (int(name[len(prefix) :]), name) for name in os.listdir(output_dir)
        if name.startswith(prefix) and name[len(prefix) :].isdigit() and os.path.isdir(os.path.join(output_dir, name))
    )  # fmt: skip
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return path
        logger.warning("%s has no %s (its save was interrupted): passed over.", path, TRAINER_STATE_NAME)
    return None


def train_or_resume(trainer: Trainer) -> tuple[TrainOutput, dict[str, Any] | None]:
    """Trains `trainer`, resuming as its `args.resume_from_checkpoint` says (which `Trainer` itself ignores), and
    logs where the run starts.

    `true`: from the last checkpoint in `args.output_dir` (see [`last_checkpoint`]), or from step 0 if there is none;
    a path (checked by [`check_resume`]): from that checkpoint, which must be in `args.output_dir`; none: from step 0,
    with a warning if `output_dir` already holds checkpoints (they are overwritten as the new run reaches their steps).

    Returns:
        `tuple`: `Trainer.train`'s output, and `{"checkpoint": path, "global_step": step}` of the checkpoint the run
        resumed from (`None` for a run from step 0).

    Raises:
        `ValueError`: a checkpoint path that is not in `args.output_dir` (see [`check_checkpoint_belongs`]).
    """
    args = trainer.args
    found = last_checkpoint(args.output_dir)
    checkpoint = found if resumes_last_checkpoints(args) else _checkpoint_path(args)
    if checkpoint is not None:
        check_checkpoint_belongs(checkpoint, args.output_dir)
    if checkpoint is None:
        if args.should_log and resumes_last_checkpoints(args):
            logger.warning("No checkpoint in %s to resume from: training from step 0.", args.output_dir)
        elif args.should_log and found is not None:
            logger.warning(
                "%s already holds %s: training from step 0 and overwriting its checkpoints (pass "
                "`--resume_from_checkpoint true` to continue it instead).", args.output_dir, found,
            )  # fmt: skip
        return trainer.train(), None
    step = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).global_step
    if args.should_log:
        logger.warning("Resuming %s from %s at global step %d.", args.output_dir, checkpoint, step)
    return trainer.train(resume_from_checkpoint=checkpoint), {"checkpoint": checkpoint, "global_step": step}


def train_and_measure(trainer: Trainer) -> dict[str, Any]:
    """Trains `trainer` (resuming as [`train_or_resume`]) and returns what a recipe reports of the cost:
    `seconds_per_step` (of the steps this call took), the mean `meta_step_seconds` and `meta_step_memory_mb` over the
    run's meta steps (`None` for a trainer without meta step, or without `meta_profile_memory`), `memory_kind`, the
    run's `peak_cuda_memory_mb` on a GPU, `meta_steps_skipped`, the `meta_step_position` the trainer ran, and
    `resumed_from` (the checkpoint and its global step, or `None`)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    output, resumed = train_or_resume(trainer)
    steps = trainer.state.global_step - (resumed["global_step"] if resumed else 0)
    statistics = getattr(trainer, "meta_statistics", None)  # a MetaTrainer's, over the run (resumes included)
    means = statistics.means() if statistics is not None else {}
    return {
        "seconds_per_step": output.metrics["train_runtime"] / max(steps, 1),
        "meta_step_seconds": means.get("meta_step_seconds"),
        "meta_step_memory_mb": means.get("meta_step_memory_mb"),
        "memory_kind": MemoryMeter(trainer.args.device).kind,
        "peak_cuda_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "meta_steps_skipped": statistics.skipped if statistics is not None else None,
        "meta_step_position": getattr(trainer, "meta_step_position", None),
        "resumed_from": resumed,
    }


def method_trainer(
    method: str,
    methods: Mapping[str, str | None],
    method_options: Mapping[str, Mapping[str, Any]],
    training_args: TrainingArguments,
    seed: int,
    *,
    run_dir: Sequence[str] = (),
    meta_dataset: Any = None,
    meta_module: Callable[[], torch.nn.Module] | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """The trainer of one run of a recipe's `method`: a [`PerSampleLossTrainer`] for a method without estimator
    (`methods[method]` is `None`), else a [`MetaTrainer`] with `meta_dataset` and the module `meta_module()` builds
    (called only then: attaching changes the model). Its arguments are `training_args` with the run's `output_dir`
    (`output_dir/*run_dir/method/seed{seed}`), `seed`, and the method's estimator and options ([`method_estimator`]).

    Args:
        trainer_kwargs: passed to the trainer (`model`, `train_dataset`, `eval_dataset`, `compute_metrics`, ...).
    """
    run_args = dataclasses.replace(
        training_args,
        output_dir=os.path.join(training_args.output_dir, *run_dir, method, f"seed{seed}"),
        seed=seed,
        **method_estimator(method, methods, method_options, training_args),
    )
    if methods[method] is None:
        return PerSampleLossTrainer(args=run_args, **trainer_kwargs)
    return MetaTrainer(args=run_args, meta_dataset=meta_dataset, meta_module=meta_module(), **trainer_kwargs)


def parse_method_options(value: dict | str | None, methods: Mapping[str, str | None]) -> dict[str, dict[str, Any]]:
    """A recipe's `method_options`, checked: for each of its methods that runs an estimator, the options of that
    estimator, e.g. `{"mwn_evograd": {"population": 2, "sigma": 0.001, "temperature": 0.05}}` (a dict, or its JSON
    string as a flag gives it; `None` is no options). See [`method_estimator`] for how they reach a run.

    Args:
        methods (`Mapping[str, str | None]`): the recipe's methods and the estimator each runs (`None`: none).

    Raises:
        `ValueError`: not JSON, not a dict of dicts, or a key that is not a method with an estimator.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"`method_options={value!r}` is not valid JSON ({err}); pass e.g. "
                '\'{"mwn_evograd": {"population": 2, "sigma": 0.001}}\'.'
            ) from err
    value = {} if value is None else value
    allowed = [method for method, estimator in methods.items() if estimator is not None]
    if not isinstance(value, dict) or not all(isinstance(options, dict) for options in value.values()):
        raise ValueError(f"`method_options` must map a method to a dict of its estimator's options, got {value!r}.")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"`method_options` names {unknown}, which run no estimator: choose from {allowed}.")
    return {method: dict(options) for method, options in value.items()}


def method_estimator(
    method: str,
    methods: Mapping[str, str | None],
    method_options: Mapping[str, Mapping[str, Any]],
    training_args: Any,
) -> dict[str, Any]:
    """The `hypergradient` and `hypergradient_kwargs` of a recipe's run of `method`, to replace in its
    `training_args`.

    The estimator is the one `methods[method]` names (a method without one keeps `training_args.hypergradient`, which
    it does not use, and gets no options). Its options are `method_options[method]` (the recipe's, from its config),
    updated with `training_args.hypergradient_kwargs` when `training_args.hypergradient` names the same estimator:
    `--hypergradient_kwargs '{"sigma": 0.01}'` (EvoGrad being the default `hypergradient`) changes `sigma` for every
    EvoGrad method and keeps the rest of each one's options, and `--hypergradient neumann --hypergradient_kwargs
    '{"terms": 5}'` reaches the Neumann methods only (other estimators would reject the options). The flag wins over
    the config so that no option a user passes is dropped.
    """
    estimator = methods[method]
    if estimator is None:
        return {"hypergradient": training_args.hypergradient, "hypergradient_kwargs": {}}
    options = dict(method_options.get(method, {}))
    if estimator == training_args.hypergradient:
        overrides = dict(training_args.hypergradient_kwargs or {})
        changed = {key: value for key, value in overrides.items() if key in options and options[key] != value}
        if changed:
            logger.info("%s: hypergradient_kwargs %s override its method_options.", method, changed)
        options.update(overrides)
    return {"hypergradient": estimator, "hypergradient_kwargs": options}


def check_methods(methods: Iterable[str], allowed: Iterable[str]) -> None:
    """Raises a `ValueError` naming the methods that are not in `allowed`."""
    unknown = sorted(set(methods) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}: choose from {list(allowed)}.")


def methods_field(methods: Mapping[str, str | None]) -> Any:
    """The `methods` field of a [`GridArguments`] subclass, with help that lists the recipe's methods."""
    return field(
        default=None,
        metadata={"help": f"Methods to run, each on every seed: any of {list(methods)}. None: all of them."},
    )


@dataclass
class GridArguments:
    """Arguments of a recipe that runs each of its methods on each seed: which methods and seeds, the methods'
    estimator options and where the results go.

    A recipe subclasses it, names its methods in `METHODS` (each method and the estimator it runs, `None` for none)
    and re-declares the fields whose default it changes (a re-declared field keeps its place among the flags).
    `__post_init__` checks `methods` against `METHODS` and parses `method_options` ([`parse_method_options`]).
    """

    METHODS: ClassVar[Mapping[str, str | None]] = {}

    methods: list[str] | None = field(
        default=None,
        metadata={"help": "Methods to run, each on every seed: any of the recipe's `METHODS`. None: all of them."},
    )  # a recipe re-declares it with `methods_field(METHODS)`, so that its help lists the names
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One run per seed and method."})
    method_options: dict[str, dict[str, Any]] | str | None = field(
        default=None, metadata={"help": METHOD_OPTIONS_HELP}
    )
    results_dir: str = field(default="outputs", metadata={"help": "Where results.json and plots go."})

    def __post_init__(self):
        if self.methods is None:
            self.methods = list(self.METHODS)
        check_methods(self.methods, self.METHODS)
        self.method_options = parse_method_options(self.method_options, self.METHODS)

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a dict (the `config` of results.json): the recipe's own fields, then the grid's."""
        values = dataclasses.asdict(self)
        grid = [f.name for f in dataclasses.fields(GridArguments)]
        return {**{k: v for k, v in values.items() if k not in grid}, **{k: values[k] for k in grid}}


def run_grid(
    seeds: Sequence[int],
    methods: Sequence[str],
    load_data: Callable[[int], Any],
    run: Callable[[str, int, Any], tuple[dict[str, Any], Trainer]],
    results_dir: str | None = None,
    training_args: TrainingArguments | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Runs every method on every seed, the data loaded once per seed and shared by the methods.

    Args:
        results_dir (`str`, *optional*): where the main process writes `runs_done.json`, the results of the runs
            finished so far, after every run (whole or not at all): an interrupted or crashed grid keeps what it
            measured.
        training_args (`TrainingArguments`, *optional*): the recipe's. With `resume_from_checkpoint` `true`, the runs
            `runs_done.json` holds (by seed and method) finished before: their results are kept and they do not run
            again (a seed whose runs all finished loads no data); the others resume in `run` (see
            [`train_or_resume`]).

    Returns:
        `tuple[list[dict], bool]`: the result of each run, and whether this process is the main one (the one that
        writes files under `accelerate launch`).

    Raises:
        `ValueError`: resuming with a `runs_done.json` that cannot be read (the error says to delete it).
    """
    done_path = None if results_dir is None else os.path.join(results_dir, RUNS_DONE_NAME)
    resume = training_args is not None and resumes_last_checkpoints(training_args)
    done = _load_runs_done(done_path) if resume and os.path.isfile(done_path or "") else {}
    results, is_main = [], training_args is None or training_args.process_index == 0
    for seed in seeds:
        data = None if all((seed, method) in done for method in methods) else load_data(seed)
        for method in methods:
            if (seed, method) in done:
                if is_main:
                    logger.warning("Run %s, seed %d finished before: result kept from %s.", method, seed, done_path)
                results.append(done[(seed, method)])
            else:
                result, trainer = run(method, seed, data)
                results.append(result)
                is_main = trainer.is_world_process_zero()
            if done_path is not None and is_main:
                _write_json_atomically(done_path, results)
    return results, is_main


def _load_runs_done(path: str) -> dict[tuple[int, str], dict[str, Any]]:
    """The results `runs_done.json` at `path` holds, by seed and method; a `ValueError` naming the file and the fix
    if it cannot be read."""
    try:
        with open(path) as f:
            return {(r["seed"], r["method"]): r for r in json.load(f)}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"Cannot read the finished runs' results from {path} ({type(err).__name__}: {err}). Delete it to run "
            "those runs again (with `--resume_from_checkpoint true`, each from the last checkpoint in its output_dir)."
        ) from err


def _write_json_atomically(path: str, value: Any) -> None:
    """Writes `value` to `path` through a temporary file in the same folder, moved into place once complete: a crash
    mid-write leaves the previous file whole."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def per_method(results: Sequence[dict[str, Any]], key: str) -> dict[str, list[Any]]:
    """`{method: [run[key] for each of its runs]}`, methods in order of appearance; runs without `key` are left out
    (e.g. the per-seed curves a recipe plots)."""
    values: dict[str, list[Any]] = {}
    for r in results:
        if key in r:
            values.setdefault(r["method"], []).append(r[key])
    return values


def summarize(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Per method (in order of appearance), the mean and standard deviation over seeds of each of `keys`, as
    `<key>_mean` and `<key>_std`; runs without a value (or with `None`) are left out; a key no run has is `None`.
    The standard deviation is the spread of the seeds themselves (`ddof=0`), not an estimate for a population of seeds;
    for intervals and tests use [`paired_differences`], whose `std` is the sample one (`ddof=1`)."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        summary[method] = {}
        for key in keys:
            values = [r[key] for r in runs if r.get(key) is not None]
            summary[method][f"{key}_mean"] = float(np.mean(values)) if values else None
            summary[method][f"{key}_std"] = float(np.std(values)) if values else None
    return summary


def paired_differences(
    results: Sequence[dict[str, Any]], baseline: str, keys: Sequence[str]
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per method other than `baseline`, each of `keys` minus the baseline's value in the run of the same seed, over
    the seeds both have: `mean`, `std`, the half-width `ci95` of a t confidence interval for the mean difference
    (`None` with fewer than 2 seeds), `n` and `positive` (how many seeds the method is above the baseline on).

    Seeds share data, episodes and initialization across methods, so the paired difference removes what a seed does
    to every method alike: its interval is the honest test of "method beats baseline" when the spread over seeds is
    larger than the gap between methods.
    """
    stats = require("scipy.stats", "recipes", "Paired differences over seeds")
    base = {r["seed"]: r for r in results if r["method"] == baseline}
    if not base:
        methods = list(dict.fromkeys(r["method"] for r in results))
        raise ValueError(f"No run of the baseline {baseline!r} to pair with: the runs' methods are {methods}.")
    report: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for method in dict.fromkeys(r["method"] for r in results if r["method"] != baseline):
        report[method] = {}
        for key in keys:
            diffs = np.array([
                r[key] - base[r["seed"]][key] for r in results
                if r["method"] == method and r["seed"] in base
                and r.get(key) is not None and base[r["seed"]].get(key) is not None
            ])  # fmt: skip
            n = len(diffs)
            ci = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / np.sqrt(n)) if n > 1 else None
            report[method][key] = {
                "mean": float(diffs.mean()) if n else None, "std": float(diffs.std(ddof=1)) if n > 1 else None,
                "ci95": ci, "n": n, "positive": int((diffs > 0).sum()),
            }  # fmt: skip
    return report


def write_results(results_dir: str, report: dict[str, Any], allow_nan: bool = True) -> str:
    """Writes `report` to `<results_dir>/results.json` (creating the folder) and returns the path; with
    `allow_nan=False` a NaN or infinity in it raises a `ValueError` instead of being written as invalid JSON."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, "results.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, allow_nan=allow_nan)
    return path


def run_and_report(
    args: GridArguments,
    training_args: TrainingArguments,
    load_data: Callable[[int], Any],
    run: Callable[[str, int, Any], tuple[dict[str, Any], Trainer]],
    summary_keys: Sequence[str],
    across_runs: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Runs a recipe's grid of `args.methods` x `args.seeds` and reports it: the resumption is checked
    ([`check_resume`]), the runs run ([`run_grid`], `runs_done.json` in `args.results_dir`), `across_runs` adds to
    each run's result what needs the others (e.g. a gap between two methods of the same seed), and they are summarized
    over seeds ([`summarize`] of `summary_keys`); the main process writes the report to `<results_dir>/results.json`
    and prints its summary.

    Returns:
        `tuple[dict, bool]`: the report (`config`, `summary` and `runs`), and whether this process is the main one
        (the one that writes files, e.g. the recipe's plots).
    """
    check_resume(training_args, seeds=args.seeds, methods=args.methods)
    results, is_main = run_grid(args.seeds, args.methods, load_data, run, args.results_dir, training_args)
    if across_runs is not None:
        across_runs(results)
    summary = summarize(results, summary_keys)
    report = {"config": args.to_dict(), "summary": summary, "runs": results}
    if is_main:
        write_results(args.results_dir, report)
        print(json.dumps(summary, indent=2))
    return report, is_main
