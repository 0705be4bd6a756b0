"""Latent Consistency Model sampling (Luo et al. 2023): 2-8 steps with an LCM or an SD v1 model plus LCM-LoRA.

A consistency model maps a noisy latent at timestep t straight to the clean latent, through the boundary
conditions f(x, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t), with c_skip = s^2 / ((10 t)^2 + s^2) and
c_out = 10 t / sqrt((10 t)^2 + s^2), s = sigma_data = 0.5 (f is the identity at t = 0). Multistep sampling
alternates that jump with fresh noise down to the next level of the schedule; the last jump is not re-noised.
The timesteps are taken from the 50-step grid the model was distilled on, not from the full 1000.

In this package's terms (`ldm.samplers.common`): `consistency_denoiser` turns a denoiser into f (x is in the
variance-exploding form, x = x_t / sqrt(a_t), so x_t = x / sqrt(1 + sigma^2)), and `sample_lcm` is the short
loop over the sigmas of `lcm_timesteps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ldm.samplers.common import Callback, Denoiser, _prepare, _randn
from ldm.samplers.schedules import sigmas_from_alphas_cumprod, t_from_sigma

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
ORIGINAL_STEPS = 50


def lcm_timesteps(steps: int, train_steps: int = 1000, original_steps: int = ORIGINAL_STEPS, strength: float = 1.0):
    """`steps` integer timesteps, decreasing: evenly spaced indices into the distillation grid (every
    train_steps // original_steps-th step, ending at the last), cut to its lower `strength` part for img2img."""
    if not 1 <= original_steps <= train_steps:
        raise ValueError(f"the LCM grid needs 1 <= original steps <= {train_steps}, not {original_steps}")
    grid = np.arange(1, int(original_steps * strength) + 1) * (train_steps // original_steps) - 1
    if not 1 <= steps <= min(len(grid), original_steps):
        raise ValueError(
            f"LCM takes 1 to {min(len(grid), original_steps)} steps here (its grid has {original_steps} steps"
            f"{f', {len(grid)} of them below strength {strength}' if strength < 1 else ''}), not {steps}"
        )
    grid = grid[::-1]
    return [int(t) for t in grid[np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)]]


def lcm_sigmas(
    alphas_cumprod: Tensor,
    steps: int,
    original_steps: int = ORIGINAL_STEPS,
    strength: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The noise levels of `lcm_timesteps`, then 0 (float32, as every schedule here)."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    ts = lcm_timesteps(steps, len(sigmas), original_steps, strength)
    return torch.cat([sigmas[ts], sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


def consistency_scalings(t: Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
    """(c_skip, c_out) at timesteps `t`: the boundary conditions that make f(x, 0) = x."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def consistency_denoiser(
    denoiser: Denoiser,
    timestep_of: Callable[[Tensor], Tensor],
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> Denoiser:
    """`denoiser` with the consistency boundary conditions applied; `timestep_of(sigma)` gives the model's
    (integer) timestep at each noise level."""

    def f(x: Tensor, sigma: Tensor) -> Tensor:
        shape = (-1, *([1] * (x.ndim - 1)))
        c_skip, c_out = consistency_scalings(timestep_of(sigma).to(x.device, x.dtype), sigma_data, timestep_scaling)
        x_t = x / (1 + sigma.to(x.dtype).reshape(shape) ** 2).sqrt()
        return c_out.reshape(shape) * denoiser(x, sigma) + c_skip.reshape(shape) * x_t

    return f


def lcm_denoiser(denoiser: Denoiser, alphas_cumprod: Tensor) -> Denoiser:
    """`consistency_denoiser` for a discrete model with this schedule: its timestep is the nearest training step."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    return consistency_denoiser(denoiser, lambda sigma: t_from_sigma(sigma.detach().cpu(), log_sigmas).round())


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """LCM multistep sampling with a `consistency_denoiser`: jump to the clean estimate, re-noise to the next
    sigma with fresh noise, and return the last jump as it is."""
    model, s = _prepare(denoiser, x, sigmas)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        x = denoised if s[i + 1] == 0 else denoised + _randn(denoised, generator) * s[i + 1]
        if callback is not None:
            callback(i, x, denoised)
    return x
