"""Samplers as short pure functions over a denoiser and a noise-level schedule (the k-diffusion design).

Conventions, shared by every sampler here:

- A *denoiser* is any callable ``denoiser(x, sigma) -> x0_hat``: given x at noise level sigma in the
  variance-exploding form x = x0 + sigma * eps, it returns the estimate of x0 (the model's
  D(x; sigma)). ``sigma`` is passed as a tensor of shape ``[batch]``. `denoiser_from_eps` turns SD's
  discrete eps-prediction UNet into one.
- ``sigmas`` is a decreasing 1-D schedule (see `ldm.samplers.schedules`), normally ending with 0;
  ``x`` is the start, already at noise level ``sigmas[0]`` (for txt2img: ``randn * sigmas[0]``).
  A schedule that stops above 0 returns x at ``sigmas[-1]``.
- The probability-flow ODE these samplers solve is dx/dsigma = (x - D(x; sigma)) / sigma. The
  DPM-Solver family works in lambda = -log(sigma), where it reads dx/dlambda = D - x and the linear
  part is integrated exactly: x(lambda + h) = e^-h x(lambda) + int_0^h e^-(h-u) D(lambda + u) du.
- Stochastic samplers take ``eta`` (how much of each step's noise is re-drawn; 0 makes them
  deterministic) and ``s_noise`` (scale of the fresh noise), and draw every random number from
  ``generator``, so a seeded generator gives the same result on every run.
- ``callback(i, x, denoised)`` is called after step i with the new x and the step's denoised estimate.

Schedule arithmetic (step ratios, exponentials, multistep weights) is done on Python floats in
double precision; only the model calls and the tensor updates run in x's dtype and device.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ldm.samplers.schedules import sigmas_from_alphas_cumprod, t_from_sigma

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


# --------------------------------------------------------------------------------------------- helpers


class _Model:
    """Calls the denoiser with sigma as a [batch] tensor, in the wider of the sigmas' and x's dtypes."""

    def __init__(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor):
        self.denoiser = denoiser
        dtype = sigmas.dtype if sigmas.is_floating_point() else torch.float32
        self.dtype = torch.promote_types(dtype, x.dtype) if x.is_floating_point() else dtype

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        return self.denoiser(x, torch.full((x.shape[0],), sigma, dtype=self.dtype, device=x.device))


def _prepare(denoiser: Denoiser, x: Tensor, sigmas: Tensor | Sequence[float]) -> tuple[_Model, list[float]]:
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    s = sigmas.detach().cpu().double().tolist()
    if any(not math.isfinite(v) for v in s) or any(v <= 0 for v in s[:-1]) or (s and s[-1] < 0):
        raise ValueError("sigmas must be finite and positive, except a final 0")
    if any(b >= a for a, b in zip(s, s[1:], strict=False)):
        raise ValueError("sigmas must be strictly decreasing")
    return _Model(denoiser, x, sigmas), s


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _to_d(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """The ODE's slope dx/dsigma = (x - D) / sigma, which is also the model's eps estimate."""
    return (x - denoised) / sigma


def _exp_step(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """First-order step holding D fixed: x_to = D + (sigma_to / sigma) (x - D).

    The same update is DDIM, Euler in sigma, and DPM-Solver(++)-1 in lambda: with D constant the
    ODE is linear and this is its exact solution. It lands exactly on D when sigma_to is 0.
    """
    return denoised + (sigma_to / sigma) * (x - denoised)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic move to sigma_down plus fresh noise of
    size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 so the noise level comes out right.

    eta = 1 re-draws as much noise as the DDPM posterior q(x_next | x, x0) does (this is DDIM's eta
    translated to sigmas); eta = 0 is the deterministic ODE step.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
    return down, up


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_j z^j / (j + k)!, the exponential-integrator functions (phi_0 = e^z,
    phi_{k+1}(z) = (phi_k(z) - 1/k!) / z). h^(k+1) phi_(k+1)(-h) = int_0^h e^-(h-u) u^k / k! du is the
    weight a D^(k) term gets in the DPM-Solver integral. Series for small |z| (the recurrence
    cancels catastrophically there), recurrence otherwise."""
    if abs(z) < 1.0:
        term, total, j = 1.0 / math.factorial(k), 0.0, 0
        while True:
            total += term
            j += 1
            term *= z / (j + k)
            if abs(term) < 1e-18 * abs(total):
                return total + term
    value = math.exp(z)
    for m in range(k):
        value = (value - 1.0 / math.factorial(m)) / z
    return value


class BrownianPath:
    """A Brownian motion W(t) sampled lazily at the times asked for, each new value drawn from its
    exact conditional law given the values already drawn: a Brownian bridge between the two nearest
    known times, a free Gaussian step beyond either end (the Markov property makes the nearest
    neighbours enough). All randomness comes from `generator`, so the same seed and the same
    queries give the same path. Unlike a virtual Brownian tree, the values for one seed depend on
    which times were asked for, so schedules of different lengths do not share noise.
    """

    def __init__(self, like: Tensor, generator: torch.Generator | None = None):
        self.like = like
        self.generator = generator
        self.times: list[float] = []
        self.values: list[Tensor] = []

    def __call__(self, t: float) -> Tensor:
        i = bisect.bisect_left(self.times, t)
        if i < len(self.times) and self.times[i] == t:
            return self.values[i]
        if not self.times:
            value = torch.zeros_like(self.like)
        elif i == 0:
            value = self.values[0] + math.sqrt(self.times[0] - t) * _randn(self.like, self.generator)
        elif i == len(self.times):
            value = self.values[-1] + math.sqrt(t - self.times[-1]) * _randn(self.like, self.generator)
        else:
            (t0, w0), (t1, w1) = (self.times[i - 1], self.values[i - 1]), (self.times[i], self.values[i])
            frac = (t - t0) / (t1 - t0)
            std = math.sqrt((t - t0) * (t1 - t) / (t1 - t0))
            value = w0 + frac * (w1 - w0) + std * _randn(self.like, self.generator)
        self.times.insert(i, t)
        self.values.insert(i, value)
        return value

    def increment(self, t0: float, t1: float) -> Tensor:
        """(W(t1) - W(t0)) / sqrt(|t1 - t0|): a standard normal, correlated with the increments over
        overlapping intervals exactly as Brownian motion's are."""
        return (self(t1) - self(t0)) / math.sqrt(abs(t1 - t0))


def lms_coefficients(nodes: Sequence[float], start: float, end: float) -> list[float]:
    """Weights w_j with int_start^end p(s) ds = sum_j w_j p(nodes[j]) for every polynomial p of degree
    < len(nodes): the integrals of the Lagrange basis polynomials, by Gauss-Legendre quadrature with
    len(nodes) points (exact up to degree 2 len(nodes) - 1, so exact here)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    k = len(nodes)
    gx, gw = np.polynomial.legendre.leggauss(k)
    half = (end - start) / 2
    tau = (start + end) / 2 + half * gx
    weights = []
    for j in range(k):
        basis = np.ones_like(tau)
        for m in range(k):
            if m != j:
                basis *= (tau - nodes[m]) / (nodes[j] - nodes[m])
        weights.append(float(half * np.sum(gw * basis)))
    return weights


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


def _taylor_from_history(history: Sequence[tuple[float, Tensor]]) -> list[Tensor]:
    """Taylor coefficients c_1, c_2, ... (D^(k)(lambda_0) / k!) at the newest point of the polynomial
    through the (lambda, D) points of `history` (newest first), from Newton divided differences."""
    lams = [lam for lam, _ in history]
    n = len(history)
    if n < 2:
        return []
    table = [d for _, d in history]
    divided = [table[0]]
    for level in range(1, n):
        table = [(table[j] - table[j + 1]) / (lams[j] - lams[j + level]) for j in range(n - level)]
        divided.append(table[0])
    # P(l) = f0 + f01 (l - l0) + f012 (l - l0)(l - l1): expand about l0.
    if n == 2:
        return [divided[1]]
    return [divided[1] + divided[2] * (lams[0] - lams[1]), divided[2]]


# --------------------------------------------------------------------------------------------- model adapter


def denoiser_from_eps(
    eps_model: Callable[[Tensor, Tensor], Tensor], alphas_cumprod: Tensor, *, quantize: bool = False
) -> Denoiser:
    """Wrap a discrete-time eps-prediction model `eps_model(x_t, t)` (SD's UNet, t in [0, T-1]) as a
    denoiser: x at noise level sigma is the model's x_t / sqrt(a_t), so feed x / sqrt(1 + sigma^2)
    at the continuous t whose sigma is sigma, and return x - sigma * eps. `quantize` rounds t to the
    nearest training step (the model only ever saw integer t)."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        t = t_from_sigma(sigma.detach().cpu(), log_sigmas)
        if quantize:
            t = t.round()
        sig = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        eps = eps_model(x / (1 + sig**2).sqrt(), t.to(device=x.device, dtype=torch.float32))
        return x - sig * eps

    return denoiser


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SamplerInfo:
    """What `--sampler list` shows and what tooling needs to know about a sampler.

    order: the deterministic solver's order of convergence in the step size (None for stochastic
    samplers); evals_per_step: denoiser calls per step (first/last steps may differ by one)."""

    name: str
    fn: Callable[..., Tensor]
    order: int | None
    stochastic: bool
    evals_per_step: int
    description: str


SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo("euler", sample_euler, 1, False, 1, "Euler on the probability-flow ODE (= DDIM, eta 0)"),
        SamplerInfo("heun", sample_heun, 2, False, 2, "Heun's 2nd-order method (Karras et al. 2022)"),
        SamplerInfo("dpm2", sample_dpm2, 2, False, 2, "DPM-Solver-2: midpoint in log-sigma"),
        SamplerInfo("lms", sample_lms, 4, False, 1, "linear multistep, order 4, on the uneven sigma grid"),
        SamplerInfo("dpmpp_2m", sample_dpmpp_2m, 2, False, 1, "DPM-Solver++(2M): 2nd-order multistep, x0-pred"),
        SamplerInfo("unipc", sample_unipc, 3, False, 1, "UniPC bh2: order-2 predictor + corrector (order 3)"),
        SamplerInfo("ddim", sample_ddim, 1, False, 1, "DDIM in the sigma form; eta > 0 adds noise"),
        SamplerInfo("plms_sigma", sample_plms_sigma, 2, False, 1, "PLMS (eps Adams-Bashforth + DDIM), reference"),
        SamplerInfo("euler_a", sample_euler_ancestral, None, True, 1, "Euler ancestral (fresh noise each step)"),
        SamplerInfo("dpm2_a", sample_dpm2_ancestral, None, True, 2, "DPM2 ancestral"),
        SamplerInfo("dpmpp_2s_a", sample_dpmpp_2s_ancestral, None, True, 2, "DPM-Solver++(2S) ancestral"),
        SamplerInfo("dpmpp_sde", sample_dpmpp_sde, None, True, 2, "DPM-Solver++ SDE, Brownian-path noise"),
        SamplerInfo("dpmpp_2m_sde", sample_dpmpp_2m_sde, None, True, 1, "DPM-Solver++(2M) SDE"),
        SamplerInfo("dpmpp_3m_sde", sample_dpmpp_3m_sde, None, True, 1, "DPM-Solver++ 3rd-order multistep SDE"),
    )
}


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry for `name`, with the valid names in the error if there is none."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None
