"""Noise-level (sigma) schedules for the samplers in `ldm.samplers`.

Everything here is in the variance-exploding parameterisation x = x0 + sigma * eps, which is the
discrete DDPM model's x_t / sqrt(alpha_bar_t): sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).
A schedule is a 1-D tensor of decreasing sigmas, normally ending with 0 (the clean sample), so a
sampler with n steps receives n + 1 values.

The arithmetic is done in float64 and cast once at the end, so a float32 schedule is the correctly
rounded version of the exact one, whatever its length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _finish(sigmas: Tensor, append_zero: bool, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(dtype=dtype, device=device)


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"a schedule needs at least one step, got {n}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) at each of the model's training steps (increasing in t).

    This is the noise level of x_t / sqrt(a_t), which is how a discrete eps-prediction model is seen
    as a denoiser of x0 + sigma * eps. Computed in float64: a_t is close to 1 at small t.
    """
    a = torch.as_tensor(alphas_cumprod).detach().to(torch.float64)
    return ((1 - a) / a).sqrt()


def sigma_from_t(t: Tensor, log_sigmas: Tensor) -> Tensor:
    """sigma at a continuous timestep t in [0, T-1]: linear interpolation of log-sigma between the
    integer steps (the natural continuous extension of a discrete schedule, and the exact inverse of
    `t_from_sigma`)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    ls = log_sigmas.to(torch.float64)
    t = t.clamp(0, len(ls) - 1)
    lo = t.floor().long().clamp(max=len(ls) - 2)
    w = t - lo
    return ((1 - w) * ls[lo] + w * ls[lo + 1]).exp()


def t_from_sigma(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """The continuous timestep whose interpolated sigma is `sigma` (see `sigma_from_t`).

    `log_sigmas` must increase with t (it does for every DDPM schedule). Sigmas outside the model's
    range are clamped to its ends, t = 0 or t = T - 1: the model was never trained beyond them.
    """
    ls = log_sigmas.to(torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    log_sigma = sigma.clamp(min=1e-300).log()
    hi = torch.searchsorted(ls, log_sigma.contiguous()).clamp(1, len(ls) - 1)
    lo = hi - 1
    w = ((log_sigma - ls[lo]) / (ls[hi] - ls[lo])).clamp(0, 1)
    return lo.to(torch.float64) + w


def discrete_sigmas(
    alphas_cumprod: Tensor,
    n: int,
    *,
    append_zero: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The model's own schedule in n steps: t evenly spaced from T-1 down to 0, sigma interpolated in
    log-sigma between integer steps, then 0. It starts at the largest sigma the model was trained on
    and takes its last noisy step at the smallest one."""
    _check_n(n)
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, n, dtype=torch.float64)
    return _finish(sigma_from_t(t, log_sigmas), append_zero, dtype, device)


def karras_sigmas(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    *,
    append_zero: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0.

    rho = 7 spends more of the steps at low noise, where the ODE's curvature (and the image detail) is;
    rho = 1 is evenly spaced in sigma, rho -> infinity evenly spaced in log-sigma.
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, append_zero, dtype, device)


def exponential_sigmas(
    n: int,
    sigma_min: float,
    sigma_max: float,
    *,
    append_zero: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Evenly spaced in log-sigma (constant step in lambda = -log sigma, the variable in which the
    DPM-Solver family is derived), from sigma_max to sigma_min, then 0."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    log_s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _finish(log_s.exp(), append_zero, dtype, device)


def sd_v1_alphas_cumprod(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> Tensor:
    """SD v1's training schedule (betas linear in sqrt-beta), float64; for tests and tools that need
    the model's schedule without loading a model."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)
