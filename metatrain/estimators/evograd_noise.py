"""EvoGrad's noise: the perturbations of one call's population regenerated from a seed, sign noise packed as bits,
and the replay of the global RNG state."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

SIGN_CHUNK = 1 << 17  # packed bytes unpacked at once: 2^20 signs, a 4 MB float32 temporary


@functools.lru_cache(maxsize=16)
def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[256, 8]`: row `b` holds the signs packed in byte `b`, `+1` where bit `i` (least significant first) is set,
    else `-1`."""
    bits = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1
    return (2 * bits - 1).to(dtype)


@functools.lru_cache(maxsize=16)
def _sigma_table(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[`_sign_table`] times `sigma`: `+/- sigma` as float32 rounds it, then in `dtype` on `device` (read only)."""
    return (_sign_table(torch.float32, device) * sigma).to(dtype)


def _unpack(table: torch.Tensor, bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The first `numel` values that the bytes `bits` pack, looked up in `table` (a [`_sign_table`], possibly
    scaled), flattened."""
    return table.index_select(0, bits.int()).view(-1)[:numel]


def _sign_chunks(bits: torch.Tensor, numel: int, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """`(start, signs)`: the `numel` signs packed in `bits` as `+/-1` of `dtype`, `8 * SIGN_CHUNK` at a time."""
    table = _sign_table(dtype, bits.device)
    for i in range(0, bits.numel(), SIGN_CHUNK):
        yield 8 * i, _unpack(table, bits[i : i + SIGN_CHUNK], min(numel - 8 * i, 8 * SIGN_CHUNK))


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    """The global CPU RNG state, and that of `device` if it is an accelerator."""
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device.type).get_rng_state(device))
    return states


@contextlib.contextmanager
def _replaying_rng(device: torch.device, state: list[torch.Tensor]) -> Iterator[None]:
    """Runs the block from the RNG state `state` (see [`_rng_state`]) and puts back the state from before it."""
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(
        devices=[device] if accelerator else [], device_type=device.type if accelerator else "cuda"
    ):
        _set_rng_state(device, state)
        yield


def _set_rng_state(device: torch.device, state: list[torch.Tensor]) -> None:
    """Puts back the RNG state `state` taken by [`_rng_state`]."""
    torch.set_rng_state(state[0])
    if device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(state[1], device)


@dataclass(frozen=True)
class NoiseDraw:
    """The perturbations `eps_k` of one call's population, regenerated from `seed` one weight at a time: copy `k` is
    drawn from `seed + k` (antithetic copy `k >= population / 2` is minus copy `k - population / 2`).

    Args:
        theta (`Mapping[str, torch.Tensor]`): the detached weights; the noise is drawn where they live.
        names (`Sequence[str]`): the perturbed weights, in the order they are drawn.
        sigma (`float`): the perturbation scale.
        seed (`int`): the seed of copy 0.
        population (`int`): the number of copies `K`.
        antithetic (`bool`, *optional*, defaults to `False`): draw `K / 2` pairs `+eps`, `-eps`.
        noise (`str`, *optional*, defaults to `"sign"`): `"sign"` for `+/- sigma`, `"gaussian"` for `sigma N(0, I)`.
    """

    theta: Mapping[str, torch.Tensor]
    names: Sequence[str]
    sigma: float
    seed: int
    population: int
    antithetic: bool = False
    noise: str = "sign"

    @property
    def scale(self) -> float:
        """`sigma` as float32 rounds it: the size of every sign draw."""
        return float(torch.tensor(self.sigma, dtype=torch.float32))

    def with_bits(self, k: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """The perturbation of copy `k` as `(name, eps, bits)` in the order of `names` (a caller never needs more than
        one weight's noise at once). Sign noise is drawn as random bytes, 8 signs each (bit set: `+sigma`), and `bits`
        holds them (`uint8`, an eighth of the weight's elements, in the weight's row-major order; see
        [`_sign_table`]); Gaussian noise has `bits=None`. An antithetic mirror has its partner's bits inverted."""
        half = self.population // 2
        mirrored = self.antithetic and k >= half
        device = self.theta[self.names[0]].device  # drawn where the weights live: no host-to-device copy per step
        generator = torch.Generator(device=device).manual_seed(self.seed + (k % half if self.antithetic else k))
        for name in self.names:
            p = self.theta[name]
            if self.noise == "sign":
                bits = torch.randint(0, 256, (-(-p.numel() // 8),), generator=generator, device=device,
                                     dtype=torch.uint8).to(p.device)  # fmt: skip
                if mirrored:
                    bits.bitwise_not_()
                yield name, _unpack(_sigma_table(self.sigma, p.dtype, p.device), bits, p.numel()).view(p.shape), bits
                continue
            eps = torch.randn(p.shape, generator=generator, device=device, dtype=torch.float32)
            yield name, eps.mul_(-self.sigma if mirrored else self.sigma).to(device=p.device, dtype=p.dtype), None

    def stream(self, k: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The perturbation of copy `k` as `(name, eps)`, one weight at a time (see [`~NoiseDraw.with_bits`])."""
        return ((name, eps) for name, eps, _ in self.with_bits(k))

    def perturbation(self, k: int) -> dict[str, torch.Tensor]:
        """The whole perturbation of copy `k` (see [`~NoiseDraw.stream`])."""
        return dict(self.stream(k))

    def tangent(self, signs: Sequence[Mapping[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
        """`eps_k - eps_K` for every perturbed weight (`K` the last copy), shaped as the weights and row-major: from
        `signs`, the bits each copy was drawn as (sign noise), or regenerated from `seed` (Gaussian noise)."""
        last = self.population - 1
        if self.noise == "sign":
            tangent = {}
            for name, bits in signs[k].items():
                p = self.theta[name]
                table = _sigma_table(self.sigma, p.dtype, p.device)
                step = _unpack(table, bits, p.numel()) - _unpack(table, signs[last][name], p.numel())
                tangent[name] = step.view(p.shape)
            return tangent
        return {name: eps - eps_last for (name, eps), (_, eps_last) in zip(self.stream(k), self.stream(last))}
