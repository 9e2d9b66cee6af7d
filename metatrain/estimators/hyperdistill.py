"""HyperDistill: the whole-trajectory second-order term distilled into one JVP per step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._base import (
    HypergradientEstimator,
    HypergradientProblem,
    HypergradientResult,
    ParamDict,
    detached_copy,
    grads_or_zeros,
)
from ._lookahead import sgd_lookahead, sgd_unroll
from ._reverse_pass import meta_gradients, reverse_pass

BATCH_MIXING = ("subsample", "replace")
STATE_KEYS = ("step", "inner", "resets", "theta", "w_star", "d_star", "generator")


def _batch_sizes(batch: Any, where: str = "batch") -> list[int]:
    """Leading sizes of the tensors in a (nested) batch; raises for leaves that cannot be subsampled."""
    if batch is None:
        return []
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError(
                f"HyperDistill option batch_mixing='subsample' needs tensors with a batch dimension, but {where} is "
                f"a 0-dim tensor; use batch_mixing='replace' for such batches."
            )
        return [batch.shape[0]]
    if isinstance(batch, Mapping):
        return [n for k, v in batch.items() for n in _batch_sizes(v, f"{where}[{k!r}]")]
    if isinstance(batch, (list, tuple)):
        return [n for i, v in enumerate(batch) for n in _batch_sizes(v, f"{where}[{i}]")]
    raise ValueError(
        f"HyperDistill option batch_mixing='subsample' can subsample tensors, dicts, lists and tuples of them, but "
        f"{where} is a {type(batch).__name__}; use batch_mixing='replace' for such batches."
    )


def _concat_rows(kept: Any, new: Any, rows_kept: torch.Tensor, rows_new: torch.Tensor) -> Any:
    """The rows `rows_kept` of every tensor of `kept` followed by the rows `rows_new` of `new` (same structure)."""
    if isinstance(new, torch.Tensor) and isinstance(kept, torch.Tensor):
        if kept.shape[1:] != new.shape[1:]:
            raise ValueError(
                "HyperDistill option batch_mixing='subsample' mixes the rows of training batches, but their tensors "
                f"differ beyond the batch dimension ({tuple(kept.shape)} and {tuple(new.shape)}; dynamic padding?): "
                "pad every batch to one length (`padding='max_length'`) or use batch_mixing='replace'."
            )
        return torch.cat([kept[rows_kept.to(kept.device)], new[rows_new.to(new.device)].to(kept.device)])
    if new is None and kept is None:
        return None
    if isinstance(new, Mapping) and isinstance(kept, Mapping) and list(kept) == list(new):
        return {k: _concat_rows(kept[k], new[k], rows_kept, rows_new) for k in new}
    if isinstance(new, (list, tuple)) and type(kept) is type(new) and len(kept) == len(new):
        items = [_concat_rows(a, b, rows_kept, rows_new) for a, b in zip(kept, new)]
        return type(new)(*items) if hasattr(new, "_fields") else type(new)(items)
    raise ValueError(
        f"HyperDistill option batch_mixing='subsample' needs every training batch to have the same structure, got "
        f"a {type(kept).__name__} and a {type(new).__name__} in the same place; use batch_mixing='replace'."
    )


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


class HyperDistill(HypergradientEstimator):
    """HyperDistill (Lee, Lee, Shin, Yang, Hospedales, Hwang, "Online Hyperparameter Meta-Learning with Hypergradient
    Distillation", ICLR 2022), Algorithms 3 and 4.

    Call `t` (counted from 1 in each inner optimisation) sees the current weights `w_{t-1}`, the training batch `D_t`
    and the step size `lr`. The hypergradient is

        `g_t = d L_meta(w_t, lambda) / d lambda + pi*_t f_t`,  `f_t = v_t / ||v_t||`,
        `v_t = alpha_t . d Phi(w*_t, lambda; D*_t) / d lambda`,

    with `w_t = Phi(w_{t-1}, lambda; D_t)` one plain SGD step (the lookahead of [`T1T2`]), `alpha_t = d L_meta / d w_t`
    there, and `v_t` the single JVP of the second-order term at the distilled point:

    - `w*_t`, the running weighted average of the weights seen so far (Eq. 12-13):
      `w*_t = sum_i gamma^(t-i) w_{i-1} / sum_i gamma^(t-i)`, updated with `p_t = (gamma - gamma^t) / (1 - gamma^t)`;
    - `D*_t`, the distilled batch (Eq. 14): `D*_1 = D_1`, then `D*_t = SS(D*_{t-1}, p_t) u SS(D_t, 1 - p_t)`.

    The size `pi*_t` is, by default, the linear estimator of Eq. 15, `pi*_t = theta ||v_t|| sum_{i<=t} gamma^(t-i)`,
    with `theta = x.y / x.x` fitted by Algorithm 4 (linear estimation): a rollout of `horizon` SGD steps from the
    current weights on fresh training batches with `lambda` fixed, then DrMAD's backward pass over it, which gives for
    every horizon `s` the second-order term `g^SO_s` and the distilled JVP `v_s` (Eq. 16-18); `x_s = ||v_s|| (1 -
    gamma^s) / (1 - gamma)`, `y_s = f_s . g^SO_s`. The fit runs at the first call of inner optimisations `1, 1 + P,
    1 + 2P, ...` (`P = estimation_period`), before the estimate of that call uses `theta`. Inner optimisations start
    at each [`~HyperDistill.reset`] (`MetaTrainer` calls it at the start of each with `meta_inner_steps`); in a run
    that never resets, at the first call and every `horizon` calls after it.
    `theta` is kept across `reset()`. With a fixed `pi`, `pi*_t = pi`: the paper's convention for Meta-Weight-Net,
    whose direct term is zero, so that `pi` only sets the hypergradient's norm (the meta learning rate's scale).

    Departures from the paper:

    - Algorithm 4's rollout takes plain SGD steps at the current step size, whatever the base optimiser (the paper's
      inner optimiser has momentum); it starts from the current weights, which are the meta-learned initialisation
      `phi` when the fit falls at the start of an inner optimisation that restarted from it.
    - `SS(D, p)` keeps `floor(n p)` rows of `D*_{t-1}`, plus one more with probability `n p - floor(n p)`, and fills
      the batch size `n` with rows of `D_t`: the expected share of each past batch is Eq. 12's weight. The paper's
      round-off takes no new rows once `n (1 - p_t) < 0.5` (at `gamma = 0.99` and `n = 32`, `D*` would stop changing
      at call 101).
    - `t` restarts at `reset()` only: a run that never resets keeps one growing trajectory (`p_t -> gamma`).

    Batches: with `batch_mixing="subsample"` a batch must be a tensor, or a dict / list / tuple (nested) of tensors
    that share their first dimension (`None` leaves allowed). Rows are chosen jointly across all tensors of a batch,
    so an example keeps its input, label and any index tensor together; meta-parameters tied to examples must be
    looked up from such an index carried in the batch, not from the position in the batch. Dicts come back as plain
    `dict`s. Other batches need `batch_mixing="replace"`, which keeps the whole previous `D*` with probability `p_t`
    and otherwise takes the current batch (the same example weights in expectation, more variance).

    Randomness comes from a private generator seeded from `seed` (or from the global torch generator on the first
    call); its state is part of [`~HyperDistill.state_dict`], so a resumed run draws the same subsamples.

    Cost per call: two training-loss gradients (one with a second-order graph), one meta-loss gradient and a double
    backward (one JVP); memory for `w*` (one copy of the weights, in at least float32) and `D*`. A fit costs `horizon`
    training steps and `2 horizon` double backwards, once every `estimation_period` inner optimisations.

    Args:
        gamma (`float`, *optional*, defaults to 0.99):
            Decay `gamma` in `[0, 1)` of the past trajectory (Eq. 7, 12); the paper tunes it in `{0.9, 0.99, 0.999,
            0.9999}`. 0 distills the last step only (the one-step lookahead's direction).
        pi (`float` or `None`, *optional*, defaults to `None`):
            `None` sizes the distilled term with Eq. 15 (fitted `theta`). A number `> 0` fixes the size `pi*` of the
            unit direction `f_t` (the paper uses 1 for Meta-Weight-Net).
        estimation_period (`int`, *optional*, defaults to 50):
            Inner optimisations between fits of `theta` (the paper: every 50).
        horizon (`int`, *optional*, defaults to 100):
            Steps `T` of the rollout a fit runs over (the paper's inner optimisation length), and the calls that
            count as one inner optimisation in a run that never resets.
        batch_mixing (`str`, *optional*, defaults to `"subsample"`):
            How `D*` is formed: `"subsample"` mixes rows (Eq. 14), `"replace"` keeps or replaces whole batches.
        seed (`int`, *optional*):
            Seed of the generator used for the subsampling. Defaults to a draw from the global torch generator.
    """

    name = "hyperdistill"
    second_order = True

    def __init__(
        self,
        gamma: float = 0.99,
        pi: float | None = None,
        estimation_period: int = 50,
        horizon: int = 100,
        batch_mixing: str = "subsample",
        seed: int | None = None,
    ):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1:
            raise ValueError(f"HyperDistill option `gamma` must be a number in [0, 1), got gamma={gamma!r}.")
        if pi is not None and (isinstance(pi, bool) or not isinstance(pi, (int, float)) or not 0 < pi < math.inf):
            raise ValueError(
                f"HyperDistill option `pi` must be a finite number > 0, or None to estimate it (Eq. 15), got "
                f"pi={pi!r}."
            )
        for option, value in (("estimation_period", estimation_period), ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HyperDistill option `{option}` must be an integer >= 1, got {option}={value!r}.")
        if batch_mixing not in BATCH_MIXING:
            raise ValueError(
                f"HyperDistill option `batch_mixing` must be one of {BATCH_MIXING}, got batch_mixing={batch_mixing!r}."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"HyperDistill option `seed` must be an integer or None, got seed={seed!r}.")
        self.gamma = float(gamma)
        self.pi = None if pi is None else float(pi)
        self.estimation_period = estimation_period
        self.horizon = horizon
        self.batch_mixing = batch_mixing
        self.seed = seed
        self._theta: float | None = None
        self._inner = 0
        self._generator: torch.Generator | None = None
        self._clear()
        self._resets = False  # whether inner optimisations are delimited by `reset()` (else by `horizon` calls)

    def _clear(self) -> None:
        self._step = 0
        self._w_star: dict[str, torch.Tensor] | None = None
        self._d_star: Any = None

    def reset(self) -> None:
        """Starts a new inner optimisation: forgets the trajectory (`t = 0`, no `w*` or `D*`); keeps `theta`. Once
        called, only `reset()` starts inner optimisations (call it before the first one too)."""
        self._clear()
        self._resets = True

    @property
    def theta(self) -> float | None:
        """The fitted parameter of the linear estimator of Eq. 15 (`None` before the first fit)."""
        return self._theta

    def decay_sum(self, t: int) -> float:
        """`sum_{i=1}^t gamma^(t-i) = (1 - gamma^t) / (1 - gamma)`."""
        return (1.0 - self.gamma**t) / (1.0 - self.gamma)

    def _new_generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int(torch.randint(2**62, ()).item())
        return torch.Generator().manual_seed(seed)

    def _mix(self, kept: Any, new: Any, p: float) -> Any:
        """`SS(kept, p) u SS(new, 1 - p)` (Eq. 14, 18), as rows or as whole batches."""
        if p <= 0.0:
            return new
        if p >= 1.0:
            return kept
        if self.batch_mixing == "replace":
            return kept if torch.rand((), generator=self._generator).item() < p else new
        sizes_kept, sizes_new = _batch_sizes(kept), _batch_sizes(new)
        if not sizes_new and not sizes_kept:
            return new
        for sizes in (sizes_kept, sizes_new):
            if not sizes or len(set(sizes)) != 1:
                raise ValueError(
                    f"HyperDistill option batch_mixing='subsample' needs the tensors of a batch to share their first "
                    f"dimension, got sizes {sizes}; use batch_mixing='replace' for such batches."
                )
        n_kept, n = sizes_kept[0], sizes_new[0]
        expected = n * p  # rounded stochastically, so that D* keeps taking new rows when n (1 - p) < 0.5
        take_kept = math.floor(expected)
        take_kept += int(torch.rand((), generator=self._generator, dtype=torch.float64).item() < expected - take_kept)
        take_kept = min(n_kept, take_kept)
        rows_kept = torch.randperm(n_kept, generator=self._generator)[:take_kept].sort().values
        rows_new = torch.randperm(n, generator=self._generator)[: n - take_kept].sort().values
        return _concat_rows(kept, new, rows_kept, rows_new)

    def _distilled_jvp(
        self, problem: HypergradientProblem, weights: ParamDict, batch: Any, alpha: Sequence[torch.Tensor], lr: float
    ) -> tuple[torch.Tensor, ...]:
        """`alpha . d Phi(weights, lambda; batch) / d lambda` through the shared one-step lookahead."""
        stepped = sgd_lookahead(weights, problem.train_loss, batch, lr, create_graph=True)
        return grads_or_zeros(_dot(list(stepped.values()), alpha), problem.meta_params)

    def fit_theta(self, problem: HypergradientProblem) -> float | None:
        """Algorithm 4: rolls out `horizon` plain SGD steps from `problem.params` on `problem.train_batches(horizon)`
        at `problem.lr`, runs DrMAD's backward pass over them and returns the least-squares `theta` of the samples
        `(x_s, y_s)`, `s = 1..horizon`; `None` where every `x_s` is 0 or the fit is not finite."""
        if problem.train_batches is None:
            raise ValueError(
                "HyperDistill with pi=None fits the size of its distilled term (Eq. 15) before using it, by a rollout "
                f"of horizon={self.horizon} SGD steps on fresh training batches (Algorithm 4): build the problem with "
                "`train_batches` (MetaTrainer does), or fix the size with `pi` (e.g. pi=1.0)."
            )
        lr = self._check_lr(problem.lr)
        batches = [detached_copy(b) for b in problem.train_batches(self.horizon)]
        if len(batches) != self.horizon:
            raise ValueError(f"train_batches({self.horizon}) returned {len(batches)} batches.")
        w_0, lrs = {k: w.detach() for k, w in problem.params.items()}, [lr] * self.horizon
        w_end = sgd_unroll(w_0, problem.train_loss, batches, lrs, create_graph=False)
        w_end = {k: w.detach() for k, w in w_end.items()}
        alpha_end, _, _ = meta_gradients(problem, w_end)
        w_star: dict[str, torch.Tensor] = {}
        d_star: Any = None
        xx = xy = 0.0
        steps = reverse_pass(problem.train_loss, problem.meta_params, alpha_end, batches, lrs, w_0, w_end)
        for s, (w_hat, g_so) in enumerate(steps, start=1):
            batch = batches[self.horizon - s]
            # Eq. 17-18: the distilled point of the horizon-s trajectory, its newest-to-oldest weights
            if s == 1:
                w_star, d_star = w_hat, batch
            else:
                p_s = (1.0 - self.gamma ** (s - 1)) / (1.0 - self.gamma**s)
                w_star = {k: p_s * w_star[k] + (1 - p_s) * w_hat[k] for k in w_star}
                d_star = self._mix(d_star, batch, p_s)
            v = [x.double() for x in self._distilled_jvp(problem, w_star, d_star, alpha_end, lr)]
            norm = math.sqrt(float(sum((x**2).sum() for x in v)))
            x_s = norm * self.decay_sum(s)
            y_s = float(_dot(v, [g.double() for g in g_so])) / norm if norm > 0 else 0.0
            xx += x_s * x_s
            xy += x_s * y_s
        theta = xy / xx if xx > 0 else None
        return theta if theta is not None and math.isfinite(theta) else None

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        lr, params, train_batch = self._check_lr(problem.lr), problem.params, problem.train_batch
        if self._w_star is not None and list(self._w_star) != list(params):
            raise ValueError(
                f"HyperDistill got weights named {list(params)[:4]}... but its running average holds "
                f"{list(self._w_star)[:4]}...; call reset() when the model changes."
            )
        if self._generator is None:
            self._generator = self._new_generator()
        if self._step == 0 or (not self._resets and self._step % self.horizon == 0):  # an inner optimisation starts
            self._inner += 1
            if self.pi is None and (self._inner - 1) % self.estimation_period == 0:
                # a fit that is not finite (a non-finite batch in the rollout) keeps the last theta
                self._theta = self.fit_theta(problem) or self._theta
        t = self._step + 1
        p_t = (self.gamma - self.gamma**t) / (1.0 - self.gamma**t)
        batch = detached_copy(train_batch)
        # Eq. 13-14: the running average is kept in at least float32 and cast back to the weights' dtype to be used
        stored = {k: w.detach().to(torch.promote_types(w.dtype, torch.float32), copy=True) for k, w in params.items()}
        if p_t == 0.0:
            w_star, d_star = stored, batch
        else:
            w_star = {k: p_t * self._w_star[k].to(w.device) + (1 - p_t) * stored[k] for k, w in stored.items()}
            d_star = self._mix(self._d_star, batch, p_t)

        if p_t == 0.0:
            # the distilled point is the current one: one second-order lookahead serves both terms, as in T1T2
            stepped = sgd_lookahead(params, problem.train_loss, train_batch, lr, create_graph=True)
            w_next = {k: w.detach() for k, w in stepped.items()}
            alpha, direct, loss = meta_gradients(problem, w_next)
            jvp = grads_or_zeros(_dot(list(stepped.values()), alpha), problem.meta_params)
        else:
            w_next = sgd_lookahead(params, problem.train_loss, train_batch, lr, create_graph=False)
            w_next = {k: w.detach() for k, w in w_next.items()}
            alpha, direct, loss = meta_gradients(problem, w_next)
            w_used = {k: w_star[k].to(dtype=p.dtype) for k, p in params.items()}
            jvp = self._distilled_jvp(problem, w_used, d_star, alpha, lr)

        if self.pi is None:
            # theta stays None only when no fit has been finite: the size of Eq. 7 with aligned, equal JVPs
            scale = (1.0 if self._theta is None else self._theta) * self.decay_sum(t)
        else:
            norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in jvp)))
            scale = self.pi / norm if norm > 0 else 0.0
        self._step, self._w_star, self._d_star = t, w_star, d_star
        grads = tuple(g + scale * v for g, v in zip(direct, jvp))
        return HypergradientResult(grads, loss)

    def state_dict(self) -> dict[str, Any]:
        """The running state: call count in the inner optimisation, inner optimisations begun (and whether resets
        delimit them), `theta`, `w*`, `D*` and the generator state."""
        return {
            "step": self._step,
            "inner": self._inner,
            "resets": self._resets,
            "theta": self._theta,
            "w_star": None if self._w_star is None else dict(self._w_star),
            "d_star": self._d_star,
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._theta, self._inner, self._generator, self._resets = None, 0, None, False
            self._clear()
            return
        if sorted(state) != sorted(STATE_KEYS):
            raise ValueError(
                f"HyperDistill state must have the keys {sorted(STATE_KEYS)}, got {sorted(state)}: missing "
                f"{sorted(set(STATE_KEYS) - set(state))}, unexpected {sorted(set(state) - set(STATE_KEYS))}."
            )
        self._step, self._inner, self._resets = int(state["step"]), int(state["inner"]), bool(state["resets"])
        self._theta = None if state["theta"] is None else float(state["theta"])
        self._w_star = None if state["w_star"] is None else dict(state["w_star"])
        self._d_star = state["d_star"]
        self._generator = None
        if state["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state["generator"].cpu())
