"""EvoGrad: first-order hypergradients from an evolutionary inner step."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from ._base import HypergradientEstimator, HypergradientResult, LossFn, ParamDict, grads_or_zeros

NOISE_TYPES = ("sign", "gaussian")


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
        sigma (`float` or `"auto"`, *optional*, defaults to 0.001):
            Perturbation scale. Linearising the softmax for small perturbations gives
            `E[theta* - theta] = -(K - 1) sigma^2 / (K tau) * grad_theta train_loss`: in expectation EvoGrad is a
            one-step lookahead with step size `(K - 1) sigma^2 / (K tau)`, so its hypergradient grows with
            `sigma^2`. `"auto"` picks `sigma = sqrt(K tau lr / (K - 1))` from the inner step size `lr` of each call,
            matching the lookahead step to the model's learning rate.
        temperature (`float`, *optional*, defaults to 0.05):
            Softmax temperature `tau`.
        noise (`str`, *optional*, defaults to `"sign"`):
            `"sign"` for `sigma * sign(N(0, I))` as the official code, `"gaussian"` for `sigma * N(0, I)`.
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
    """

    name = "evograd"

    def __init__(
        self,
        population: int = 2,
        sigma: float | str = 0.001,
        temperature: float = 0.05,
        noise: str = "sign",
        antithetic: bool = False,
        perturb: str | None = None,
    ):
        if isinstance(population, bool) or not isinstance(population, int) or population < 2:
            raise ValueError(f"EvoGrad option `population` must be an integer >= 2, got population={population!r}.")
        if not isinstance(antithetic, bool):
            raise ValueError(f"EvoGrad option `antithetic` must be True or False, got antithetic={antithetic!r}.")
        if antithetic and population % 2:
            raise ValueError(
                f"EvoGrad option `antithetic=True` needs an even `population` (pairs theta +/- eps), got "
                f"population={population}."
            )
        checked = [("temperature", temperature)] + ([] if sigma == "auto" else [("sigma", sigma)])
        for option, value in checked:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                allowed = 'a number > 0 or "auto"' if option == "sigma" else "a number > 0"
                raise ValueError(f"EvoGrad option `{option}` must be {allowed}, got {option}={value!r}.")
        if noise not in NOISE_TYPES:
            raise ValueError(f"EvoGrad option `noise` must be one of {NOISE_TYPES}, got noise={noise!r}.")
        self.population = population
        self.sigma = sigma if sigma == "auto" else float(sigma)
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
        """`sigma`, or for `"auto"` the one whose effective step size equals `lr`."""
        if self.sigma != "auto":
            return self.sigma
        return math.sqrt(self._check_lr(lr) / self._step_per_sigma2())

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

    def _perturbation(self, p: torch.Tensor, sigma: float) -> torch.Tensor:
        draws = self.population // 2 if self.antithetic else self.population
        eps = torch.randn((draws, *p.shape), device=p.device, dtype=p.dtype)
        eps = sigma * (eps.sign() if self.noise == "sign" else eps)
        return torch.cat([eps, -eps]) if self.antithetic else eps

    def estimate(
        self,
        params: ParamDict,
        meta_params: Sequence[torch.Tensor],
        train_loss: LossFn,
        meta_loss: LossFn,
        train_batch: Any = None,
        meta_batch: Any = None,
        lr: float | None = None,
    ) -> HypergradientResult:
        sigma = self.resolve_sigma(lr)
        theta = {name: p.detach() for name, p in params.items()}
        eps = {name: self._perturbation(theta[name], sigma) for name in self._perturbed_names(theta)}

        def copy(k: int) -> dict[str, torch.Tensor]:
            return {name: p + eps[name][k] if name in eps else p for name, p in theta.items()}

        losses = torch.stack([train_loss(copy(k), train_batch).reshape(()) for k in range(self.population)])
        weights = torch.softmax(-losses.float() / self.temperature, dim=0)
        theta_star = {
            name: p + torch.tensordot(weights.to(p.dtype), eps[name], dims=1) if name in eps else p
            for name, p in theta.items()
        }
        loss = meta_loss(theta_star, meta_batch)
        return HypergradientResult(grads_or_zeros(loss, meta_params), loss.detach())
