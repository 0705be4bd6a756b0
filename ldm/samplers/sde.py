"""Stochastic samplers: ancestral steps and the DPM-Solver++ SDE family; conventions in `ldm.samplers.common`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.samplers.common import (
    BrownianPath,
    Callback,
    Denoiser,
    _exp_step,
    _prepare,
    _randn,
    _taylor_from_history,
    _to_d,
    ancestral_step,
    phi,
)

# --------------------------------------------------------------------------------------------- SDE samplers


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up back up to
    sigma_next (`ancestral_step`). Stochastic, one evaluation per step."""
    model, s = _prepare(denoiser, x, sigmas)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + _to_d(x, denoised, s[i]) * (down - s[i])
        if up:
            x = x + _randn(x, generator) * (s_noise * up)
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM2 ancestral: the DPM2 midpoint step down to sigma_down, then noise of size sigma_up.
    Stochastic, two evaluations per step (one on the step to 0)."""
    model, s = _prepare(denoiser, x, sigmas)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        d = _to_d(x, denoised, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = x + d * (down - s[i])
        else:
            s_mid = math.sqrt(s[i] * down)
            x_mid = x + d * (s_mid - s[i])
            x = x + _to_d(x_mid, model(x_mid, s_mid), s_mid) * (down - s[i])
        if up:
            x = x + _randn(x, generator) * (s_noise * up)
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2S) ancestral: the single-step second-order DPM-Solver++ (an intermediate D at the
    lambda midpoint) down to sigma_down, then noise of size sigma_up. Stochastic, two evaluations
    per step (one on the step to 0). At eta = 0 it is deterministic DPM-Solver++(2S), order 2."""
    model, s = _prepare(denoiser, x, sigmas)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = denoised
        else:
            s_mid = math.sqrt(s[i] * down)
            x_mid = _exp_step(x, denoised, s[i], s_mid)
            x = _exp_step(x, model(x_mid, s_mid), s[i], down)
        if up:
            x = x + _randn(x, generator) * (s_noise * up)
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++ SDE (single-step, second order in the drift): an ancestral half step to the
    lambda fraction r gives a second D; the full ancestral step uses the mix (1 - 1/2r) D + 1/2r D_r.
    The noise of the sub-step and of the full step are increments of one Brownian path
    (`BrownianPath`, W indexed by sigma) over [sigma_r, sigma] and [sigma_next, sigma], so they are
    correlated as the underlying SDE's noise is. Stochastic, two evaluations per step."""
    if not 0 < r <= 1:
        raise ValueError(f"r must be in (0, 1], got {r}")
    model, s = _prepare(denoiser, x, sigmas)
    brownian = BrownianPath(x, generator)
    fac = 1 / (2 * r)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            s_r = s[i] * (s[i + 1] / s[i]) ** r
            down, up = ancestral_step(s[i], s_r, eta)
            x_r = _exp_step(x, denoised, s[i], down)
            if up:
                x_r = x_r + brownian.increment(s[i], s_r) * (s_noise * up)
            denoised_r = model(x_r, s_r)
            down, up = ancestral_step(s[i], s[i + 1], eta)
            x = _exp_step(x, (1 - fac) * denoised + fac * denoised_r, s[i], down)
            if up:
                x = x + brownian.increment(s[i], s[i + 1]) * (s_noise * up)
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, the data-prediction SDE solver): over a step of h in
    lambda the SDE contracts by e^-(1+eta)h, D gets the rest, and noise of size
    sigma_next sqrt(1 - e^-2 eta h) is added; D is corrected with the previous step's D as in 2M.
    At eta = 0 it is exactly `sample_dpmpp_2m`. One evaluation per step; independent noise per step
    is exact here (the increments are over disjoint intervals)."""
    model, s = _prepare(denoiser, x, sigmas)
    old_denoised, h_prev = None, None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            decay = math.exp(-(1 + eta) * h)
            d = denoised if old_denoised is None else denoised + (h / (2 * h_prev)) * (denoised - old_denoised)
            x = decay * x + (1 - decay) * d
            if eta:
                x = x + _randn(x, generator) * (s_noise * s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)))
            h_prev = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Third-order multistep DPM-Solver++ SDE: D along lambda is the quadratic through the last three
    D's, and the step integrates it exactly against the SDE's kernel (1+eta) e^-(1+eta)(h-u):
    the k-th derivative gets weight h^k H phi_(k+1)(-H), H = (1+eta) h. Noise as in 2M SDE. At
    eta = 0 a deterministic third-order multistep solver. One evaluation per step."""
    model, s = _prepare(denoiser, x, sigmas)
    history: list[tuple[float, Tensor]] = []  # (lambda, D), newest first
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        lam = -math.log(s[i])
        history.insert(0, (lam, denoised))
        del history[3:]
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            big_h = (1 + eta) * h
            x = math.exp(-big_h) * x + (-math.expm1(-big_h)) * denoised
            taylor = _taylor_from_history(history)
            for k, coef in enumerate(taylor, start=1):
                x = x + (math.factorial(k) * h**k * big_h * phi(k + 1, -big_h)) * coef
            if eta:
                x = x + _randn(x, generator) * (s_noise * s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)))
        if callback is not None:
            callback(i, x, denoised)
    return x
