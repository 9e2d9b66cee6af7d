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
    leaves,
)
from ._hvp import gradient_vector_product
from ._lookahead import sgd_lookahead

BATCH_MIXING = ("subsample", "replace")
STATE_KEYS = ("step", "theta", "w_star", "d_star", "generator", "window_start", "window_batches", "window_lrs")


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
    Distillation", ICLR 2022), Algorithms 3 and 4, online over the calls of one training run.

    Call `t` (counted from 1) sees the current weights `w_{t-1}`, the training batch `D_t` and the step size `lr`.
    The hypergradient is

        `g_t = d L_meta(w_t, lambda) / d lambda + pi_t * v_t`,  `v_t = alpha_t . d Phi(w*_t, lambda; D*_t) / d lambda`,

    with `w_t = Phi(w_{t-1}, lambda; D_t)` one plain SGD step (the lookahead of [`T1T2`]), `alpha_t = d L_meta / d w_t`
    there, and `v_t` the single JVP of the second-order term taken through `sgd_lookahead` at the distilled point:

    - `w*_t`, the running weighted average of the weights seen so far (Eq. 13):
      `w*_1 = w_0`, `w*_t = p_t w*_{t-1} + (1 - p_t) w_{t-1}` with `p_t = (gamma - gamma^t) / (1 - gamma^t)`, i.e.
      `w*_t = sum_i gamma^(t-i) w_{i-1} / sum_i gamma^(t-i)` (Eq. 12);
    - `D*_t`, the distilled batch (Eq. 14): `D*_1 = D_1`, then `D*_t = SS(D*_{t-1}, p_t) u SS(D_t, 1 - p_t)`.

    With `gamma = 0`, `w*_t = w_{t-1}`, `D*_t = D_t` and (with `pi = 1`) the estimate is exactly [`T1T2`].

    The size `pi_t` multiplies the unnormalised JVP `v_t = ||v_t|| f_t`, so the paper's scaling factor of the unit
    direction `f_t` is `pi*_t = pi_t ||v_t||`. It is either fixed (`pi`), or the linear estimator of Eq. 15,
    `pi*_t = c_gamma(t; theta) = theta ||v_t|| sum_{i<=t} gamma^(t-i)`, that is
    `pi_t = theta (1 - gamma^t) / (1 - gamma)`, with `theta = x.y / x.x` fitted by the DrMAD backward pass of
    Algorithm 4 (samples `x_s = ||v_s|| (1 - gamma^s) / (1 - gamma)`, `y_s = f_s . g^SO_s` for horizons
    `s = 1..T`, Eq. 16-18).

    Differences from the paper, all forced by seeing one call per base step of a single run:

    - Algorithm 4 runs a fresh `T`-step inner optimization from the meta-learned initialization with `lambda` held
      fixed. Here the refit uses the trajectory the run actually took: the weights snapshotted at the first call of a
      window of `horizon` calls (DrMAD's `w_0`), the batches and step sizes of those calls, and the current lookahead
      `w_t` as the last weight `w_T`, with `alpha_T = alpha_t` from the current meta batch. The backward pass treats
      every step as plain SGD with the current `lambda` (`lambda` moved during the window, and the base optimizer may
      use momentum or Adam); like DrMAD it only needs `w_0` and `w_T`, the weights in between are interpolated.
    - Eq. 17 averages the interpolated weights `w^_{T-s}` (the only ones Algorithm 4 keeps), and `v_s` uses the step
      size of the last call of the window (the online `v_t` uses the current one).
    - Refits happen in calls, not inner optimizations: windows start at calls `1, 1 + P, 1 + 2P, ...`
      (`P = estimation_period`) and `theta` is refitted at their last call (`horizon`, `horizon + P`, ...), after
      which the window is dropped. Before the first fit `theta = 1`, the size Eq. 7 gives when all JVPs of the
      trajectory are aligned and equal (exact on a quadratic with Hessian `k I` and `gamma = 1 - lr k`). If every
      sample has `x_s = 0`, the previous `theta` is kept.
    - `t` counts calls since construction or [`~HyperDistill.reset`], not steps of an inner optimization restarted
      from an initialization; call `reset()` at the start of each inner optimization to get the episodic form.
    - `SS(D, p)` keeps `round(n p)` rows of `D*_{t-1}` and fills the rest of the current batch size `n` with rows of
      `D_t` (the paper rounds both parts, which can change the batch size by one).

    Batches: with `batch_mixing="subsample"` a batch must be a tensor, or a dict / list / tuple (nested) of tensors
    that share their first dimension (`None` leaves allowed). Rows are chosen jointly across all tensors of a batch,
    so an example keeps its input, label and any index tensor together; meta-parameters tied to examples must be
    looked up from such an index carried in the batch, not from the position in the batch. Dicts come back as plain
    `dict`s. Other batches need `batch_mixing="replace"`, which keeps the whole previous `D*` with probability `p_t`
    and otherwise takes the current batch (the same example weights of Eq. 12 in expectation, more variance).

    Randomness comes from a private generator seeded from `seed` (or from the global torch generator on the first
    call); its state is part of [`~HyperDistill.state_dict`], so a resumed run draws the same subsamples.

    Cost per call: two training-loss gradients (one of them with a second-order graph), one meta-loss gradient and a
    double backward; memory for `w*` (one copy of the weights, in at least float32) and `D*`. With `pi=None`, a refit
    costs `2 horizon` double backwards and keeps one weight snapshot and `horizon` batches while a window is open.

    Args:
        gamma (`float`, *optional*, defaults to 0.99):
            Decay `gamma` in `[0, 1)` of the past trajectory (Eq. 7, 12); the paper tunes it in `{0.9, 0.99, 0.999,
            0.9999}`. 0 is the one-step lookahead.
        pi (`float` or `None`, *optional*, defaults to 1.0):
            Fixed factor `> 0` on the distilled JVP `v_t` (the paper sets the size to 1 for Meta-Weight-Net, where
            the direct term is zero and the size only rescales the meta learning rate; note that the paper's 1
            multiplies the unit direction `f_t`, this one the JVP itself). `None` estimates it with Eq. 15.
        estimation_period (`int`, *optional*, defaults to 5000):
            Calls between refits of `theta` when `pi=None` (the paper refits every 50 inner optimizations of 100
            steps).
        horizon (`int`, *optional*, defaults to 100):
            Length `T` of the window the DrMAD backward pass of a refit runs over (the paper's inner horizon), at
            most `estimation_period`.
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
        pi: float | None = 1.0,
        estimation_period: int = 5000,
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
        if horizon > estimation_period:
            raise ValueError(
                f"HyperDistill option `horizon` must be at most `estimation_period` (one refit window per period), "
                f"got horizon={horizon} and estimation_period={estimation_period}."
            )
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
        self.reset()

    def reset(self) -> None:
        """Forgets the trajectory (`t = 0`, no `w*`, `D*` or window) and sets `theta` back to 1."""
        self._step = 0
        self._theta = 1.0
        self._w_star: dict[str, torch.Tensor] | None = None
        self._d_star: Any = None
        self._generator: torch.Generator | None = None
        self._window_start: dict[str, torch.Tensor] | None = None
        self._window: list[tuple[Any, float]] = []

    @property
    def theta(self) -> float:
        """The current parameter of the linear estimator of Eq. 15 (1 until the first refit)."""
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
        take_kept = min(n_kept, math.floor(n * p + 0.5))
        rows_kept = torch.randperm(n_kept, generator=self._generator)[:take_kept].sort().values
        rows_new = torch.randperm(n, generator=self._generator)[: n - take_kept].sort().values
        return _concat_rows(kept, new, rows_kept, rows_new)

    def _meta_gradients(
        self, problem: HypergradientProblem, weights: ParamDict
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """`alpha = d L_meta / d w` and the direct term `d L_meta / d lambda` at `weights`, and the loss."""
        w = leaves(weights)
        loss = problem.meta_loss(w, problem.meta_batch)
        grads = grads_or_zeros(loss, [*w.values(), *problem.meta_params])
        return list(grads[: len(w)]), list(grads[len(w) :]), loss.detach()

    def _distilled_jvp(
        self, problem: HypergradientProblem, weights: ParamDict, batch: Any, alpha: Sequence[torch.Tensor], lr: float
    ) -> tuple[torch.Tensor, ...]:
        """`alpha . d Phi(weights, lambda; batch) / d lambda` through the shared one-step lookahead."""
        stepped = sgd_lookahead(weights, problem.train_loss, batch, lr, create_graph=True)
        return grads_or_zeros(_dot(list(stepped.values()), alpha), problem.meta_params)

    def _fit_theta(
        self, problem: HypergradientProblem, w_end: ParamDict, alpha_end: Sequence[torch.Tensor]
    ) -> float | None:
        """Algorithm 4 over the window: DrMAD backward pass from `w_end`, one `(x_s, y_s)` per horizon `s`."""
        meta_params = problem.meta_params
        names = list(w_end)
        w_0 = {k: self._window_start[k].to(device=w_end[k].device, dtype=w_end[k].dtype) for k in names}
        lr_end = self._window[-1][1]
        big_t = len(self._window)
        alpha = list(alpha_end)
        g_so = [torch.zeros_like(m) for m in meta_params]
        w_star: dict[str, torch.Tensor] = {}
        d_star: Any = None
        xx = xy = 0.0
        for s in range(1, big_t + 1):
            t = big_t - s + 1
            batch, lr_t = self._window[t - 1]
            frac = (t - 1) / big_t
            w_hat = {k: (1 - frac) * w_0[k] + frac * w_end[k] for k in names}
            # Eq. 16: g^SO += alpha B^_t, alpha <- alpha A^_t, with A^_t = I - lr H and B^_t = -lr d^2 L / dw dlambda
            w_leaf = leaves(w_hat)
            grads = grads_or_zeros(problem.train_loss(w_leaf, batch), list(w_leaf.values()), create_graph=True)
            products = gradient_vector_product(grads, [*w_leaf.values(), *meta_params], alpha)
            alpha = [a - lr_t * hv for a, hv in zip(alpha, products[: len(names)])]
            g_so = [g - lr_t * mv for g, mv in zip(g_so, products[len(names) :])]
            # Eq. 17-18: distilled point of the horizon-s trajectory, its newest-to-oldest weights w^_{T-1..T-s}
            if s == 1:
                w_star, d_star = w_hat, batch
            else:
                p_s = (1.0 - self.gamma ** (s - 1)) / (1.0 - self.gamma**s)
                w_star = {k: p_s * w_star[k] + (1 - p_s) * w_hat[k] for k in names}
                d_star = self._mix(d_star, batch, p_s)
            v = self._distilled_jvp(problem, w_star, d_star, alpha_end, lr_end)
            norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in v))
            x_s = norm * self.decay_sum(s)
            y_s = float(_dot([x.double() for x in v], [g.double() for g in g_so])) / norm if norm > 0 else 0.0
            xx += x_s * x_s
            xy += x_s * y_s
        return xy / xx if xx > 0 else None

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        lr, params, train_batch = self._check_lr(problem.lr), problem.params, problem.train_batch
        if self._w_star is not None and list(self._w_star) != list(params):
            raise ValueError(
                f"HyperDistill got weights named {list(params)[:4]}... but its running average holds "
                f"{list(self._w_star)[:4]}...; call reset() when the model changes."
            )
        if self._generator is None:
            self._generator = self._new_generator()
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
            alpha, direct, loss = self._meta_gradients(problem, w_next)
            jvp = grads_or_zeros(_dot(list(stepped.values()), alpha), problem.meta_params)
        else:
            w_next = sgd_lookahead(params, problem.train_loss, train_batch, lr, create_graph=False)
            w_next = {k: w.detach() for k, w in w_next.items()}
            alpha, direct, loss = self._meta_gradients(problem, w_next)
            w_used = {k: w_star[k].to(dtype=p.dtype) for k, p in params.items()}
            jvp = self._distilled_jvp(problem, w_used, d_star, alpha, lr)

        if self.pi is None:
            phase = (t - 1) % self.estimation_period
            if phase == 0:
                self._window_start, self._window = {k: w.detach().clone() for k, w in params.items()}, []
            if phase < self.horizon:
                self._window.append((batch, lr))
            if phase == self.horizon - 1:
                theta = self._fit_theta(problem, w_next, alpha)
                # a refit that is not finite (a non-finite batch in its window) keeps the last theta; MetaTrainer
                # also puts the whole state back after a skipped meta step, so there this is a second guard
                self._theta = theta if theta is not None and math.isfinite(theta) else self._theta
                self._window_start, self._window = None, []
            scale = self._theta * self.decay_sum(t)
        else:
            scale = self.pi
        self._step, self._w_star, self._d_star = t, w_star, d_star
        grads = tuple(g + scale * v for g, v in zip(direct, jvp))
        return HypergradientResult(grads, loss)

    def state_dict(self) -> dict[str, Any]:
        """The running state: call count, `theta`, `w*`, `D*`, the generator state and an open refit window."""
        return {
            "step": self._step,
            "theta": self._theta,
            "w_star": None if self._w_star is None else dict(self._w_star),
            "d_star": self._d_star,
            "generator": None if self._generator is None else self._generator.get_state(),
            "window_start": None if self._window_start is None else dict(self._window_start),
            "window_batches": [b for b, _ in self._window],
            "window_lrs": [lr for _, lr in self._window],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.reset()
            return
        if sorted(state) != sorted(STATE_KEYS):
            raise ValueError(
                f"HyperDistill state must have the keys {sorted(STATE_KEYS)}, got {sorted(state)}: missing "
                f"{sorted(set(STATE_KEYS) - set(state))}, unexpected {sorted(set(state) - set(STATE_KEYS))}."
            )
        if len(state["window_batches"]) != len(state["window_lrs"]):
            raise ValueError("HyperDistill state has different numbers of window batches and step sizes.")
        self._step = int(state["step"])
        self._theta = float(state["theta"])
        self._w_star = None if state["w_star"] is None else dict(state["w_star"])
        self._d_star = state["d_star"]
        self._generator = None
        if state["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state["generator"].cpu())
        self._window_start = None if state["window_start"] is None else dict(state["window_start"])
        self._window = list(zip(state["window_batches"], [float(lr) for lr in state["window_lrs"]]))
