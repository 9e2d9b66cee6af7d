"""Compare hypergradient estimators on one problem: agreement with a reference estimator, wall time and memory.

[`compare_estimators`] runs each estimator on the same weights, meta-parameters and batch pair and reports how
its hypergradient lines up with a reference (T1-T2 by default), what a call costs in time and memory;
[`format_table`] turns the reports into a Markdown table for the docs; [`model_losses`] builds the loss closures
for a plain classifier with a loss weighter, the way [`MetaTrainer`] does in its meta step (with the weighting
net's input held at the current weights for EvoGrad and `t1t2_fd`, see [`TrainLoss.holding`]). For example:

```python
from metatrain.diagnostics import compare_estimators, format_table, model_losses
from metatrain.modules import MetaWeightNet

weighter = MetaWeightNet()
params, train_loss, meta_loss = model_losses(model.train(), weighter)
reports = compare_estimators(
    params, list(weighter.parameters()), train_loss, meta_loss, (x_train, y_train), (x_meta, y_meta), lr=0.1,
    estimators=["t1t2", "first_order", ("evograd", {"population": 64, "sigma": "auto"})], repeats=10,
)
print(format_table(reports))
```
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from .estimators import HypergradientEstimator, HypergradientResult, create_estimator
from .estimators.functional import LossFn, ParamDict
from .losses import logits_of, per_sample_cross_entropy, weighted_mean
from .modules import LossWeighter
from .profiling import MemoryMeter

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


def flatten(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float64 CPU vector of a hypergradient given as one tensor per meta-parameter."""
    return torch.cat([g.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for g in grads])


def ratio(num: float, den: float) -> float:
    """`num / den`, NaN when `den` is not positive or either is not finite."""
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else math.nan


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity in [-1, 1], NaN when either vector is zero (undefined, not orthogonal) or not finite."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0 or not math.isfinite(na * nb):
        return math.nan
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


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
    params: ParamDict,
    meta_params: Sequence[torch.Tensor],
    train_loss: LossFn,
    meta_loss: LossFn,
    train_batch: Any,
    meta_batch: Any,
    lr: float | None,
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

    When `train_loss` has a `holding` method (the [`TrainLoss`] of [`model_losses`]), each call of each estimator
    (the reference too) gets `train_loss.holding(params, train_batch, estimator.perturbs_weights)`, the closure
    [`MetaTrainer`]'s meta step builds: estimators that perturb the weights (EvoGrad, `t1t2_fd`) then see the
    weighting net's input held at `params` on `train_batch`, so that every estimator targets MetaTrainer's objective.
    The held losses are computed once per call, inside the timed and metered call as in a meta step.

    Args:
        params, meta_params, train_loss, meta_loss, train_batch, meta_batch, lr:
            The problem, as [`~metatrain.estimators.HypergradientEstimator.estimate`] takes it. `meta_params` must
            be leaf tensors with `requires_grad=True`; [`model_losses`] builds the rest for a classifier.
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
            Whether to hold the weighting net's input as described above; `False` calls every estimator with
            `train_loss` itself, whose weighting net sees the losses at whatever weights an estimator evaluates
            (for EvoGrad and `t1t2_fd` a different objective than MetaTrainer's). No effect on a `train_loss`
            without `holding`.

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
    meta_params = list(meta_params)
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
        device = next(iter(params.values()), meta_params[0]).device
    device = torch.device(device)

    holding = getattr(train_loss, "holding", None) if hold_weighter_inputs else None
    existing = [*params.values(), *meta_params, *tree_flatten(train_batch)[0], *tree_flatten(meta_batch)[0]]

    def caller(estimator: HypergradientEstimator) -> Callable[[], HypergradientResult]:
        def call() -> HypergradientResult:
            # a new closure every call, like every meta step: the held losses belong to this call
            loss = train_loss if holding is None else holding(params, train_batch, estimator.perturbs_weights)
            return estimator.estimate(params, meta_params, loss, meta_loss, train_batch, meta_batch, lr)

        return call

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
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in reports:
        memory = f"{r.memory_bytes / scale:.1f}" if scale > 1 else str(r.memory_bytes)
        if shared_kind is None:
            memory += f" ({r.memory_kind})"
        cells = [
            r.label.replace("|", "\\|"),
            _number(r.cosine),
            _number(r.cosine_of_mean),
            _number(r.norm_ratio),
            _number(r.norm_ratio_of_mean),
            f"{r.seconds * 1e3:.2f}",
            memory,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class TrainLoss:
    """The training loss of [`model_losses`]: `train_loss(weights, batch)`, and [`~TrainLoss.holding`] for one step.

    Called directly it feeds the loss weighter the per-sample losses at the weights being evaluated (detached by the
    weighter), which is what MetaTrainer's base step and every autograd estimator see. [`~TrainLoss.holding`] gives
    the closure that [`MetaTrainer`]'s meta step builds for an estimator: for an estimator that perturbs the weights
    (`perturbs_weights`: EvoGrad, `t1t2_fd`), the weighter's input for the current training batch is held at the
    current weights.

    Args:
        per_sample (`Callable[[ParamDict, Any], torch.Tensor]`): per-sample losses `[B]` of a batch at some weights.
        loss_weighter (`LossWeighter`, *optional*): weights the per-sample losses; without it the loss is the mean.
    """

    def __init__(self, per_sample: Callable[[ParamDict, Any], torch.Tensor], loss_weighter: LossWeighter | None):
        self.per_sample = per_sample
        self.loss_weighter = loss_weighter

    def __call__(self, weights: ParamDict, batch: Any) -> torch.Tensor:
        losses = self.per_sample(weights, batch)
        return losses.mean() if self.loss_weighter is None else self.loss_weighter.weighted_loss(losses)

    def holding(self, params: ParamDict, train_batch: Any, perturbs_weights: bool = True) -> LossFn:
        """The training loss of one meta step at `params` on `train_batch`, as [`MetaTrainer`] builds it.

        With `perturbs_weights` (pass the estimator's attribute of that name) and a loss weighter, a call on the
        batch object `train_batch` itself (`batch is train_batch`, not an equal copy) feeds the weighter the
        per-sample losses at `params`, computed once under `torch.no_grad` on the first such call; a call on any
        other batch (reverse mode's remembered batches, HyperDistill's distilled batch) feeds it the losses at the
        weights being evaluated. Otherwise this is the plain training loss. Build a new one for every step (every
        `estimate` call): the held losses belong to `params`.

        Args:
            params (`ParamDict`): the current weights, those passed to `estimate`.
            train_batch: the current training batch, the object passed to `estimate`.
            perturbs_weights (`bool`, *optional*, defaults to `True`): whether the estimator evaluates the training
                loss at perturbed weights; for `False` the plain training loss is returned.

        Returns:
            `Callable[[ParamDict, Any], torch.Tensor]`: `train_loss(weights, batch)`.
        """
        if self.loss_weighter is None or not perturbs_weights:
            return self
        weighter, per_sample = self.loss_weighter, self.per_sample
        held: dict[str, torch.Tensor] = {}

        def train_loss(weights: ParamDict, batch: Any) -> torch.Tensor:
            losses = per_sample(weights, batch)
            if batch is not train_batch:
                return weighter.weighted_loss(losses)
            if "losses" not in held:
                with torch.no_grad():
                    held["losses"] = per_sample(params, batch)
            return weighted_mean(losses, weighter(held["losses"]))

        return train_loss


def model_losses(
    model: nn.Module,
    loss_weighter: LossWeighter | None = None,
    per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], TrainLoss, LossFn]:
    """The weights and loss closures of a classifier, for [`compare_estimators`] or any estimator.

    Mirrors the meta step of [`MetaTrainer`] without it: the model runs through `torch.func.functional_call` on
    the weights an estimator passes, with freshly cloned buffers at every call, so BatchNorm running statistics
    (and any other buffer) are never changed. The model runs in the mode it is in: call `model.train()` first to
    match MetaTrainer, which computes the hypergradient in training mode. The training loss is
    `sum(w * l) / sum(w)` with `w = loss_weighter(l)` over the per-sample losses `l`, or their mean without a
    weighter; the meta loss is always the plain mean.

    Which losses the weighting net sees: calling `train_loss` feeds it the (detached) per-sample losses at the
    weights being evaluated. [`MetaTrainer`] instead holds them at the current weights on the current training batch
    for estimators that perturb the weights (`perturbs_weights`: EvoGrad, `t1t2_fd`), which otherwise would
    differentiate through the weighting net's input, a different objective. `train_loss.holding(params, train_batch,
    estimator.perturbs_weights)` ([`TrainLoss.holding`]) builds that closure for one step, and [`compare_estimators`]
    uses it for every estimator when given this `train_loss` (unless `hold_weighter_inputs=False`), so that its
    numbers are those of MetaTrainer's objective. For the autograd estimators the two are the same.

    The meta-parameters are then the loss weighter's own parameters, `list(loss_weighter.parameters())`, which the
    training loss uses as they are: they must require grad.

    Args:
        model (`nn.Module`):
            The classifier, called as `model(inputs)` (or `model(*inputs)` for a tuple) and returning logits, a dict
            with `logits`, or an output with `.logits`.
        loss_weighter (`LossWeighter`, *optional*):
            Weights the per-sample training losses, e.g. [`~metatrain.modules.MetaWeightNet`].
        per_sample_loss (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`, *optional*):
            Maps logits and labels to per-example losses `[B]`; defaults to
            [`~metatrain.losses.per_sample_cross_entropy`], MetaTrainer's default (it computes in float32).

    Returns:
        `tuple[dict[str, torch.Tensor], TrainLoss, Callable]`: `params`, the detached trainable weights of `model`
        by name (weights not passed keep the model's own values), and `train_loss(weights, batch)` (a [`TrainLoss`],
        with its `holding` method), `meta_loss(weights, batch)` for batches `(inputs, labels)`.
    """
    if loss_weighter is not None and not isinstance(loss_weighter, LossWeighter):
        raise ValueError(
            f"`loss_weighter` must be a metatrain.modules.LossWeighter (e.g. MetaWeightNet), got "
            f"{type(loss_weighter).__name__}."
        )
    per_sample_loss = per_sample_loss or per_sample_cross_entropy
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def per_sample(weights: ParamDict, batch: Any) -> torch.Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"model_losses expects batches `(inputs, labels)`, got {type(batch).__name__}.")
        inputs, labels = batch
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        outputs = functional_call(model, {**buffers, **weights}, args)
        return per_sample_loss(logits_of(outputs), labels)

    def meta_loss(weights: ParamDict, batch: Any) -> torch.Tensor:
        return per_sample(weights, batch).mean()

    return params, TrainLoss(per_sample, loss_weighter), meta_loss
