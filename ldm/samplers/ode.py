"""Deterministic solvers of the probability-flow ODE (and DDIM, whose eta adds noise); conventions in
`ldm.samplers.common`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ldm.samplers.common import (
    Callback,
    Denoiser,
    _exp_step,
    _prepare,
    _randn,
    _to_d,
    ancestral_step,
    lms_coefficients,
    phi,
)

# --------------------------------------------------------------------------------------------- ODE samplers


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method on dx/dsigma = (x - D) / sigma (Karras et al. 2022, Alg. 1 without churn).
    Identical to deterministic DDIM. Order 1, one evaluation per step."""
    model, s = _prepare(denoiser, x, sigmas)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        x = x + _to_d(x, denoised, s[i]) * (s[i + 1] - s[i])
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's method (trapezoidal predictor-corrector, Karras et al. 2022 Alg. 1). Order 2, two
    evaluations per step; the step to sigma = 0 is plain Euler, since the slope is undefined there."""
    model, s = _prepare(denoiser, x, sigmas)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        d = _to_d(x, denoised, s[i])
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            d_pred = _to_d(x_pred, model(x_pred, s[i + 1]), s[i + 1])
            x = x + (d + d_pred) / 2 * dt
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver-2 in the sigma form (Karras et al.'s 'DPM2'): a midpoint method whose midpoint is
    the geometric mean of the two sigmas (the middle in log-sigma). Order 2, two evaluations; the
    step to 0 is Euler."""
    model, s = _prepare(denoiser, x, sigmas)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        d = _to_d(x, denoised, s[i])
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:
            s_mid = math.sqrt(s[i] * s[i + 1])
            x_mid = x + d * (s_mid - s[i])
            x = x + _to_d(x_mid, model(x_mid, s_mid), s_mid) * (s[i + 1] - s[i])
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 4,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Linear multistep (Adams-Bashforth on the true, uneven sigma grid): the slope is extrapolated
    by the polynomial through the last `order` slopes and integrated exactly over the step. The
    first steps have fewer past slopes and use a lower order. One evaluation per step."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    model, s = _prepare(denoiser, x, sigmas)
    slopes: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        slopes.append(_to_d(x, denoised, s[i]))
        del slopes[:-order]
        k = len(slopes)
        weights = lms_coefficients(s[i - k + 1 : i + 1][::-1], s[i], s[i + 1])
        x = x + sum(w * d for w, d in zip(weights, reversed(slopes), strict=True))
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_plms_sigma(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """PLMS (Liu et al. 2022) over a sigma schedule: Adams-Bashforth on the eps estimate with the
    equal-step coefficients (exact only on a schedule even in the model's timestep), fed to the DDIM
    update, which in the sigma form is x + eps * (sigma_next - sigma). The first step is a pseudo
    improved-Euler step (two evaluations). A reference for comparison; the txt2img PLMS that matches
    the original CompVis code is `ldm.models.diffusion.plms`."""
    model, s = _prepare(denoiser, x, sigmas)
    history: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        eps = _to_d(x, denoised, s[i])
        dt = s[i + 1] - s[i]
        if not history:
            if s[i + 1] == 0:
                eps_prime = eps
            else:
                x_pred = x + eps * dt
                eps_prime = (eps + _to_d(x_pred, model(x_pred, s[i + 1]), s[i + 1])) / 2
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history.append(eps)
        del history[:-3]
        x = x + eps_prime * dt
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): exponential integrator in lambda = -log sigma on
    the x0 prediction, with D linearly extrapolated from the previous step's D to the step's middle:
    x_next = e^-h x + (1 - e^-h) (D + (h / 2 h_prev) (D - D_prev)). Order 2, one evaluation per step;
    the first step is DPM-Solver++-1 and the step to sigma = 0 returns D."""
    model, s = _prepare(denoiser, x, sigmas)
    old_denoised, h_prev = None, None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            d = denoised if old_denoised is None else denoised + (h / (2 * h_prev)) * (denoised - old_denoised)
            x = _exp_step(x, d, s[i], s[i + 1])
            h_prev = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


def _unipc_weights(rks: Sequence[float], h: float, variant: str) -> tuple[float, list[float]]:
    """B(h) and the weights a_m of UniPC's update x_base + B(h) sum_m a_m (D_m - D_s) / r_m.

    The update equals the lambda-integral of the polynomial through the points when
    sum_m a_m r_m^(k-1) = k! h phi_(k+1)(-h) / B(h) for k = 1..len(rks) (Taylor matching; the
    system is square, so B(h) only matters where it is not solved). With a single point UniPC
    uses a = 1/2 instead of solving (the paper's choice; it keeps the order).
    """
    if variant == "bh1":
        b_h = h
    elif variant == "bh2":
        b_h = -math.expm1(-h)
    else:
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    n = len(rks)
    if n == 1:
        return b_h, [0.5]
    rhs = np.array([math.factorial(k) * h * phi(k + 1, -h) / b_h for k in range(1, n + 1)])
    mat = np.array([[r ** (k - 1) for r in rks] for k in range(1, n + 1)])
    return b_h, np.linalg.solve(mat, rhs).tolist()


def _unipc_update(
    x: Tensor,
    lam_s: float,
    lam_t: float,
    d_s: Tensor,
    past: Sequence[tuple[float, Tensor]],
    d_t: Tensor | None,
    variant: str,
) -> Tensor:
    """One UniP (d_t None) or UniC (d_t = D at the predicted point) update from lambda_s to lambda_t
    (Zhao et al. 2023, x0-prediction form, alpha = 1): the DPM-Solver++-1 step plus the higher-order
    correction built from past (lambda_m, D_m) pairs, newest first, and, for UniC, the new D_t."""
    h = lam_t - lam_s
    x_next = math.exp(-h) * x - math.expm1(-h) * d_s
    points = [((lam_m - lam_s) / h, d_m) for lam_m, d_m in past]
    if d_t is not None:
        points.append((1.0, d_t))
    if not points:
        return x_next
    b_h, weights = _unipc_weights([r for r, _ in points], h, variant)
    for w, (r, d_m) in zip(weights, points, strict=True):
        x_next = x_next + (b_h * w / r) * (d_m - d_s)
    return x_next


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 2,
    variant: str = "bh2",
    use_corrector: bool = True,
    lower_order_final: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """UniPC (Zhao et al. 2023), x0 prediction, in lambda = -log sigma. Each step: evaluate D at
    the predicted point; UniC re-does the step that led there using that D as well (raising the
    order by one at no extra evaluation); UniP-`order` then predicts the next point from the
    corrected x and the D history. Order `order` + 1 with the corrector; one evaluation per step.
    The step to sigma = 0 returns D. With fewer than 10 steps the last steps lower their order
    (`lower_order_final`), as the reference implementations do for stability."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    model, s = _prepare(denoiser, x, sigmas)
    steps = len(s) - 1
    lams = [-math.log(v) if v > 0 else math.inf for v in s]
    history: list[tuple[float, Tensor]] = []  # (lambda, D), newest first
    x_prev, prev_order = None, 0
    for i in range(steps):
        denoised = model(x, s[i])
        if use_corrector and x_prev is not None:
            d_prev = history[0][1]
            x = _unipc_update(x_prev, lams[i - 1], lams[i], d_prev, history[1:prev_order], denoised, variant)
        history.insert(0, (lams[i], denoised))
        del history[order:]
        if s[i + 1] == 0:
            x_prev, x = x, denoised
        else:
            step_order = min(order, len(history))
            if lower_order_final and steps < 10:
                step_order = min(step_order, steps - i)
            x_prev = x
            x = _unipc_update(x, lams[i], lams[i + 1], denoised, history[1:step_order], None, variant)
            prev_order = step_order
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) in the sigma form: x_next = D + (sigma_down / sigma) (x - D), plus
    noise of size sigma_up (`ancestral_step`). At eta = 0 (the default) this is exactly Euler; at
    eta = 1 exactly Euler ancestral. Order 1."""
    model, s = _prepare(denoiser, x, sigmas)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = _exp_step(x, denoised, s[i], down)
        if up:
            x = x + _randn(x, generator) * (s_noise * up)
        if callback is not None:
            callback(i, x, denoised)
    return x
