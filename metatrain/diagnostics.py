"""Compare hypergradient estimators on one problem: agreement with a reference estimator, wall time and memory.

[`compare_estimators`] runs each estimator on the same [`~metatrain.estimators.HypergradientProblem`] and reports
how its hypergradient lines up with a reference (T1-T2 by default) and what a call costs in time and memory;
[`format_table`] turns the reports into a Markdown table for the docs. [`~metatrain.objective.MetaObjective`] builds
the problem of a model and a meta-module as [`MetaTrainer`]'s meta step does. For example:

```python
from metatrain.diagnostics import compare_estimators, format_table
from metatrain.modules import MetaWeightNet
from metatrain.objective import MetaObjective

weighter = MetaWeightNet()
problem = MetaObjective(model.train(), weighter).problem((x_train, y_train), (x_meta, y_meta), lr=0.1)
reports = compare_estimators(
    problem, ["t1t2", "first_order", ("evograd", {"population": 64, "sigma": "auto"})], repeats=10
)
print(format_table(reports))
```
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .estimators import HypergradientEstimator, HypergradientProblem, HypergradientResult, create_estimator
from .profiling import MemoryMeter
from .tables import markdown_table
from .utils import cosine, flatten, ratio

EstimatorSpec = str | tuple[str, Mapping[str, Any]] | HypergradientEstimator


@dataclass
class EstimatorReport:
    """How one estimator compares with the reference on one problem.

    Cosines and norm ratios are computed in float64 on the hypergradient flattened over all meta-parameters.
    A cosine with a zero vector is undefined and reported as NaN, not 0: a zero hypergradient (`first_order` when
    the meta loss does not depend on the meta-parameters directly) is not orthogonal to the reference, it has no
    direction; `norm_ratio` = 0 says what happened. A ratio to a zero reference norm is NaN too.

    Args:
        name (`str`): the estimator's registered name.
        options (`dict[str, Any]`): the options it was built with (for an instance, its public attributes).
        cosine (`float`): cosine of single estimates with the reference, averaged over the repeats.
        cosine_of_mean (`float`): cosine of the mean of the repeats with the reference: for a stochastic
            estimator it shows whether the estimate is right on average; for a deterministic one it is `cosine`.
        norm_ratio (`float`): norm of single estimates over the reference's norm, averaged over the repeats.
        norm_ratio_of_mean (`float`): norm of the mean of the repeats over the reference's norm.
        norm (`float`): norm of single estimates, averaged over the repeats.
        reference (`str`): label of the reference estimator, e.g. `"t1t2"`.
        reference_norm (`float`): norm of the reference hypergradient.
        seconds (`float`): median wall time of one call over the repeats, after the warm-up calls.
        memory_bytes (`int`): memory of one call measured by [`~metatrain.profiling.MemoryMeter`].
        memory_kind (`str`): what `memory_bytes` measures (`"cuda_peak_allocated"` or `"cpu_peak_saved_for_backward"`);
            compare figures of one kind only.
        repeats (`int`): number of timed calls the statistics are taken over.
        meta_loss (`float`): the meta loss the first timed call differentiated.
        hypergradient (`torch.Tensor`, *optional*): the mean of the repeats, flattened, float64 on CPU; left out
            of [`~EstimatorReport.to_dict`].
    """

    name: str
    options: dict[str, Any]
    cosine: float
    cosine_of_mean: float
    norm_ratio: float
    norm_ratio_of_mean: float
    norm: float
    reference: str
    reference_norm: float
    seconds: float
    memory_bytes: int
    memory_kind: str
    repeats: int
    meta_loss: float
    hypergradient: torch.Tensor | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The name with its options, e.g. `evograd(population=64, sigma='auto')`: tells apart two rows of one
        estimator."""
        return _label(self.name, self.options)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values for a results JSON: `label` added, `hypergradient` left out, and NaN
        written as `None` so that `json.dumps(..., allow_nan=False)` accepts it."""
        out: dict[str, Any] = {"label": self.label}
        for f in fields(self):
            if f.name == "hypergradient":
                continue
            value = getattr(self, f.name)
            out[f.name] = None if isinstance(value, float) and math.isnan(value) else value
        out["options"] = dict(self.options)
        return out


def _label(name: str, options: Mapping[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else name


def _build(spec: Any) -> tuple[str, dict[str, Any], HypergradientEstimator]:
    """`(name, options, estimator)` from a name, a `(name, options)` pair or an estimator instance."""
    if isinstance(spec, HypergradientEstimator):
        options = {k: v for k, v in vars(spec).items() if not k.startswith("_")}
        return spec.name or type(spec).__name__, options, spec
    if isinstance(spec, str):
        return spec, {}, create_estimator(spec)
    if (
        isinstance(spec, (tuple, list))
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], Mapping)
    ):
        return spec[0], dict(spec[1]), create_estimator(spec[0], **spec[1])
    raise ValueError(
        f"Cannot build a hypergradient estimator from {spec!r}: give a registered name (`'t1t2'`), a "
        "`(name, options)` pair (`('evograd', {'population': 8})`) or a `HypergradientEstimator` instance."
    )


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so wall-clock timings include it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(
    call: Callable[[], HypergradientResult], repeats: int, warmup: int, device: torch.device, existing: list
) -> tuple[list[HypergradientResult], list[float], MemoryMeter]:
    """`warmup` untimed calls, `repeats` timed ones (results and seconds), then one inside a `MemoryMeter` that does
    not count the `existing` tensors (the problem's weights and batches)."""
    for _ in range(warmup):
        call()
    results, seconds = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        results.append(call())
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    with MemoryMeter(device, exclude=existing) as meter:
        call()
    return results, seconds, meter


def _restoring_state(estimator: HypergradientEstimator, work: Callable[[], Any]) -> Any:
    """Runs `work` and puts the estimator's state back as it was, whatever happens."""
    state = copy.deepcopy(estimator.state_dict())
    try:
        return work()
    finally:
        estimator.load_state_dict(state)


def compare_estimators(
    problem: HypergradientProblem,
    estimators: Sequence[EstimatorSpec],
    reference: EstimatorSpec = "t1t2",
    repeats: int = 1,
    device: torch.device | str | None = None,
    warmup: int = 1,
    hold_weighter_inputs: bool = True,
) -> list[EstimatorReport]:
    """Runs each estimator on one problem and reports its agreement with `reference`, its time and its memory.

    The reference is computed once (a stochastic reference is thus a single draw). Each estimator then gets
    `warmup` untimed calls, `repeats` timed calls (their hypergradients give the cosines and norms; time is the
    median) and one more call inside a [`~metatrain.profiling.MemoryMeter`], kept apart because the CPU meter's
    hooks slow the call down. Nothing is seeded: seed `torch` first for reproducible stochastic estimates. A
    stateful estimator sees every call as a new step on the same weights; its state is restored afterwards, so an
    instance passed in is left as it was.

    A problem built by [`~metatrain.objective.MetaObjective.problem`] holds a loss weighter's input at the current
    weights for the estimators that perturb the weights (EvoGrad, `t1t2_fd`), as [`MetaTrainer`]'s meta step does,
    so that every estimator targets MetaTrainer's objective; the held losses are computed once, in the first call
    that needs them.

    Args:
        problem ([`~metatrain.estimators.HypergradientProblem`]): the problem; its `meta_params` must be leaf
            tensors with `requires_grad=True`. [`~metatrain.objective.MetaObjective`] builds one for a model.
        estimators (`Sequence[str | tuple[str, Mapping[str, Any]] | HypergradientEstimator]`):
            What to compare: registered names (see `metatrain.estimators.ESTIMATORS`), `(name, options)` pairs, or
            built estimators. One report each, in this order.
        reference (`str`, `tuple[str, Mapping[str, Any]]` or `HypergradientEstimator`, *optional*,
            defaults to `"t1t2"`):
            The estimator every other is compared with.
        repeats (`int`, *optional*, defaults to 1):
            Timed calls per estimator; above 1 a stochastic estimator's `cosine_of_mean` and `cosine` differ.
        device (`torch.device` or `str`, *optional*):
            Where the work runs, for synchronisation and the memory meter; defaults to the device of the first
            weight (or meta-parameter).
        warmup (`int`, *optional*, defaults to 1):
            Untimed calls per estimator before the timed ones.
        hold_weighter_inputs (`bool`, *optional*, defaults to `True`):
            Whether to keep the problem's `held_train_loss`; `False` gives every estimator `train_loss` itself, whose
            weighting net sees the losses at whatever weights an estimator evaluates (for EvoGrad and `t1t2_fd` a
            different objective than MetaTrainer's).

    Returns:
        `list[EstimatorReport]`: one report per entry of `estimators`.

    Raises:
        `ValueError`: for an empty `estimators`, an unknown name or option (as
            [`~metatrain.estimators.create_estimator`] raises it), `repeats < 1`, `warmup < 0`, or meta-parameters
            that do not require grad.
    """
    if isinstance(estimators, (str, HypergradientEstimator)) or not estimators:
        raise ValueError(
            f"`estimators` must be a non-empty list of estimator names, (name, options) pairs or estimators, "
            f"got {estimators!r}."
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be an integer >= 1, got repeats={repeats!r}.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`warmup` must be an integer >= 0, got warmup={warmup!r}.")
    meta_params = list(problem.meta_params)
    if not meta_params:
        raise ValueError(
            "`meta_params` is empty: pass the meta-module's parameters, e.g. `list(weighter.parameters())`."
        )
    frozen = [i for i, p in enumerate(meta_params) if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"meta_params {frozen} do not require grad, so every hypergradient would be zero. Call "
            "`p.requires_grad_(True)` on them first (MetaTrainer turns it off on the meta-module it trains)."
        )
    # build everything before computing anything, so that a typo fails at once
    built = [_build(spec) for spec in estimators]
    reference_name, reference_options, reference_estimator = _build(reference)
    if device is None:
        device = next(iter(problem.params.values()), meta_params[0]).device
    device = torch.device(device)
    if not hold_weighter_inputs:
        problem = dataclasses.replace(problem, held_train_loss=None)
    batches = [*tree_flatten(problem.train_batch)[0], *tree_flatten(problem.meta_batch)[0]]
    existing = [*problem.params.values(), *meta_params, *batches]

    def caller(estimator: HypergradientEstimator) -> Callable[[], HypergradientResult]:
        return lambda: estimator.estimate(problem)

    ref = flatten(_restoring_state(reference_estimator, caller(reference_estimator)).grads)
    ref_norm = float(ref.norm())

    reports = []
    for name, options, estimator in built:
        call = caller(estimator)
        measure = partial(_measure, call, repeats, warmup, device, existing)
        results, seconds, meter = _restoring_state(estimator, measure)
        flats = [flatten(r.grads) for r in results]
        mean = torch.stack(flats).mean(0)
        norms = [float(g.norm()) for g in flats]
        reports.append(
            EstimatorReport(
                name=name,
                options=options,
                cosine=statistics.fmean(cosine(g, ref) for g in flats),
                cosine_of_mean=cosine(mean, ref),
                norm_ratio=statistics.fmean(ratio(n, ref_norm) for n in norms),
                norm_ratio_of_mean=ratio(float(mean.norm()), ref_norm),
                norm=statistics.fmean(norms),
                reference=_label(reference_name, reference_options),
                reference_norm=ref_norm,
                seconds=statistics.median(seconds),
                memory_bytes=int(meter.peak_bytes),
                memory_kind=meter.kind,
                repeats=repeats,
                meta_loss=float(results[0].meta_loss),
                hypergradient=mean.cpu(),
            )
        )
    return reports


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def format_table(reports: Sequence[EstimatorReport]) -> str:
    """A Markdown table of reports, one row per report, for the docs.

    Time is in milliseconds; memory in the largest unit (B, KiB, MiB, GiB) that keeps every row at 1 or more,
    with its kind in the header when all rows share it (else beside each figure). NaN is written `n/a`.

    Args:
        reports (`Sequence[EstimatorReport]`): what [`compare_estimators`] returned.

    Returns:
        `str`: the table, header and separator lines included, without a trailing newline.
    """
    units = [("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)]
    positive = [r.memory_bytes for r in reports if r.memory_bytes > 0]
    unit, scale = next(((u, s) for u, s in units if positive and min(positive) >= s), units[-1])
    kinds = {r.memory_kind for r in reports}
    shared_kind = kinds.pop() if len(kinds) == 1 else None
    memory_header = f"memory ({unit}, {shared_kind})" if shared_kind else f"memory ({unit})"
    header = [
        "estimator", "cosine", "cosine of mean", "norm ratio", "norm ratio of mean", "time (ms)", memory_header,
    ]  # fmt: skip
    rows = []
    for r in reports:
        memory = f"{r.memory_bytes / scale:.1f}" if scale > 1 else str(r.memory_bytes)
        if shared_kind is None:
            memory += f" ({r.memory_kind})"
        rows.append([
            r.label, _number(r.cosine), _number(r.cosine_of_mean), _number(r.norm_ratio),
            _number(r.norm_ratio_of_mean), f"{r.seconds * 1e3:.2f}", memory,
        ])  # fmt: skip
    return markdown_table(header, rows, right_from=1)


def __getattr__(name: str) -> Any:
    if name in ("model_losses", "TrainLoss"):
        raise AttributeError(
            f"metatrain.diagnostics.{name} was replaced by metatrain.objective.MetaObjective: "
            "`MetaObjective(model, loss_weighter).problem(train_batch, meta_batch, lr)` gives the problem that "
            "`compare_estimators(problem, estimators)` and every estimator take."
        )
    raise AttributeError(f"module 'metatrain.diagnostics' has no attribute {name!r}")
