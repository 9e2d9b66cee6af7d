"""EvoGrad: first-order hypergradients from an evolutionary inner step."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Sequence

import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._base import HypergradientEstimator, HypergradientProblem, HypergradientResult, ParamDict, grads_or_zeros
from .evograd_noise import NoiseDraw, _replaying_rng, _rng_state, _set_rng_state, _sign_chunks

logger = logging.getLogger(__name__)
NOISE_TYPES = ("sign", "gaussian")
SIGMA_RULES = ("auto", "lr")  # sigma derived from the inner learning rate of each call
Grads = tuple[torch.Tensor, ...]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a . b` as a float64 scalar, computed in float32 at least."""
    if a.dtype not in (torch.float32, torch.float64):
        a, b = a.float(), b.float()
    return torch.dot(a, b).double()


class EvoGrad(HypergradientEstimator):
    """EvoGrad (Bohdal, Yang, Hospedales, "EvoGrad: Efficient Gradient-Based Meta-Learning and Hyperparameter
    Optimization", NeurIPS 2021), Eq. 3-5.

    `K` perturbed copies `theta_k = theta + eps_k` are scored with the training loss (weights detached,
    meta-parameters in the graph), `w = softmax(-l / temperature)`, and the meta loss is evaluated at the
    affine combination `theta* = sum_k w_k theta_k`. The hypergradient reaches `lambda` only through the
    softmax weights, so no second-order graph is ever built. The unperturbed weights are not in the population.

    Args:
        population (`int`, *optional*, defaults to 2):
            Number of perturbed copies `K` (at least 2).
        sigma (`float`, `"auto"` or `"lr"`, *optional*, defaults to 0.001):
            Perturbation scale. Linearising the softmax for small perturbations gives
            `E[theta* - theta] = -(K - 1) sigma^2 / (K tau) * grad_theta train_loss`: in expectation EvoGrad is a
            one-step lookahead with step size `(K - 1) sigma^2 / (K tau)`, so its hypergradient grows with
            `sigma^2`. `"auto"` picks `sigma = sqrt(K tau lr / (K - 1))` from the inner step size `lr` of each call,
            matching the lookahead step to the model's learning rate. `"lr"` sets `sigma` to `lr` itself at each call,
            as EvoGrad's official LFT code does (sigma = the model learning rate, 1e-3 there).
        temperature (`float`, *optional*, defaults to 0.05):
            Softmax temperature `tau`.
        noise (`str`, *optional*, defaults to `"sign"`):
            `"sign"` for `+/- sigma` with random signs (the distribution of the official code's
            `sigma * sign(N(0, I))`, drawn as random bytes, 8 signs each: an eighth of the random numbers and no
            Gaussian transform), `"gaussian"` for `sigma * N(0, I)`.
        antithetic (`bool`, *optional*, defaults to `False`):
            Draw the population as `K / 2` pairs `theta + eps`, `theta - eps` (`K` must be even). The even-order
            terms of the loss (curvature) then cancel in each pair's loss difference, which matters when `sigma` is
            large, and the effective lookahead step becomes `sigma^2 / tau` for any even `K`.
        perturb (`str`, *optional*):
            Regular expression (`re.search`) over the names in `params`: only matching weights are perturbed, the
            others stay at `theta`. The estimate is then, in expectation, the one-step lookahead over those weights
            alone (the layer-subset approximation of FaMUS, Xu et al., CVPR 2021). A random projection in fewer
            dimensions is far less noisy: perturbing only a classifier head often recovers most of the signal.
            Defaults to every weight.
        rescale (`bool`, *optional*, defaults to `False`):
            Multiply the indirect term of the estimate (the part through the softmax weights; not the meta loss's own
            dependence on the meta-parameters, if any) by `lr / effective_lr(sigma)`, so that its expected value is
            the one-step lookahead hypergradient at the learning rate (T1-T2's scale) whatever `sigma`. This
            separates the two roles of `sigma`: keep it small for the linear regime (large perturbations add
            higher-order noise, e.g. when the meta-parameters act on the inputs) and let `rescale` set the size that
            the meta-optimizer's weight decay or an SGD meta-optimizer sees. Needs `lr`.
        memory_lean (`bool`, *optional*):
            Process the copies one at a time instead of holding all `K` perturbations and training graphs at once:
            each copy's noise is drawn one weight at a time straight into its perturbed copy, its training loss is
            differentiated to the meta-parameters right away, and its perturbation is kept as the bits it was drawn
            as (sign noise: one bit per weight, a 32nd of a float32 copy, not drawn again) or regenerated from its
            seed (Gaussian noise). With sign noise the meta backward turns each weight's gradient into the copies' dot
            products as soon as it is produced and frees it. Peak memory beyond the weights is about one weight copy
            (a perturbed copy, then `theta*`) and one graph whatever `K`, plus the signs and `K` gradients w.r.t. the
            meta-parameters (Gaussian noise: one more weight copy, the gradient w.r.t. `theta*`). Same estimate as
            the all-at-once path for the same seed. `False` holds all `K` copies and their training graphs at once
            and differentiates the meta loss by one backward pass. Unset, the copies are processed one at a time.
        forward_mode (`bool`, *optional*):
            Differentiate the meta loss with forward-mode AD instead of a backward pass: through the softmax only the
            differences `c_k - c_K = grad L_meta(theta*) . (eps_k - eps_K)` matter, which are `K - 1` Jacobian-vector
            products at `theta*` (one for the default `K = 2`), each a forward pass of the meta loss with dual weights,
            all on the same random draws (dropout). Nothing is stored for a backward pass of the meta loss (only what
            a direct dependence of the meta loss on the meta-parameters needs), so the meta step's memory is that of
            a forward pass plus one weight-sized tangent. On a 2-core CPU one product took about 15% more time than
            the meta loss's forward and backward passes together (a CIFAR ResNet-32), so with `K > 2` the meta step
            costs about `K - 1` times that. The copies are processed one at a time, as with `memory_lean`, and the
            estimate is the same as the other paths' for the same seed, up to floating-point rounding. Every operator
            of the meta loss needs a forward-mode derivative (convolutions, normalization and the usual losses have
            one; `scaled_dot_product_attention` is run on its math backend, as its fused kernels have none). Unset
            (the default) with `memory_lean` unset, forward mode is used for `K = 2` (one product) and the lean
            backward otherwise, and also from the first call whose meta loss has an operator without a forward-mode
            derivative on (with a warning).
        per_rank_noise (`bool`, *optional*, defaults to `True`):
            Under `torch.distributed`, offset the noise seed by the process rank, so each rank draws its own
            population and the averaged hypergradient (MetaTrainer averages across ranks) uses `K x world_size`
            copies. With `False` every rank draws rank 0's population (its seed is broadcast each call).

    The noise of each call comes from a seed drawn from the global torch RNG, so a checkpoint of the RNG state (as
    `transformers.Trainer` saves) replays it; copy `k` is generated from `seed + k`.
    """

    name = "evograd"
    uses_held_train_loss = True

    def __init__(
        self,
        population: int = 2,
        sigma: float | str = 0.001,
        temperature: float = 0.05,
        noise: str = "sign",
        antithetic: bool = False,
        perturb: str | None = None,
        rescale: bool = False,
        memory_lean: bool | None = None,
        forward_mode: bool | None = None,
        per_rank_noise: bool = True,
    ):
        if isinstance(population, bool) or not isinstance(population, int) or population < 2:
            raise ValueError(f"EvoGrad option `population` must be an integer >= 2, got population={population!r}.")
        flags = {
            "antithetic": antithetic,
            "rescale": rescale,
            "memory_lean": memory_lean,
            "forward_mode": forward_mode,
            "per_rank_noise": per_rank_noise,
        }
        for option, value in flags.items():
            unset = value is None and option in ("memory_lean", "forward_mode")
            if not (isinstance(value, bool) or unset):
                allowed = (
                    "True, False or None (chosen)" if option in ("memory_lean", "forward_mode") else "True or False"
                )
                raise ValueError(f"EvoGrad option `{option}` must be {allowed}, got {option}={value!r}.")
        if memory_lean is False and forward_mode:
            raise ValueError(
                "EvoGrad options memory_lean=False and forward_mode=True contradict each other: forward mode takes "
                "the copies one at a time. Leave `memory_lean` unset with forward_mode=True."
            )
        if antithetic and population % 2:
            raise ValueError(
                f"EvoGrad option `antithetic=True` needs an even `population` (pairs theta +/- eps), got "
                f"population={population}."
            )
        checked = [("temperature", temperature)] + ([] if sigma in SIGMA_RULES else [("sigma", sigma)])
        for option, value in checked:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                allowed = 'a number > 0, "auto" or "lr"' if option == "sigma" else "a number > 0"
                raise ValueError(f"EvoGrad option `{option}` must be {allowed}, got {option}={value!r}.")
        if noise not in NOISE_TYPES:
            raise ValueError(f"EvoGrad option `noise` must be one of {NOISE_TYPES}, got noise={noise!r}.")
        self.population = population
        self.sigma = sigma if sigma in SIGMA_RULES else float(sigma)
        self.temperature = float(temperature)
        if perturb is not None:
            try:
                re.compile(perturb)
            except (re.error, TypeError) as err:
                raise ValueError(
                    f"EvoGrad option `perturb` must be a regular expression over parameter names, got "
                    f"perturb={perturb!r} ({err})."
                ) from err
        self.noise = noise
        self.antithetic = antithetic
        self.perturb = perturb
        self.rescale = rescale
        self.memory_lean = memory_lean
        self.forward_mode = forward_mode
        self.per_rank_noise = per_rank_noise
        # the path chosen for unset options, once a meta loss without a forward-mode derivative has been seen
        self._forward_unsupported = False

    @property
    def path(self) -> str:
        """The path the next call takes: `"all_at_once"`, `"lean"` (one copy at a time, meta loss by backward) or
        `"forward"` (one copy at a time, meta loss by Jacobian-vector products)."""
        if self.forward_mode:
            return "forward"
        if self.memory_lean is False:
            return "all_at_once"
        chosen = self.forward_mode is None and self.memory_lean is None and self.population == 2
        return "forward" if chosen and not self._forward_unsupported else "lean"

    def _step_per_sigma2(self) -> float:
        """Effective lookahead step divided by `sigma^2`: `1 / tau` for antithetic pairs, else `(K-1) / (K tau)`."""
        if self.antithetic:
            return 1.0 / self.temperature
        return (self.population - 1) / (self.population * self.temperature)

    def effective_lr(self, sigma: float) -> float:
        """Step size of the lookahead that EvoGrad matches in expectation: `(K - 1) sigma^2 / (K tau)`, or
        `sigma^2 / tau` with antithetic pairs."""
        return sigma**2 * self._step_per_sigma2()

    def resolve_sigma(self, lr: float | None) -> float:
        """`sigma`; for `"auto"` the one whose effective step size equals `lr`; for `"lr"`, `lr` itself."""
        if self.sigma == "auto":
            return math.sqrt(self._check_lr(lr) / self._step_per_sigma2())
        if self.sigma == "lr":
            return self._check_lr(lr)
        return self.sigma

    def _perturbed_names(self, params: ParamDict) -> list[str]:
        if self.perturb is None:
            return list(params)
        names = [name for name in params if re.search(self.perturb, name)]
        if not names:
            shown = list(params)[:8]
            raise ValueError(
                f"EvoGrad option perturb={self.perturb!r} matches no parameter name: names look like {shown}"
                f"{' ...' if len(params) > 8 else ''}. Fix the pattern, or leave `perturb` unset to perturb all."
            )
        return names

    def _softmax_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """`softmax(-losses / tau)`, in at least float32 (half-precision losses are promoted, float64 kept)."""
        return torch.softmax(-losses.to(torch.promote_types(losses.dtype, torch.float32)) / self.temperature, dim=0)

    def _base_seed(self) -> int:
        """The seed of this call's population, drawn from the global torch RNG. Under `torch.distributed`, offset by
        the rank (`per_rank_noise`), or else rank 0's seed, broadcast: the population is shared even where the ranks'
        RNG streams have drifted apart (every rank must then call `estimate`, as MetaTrainer's meta step does)."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return seed
        if self.per_rank_noise:
            return seed + 1_000_003 * torch.distributed.get_rank()
        shared = [seed]
        torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]

    def _noise_draw(self, theta: ParamDict, names: list[str], sigma: float, seed: int) -> NoiseDraw:
        """The perturbations of one call's population with this estimator's `population`, `antithetic` and `noise`."""
        return NoiseDraw(theta, names, sigma, seed, self.population, self.antithetic, self.noise)

    def estimate(self, problem: HypergradientProblem) -> HypergradientResult:
        sigma = self.resolve_sigma(problem.lr)
        theta = {name: p.detach() for name, p in problem.params.items()}
        names, seed = self._perturbed_names(theta), self._base_seed()
        draw = self._noise_draw(theta, names, sigma, seed)
        if self.path == "all_at_once":
            direct, indirect, loss = self._estimate(problem, draw)
        else:
            direct, indirect, loss = self._estimate_lean(problem, draw)
        factor = 1.0
        if self.rescale:
            effective = self.effective_lr(sigma)
            # sigma = 0 (a warmup from lr = 0 under "auto" or "lr"): theta* = theta, the indirect term is zero
            factor = self._check_lr(problem.lr) / effective if effective > 0 else 1.0
        return HypergradientResult(tuple(d + factor * i for d, i in zip(direct, indirect)), loss)

    def _estimate(self, problem: HypergradientProblem, draw: NoiseDraw) -> tuple[Grads, Grads, torch.Tensor]:
        """All copies at once: the meta loss at `theta*`, differentiated directly (where it depends on the
        meta-parameters itself) and through the softmax weights. Returns `(direct, indirect, meta loss)`."""
        theta, names = draw.theta, draw.names
        eps = [draw.perturbation(k) for k in range(self.population)]
        losses = torch.stack(
            [problem.held_train_loss({**theta, **{n: theta[n] + e[n] for n in names}}).reshape(()) for e in eps]
        )
        weights = self._softmax_weights(losses)
        held = weights.detach().requires_grad_()  # the two paths apart: `rescale` scales only the indirect one
        theta_star = dict(theta)
        for name in names:
            stacked = torch.stack([e[name] for e in eps])
            theta_star[name] = theta[name] + torch.tensordot(held.to(stacked.dtype), stacked, dims=1)
        loss = problem.meta_loss(theta_star, problem.meta_batch)
        *direct, d_weights = grads_or_zeros(loss, [*problem.meta_params, held])
        indirect = grads_or_zeros(weights, problem.meta_params, grad_outputs=d_weights)
        return tuple(direct), indirect, loss.detach()

    def _estimate_lean(self, problem: HypergradientProblem, draw: NoiseDraw) -> tuple[Grads, Grads, torch.Tensor]:
        """One copy at a time: `d L_meta / d lambda = direct - (1 / tau) sum_k w_k (c_k - c_bar) d l_k / d lambda`,
        with `c_k = grad L_meta(theta*) . eps_k` and `c_bar = sum_k w_k c_k` (the chain rule through the softmax).
        Returns `(direct, indirect, meta loss)`, the sum over copies being the indirect term.

        Weight-sized tensors alive at once, besides the weights: one perturbed copy while its training loss is
        differentiated (its noise is drawn one weight at a time, straight into it), then `theta*` while the meta loss
        is. With sign noise the perturbations are kept as the packed bits they were drawn as (one bit per weight) and
        `c_k` is accumulated weight by weight as the meta backward produces `grad L_meta(theta*)`, each gradient freed
        at once, so no full gradient w.r.t. `theta*` is ever held. (Gaussian noise is regenerated from its seed, in
        order, so that gradient is held for it.)"""
        theta, names, meta_params = draw.theta, draw.names, problem.meta_params
        signed, scale = self.noise == "sign", draw.scale
        losses, loss_grads, signs = [], [], []
        for k in range(self.population):
            perturbed, kept = dict(theta), {}
            for name, eps, bits in draw.with_bits(k):
                perturbed[name] = eps.add_(theta[name])  # theta + eps, in the noise's own memory
                if signed:  # one bit per weight, not drawn again
                    kept[name] = bits
                del eps  # before the next weight's noise is drawn
            signs.append(kept)
            loss_k = problem.held_train_loss(perturbed).reshape(())
            losses.append(loss_k.detach())
            loss_grads.append(grads_or_zeros(loss_k, meta_params))
            del perturbed, loss_k

        weights = self._softmax_weights(torch.stack(losses))
        # theta* in the weights' row-major order, the order of the packed signs
        moved = {name: theta[name].clone(memory_format=torch.contiguous_format) for name in names}
        for k, w_k in enumerate(weights.tolist()):  # one device sync, not one per weight or chunk
            if signed:  # +/- 1 a chunk at a time, times w_k sigma
                for name, bits in signs[k].items():
                    flat = moved[name].view(-1)
                    for start, chunk in _sign_chunks(bits, flat.numel(), flat.dtype):
                        flat[start : start + chunk.numel()].add_(chunk, alpha=w_k * scale)
                continue
            for name, eps in draw.stream(k):
                moved[name].add_(eps, alpha=w_k)
        forward = self.path == "forward"
        if forward:
            device = next(iter(moved.values())).device
            before = _rng_state(device)
            try:
                direct, c, loss = self._meta_jvps(problem, draw, moved, signs)
            except (NotImplementedError, RuntimeError) as err:
                if self.forward_mode:  # asked for: the error says what to do
                    raise
                _set_rng_state(device, before)  # the failed attempt leaves the RNG where it found it
                logger.warning(
                    f"EvoGrad: the meta loss could not be differentiated in forward mode ({err.__cause__ or err}): "
                    "taking the lean backward path from now on (set memory_lean=True to choose it)."
                )
                self._forward_unsupported, forward = True, False
        if not forward:
            loss = problem.meta_loss(
                {**theta, **{name: p.requires_grad_() for name, p in moved.items()}}, problem.meta_batch
            )
            if signed:
                direct, c = self._meta_backward(loss, moved, meta_params, signs, scale)
            else:
                c = torch.zeros(self.population, dtype=torch.float64, device=loss.device)
                grads = grads_or_zeros(loss, [*moved.values(), *meta_params])
                g_star, direct = dict(zip(names, grads[: len(names)])), grads[len(names) :]
                for k in range(self.population):
                    for name, eps in draw.stream(k):
                        c[k] += (g_star[name] * eps).sum(dtype=torch.float64)
        coefficient = -(weights.double() * (c - (weights.double() * c).sum())) / self.temperature
        indirect = tuple(
            sum(coefficient[k].to(d.dtype) * loss_grads[k][i] for k in range(self.population))
            for i, d in enumerate(direct)
        )
        return tuple(direct), indirect, loss.detach()

    def _meta_jvps(
        self, problem: HypergradientProblem, draw: NoiseDraw, moved: dict[str, torch.Tensor], signs: list[dict]
    ) -> tuple[Grads, torch.Tensor, torch.Tensor]:
        """`(direct, c, meta loss)` by forward-mode AD (`forward_mode`) at `theta* = moved`:
        `c_k = grad L_meta(theta*) . (eps_k - eps_K)` (so `c_K = 0`, which the softmax's chain rule does not see: only
        differences of `c` matter), one Jacobian-vector product per copy but the last, each a forward pass of the meta
        loss with dual weights. The primal of the first carries the graph of a direct dependence on the
        meta-parameters, if any."""
        device = next(iter(moved.values())).device
        c = torch.zeros(self.population, dtype=torch.float64, device=device)
        loss, start = None, _rng_state(device)
        for k in range(self.population - 1):
            tangent = draw.tangent(signs, k)
            # every product on the first one's random draws (dropout), and the RNG moved on by one meta loss call, as
            # the backward paths leave it; scaled_dot_product_attention's fused kernels have no forward derivative
            replay = contextlib.nullcontext() if k == 0 else _replaying_rng(device, start)
            with forward_ad.dual_level(), replay, sdpa_kernel(SDPBackend.MATH):
                duals = {name: forward_ad.make_dual(p, tangent[name]) for name, p in moved.items()}
                del tangent
                try:
                    output = problem.meta_loss({**draw.theta, **duals}, problem.meta_batch)
                except (NotImplementedError, RuntimeError) as err:
                    if not re.search(r"forward[ -](mode )?AD", str(err)):
                        raise
                    raise NotImplementedError(
                        f"EvoGrad option forward_mode=True: an operator of the meta loss has no forward-mode "
                        f"derivative ({err}). Set forward_mode=False "
                        "(memory_lean=True still takes the copies one at a time)."
                    ) from err
                primal, derivative = forward_ad.unpack_dual(output)
            # a meta loss that does not depend on the weights has no tangent
            # a constant of the estimate: the hypergradient flows through the softmax weights only
            c[k] = 0.0 if derivative is None else derivative.detach().reshape(()).double()
            if loss is None:
                loss = primal
                direct = grads_or_zeros(primal, problem.meta_params)
        return direct, c, loss

    @staticmethod
    def _meta_backward(
        loss: torch.Tensor,
        moved: dict[str, torch.Tensor],
        meta_params: Sequence[torch.Tensor],
        signs: list[dict],
        scale: float,
    ) -> tuple[Grads, torch.Tensor]:
        """Backward of the meta loss that takes `grad_n . signs[k][n]` for every copy `k` as each weight's gradient
        `grad_n` is accumulated and then drops it, and sets `c[k]` to `scale` times their sum over the weights. The
        signs are unpacked a chunk at a time (see [`_sign_chunks`]), so the backward, whose activations are alive,
        gains no weight-sized temporary. Returns `(direct, c)`: the gradients w.r.t. `meta_params` (zeros where the
        loss does not depend on them) and `c` (float64); the `.grad` the caller's meta-parameters had is put back."""
        c = torch.zeros(len(signs), dtype=torch.float64, device=loss.device)
        if not loss.requires_grad:
            return tuple(torch.zeros_like(p) for p in meta_params), c
        parts: list[dict[str, torch.Tensor]] = [{} for _ in signs]

        def consume(name: str):
            def hook(p: torch.Tensor) -> None:
                grad, p.grad = p.grad, None
                flat = grad.reshape(-1)  # row-major, as the signs
                for k, kept in enumerate(signs):
                    parts[k][name] = sum(
                        _dot(flat[start : start + chunk.numel()], chunk)
                        for start, chunk in _sign_chunks(kept[name], flat.numel(), flat.dtype)
                    )

            return hook

        handles = [p.register_post_accumulate_grad_hook(consume(name)) for name, p in moved.items()]
        held = [p.grad for p in meta_params]
        try:
            for p in meta_params:
                p.grad = None
            torch.autograd.backward(loss, inputs=[*moved.values(), *meta_params])
            direct = tuple(torch.zeros_like(p) if p.grad is None else p.grad for p in meta_params)
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in zip(meta_params, held):
                p.grad = grad
        for k, kept in enumerate(signs):
            zero = torch.zeros((), dtype=torch.float64, device=c.device)  # a weight the meta loss does not reach
            c[k] = scale * sum(parts[k].get(name, zero) for name in kept)
        return direct, c
